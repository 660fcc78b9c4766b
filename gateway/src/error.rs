//! Errors of the gateway by kind, mapped exhaustively to HTTP statuses (before the stream
//! starts) and to SSE error codes (after). Every `{"code","message","retriable"}` body, HTTP or
//! SSE, is an [`ErrorBody`] built by [`GatewayError::body`].

use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// What went wrong, coarse enough to pick a status and an SSE code from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is invalid (400).
    InvalidRequest,
    /// A job with the same id is running (409 / `INVALID_REQUEST`).
    Conflict,
    /// The request lacks the API key (401 / `UNAUTHORIZED`).
    Unauthorized,
    /// Too much work already (429, retriable).
    Overloaded,
    /// An upstream service is down, or the worker is draining (503, retriable).
    Unavailable,
    /// The job's time budget ran out (504 / `TIMEOUT`).
    Timeout,
    /// The job was cancelled (499 / `CANCELLED`).
    Cancelled,
    /// An upstream failed in the middle of a job (502 / `INFERENCE_FAILED`, retriable).
    UpstreamLost,
    /// Anything else (500 / `INFERENCE_FAILED`).
    Internal,
}

/// A gateway error: its kind and a message safe to show the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct GatewayError {
    /// The kind.
    pub kind: ErrorKind,
    /// A message safe to show the client (internal detail is logged, not sent).
    pub message: String,
}

impl GatewayError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    /// Maps a gRPC status from an upstream, logging its detail.
    pub fn from_status(upstream: &str, status: &tonic::Status) -> Self {
        use tonic::Code;
        let kind = match status.code() {
            Code::InvalidArgument
            | Code::OutOfRange
            | Code::FailedPrecondition
            | Code::AlreadyExists => ErrorKind::InvalidRequest,
            Code::ResourceExhausted => ErrorKind::Overloaded,
            Code::Unavailable | Code::Unknown | Code::Aborted => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            // tonic's client ends a call that ran past its timeout with this status.
            Code::Cancelled if status.message() == "Timeout expired" => ErrorKind::Timeout,
            Code::Cancelled => ErrorKind::Cancelled,
            Code::Ok
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => ErrorKind::Internal,
        };
        tracing::warn!(upstream, code = ?status.code(), message = status.message(), "upstream error");
        let message = match kind {
            ErrorKind::InvalidRequest | ErrorKind::Conflict | ErrorKind::Unauthorized => {
                status.message().to_owned()
            }
            ErrorKind::Overloaded => "the engine queue is full; retry later".to_owned(),
            ErrorKind::Unavailable => format!("the {upstream} service is unavailable"),
            ErrorKind::Timeout => "the request timed out".to_owned(),
            ErrorKind::Cancelled => "the job was cancelled".to_owned(),
            ErrorKind::UpstreamLost | ErrorKind::Internal => {
                format!("the {upstream} service failed")
            }
        };
        Self { kind, message }
    }

    /// The HTTP status before the stream starts.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            ErrorKind::UpstreamLost => StatusCode::BAD_GATEWAY,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `code` of the JSON error body / SSE `error` event.
    pub fn code(&self) -> &'static str {
        match self.kind {
            ErrorKind::InvalidRequest | ErrorKind::Conflict => "INVALID_REQUEST",
            ErrorKind::Unauthorized => "UNAUTHORIZED",
            ErrorKind::Overloaded => "OVERLOADED",
            ErrorKind::Unavailable => "WORKER_UNHEALTHY",
            ErrorKind::Timeout => "TIMEOUT",
            ErrorKind::Cancelled => "CANCELLED",
            ErrorKind::UpstreamLost | ErrorKind::Internal => "INFERENCE_FAILED",
        }
    }

    /// Whether retrying the same request may succeed.
    pub fn retriable(&self) -> bool {
        match self.kind {
            ErrorKind::Overloaded
            | ErrorKind::Unavailable
            | ErrorKind::Timeout
            | ErrorKind::UpstreamLost => true,
            ErrorKind::InvalidRequest
            | ErrorKind::Conflict
            | ErrorKind::Unauthorized
            | ErrorKind::Cancelled
            | ErrorKind::Internal => false,
        }
    }

    /// `{"code","message","retriable"}`.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { code: self.code(), message: self.message.clone(), retriable: self.retriable() }
    }
}

/// The JSON body of a refusal, and the payload of the SSE `error` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    /// `INVALID_REQUEST`, `UNAUTHORIZED`, `OVERLOADED`, `WORKER_UNHEALTHY`, `TIMEOUT`,
    /// `CANCELLED`, `INFERENCE_FAILED`.
    pub code: &'static str,
    /// What happened.
    pub message: String,
    /// Whether to retry.
    pub retriable: bool,
}

impl GatewayError {
    /// The refusal as an HTTP response with `status`: the body, and `Retry-After` when
    /// overloaded.
    fn response_with(&self, status: StatusCode) -> Response {
        let mut resp = (status, axum::Json(self.body())).into_response();
        if self.kind == ErrorKind::Overloaded {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.response_with(self.status())
    }
}

/// A JSON-body rejection with the worker's error shape, keeping axum's status (400 bad JSON,
/// 415 wrong content type, 422 missing or mistyped field, 413 too large).
pub fn json_rejection(rejection: &JsonRejection) -> Response {
    GatewayError::new(ErrorKind::InvalidRequest, rejection.body_text())
        .response_with(rejection.status())
}
