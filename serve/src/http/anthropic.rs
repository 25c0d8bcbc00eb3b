//! Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`).

use std::sync::Arc;

use hyper::{Response, StatusCode};
use serde::Deserialize;

use super::{ApiError, AppState, Body};

#[derive(Deserialize)]
pub(super) struct MessagesRequest {}

pub(super) async fn messages(state: Arc<AppState>, req: MessagesRequest) -> Result<Response<Body>, ApiError> {
    let _ = (state, req);
    Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "invalid_request_error", "not yet"))
}

pub(super) async fn count_tokens(state: Arc<AppState>, req: MessagesRequest) -> Result<Response<Body>, ApiError> {
    let _ = (state, req);
    Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "invalid_request_error", "not yet"))
}
