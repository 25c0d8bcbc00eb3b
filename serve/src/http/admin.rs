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
    let registry = state.registry.clone();
    let name = req.model.clone();
    // Unloading joins the engine thread and frees the model: not on an async worker.
    let now = tokio::task::spawn_blocking(move || registry.unload(&name))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the unload failed"))??;
    Ok(json_response(StatusCode::OK, &AdminResponse { model: &req.model, status: if now { "unloaded" } else { "unloading" } }))
}
