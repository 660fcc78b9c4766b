//! `X-Correlation-ID`: echoed when the caller sends a UUID, generated otherwise; every log line
//! of the request carries it (the request span), and it is forwarded to the upstreams.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

/// The header name.
pub const HEADER: &str = "x-correlation-id";

/// The request's correlation id, in the request extensions.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// Middleware: picks the id, opens the request span, echoes the header.
pub async fn layer(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v.trim()).ok())
        .unwrap_or_else(uuid::Uuid::new_v4)
        .hyphenated()
        .to_string();
    req.extensions_mut().insert(CorrelationId(id.clone()));
    let span = tracing::info_span!("request", correlation_id = %id, method = %req.method(), path = %req.uri().path(), job_id = tracing::field::Empty);
    let mut resp = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(HEADER, v);
    }
    resp
}
