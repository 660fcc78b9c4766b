//! `POST /tokenize` and `POST /detokenize` through the tokenizer service, in the shapes vLLM
//! and llama.cpp's server use: `/tokenize` reads `prompt` (vLLM) or `content` (llama.cpp) and
//! answers `{"tokens","count","max_model_len"}`; `/detokenize` reads `tokens` and answers the
//! text as both `prompt` (vLLM) and `content` (llama.cpp).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use llorch_proto::tokenizer::v1 as tpb;
use serde::Deserialize;
use serde_json::json;

use super::error::OpenAiError;
use crate::correlation::CorrelationId;
use crate::error::GatewayError;
use crate::state::AppState;
use crate::upstream::CallContext;

/// A `/tokenize` body.
#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    /// The served model, or absent.
    model: Option<String>,
    /// The text (vLLM's name).
    prompt: Option<String>,
    /// The text (llama.cpp's name).
    content: Option<String>,
    /// Add the model's special tokens (GPT-2 adds none).
    #[serde(default)]
    add_special_tokens: bool,
}

/// A `/detokenize` body.
#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    /// The served model, or absent.
    model: Option<String>,
    /// Token ids.
    tokens: Vec<u32>,
}

/// Parses `body` as `T`, answering OpenAI-style errors.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, OpenAiError> {
    let body = body.map_err(|r| OpenAiError::unreadable_body(r.status(), r.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| OpenAiError::bad_body(format!("invalid body: {e}")))
}

/// 404 unless `model` is absent or the served model.
async fn check_model(app: &AppState, model: Option<&str>) -> Result<u32, OpenAiError> {
    let facts = app.facts().await?;
    match model {
        Some(m) if m != facts.model => Err(OpenAiError::model_not_found(m, &facts.model)),
        _ => Ok(facts.n_ctx),
    }
}

/// `POST /tokenize`.
pub async fn tokenize(
    State(app): State<Arc<AppState>>,
    Extension(correlation): Extension<CorrelationId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: TokenizeRequest = parse(body)?;
        let n_ctx = check_model(&app, req.model.as_deref()).await?;
        let Some(text) = req.prompt.or(req.content) else {
            return Err(OpenAiError::invalid("prompt", "prompt (or content) is required"));
        };
        let msg = tpb::EncodeRequest { text, add_special_tokens: req.add_special_tokens };
        let ids = app
            .upstreams
            .tokenizer
            .clone()
            .encode(CallContext::new(correlation.0, app.config.request_timeout()).request(msg))
            .await
            .map_err(|e| GatewayError::from_status("tokenizer", &e))?
            .into_inner()
            .ids;
        Ok::<_, OpenAiError>(json!({"tokens": ids, "count": ids.len(), "max_model_len": n_ctx}))
    };
    run.await.map_or_else(IntoResponse::into_response, |v| axum::Json(v).into_response())
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(app): State<Arc<AppState>>,
    Extension(correlation): Extension<CorrelationId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: DetokenizeRequest = parse(body)?;
        check_model(&app, req.model.as_deref()).await?;
        let msg = tpb::DecodeRequest { ids: req.tokens, skip_special_tokens: false };
        let text = app
            .upstreams
            .tokenizer
            .clone()
            .decode(CallContext::new(correlation.0, app.config.request_timeout()).request(msg))
            .await
            .map_err(|e| {
                let mut e = OpenAiError::from(GatewayError::from_status("tokenizer", &e));
                if e.status == axum::http::StatusCode::BAD_REQUEST {
                    e.param = Some("tokens".to_owned());
                }
                e
            })?
            .into_inner()
            .text;
        Ok::<_, OpenAiError>(json!({"prompt": text, "content": text}))
    };
    run.await.map_or_else(IntoResponse::into_response, |v| axum::Json(v).into_response())
}
