//! `X-Correlation-ID`: echoed when the caller sends a UUID, generated otherwise; every log line
//! of the request carries it (recorded on the request span, [`crate::server::http_span`]), and
//! it is forwarded to the upstreams.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

/// The header name.
pub const HEADER: &str = "x-correlation-id";

/// The request's correlation id, in the request extensions.
#[derive(Debug, Clone)]
pub struct CorrelationId(pub String);

/// Middleware: picks the id, records it on the request span, echoes the header.
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
    tracing::Span::current().record("correlation_id", id.as_str());
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(HEADER, v);
    }
    resp
}
