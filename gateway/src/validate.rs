//! Validation of `/execute` bodies, collecting every error in the llama-orch worker's shape:
//! `{"errors":[{"field","constraint","message","value"}]}`. Two stages: the fields
//! ([`ExecuteRequest::validate`] into [`ValidExecute`]), then, once the prompt is tokenized, the
//! model's limits ([`ValidExecute::check_context`] into [`ValidGenerate`]): the engine's largest
//! `max_new_tokens` and the context length, both from the engine's `Info`.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Longest prompt, in Unicode scalar values.
pub const MAX_PROMPT_CHARS: usize = 32_768;
/// Largest `max_tokens` the worker API accepts; the model's limits (checked after tokenizing)
/// may be lower.
pub const MAX_TOKENS: i64 = 2048;
/// Largest `|presence_penalty|` and `|frequency_penalty|` (OpenAI's range).
pub const MAX_PENALTY: f64 = 2.0;
/// Largest `|logit_bias|` value (OpenAI's range).
pub const MAX_LOGIT_BIAS: f64 = 100.0;
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

/// Most prompt token ids (a prompt given as ids; the model's context is the real limit).
pub const MAX_PROMPT_IDS: usize = MAX_PROMPT_CHARS;
/// Most top alternatives per token (`logprobs`; the engine's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u32 = 5;

/// A prompt: text to tokenize, or token ids as they are (OpenAI's token-id prompts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// 1..=32768 characters, tokenized by the tokenizer service.
    Text(String),
    /// 1..=32768 ids, each checked against the vocabulary once it is known.
    Ids(Vec<u32>),
}

impl Prompt {
    /// The error of an id prompt with an id not below `vocab_size`.
    pub fn id_errors(&self, vocab_size: u32) -> Vec<FieldError> {
        let Self::Ids(ids) = self else { return Vec::new() };
        let Some((i, id)) = ids.iter().enumerate().find(|&(_, &id)| id >= vocab_size) else {
            return Vec::new();
        };
        vec![token_id_error("prompt", &format!("prompt[{i}]: token id"), *id, vocab_size)]
    }
}

/// A request that passed validation: nothing optional left.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidExecute {
    /// Non-empty job id.
    pub job_id: String,
    /// 1..=32768 characters, or 1..=32768 token ids.
    pub prompt: Prompt,
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
    /// Engine options the worker API does not expose (its fields are fixed); off for
    /// `/execute`. Routes that offer them (OpenAI's) fill them in after
    /// [`EngineOptions::errors`] found nothing wrong.
    pub engine: EngineOptions,
}

/// Sampling and stopping options of the engine's `Generate` beyond the worker API's fields.
/// The default is off: no penalty, no bias, stop at end-of-text, no stop ids.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineOptions {
    /// OpenAI presence penalty over the generated tokens, -2.0..=2.0.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over the generated tokens, -2.0..=2.0.
    pub frequency_penalty: f32,
    /// Token id → bias added to its logit, -100.0..=100.0; ids below the vocabulary size.
    pub logit_bias: BTreeMap<u32, f32>,
    /// Keep generating past the end-of-text token.
    pub ignore_eos: bool,
    /// Ids that end generation once generated (the id is part of the output).
    pub stop_token_ids: Vec<u32>,
    /// Report each generated token's logprob and this many most likely alternatives
    /// (0..=5); `None`: no logprobs.
    pub logprobs: Option<u32>,
}

