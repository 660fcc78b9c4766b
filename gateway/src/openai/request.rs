//! `POST /v1/completions` bodies: read field by field from the JSON object, so that a value of
//! the wrong type is a 400 naming its field (`param`), then checked by the worker API's own
//! validation ([`ExecuteRequest::validate_with`]) and [`EngineOptions::errors`]. Unknown fields
//! are ignored, as OpenAI-compatible servers do.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::OpenAiError;
use crate::validate::{EngineOptions, ExecuteRequest, Prompt, ValidExecute};

/// `max_tokens` when the request leaves it out (OpenAI's default).
pub const DEFAULT_MAX_TOKENS: i64 = 16;

/// A completion request, read but not yet checked against the model.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The model asked for; `None` = the served one.
    pub model: Option<String>,
    /// The worker API's fields (`job_id` generated, `prompt` empty: see [`Self::prompt`]).
    pub execute: ExecuteRequest,
    /// The prompt, text or token ids.
    pub prompt: Prompt,
    /// Options beyond the worker API's (penalties, bias, stop ids, `ignore_eos`, logprobs).
    pub engine: EngineOptions,
    /// Prepend the prompt to the completion.
    pub echo: bool,
    /// Answer with SSE chunks.
    pub stream: bool,
    /// With `stream`: a last chunk with `usage`.
    pub include_usage: bool,
    /// OpenAI's end-user id (logged only).
    pub user: Option<String>,
}

/// The request, validated: what the job runs, and how to answer.
#[derive(Debug, Clone)]
pub struct ValidCompletion {
    /// The job.
    pub job: ValidExecute,
    /// Prepend the prompt to the completion.
    pub echo: bool,
    /// Answer with SSE chunks.
    pub stream: bool,
    /// With `stream`: a last chunk with `usage`.
    pub include_usage: bool,
}

/// Field `name` of `body` as a `T`; `None` when absent or `null`.
fn field<T: DeserializeOwned>(
    body: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, OpenAiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| OpenAiError::invalid(name, format!("{name}: {e} (got {v})"))),
    }
}

/// `prompt`: a string, a list of token ids, or a list holding one of those.
fn prompt(body: &Map<String, Value>) -> Result<Prompt, OpenAiError> {
    let wrong = || {
        OpenAiError::invalid("prompt", "prompt must be a string or a list of token ids (integers)")
    };
    let ids = |items: &[Value]| -> Result<Prompt, OpenAiError> {
        let ids: Option<Vec<u32>> =
            items.iter().map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok())).collect();
        ids.map(Prompt::Ids).ok_or_else(wrong)
    };
    match body.get("prompt") {
        None | Some(Value::Null) => Err(OpenAiError::invalid("prompt", "prompt is required")),
        Some(Value::String(text)) => Ok(Prompt::Text(text.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(text)] => Ok(Prompt::Text(text.clone())),
            [Value::Array(inner)] => ids(inner),
            [Value::String(_) | Value::Array(_), _, ..] => Err(OpenAiError::invalid(
                "prompt",
                format!(
                    "a list of {} prompts is not supported: send one prompt per request",
                    items.len()
                ),
            )),
            _ => ids(items),
        },
        Some(_) => Err(wrong()),
    }
}

/// `stop`: a string or a list of strings.
fn stop(body: &Map<String, Value>) -> Result<Vec<String>, OpenAiError> {
    match body.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            OpenAiError::invalid(
                "stop",
                format!("stop must be a string or a list of strings (got {v})"),
            )
        }),
    }
}

/// `logit_bias`: `{"<token id>": bias}`.
fn logit_bias(body: &Map<String, Value>) -> Result<BTreeMap<u32, f32>, OpenAiError> {
    let raw: BTreeMap<String, f64> = field(body, "logit_bias")?.unwrap_or_default();
    raw.into_iter()
        .map(|(k, v)| {
            let id = k.trim().parse::<u32>().map_err(|_| {
                OpenAiError::invalid(
                    "logit_bias",
                    format!("logit_bias keys must be token ids (got {k:?})"),
                )
            })?;
            Ok((id, v as f32))
        })
        .collect()
}

