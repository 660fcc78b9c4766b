//! OpenAI-compatible routes beside the worker API: `GET /v1/models`, `POST /v1/completions`,
//! `POST /v1/chat/completions` (a clear 400: GPT-2 has no chat template), and vLLM/llama.cpp's
//! `POST /tokenize` and `POST /detokenize`. Completions run as the same jobs as `/execute`
//! ([`crate::job`]); only the request parsing and the wire format are OpenAI's.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::state::AppState;

pub mod completions;
pub mod error;
pub mod logprobs;
pub mod request;
pub mod tokenize;

use error::OpenAiError;

/// The OpenAI-compatible routes (merged into [`crate::server::router`]).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
}

/// `GET /v1/models`: the one served model, with its context length.
async fn models(State(app): State<Arc<AppState>>) -> Response {
    match app.facts().await {
        Ok(f) => axum::Json(json!({
            "object": "list",
            "data": [{
                "id": f.model,
                "object": "model",
                "created": 0,
                "owned_by": "llorch",
                "context_length": f.n_ctx,
                "max_model_len": f.n_ctx,
            }],
        }))
        .into_response(),
        Err(e) => OpenAiError::from(e).into_response(),
    }
}

/// `POST /v1/chat/completions`: refused with 400, not 404, so that a client learns why.
async fn chat_completions() -> Response {
    OpenAiError::invalid(
        "messages",
        "chat completions are not supported: this model (GPT-2) has no chat template; \
         use POST /v1/completions with a text prompt",
    )
    .into_response()
}
