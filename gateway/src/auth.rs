//! The API key on HTTP: with `--api-key` (or `--api-key-file`), every request except
//! `--public-paths` must carry `Authorization: Bearer <key>` (compared in constant time,
//! [`ApiKey::accepts`](llorch_common::auth::ApiKey::accepts)); others get 401 with
//! `WWW-Authenticate: Bearer`, in the OpenAI shape under `/v1/` and the worker API's elsewhere.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ErrorKind, GatewayError};
use crate::openai::error::OpenAiError;
use crate::state::AppState;

/// Middleware: passes requests that carry the key (or need none), refuses the rest.
pub async fn layer(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &app.api_key else { return next.run(req).await };
    let path = req.uri().path();
    if app.config.public_paths.iter().any(|p| p == path)
        || key.accepts(req.headers().get(header::AUTHORIZATION))
    {
        return next.run(req).await;
    }
    let given = req.headers().contains_key(header::AUTHORIZATION);
    tracing::warn!(path, authorization_given = given, "request without a valid API key refused");
    let message = if given {
        "the API key is not valid"
    } else {
        "this worker requires an API key: send `Authorization: Bearer <key>`"
    };
    let err = GatewayError::new(ErrorKind::Unauthorized, message);
    let mut resp = if path.starts_with("/v1/") {
        OpenAiError::from(err).into_response()
    } else {
        err.into_response()
    };
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"llorch\""));
    resp
}
