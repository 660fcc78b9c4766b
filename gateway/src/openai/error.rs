//! Errors in OpenAI's shape, `{"error":{"message","type","param","code"}}`, with the statuses
//! OpenAI uses: 400 invalid request, 404 unknown model, 413 body too large, 429 overloaded (with
//! `Retry-After`), 503 draining or an upstream down. Built from the same [`GatewayError`] and
//! [`ValidationErrors`] the worker API answers with, so both routes refuse for the same reasons.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use crate::error::{ErrorKind, GatewayError};
use crate::job::Refusal;
use crate::validate::ValidationErrors;

/// One OpenAI-style error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What is wrong, for a person.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, …).
    pub code: Option<String>,
}

/// The `error` object of the body (and of an error chunk in a stream).
#[derive(Debug, Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl OpenAiError {
    /// A 400 about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_owned()),
            code: None,
        }
    }

    /// A 400 about the body as a whole (not JSON, not an object).
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self { param: None, ..Self::invalid("", message) }
    }

    /// 404 `model_not_found`: the request named a model this worker does not serve.
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{asked}` does not exist; this server serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".to_owned()),
            code: Some("model_not_found".to_owned()),
        }
    }

    /// A body the server would not read: 413 when over `--max-body-bytes`, else 400.
    pub fn unreadable_body(status: StatusCode, message: String) -> Self {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self {
                status,
                message,
                kind: "invalid_request_error",
                param: None,
                code: Some("request_too_large".to_owned()),
            }
        } else {
            Self::bad_body(message)
        }
    }

    /// The `{"error":{…}}` JSON.
    pub fn body(&self) -> serde_json::Value {
        let error = ErrorObject {
            message: &self.message,
            kind: self.kind,
            param: self.param.as_deref(),
            code: self.code.as_deref(),
        };
        json!({ "error": error })
    }
}

impl From<ValidationErrors> for OpenAiError {
    /// Every message in one, the first failing field as `param`; a context overflow (its
    /// message names both numbers) has the code `context_length_exceeded`.
    fn from(errors: ValidationErrors) -> Self {
        let messages: Vec<&str> = errors.errors.iter().map(|e| e.message.as_str()).collect();
        let first = errors.errors.first();
        let overflow = errors.errors.iter().any(|e| e.constraint.starts_with("context_length("));
        Self {
            param: first.map(|e| e.field.clone()),
            code: overflow.then(|| "context_length_exceeded".to_owned()),
            ..Self::invalid("", messages.join("; "))
        }
    }
}

impl From<GatewayError> for OpenAiError {
    fn from(e: GatewayError) -> Self {
        let kind = match e.kind {
            ErrorKind::InvalidRequest
            | ErrorKind::Conflict
            | ErrorKind::Unauthorized
            | ErrorKind::Cancelled => "invalid_request_error",
            ErrorKind::Overloaded => "rate_limit_error",
            ErrorKind::Unavailable
            | ErrorKind::Timeout
            | ErrorKind::UpstreamLost
            | ErrorKind::Internal => "server_error",
        };
        let code = match e.kind {
            ErrorKind::Overloaded => "rate_limit_exceeded".to_owned(),
            ErrorKind::Unauthorized => "invalid_api_key".to_owned(),
            ErrorKind::InvalidRequest
            | ErrorKind::Conflict
            | ErrorKind::Unavailable
            | ErrorKind::Timeout
            | ErrorKind::Cancelled
            | ErrorKind::UpstreamLost
            | ErrorKind::Internal => e.code().to_ascii_lowercase(),
        };
        Self { status: e.status(), message: e.message, kind, param: None, code: Some(code) }
    }
}

impl From<Refusal> for OpenAiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Invalid(errors) => errors.into(),
            Refusal::Error(e) => e.into(),
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::FieldError;

    #[test]
    fn an_overflow_names_both_numbers_and_has_openai_code() {
        let errors = ValidationErrors {
            errors: vec![FieldError {
                field: "max_tokens".into(),
                constraint: "context_length(1024)".into(),
                message: "prompt (3 tokens) + max_tokens (1022) = 1025 exceeds the model's context length of 1024 tokens".into(),
                value: Some("1022".into()),
            }],
        };
        let e = OpenAiError::from(errors);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body(),
            json!({"error": {
                "message": "prompt (3 tokens) + max_tokens (1022) = 1025 exceeds the model's context length of 1024 tokens",
                "type": "invalid_request_error", "param": "max_tokens", "code": "context_length_exceeded"}})
        );
    }

    #[test]
    fn overload_is_429_with_retry_after() {
        let e = OpenAiError::from(GatewayError::new(ErrorKind::Overloaded, "busy"));
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn draining_is_503_server_error() {
        let e = OpenAiError::from(GatewayError::new(ErrorKind::Unavailable, "shutting down"));
        assert_eq!((e.status, e.kind), (StatusCode::SERVICE_UNAVAILABLE, "server_error"));
        assert_eq!(e.code.as_deref(), Some("worker_unhealthy"));
    }
}