impl CompletionRequest {
    /// Reads `body` (the raw bytes of the request).
    pub fn parse(body: &[u8]) -> Result<Self, OpenAiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| OpenAiError::bad_body(format!("the body is not valid JSON: {e}")))?;
        let Value::Object(body) = value else {
            return Err(OpenAiError::bad_body("the body must be a JSON object"));
        };
        let n: i64 = field(&body, "n")?.unwrap_or(1);
        if n != 1 {
            return Err(OpenAiError::invalid("n", format!("only n = 1 is supported (got {n})")));
        }
        let best_of: i64 = field(&body, "best_of")?.unwrap_or(1);
        if best_of != 1 {
            let message = format!("only best_of = 1 is supported (got {best_of})");
            return Err(OpenAiError::invalid("best_of", message));
        }
        if field::<String>(&body, "suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(OpenAiError::invalid("suffix", "suffix is not supported"));
        }
        // vLLM's convention: -1 (or 0) turns top-k off.
        let top_k: Option<i64> = field(&body, "top_k")?;
        let top_k = match top_k {
            None => None,
            Some(k) if (-1..=0).contains(&k) => Some(0),
            Some(k) => Some(u32::try_from(k).map_err(|_| {
                OpenAiError::invalid(
                    "top_k",
                    format!("top_k must be -1 (off) or at least 0 (got {k})"),
                )
            })?),
        };
        let logprobs: Option<i64> = field(&body, "logprobs")?;
        let logprobs = match logprobs {
            None => None,
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                OpenAiError::invalid("logprobs", format!("logprobs must be at least 0 (got {n})"))
            })?),
        };
        let stream_options: Map<String, Value> =
            field(&body, "stream_options")?.unwrap_or_default();
        let execute = ExecuteRequest {
            job_id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
            prompt: String::new(),
            max_tokens: field(&body, "max_tokens")?.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: field(&body, "temperature")?,
            // OpenAI samples differently each time unless a seed is given.
            seed: Some(
                field(&body, "seed")?.unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0),
            ),
            top_p: field(&body, "top_p")?,
            top_k,
            repetition_penalty: field(&body, "repetition_penalty")?,
            min_p: field(&body, "min_p")?,
            stop: stop(&body)?,
        };
        let engine = EngineOptions {
            presence_penalty: field::<f64>(&body, "presence_penalty")?.unwrap_or(0.0) as f32,
            frequency_penalty: field::<f64>(&body, "frequency_penalty")?.unwrap_or(0.0) as f32,
            logit_bias: logit_bias(&body)?,
            ignore_eos: field(&body, "ignore_eos")?.unwrap_or(false),
            stop_token_ids: field(&body, "stop_token_ids")?.unwrap_or_default(),
            logprobs,
        };
        Ok(Self {
            model: field(&body, "model")?,
            execute,
            prompt: prompt(&body)?,
            engine,
            echo: field(&body, "echo")?.unwrap_or(false),
            stream: field(&body, "stream")?.unwrap_or(false),
            include_usage: field(&stream_options, "include_usage")?.unwrap_or(false),
            user: field(&body, "user")?,
        })
    }

    /// Checks every field (the worker API's checks, then the engine options' against the
    /// vocabulary), collecting all failures.
    pub fn validate(self, vocab_size: u32) -> Result<ValidCompletion, OpenAiError> {
        let engine_errors = self.engine.errors(vocab_size);
        let mut job = match self.execute.validate_with(self.prompt) {
            Ok(job) if engine_errors.is_empty() => job,
            Ok(_) => {
                let errors = crate::validate::ValidationErrors { errors: engine_errors };
                return Err(errors.into());
            }
            Err(mut errors) => {
                errors.errors.extend(engine_errors);
                return Err(errors.into());
            }
        };
        job.engine = self.engine;
        Ok(ValidCompletion {
            job,
            echo: self.echo,
            stream: self.stream,
            include_usage: self.include_usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<CompletionRequest, OpenAiError> {
        CompletionRequest::parse(v.to_string().as_bytes())
    }

    #[test]
    fn defaults_follow_openai() {
        let r = parse(serde_json::json!({"prompt": "Hi"})).unwrap();
        assert_eq!(r.execute.max_tokens, 16);
        assert_eq!(r.prompt, Prompt::Text("Hi".into()));
        assert!(!r.echo && !r.stream && r.engine == EngineOptions::default());
        let a = parse(serde_json::json!({"prompt": "Hi"})).unwrap().execute.seed;
        let b = parse(serde_json::json!({"prompt": "Hi"})).unwrap().execute.seed;
        assert_ne!(a, b, "no seed: a fresh one per request");
    }

    #[test]
    fn prompts_are_text_or_ids_and_one_only() {
        let ids = parse(serde_json::json!({"prompt": [15496, 13]})).unwrap().prompt;
        assert_eq!(ids, Prompt::Ids(vec![15496, 13]));
        let nested = parse(serde_json::json!({"prompt": [[1, 2]]})).unwrap().prompt;
        assert_eq!(nested, Prompt::Ids(vec![1, 2]));
        let e = parse(serde_json::json!({"prompt": ["a", "b"]})).unwrap_err();
        assert_eq!(e.message, "a list of 2 prompts is not supported: send one prompt per request");
        let e = parse(serde_json::json!({"prompt": [1, -2]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        let e = parse(serde_json::json!({"prompt": 5})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }

    #[test]
    fn a_wrong_type_names_its_field() {
        let e = parse(serde_json::json!({"prompt": "x", "temperature": "hot"})).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("temperature")));
        let e = parse(serde_json::json!({"prompt": "x", "n": 2})).unwrap_err();
        assert_eq!(
            (e.param.as_deref(), e.message.as_str()),
            (Some("n"), "only n = 1 is supported (got 2)")
        );
        let e = CompletionRequest::parse(b"{\"prompt\":").unwrap_err();
        assert!(e.message.starts_with("the body is not valid JSON"), "{}", e.message);
    }

    #[test]
    fn every_range_error_is_collected_with_the_first_as_param() {
        let r = parse(serde_json::json!({
            "prompt": "x", "temperature": 3, "presence_penalty": 5, "logprobs": 6,
            "logit_bias": {"50257": 1}
        }))
        .unwrap();
        let e = r.validate(50257).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        for part in [
            "temperature must be at most 2.0",
            "presence_penalty must be at most 2.0",
            "logprobs must be at most 5",
            "logit_bias token 50257",
        ] {
            assert!(e.message.contains(part), "{part} in {}", e.message);
        }
    }

    #[test]
    fn stop_is_a_string_or_a_list() {
        let r = parse(serde_json::json!({"prompt": "x", "stop": "\n"})).unwrap();
        assert_eq!(r.execute.stop, ["\n"]);
        let r = parse(serde_json::json!({"prompt": "x", "stop": ["a", "b"]})).unwrap();
        assert_eq!(r.execute.stop, ["a", "b"]);
        assert!(parse(serde_json::json!({"prompt": "x", "stop": 3})).is_err());
    }
}
