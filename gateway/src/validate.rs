//! Validation of `/execute` bodies, collecting every error in the llama-orch worker's shape:
//! `{"errors":[{"field","constraint","message","value"}]}`. Two stages: the fields
//! ([`ExecuteRequest::validate`] into [`ValidExecute`]), then, once the prompt is tokenized, the
//! context length ([`ValidExecute::check_context`] into [`ValidGenerate`]).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Longest prompt, in Unicode scalar values.
pub const MAX_PROMPT_CHARS: usize = 32_768;
/// Largest `max_tokens`.
pub const MAX_TOKENS: i64 = 2048;
/// Most stop strings.
pub const MAX_STOP: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 100;

/// The `/execute` body as sent (unknown fields ignored). Numbers are read wide so that a value
/// of the right type but out of range is a validation error with the standard shape.
#[derive(Debug, Clone, Deserialize)]
pub struct ExecuteRequest {
    /// Caller's job id.
    pub job_id: String,
    /// The prompt text.
    pub prompt: String,
    /// Tokens to generate at most.
    pub max_tokens: i64,
    /// 0.0..=2.0, default 1.0; below 1e-6 greedy.
    pub temperature: Option<f64>,
    /// RNG seed, default 42.
    pub seed: Option<u64>,
    /// 0.0..=1.0, default 1.0 (off).
    pub top_p: Option<f64>,
    /// Default 0 (off).
    pub top_k: Option<u32>,
    /// 0.0..=2.0, default 1.0 (off).
    pub repetition_penalty: Option<f64>,
    /// 0.0..=1.0, default 0.0 (off).
    pub min_p: Option<f64>,
    /// Stop strings matched on the generated text.
    #[serde(default)]
    pub stop: Vec<String>,
}

/// A request that passed validation: nothing optional left.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidExecute {
    /// Non-empty job id.
    pub job_id: String,
    /// 1..=32768 characters.
    pub prompt: String,
    /// 1..=2048.
    pub max_tokens: u32,
    /// 0.0..=2.0.
    pub temperature: f32,
    /// The RNG seed.
    pub seed: u64,
    /// 0.0..=1.0.
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 0.0..=2.0.
    pub repetition_penalty: f32,
    /// 0.0..=1.0.
    pub min_p: f32,
    /// At most 4, each 1..=100 bytes.
    pub stop: Vec<String>,
}

/// A request that also fits the model's context: prompt tokens + `max_tokens` ≤ `n_ctx`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGenerate {
    /// The checked fields.
    pub request: ValidExecute,
    /// The tokenized prompt.
    pub prompt_ids: Vec<u32>,
}

/// One validation failure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldError {
    /// The field, as named in the request.
    pub field: String,
    /// Which rule: `non_empty`, `length(1..=32768)`, `range(..)`, `max_count(4)`,
    /// `max_length(100)`, `context_length(n)`.
    pub constraint: String,
    /// What is wrong.
    pub message: String,
    /// The offending value (omitted for `prompt` and `stop`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Every validation failure of one request: a 400 response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationErrors {
    /// All of them, in field order.
    pub errors: Vec<FieldError>,
}

impl IntoResponse for ValidationErrors {
    fn into_response(self) -> Response {
        (StatusCode::BAD_REQUEST, axum::Json(self)).into_response()
    }
}

fn range_error(field: &str, value: f64, lo: f64, hi: f64, constraint: &str) -> FieldError {
    let (bound, limit) = if value < lo { ("least", lo) } else { ("most", hi) };
    let shown = if constraint.contains('.') { format!("{limit:.1}") } else { format!("{limit}") };
    FieldError {
        field: field.into(),
        constraint: constraint.into(),
        message: format!("{field} must be at {bound} {shown} (got {value})"),
        value: Some(value.to_string()),
    }
}