impl EngineOptions {
    /// Everything wrong with these options for a vocabulary of `vocab_size` ids, in field
    /// order (empty when they are fine); fields named as OpenAI names them.
    pub fn errors(&self, vocab_size: u32) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let (lo, hi) = (-MAX_PENALTY, MAX_PENALTY);
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            check_float(&mut errors, field, Some(f64::from(v)), 0.0, lo, hi);
        }
        for (&id, &bias) in &self.logit_bias {
            if id >= vocab_size {
                errors.push(token_id_error("logit_bias", "logit_bias token", id, vocab_size));
            }
            let bias = f64::from(bias);
            if !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias) {
                let mut e = range_error("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS);
                e.message = format!("logit_bias of token {id}: {}", e.message);
                errors.push(e);
            }
        }
        if let Some(id) = self.stop_token_ids.iter().find(|&&id| id >= vocab_size) {
            errors.push(token_id_error("stop_token_ids", "stop_token_ids:", *id, vocab_size));
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            let max = i64::from(MAX_TOP_LOGPROBS);
            errors.push(int_range_error("logprobs", i64::from(n), 0, max, ""));
        }
        errors
    }
}

/// The model's limits on `max_tokens`, from the engine's `Info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelLimits {
    /// Context length: prompt tokens + `max_tokens` must not exceed it.
    pub n_ctx: u32,
    /// The engine's largest `max_new_tokens` (its `--max-new-tokens-limit`).
    pub max_new_tokens: u32,
}

/// A request that also fits the model: `max_tokens` ≤ the engine's limit and prompt tokens +
/// `max_tokens` ≤ `n_ctx`.
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

/// A token id of `field` not below `vocab_size`; the message starts with `what`.
fn token_id_error(field: &str, what: &str, id: u32, vocab_size: u32) -> FieldError {
    FieldError {
        field: field.into(),
        constraint: format!("token_id(0..{vocab_size})"),
        message: format!("{what} {id} is not below the vocabulary size {vocab_size}"),
        value: Some(id.to_string()),
    }
}

/// `field` outside `lo..=hi` (floats; the limits printed with one decimal, as in the
/// constraint `range(0.0..=2.0)`).
fn range_error(field: &str, value: f64, lo: f64, hi: f64) -> FieldError {
    let (bound, limit) = if value < lo { ("least", lo) } else { ("most", hi) };
    FieldError {
        field: field.into(),
        constraint: format!("range({lo:.1}..={hi:.1})"),
        message: format!("{field} must be at {bound} {limit:.1} (got {value})"),
        value: Some(value.to_string()),
    }
}

/// Integer `field` outside `lo..=hi`: every number printed as the integer it is.
fn int_range_error(field: &str, value: i64, lo: i64, hi: i64, why: &str) -> FieldError {
    let (bound, limit) = if value < lo { ("least", lo) } else { ("most", hi) };
    FieldError {
        field: field.into(),
        constraint: format!("range({lo}..={hi})"),
        message: format!("{field} must be at {bound} {limit}{why} (got {value})"),
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
        errors.push(range_error(field, v, lo, hi));
    }
    v as f32
}

impl ExecuteRequest {
    /// Checks every field; returns all failures at once.
    pub fn validate(mut self) -> Result<ValidExecute, ValidationErrors> {
        let prompt = Prompt::Text(std::mem::take(&mut self.prompt));
        self.validate_with(prompt)
    }

    /// The checks of [`Self::validate`] with `prompt` (text or token ids) in place of the
    /// `prompt` field, for routes whose prompt may be token ids.
    pub fn validate_with(self, prompt: Prompt) -> Result<ValidExecute, ValidationErrors> {
        let mut errors = Vec::new();
        if self.job_id.is_empty() {
            errors.push(FieldError {
                field: "job_id".into(),
                constraint: "non_empty".into(),
                message: "job_id must not be empty".into(),
                value: Some(String::new()),
            });
        }
        let (len, max, unit) = match &prompt {
            Prompt::Text(text) => (text.chars().count(), MAX_PROMPT_CHARS, "characters long"),
            Prompt::Ids(ids) => (ids.len(), MAX_PROMPT_IDS, "token ids"),
        };
        if !(1..=max).contains(&len) {
            errors.push(FieldError {
                field: "prompt".into(),
                constraint: format!("length(1..={max})"),
                message: format!("prompt must be 1 to {max} {unit} (got {len})"),
                value: None,
            });
        }
        if !(1..=MAX_TOKENS).contains(&self.max_tokens) {
            errors.push(int_range_error("max_tokens", self.max_tokens, 1, MAX_TOKENS, ""));
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
            prompt,
            max_tokens: self.max_tokens as u32,
            temperature,
            seed: self.seed.unwrap_or(42),
            top_p,
            top_k: self.top_k.unwrap_or(0),
            repetition_penalty,
            min_p,
            stop: self.stop,
            engine: EngineOptions::default(),
        })
    }
}

