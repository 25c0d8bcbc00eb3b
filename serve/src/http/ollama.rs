//! Ollama's API (`/api/*`).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{ApiError, AppState, Body};

/// Ollama's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Version,
    Tags,
    Show,
    Ps,
    Generate,
    Chat,
    Embed,
    /// The legacy single-input `/api/embeddings`.
    Embeddings,
    /// A route that needs a model registry (pull, push, create, copy, delete): 501.
    Registry(&'static str),
}

pub(super) async fn dispatch(state: Arc<AppState>, route: Route, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let _ = (state, route, req);
    Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "invalid_request_error", "not yet"))
}