fn check_float(
    errors: &mut Vec<FieldError>,
    field: &str,
    value: Option<f64>,
    default: f64,
    lo: f64,
    hi: f64,
) -> f32 {
    let v = value.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        errors.push(range_error(field, v, lo, hi, &format!("range({lo:.1}..={hi:.1})")));
    }
    v as f32
}

impl ExecuteRequest {
    /// Checks every field; returns all failures at once.
    pub fn validate(self) -> Result<ValidExecute, ValidationErrors> {
        let mut errors = Vec::new();
        if self.job_id.is_empty() {
            errors.push(FieldError {
                field: "job_id".into(),
                constraint: "non_empty".into(),
                message: "job_id must not be empty".into(),
                value: Some(String::new()),
            });
        }
        let chars = self.prompt.chars().count();
        if !(1..=MAX_PROMPT_CHARS).contains(&chars) {
            errors.push(FieldError {
                field: "prompt".into(),
                constraint: format!("length(1..={MAX_PROMPT_CHARS})"),
                message: format!(
                    "prompt must be 1 to {MAX_PROMPT_CHARS} characters long (got {chars})"
                ),
                value: None,
            });
        }
        if !(1..=MAX_TOKENS).contains(&self.max_tokens) {
            errors.push(range_error(
                "max_tokens",
                self.max_tokens as f64,
                1.0,
                MAX_TOKENS as f64,
                &format!("range(1..={MAX_TOKENS})"),
            ));
        }
        let temperature = check_float(&mut errors, "temperature", self.temperature, 1.0, 0.0, 2.0);
        let top_p = check_float(&mut errors, "top_p", self.top_p, 1.0, 0.0, 1.0);
        let repetition_penalty =
            check_float(&mut errors, "repetition_penalty", self.repetition_penalty, 1.0, 0.0, 2.0);
        let min_p = check_float(&mut errors, "min_p", self.min_p, 0.0, 0.0, 1.0);
        if self.stop.len() > MAX_STOP {
            errors.push(FieldError {
                field: "stop".into(),
                constraint: format!("max_count({MAX_STOP})"),
                message: format!(
                    "stop must have at most {MAX_STOP} strings (got {})",
                    self.stop.len()
                ),
                value: None,
            });
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() {
                errors.push(FieldError {
                    field: "stop".into(),
                    constraint: "non_empty".into(),
                    message: format!("stop[{i}] must not be empty"),
                    value: None,
                });
            } else if s.len() > MAX_STOP_BYTES {
                errors.push(FieldError {
                    field: "stop".into(),
                    constraint: format!("max_length({MAX_STOP_BYTES})"),
                    message: format!(
                        "stop[{i}] must be at most {MAX_STOP_BYTES} bytes (got {})",
                        s.len()
                    ),
                    value: None,
                });
            }
        }
        if !errors.is_empty() {
            return Err(ValidationErrors { errors });
        }
        Ok(ValidExecute {
            job_id: self.job_id,
            prompt: self.prompt,
            max_tokens: self.max_tokens as u32,
            temperature,
            seed: self.seed.unwrap_or(42),
            top_p,
            top_k: self.top_k.unwrap_or(0),
            repetition_penalty,
            min_p,
            stop: self.stop,
        })
    }
}

