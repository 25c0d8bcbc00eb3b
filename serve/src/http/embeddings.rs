//! OpenAI's `POST /v1/embeddings`: `input` as a string, an array of strings, an array of
//! token ids or an array of token-id arrays; `encoding_format` `float` or `base64`;
//! `dimensions` only when it is the model's own. The request goes through the model's
//! engine like a completion (admission, limits, metrics; `engine::embed`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::openai::KeepAliveField;
use super::{blocking, clip, json_response, ApiError, AppState, Body};
use crate::engine::{EmbedFailure, EmbedInput, EmbedRequest, MAX_EMBED_INPUTS};
use crate::registry::KeepAlive;

#[derive(Deserialize)]
pub(super) struct EmbeddingsRequest {
    model: Option<String>,
    input: Option<Value>,
    encoding_format: Option<String>,
    dimensions: Option<Value>,
    /// llama-server's extension: the normalisation (`--embd-normalize`: -1 none, 0
    /// max-absolute, 1 taxicab, 2 Euclidean, the default, p > 2 a p-norm).
    embd_normalize: Option<i32>,
    keep_alive: Option<KeepAliveField>,
    /// OpenAI's end-user id: accepted, unused.
    #[serde(rename = "user")]
    _user: Option<Value>,
}

#[derive(Serialize)]
struct EmbeddingsResponse<'a> {
    object: &'static str,
    data: Vec<Embedding>,
    model: &'a str,
    usage: Usage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: usize,
    embedding: Encoded,
}

/// A vector as floats (serialized as f32, the shortest form that reads back exactly), or
/// as base64 of its little-endian f32 bytes.
#[derive(Serialize)]
#[serde(untagged)]
enum Encoded {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// The inputs of `input`, each checked for shape (token ids are checked against the
/// vocabulary by the engine). The count is checked before anything is converted.
fn inputs(input: Option<Value>) -> Result<Vec<EmbedInput>, ApiError> {
    let shape = "'input' must be a string, an array of strings, an array of token ids or an array of token-id arrays";
    let param = Some("input");
    let ids = |index: usize, items: Vec<Value>| -> Result<Vec<i64>, ApiError> {
        items
            .into_iter()
            .map(|v| match &v {
                Value::Number(n) => n.as_i64().or_else(|| n.as_u64().map(|_| i64::MAX)).ok_or(()),
                _ => Err(()),
            }
            .map_err(|()| ApiError::bad_request(format!("input {index}: {} is not a token id", clip(&v.to_string(), 40)), param)))
            .collect()
    };
    match input {
        None | Some(Value::Null) => Err(ApiError::bad_request("'input' is required", param)),
        Some(Value::String(s)) => Ok(vec![EmbedInput::Text(s)]),
        Some(Value::Array(items)) => {
            if items.is_empty() {
                return Err(ApiError::bad_request("'input' is an empty array: give at least one input", param));
            }
            // A flat array of numbers is one input of token ids (its length is checked
            // against the token limit by the engine).
            if items.iter().all(Value::is_number) {
                return Ok(vec![EmbedInput::Tokens(ids(0, items)?)]);
            }
            if items.iter().any(Value::is_number) {
                return Err(ApiError::bad_request("'input' mixes token ids with other values: give one array of token ids, or an array of inputs", param));
            }
            if items.len() > MAX_EMBED_INPUTS {
                return Err(ApiError::bad_request(format!("{} inputs is over the limit of {MAX_EMBED_INPUTS}", items.len()), param));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(EmbedInput::Text(s)),
                    Value::Array(a) => Ok(EmbedInput::Tokens(ids(i, a)?)),
                    other => Err(ApiError::bad_request(format!("input {i}: {} is neither a string nor an array of token ids", clip(&other.to_string(), 40)), param)),
                })
                .collect()
        }
        Some(_) => Err(ApiError::bad_request(shape, param)),
    }
}

/// The width of the model's vectors from its file: `<arch>.embedding_length_out` where a
/// model's output width differs from its hidden size (llama.cpp's `n_embd_out`), else
/// `<arch>.embedding_length`.
fn width(model: &llama_host::Model) -> Option<u64> {
    let arch = model.meta("general.architecture")?;
    let key = |k: &str| model.meta(&format!("{arch}.{k}")).and_then(|v| v.trim().parse().ok());
    key("embedding_length_out").or_else(|| key("embedding_length"))
}

pub(super) async fn embeddings(state: Arc<AppState>, req: EmbeddingsRequest) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::bad_request(format!("encoding_format must be 'float' or 'base64', not '{}'", clip(other, 40)), Some("encoding_format"))),
    };
    let normalize = llama_host::Normalize::new(req.embd_normalize.unwrap_or(2)).map_err(|e| ApiError::bad_request(e.to_string(), Some("embd_normalize")))?;
    let dimensions = match &req.dimensions {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|&d| d > 0).ok_or_else(|| ApiError::bad_request("dimensions must be a whole number above 0", Some("dimensions")))?),
    };
    let keep_alive = req.keep_alive.as_ref().map(KeepAliveField::parse).transpose()?;
    let inputs = inputs(req.input)?;
    let out = embed(&state, req.model.as_deref(), keep_alive, inputs, normalize, dimensions).await?;
    let data = out
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| Embedding {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Encoded::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Encoded::Float(v)
            },
        })
        .collect();
    let usage = Usage { prompt_tokens: out.prompt_tokens, total_tokens: out.prompt_tokens };
    Ok(json_response(StatusCode::OK, &EmbeddingsResponse { object: "list", data, model: &out.model, usage }))
}