impl ValidExecute {
    /// The second stage, after tokenizing: `max_tokens` must not exceed the engine's limit, and
    /// the prompt's `prompt_ids` plus `max_tokens` must fit the model's context. Both failures
    /// are reported together, each naming the numbers involved.
    pub fn check_context(
        self,
        prompt_ids: Vec<u32>,
        limits: ModelLimits,
    ) -> Result<ValidGenerate, ValidationErrors> {
        let (prompt_tokens, max_tokens) = (prompt_ids.len(), self.max_tokens);
        let n_ctx = limits.n_ctx;
        let mut errors = Vec::new();
        if max_tokens > limits.max_new_tokens {
            let why = ", the engine's limit for this model";
            let max = i64::from(limits.max_new_tokens);
            errors.push(int_range_error("max_tokens", i64::from(max_tokens), 1, max, why));
        }
        if prompt_tokens + max_tokens as usize > n_ctx as usize {
            errors.push(FieldError {
                field: "max_tokens".into(),
                constraint: format!("context_length({n_ctx})"),
                message: format!(
                    "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {} exceeds the model's context length of {n_ctx} tokens",
                    prompt_tokens + max_tokens as usize
                ),
                value: Some(max_tokens.to_string()),
            });
        }
        if !errors.is_empty() {
            return Err(ValidationErrors { errors });
        }
        Ok(ValidGenerate { request: self, prompt_ids })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's context with the engine's default `--max-new-tokens-limit`.
    const GPT2: ModelLimits = ModelLimits { n_ctx: 1024, max_new_tokens: 2048 };

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
        assert!(valid.clone().check_context(vec![1, 2], GPT2).is_ok());
        let e = valid.check_context(vec![1, 2, 3], GPT2).unwrap_err();
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

    #[test]
    fn integer_limits_are_printed_as_integers() {
        for (max_tokens, want) in [
            (3000_i64, "max_tokens must be at most 2048 (got 3000)"),
            (0, "max_tokens must be at least 1 (got 0)"),
            // Beyond 2^53 an f64 would round the value shown.
            (9_007_199_254_740_993, "max_tokens must be at most 2048 (got 9007199254740993)"),
        ] {
            let mut v = base();
            v["max_tokens"] = serde_json::json!(max_tokens);
            let e = &validate(v).unwrap_err().errors[0];
            assert_eq!(e.message, want);
            assert_eq!(e.constraint, "range(1..=2048)");
            assert_eq!(e.value.as_deref(), Some(max_tokens.to_string().as_str()));
        }
        let mut v = base();
        v["top_p"] = serde_json::json!(1.5);
        assert_eq!(
            validate(v).unwrap_err().errors[0].message,
            "top_p must be at most 1.0 (got 1.5)"
        );
    }

    #[test]
    fn max_tokens_follows_the_model_not_only_the_worker_api() {
        let mut v = base();
        v["max_tokens"] = serde_json::json!(2000);
        let valid = validate(v).unwrap();
        // GPT-2's 1024-token context: refused with both numbers, after tokenizing.
        let e = valid.clone().check_context(vec![15496, 13], GPT2).unwrap_err();
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"errors":[{"field":"max_tokens","constraint":"context_length(1024)","message":"prompt (2 tokens) + max_tokens (2000) = 2002 exceeds the model's context length of 1024 tokens","value":"2000"}]})
        );
        // An engine started with a lower --max-new-tokens-limit and a longer context.
        let long = ModelLimits { n_ctx: 4096, max_new_tokens: 256 };
        let e = valid.clone().check_context(vec![1, 2], long).unwrap_err();
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"errors":[{"field":"max_tokens","constraint":"range(1..=256)","message":"max_tokens must be at most 256, the engine's limit for this model (got 2000)","value":"2000"}]})
        );
        // Both at once.
        let small = ModelLimits { n_ctx: 64, max_new_tokens: 256 };
        let e = valid.clone().check_context(vec![1, 2], small).unwrap_err();
        let constraints: Vec<&str> = e.errors.iter().map(|e| e.constraint.as_str()).collect();
        assert_eq!(constraints, ["range(1..=256)", "context_length(64)"]);
        assert!(
            valid
                .check_context(vec![1, 2], ModelLimits { n_ctx: 4096, max_new_tokens: 2048 })
                .is_ok()
        );
    }

    #[test]
    fn an_id_prompt_is_checked_for_length_then_against_the_vocabulary() {
        let request = |ids: Vec<u32>| {
            serde_json::from_value::<ExecuteRequest>(base())
                .unwrap()
                .validate_with(Prompt::Ids(ids))
        };
        let e = request(vec![]).unwrap_err();
        assert_eq!(e.errors[0].message, "prompt must be 1 to 32768 token ids (got 0)");
        let valid = request(vec![15496, 50257, 70000]).unwrap();
        let errors = valid.prompt.id_errors(50257);
        assert_eq!(
            errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["prompt[1]: token id 50257 is not below the vocabulary size 50257"]
        );
        assert!(request(vec![0, 50256]).unwrap().prompt.id_errors(50257).is_empty());
        assert!(Prompt::Text("x".into()).id_errors(1).is_empty());
    }

    #[test]
    fn execute_leaves_the_engine_options_off() {
        assert_eq!(validate(base()).unwrap().engine, EngineOptions::default());
        let v = serde_json::json!({"job_id": "j", "prompt": "x", "max_tokens": 1, "presence_penalty": 1.0, "logit_bias": {"5": 3}, "ignore_eos": true});
        assert_eq!(validate(v).unwrap().engine, EngineOptions::default(), "not part of /execute");
    }

    #[test]
    fn engine_option_errors_name_the_field_and_the_limit() {
        assert!(EngineOptions::default().errors(50257).is_empty());
        let ok = EngineOptions {
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logit_bias: [(0, -100.0), (50256, 100.0)].into(),
            ignore_eos: true,
            stop_token_ids: vec![50256],
            logprobs: Some(5),
        };
        assert!(ok.errors(50257).is_empty());
        let bad = EngineOptions {
            presence_penalty: 2.5,
            frequency_penalty: -3.0,
            logit_bias: [(7, 150.0), (50257, 1.0)].into(),
            ignore_eos: false,
            stop_token_ids: vec![1, 60000],
            logprobs: Some(6),
        };
        let got: Vec<(String, String, String)> =
            bad.errors(50257).into_iter().map(|e| (e.field, e.constraint, e.message)).collect();
        let want = [
            (
                "presence_penalty",
                "range(-2.0..=2.0)",
                "presence_penalty must be at most 2.0 (got 2.5)",
            ),
            (
                "frequency_penalty",
                "range(-2.0..=2.0)",
                "frequency_penalty must be at least -2.0 (got -3)",
            ),
            (
                "logit_bias",
                "range(-100.0..=100.0)",
                "logit_bias of token 7: logit_bias must be at most 100.0 (got 150)",
            ),
            (
                "logit_bias",
                "token_id(0..50257)",
                "logit_bias token 50257 is not below the vocabulary size 50257",
            ),
            (
                "stop_token_ids",
                "token_id(0..50257)",
                "stop_token_ids: 60000 is not below the vocabulary size 50257",
            ),
            ("logprobs", "range(0..=5)", "logprobs must be at most 5 (got 6)"),
        ];
        assert_eq!(got, want.map(|(a, b, c)| (a.to_owned(), b.to_owned(), c.to_owned())));
    }
}