impl ValidExecute {
    /// The second stage, after tokenizing: the prompt's `prompt_ids` plus `max_tokens` must fit
    /// the model's context of `n_ctx` tokens.
    pub fn check_context(
        self,
        prompt_ids: Vec<u32>,
        n_ctx: u32,
    ) -> Result<ValidGenerate, ValidationErrors> {
        let (prompt_tokens, max_tokens) = (prompt_ids.len(), self.max_tokens);
        if prompt_tokens + max_tokens as usize > n_ctx as usize {
            return Err(ValidationErrors {
                errors: vec![FieldError {
                    field: "max_tokens".into(),
                    constraint: format!("context_length({n_ctx})"),
                    message: format!(
                        "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {} exceeds the model's context length of {n_ctx} tokens",
                        prompt_tokens + max_tokens as usize
                    ),
                    value: Some(max_tokens.to_string()),
                }],
            });
        }
        Ok(ValidGenerate { request: self, prompt_ids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({"job_id": "j", "prompt": "Hello", "max_tokens": 5})
    }

    fn validate(v: serde_json::Value) -> Result<ValidExecute, ValidationErrors> {
        serde_json::from_value::<ExecuteRequest>(v).unwrap().validate()
    }

    #[test]
    fn defaults_are_the_worker_api_defaults() {
        let v = validate(base()).unwrap();
        assert_eq!(
            (v.temperature, v.seed, v.top_p, v.top_k, v.repetition_penalty, v.min_p),
            (1.0, 42, 1.0, 0, 1.0, 0.0)
        );
    }

    #[test]
    fn the_temperature_error_has_the_documented_shape() {
        let mut v = base();
        v["temperature"] = serde_json::json!(3);
        let e = validate(v).unwrap_err();
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"errors":[{"field":"temperature","constraint":"range(0.0..=2.0)","message":"temperature must be at most 2.0 (got 3)","value":"3"}]})
        );
    }

    #[test]
    fn every_error_is_collected() {
        let v = serde_json::json!({
            "job_id": "", "prompt": "", "max_tokens": 0, "temperature": -1, "top_p": 2, "repetition_penalty": 5,
            "min_p": -0.5, "stop": ["", "x".repeat(101), "a", "b", "c"], "unknown_field": true
        });
        let fields: Vec<(String, String)> =
            validate(v).unwrap_err().errors.into_iter().map(|e| (e.field, e.constraint)).collect();
        let want = [
            ("job_id", "non_empty"),
            ("prompt", "length(1..=32768)"),
            ("max_tokens", "range(1..=2048)"),
            ("temperature", "range(0.0..=2.0)"),
            ("top_p", "range(0.0..=1.0)"),
            ("repetition_penalty", "range(0.0..=2.0)"),
            ("min_p", "range(0.0..=1.0)"),
            ("stop", "max_count(4)"),
            ("stop", "non_empty"),
            ("stop", "max_length(100)"),
        ];
        assert_eq!(fields, want.map(|(a, b)| (a.to_owned(), b.to_owned())));
    }

    #[test]
    fn prompt_and_stop_errors_carry_no_value() {
        let v = serde_json::json!({"job_id": "j", "prompt": "", "max_tokens": 1, "stop": [""]});
        let e = validate(v).unwrap_err();
        assert!(e.errors.iter().all(|e| e.value.is_none()));
    }

    #[test]
    fn the_prompt_limit_counts_characters_not_bytes() {
        let mut v = base();
        v["prompt"] = serde_json::json!("é".repeat(MAX_PROMPT_CHARS));
        assert!(validate(v.clone()).is_ok());
        v["prompt"] = serde_json::json!("é".repeat(MAX_PROMPT_CHARS + 1));
        assert_eq!(validate(v).unwrap_err().errors[0].constraint, "length(1..=32768)");
    }

    #[test]
    fn the_context_holds_the_prompt_and_max_tokens_exactly() {
        let mut v = base();
        v["max_tokens"] = serde_json::json!(1022);
        let valid = validate(v).unwrap();
        assert!(valid.clone().check_context(vec![1, 2], 1024).is_ok());
        let e = valid.check_context(vec![1, 2, 3], 1024).unwrap_err();
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"errors":[{"field":"max_tokens","constraint":"context_length(1024)","message":"prompt (3 tokens) + max_tokens (1022) = 1025 exceeds the model's context length of 1024 tokens","value":"1022"}]})
        );
    }

    #[test]
    fn edges_are_inclusive() {
        let v = serde_json::json!({"job_id": "j", "prompt": "x", "max_tokens": 2048, "temperature": 2.0, "top_p": 0.0, "min_p": 1.0, "repetition_penalty": 0.0, "stop": ["a", "b", "c", "x".repeat(100)]});
        assert!(validate(v).is_ok());
    }
}