/// What an embedding request gave, in no dialect.
pub(super) struct Embedded {
    /// One vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    /// The model's name, as the request should be answered with it.
    pub model: String,
    /// How long the request waited for its model to be loaded (Ollama's `load_duration`).
    pub load: Duration,
}

/// The embedding path every dialect shares (OpenAI's /v1/embeddings, Ollama's /api/embed
/// and /api/embeddings): the model's lease (loading it on demand), the pooling check, the
/// width check when `dimensions` is given, admission (503 at once when full), submission on
/// a blocking thread (tokenizing), and the wait. `inputs` are already checked for shape.
pub(super) async fn embed(
    state: &Arc<AppState>,
    model: Option<&str>,
    keep_alive: Option<KeepAlive>,
    inputs: Vec<EmbedInput>,
    normalize: llama_host::Normalize,
    dimensions: Option<u64>,
) -> Result<Embedded, ApiError> {
    let asked = Instant::now();
    let lease = state.registry.acquire(model, keep_alive).await?;
    let load = asked.elapsed();
    let engine = lease.ready.engine.clone();
    if let Some(reason) = engine.embed_refusal() {
        return Err(ApiError::bad_request(format!("the model '{}' cannot compute embeddings as served: {}", clip(lease.name(), 64), clip(reason, 300)), Some("model"))
            .code("embeddings_unsupported"));
    }
    if let Some(d) = dimensions {
        match width(engine.model()) {
            Some(w) if w == d => {}
            Some(w) => {
                return Err(ApiError::bad_request(
                    format!("this model's embeddings have {w} dimensions; it cannot give {d} (leave dimensions out, or ask for {w})"),
                    Some("dimensions"),
                ))
            }
            None => return Err(ApiError::bad_request("this model does not say its embedding width; leave dimensions out", Some("dimensions"))),
        }
    }
    // Admission before any work: a full engine answers 503 at once.
    let reservation = engine.reserve()?;
    let handle = blocking(state, move || reservation.submit_embed(EmbedRequest { inputs, normalize, deadline: None })).await??;
    // A client that goes away drops this future and the handle with it: the request is
    // cancelled before its next batch.
    let out = handle.wait().await.map_err(|e| match e {
        EmbedFailure::Cancelled | EmbedFailure::Timeout => ApiError::cancelled(),
        EmbedFailure::Error(why) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", clip(&why, 300)).code("embedding_failed"),
    })?;
    let model = lease.name().to_string();
    drop(lease);
    Ok(Embedded { vectors: out.vectors, prompt_tokens: out.prompt_tokens, model, load })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(v: Value) -> Result<Vec<String>, String> {
        inputs(Some(v)).map(|i| i.iter().map(|x| format!("{x:?}")).collect()).map_err(|e| e.message)
    }

    #[test]
    fn every_input_shape_openai_allows() {
        assert_eq!(shape(serde_json::json!("a")).unwrap(), vec!["Text(\"a\")"]);
        assert_eq!(shape(serde_json::json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(shape(serde_json::json!([1, 2, 3])).unwrap(), vec!["Tokens([1, 2, 3])"]);
        assert_eq!(shape(serde_json::json!([[1, 2], [3]])).unwrap(), vec!["Tokens([1, 2])", "Tokens([3])"]);
        assert_eq!(shape(serde_json::json!(["a", [3]])).unwrap().len(), 2);
    }

    #[test]
    fn bad_shapes_name_the_problem() {
        assert!(shape(serde_json::json!([])).unwrap_err().contains("empty array"));
        assert!(shape(serde_json::json!(7)).unwrap_err().contains("must be a string"));
        assert!(shape(serde_json::json!({"a": 1})).unwrap_err().contains("must be a string"));
        assert!(shape(serde_json::json!(["a", 7.5])).unwrap_err().contains("mixes token ids"));
        assert!(shape(serde_json::json!([1, null])).unwrap_err().contains("mixes token ids"));
        assert!(shape(serde_json::json!(["a", null])).unwrap_err().contains("input 1: null"));
        assert!(shape(serde_json::json!([[1, "x"]])).unwrap_err().contains("input 0: \"x\" is not a token id"));
        assert!(shape(serde_json::json!([1.5])).unwrap_err().contains("1.5"));
        assert!(inputs(None).unwrap_err().message.contains("required"));
        let many: Vec<&str> = vec!["a"; MAX_EMBED_INPUTS + 1];
        assert!(shape(serde_json::json!(many)).unwrap_err().contains("over the limit of 2048"));
        // One input of 3,000 token ids is one input, not 3,000.
        let ids: Vec<u32> = vec![5; 3000];
        assert_eq!(shape(serde_json::json!(ids)).unwrap().len(), 1);
        // A huge id stays an id the engine refuses by name, never a wrapped-around one.
        assert_eq!(shape(serde_json::json!([u64::MAX])).unwrap(), vec![format!("Tokens([{}])", i64::MAX)]);
    }
}
