//! The model admin routes, behind the API key like every route but /health:
//! `POST /models/load` (answers once the model is ready) and `POST /models/unload` (now when
//! idle, else once its requests end).

use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{json_response, ApiError, AppState, Body};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminRequest {
    model: String,
}

#[derive(Serialize)]
struct AdminResponse<'a> {
    model: &'a str,
    /// `loaded`, `unloaded`, or `unloading` (busy: unloaded once its requests end).
    status: &'static str,
}

pub(super) async fn load(state: Arc<AppState>, req: AdminRequest) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let lease = state.registry.acquire(Some(&req.model), None).await?;
    drop(lease);
    Ok(json_response(StatusCode::OK, &AdminResponse { model: &req.model, status: "loaded" }))
}

pub(super) async fn unload(state: Arc<AppState>, req: AdminRequest) -> Result<Response<Body>, ApiError> {
    state.serving()?;
    let now = unload_model(&state, req.model.clone()).await?;
    Ok(json_response(StatusCode::OK, &AdminResponse { model: &req.model, status: if now { "unloaded" } else { "unloading" } }))
}

/// Unloads `name` now when idle, else once its requests end (`Ok(true)`: now, or it was
/// not loaded); Ollama's `keep_alive: 0` unloads through here too. Unloading joins the
/// engine thread and frees the model: on a blocking thread, not an async worker.
pub(super) async fn unload_model(state: &Arc<AppState>, name: String) -> Result<bool, ApiError> {
    let registry = state.registry.clone();
    Ok(tokio::task::spawn_blocking(move || registry.unload(&name))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the unload failed"))??)
}
