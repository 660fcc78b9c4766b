//! Validation into types: a raw [`GenerateRequest`] becomes a [`ValidRequest`] with nothing
//! optional left, or an `INVALID_ARGUMENT` error naming the field and the limit. Only
//! `ValidRequest` reaches the scheduler.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use llorch_proto::engine::v1::GenerateRequest;

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::sampling::SamplingParams;

/// Most `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 5;
/// Longest `request_id`, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 256;
/// Largest `logit_bias` magnitude (OpenAI's limit).
pub const MAX_LOGIT_BIAS: f32 = 100.0;
/// Most `stop_token_ids`.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;

/// When to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct Stopping {
    /// 1..=limit, and prompt + this ≤ n_ctx.
    pub max_new_tokens: usize,
    /// Ids that end the stream after being sent.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// The model's EOS id.
    pub eos_token_id: u32,
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// The caller's id, or a generated one.
    pub request_id: String,
    /// The prompt; non-empty, every id below the vocabulary size.
    pub prompt: Vec<u32>,
    /// Sampling with every default filled in (the seed too).
    pub sampling: SamplingParams,
    /// Stopping criteria.
    pub stopping: Stopping,
    /// Report each chosen token's log-probability.
    pub logprobs: bool,
    /// How many top alternatives to report, 0..=5.
    pub top_logprobs: usize,
}

/// Checks `req` against the model and the engine's limit on `max_new_tokens`.
pub fn validate(
    req: GenerateRequest,
    cfg: &ModelConfig,
    max_new_tokens_limit: usize,
) -> Result<ValidRequest, EngineError> {
    let GenerateRequest { request_id, prompt_ids, sampling, stopping, logprobs, top_logprobs } =
        req;
    if request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(EngineError::invalid(
            "request_id",
            format!("is {} bytes; the limit is {MAX_REQUEST_ID_BYTES}", request_id.len()),
        ));
    }
    let request_id =
        if request_id.is_empty() { format!("req-{:016x}", random_u64()) } else { request_id };
    if prompt_ids.is_empty() {
        return Err(EngineError::invalid("prompt_ids", "must not be empty"));
    }
    let vocab = cfg.vocab_size;
    if let Some((i, id)) = prompt_ids.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
        return Err(EngineError::invalid(
            "prompt_ids",
            format!("prompt_ids[{i}] = {id} is not below vocab_size {vocab}"),
        ));
    }

    let stopping = stopping.unwrap_or_default();
    let max_new = stopping.max_new_tokens as usize;
    if max_new == 0 || max_new > max_new_tokens_limit {
        return Err(EngineError::invalid(
            "stopping.max_new_tokens",
            format!("must be in 1..={max_new_tokens_limit} (got {max_new})"),
        ));
    }
    if prompt_ids.len() + max_new > cfg.n_ctx {
        return Err(EngineError::invalid(
            "stopping.max_new_tokens",
            format!(
                "prompt ({} tokens) + max_new_tokens ({max_new}) exceeds the context length n_ctx ({})",
                prompt_ids.len(),
                cfg.n_ctx
            ),
        ));
    }
    if stopping.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(EngineError::invalid(
            "stopping.stop_token_ids",
            format!("has {} ids; the limit is {MAX_STOP_TOKEN_IDS}", stopping.stop_token_ids.len()),
        ));
    }
    if let Some(id) = stopping.stop_token_ids.iter().find(|id| **id as usize >= vocab) {
        return Err(EngineError::invalid(
            "stopping.stop_token_ids",
            format!("{id} is not below vocab_size {vocab}"),
        ));
    }

    let s = sampling.unwrap_or_default();
    let temperature = in_range("sampling.temperature", s.temperature.unwrap_or(1.0), 0.0, 2.0)?;
    let top_p = in_range("sampling.top_p", s.top_p.unwrap_or(1.0), 0.0, 1.0)?;
    let min_p = in_range("sampling.min_p", s.min_p, 0.0, 1.0)?;
    let repetition_penalty =
        in_range("sampling.repetition_penalty", s.repetition_penalty.unwrap_or(1.0), 0.0, 2.0)?;
    let presence_penalty = in_range("sampling.presence_penalty", s.presence_penalty, -2.0, 2.0)?;
    let frequency_penalty = in_range("sampling.frequency_penalty", s.frequency_penalty, -2.0, 2.0)?;
    let logit_bias = logit_bias(s.logit_bias, vocab)?;
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(EngineError::invalid(
            "top_logprobs",
            format!("must be at most {MAX_TOP_LOGPROBS} (got {top_logprobs})"),
        ));
    }
    Ok(ValidRequest {
        request_id,
        prompt: prompt_ids,
        sampling: SamplingParams {
            temperature,
            top_k: s.top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            seed: s.seed.unwrap_or_else(random_u64),
        },
        stopping: Stopping {
            max_new_tokens: max_new,
            stop_token_ids: stopping.stop_token_ids,
            ignore_eos: stopping.ignore_eos,
            eos_token_id: cfg.eos_token_id,
        },
        logprobs,
        top_logprobs: top_logprobs as usize,
    })
}

/// `logit_bias` as `(id, bias)` sorted by id: every id below `vocab`, every bias in
/// -100.0..=100.0 (OpenAI's range).
fn logit_bias(map: HashMap<u32, f32>, vocab: usize) -> Result<Vec<(u32, f32)>, EngineError> {
    let mut bias: Vec<(u32, f32)> = map.into_iter().collect();
    bias.sort_unstable_by_key(|&(id, _)| id);
    for &(id, b) in &bias {
        if id as usize >= vocab {
            return Err(EngineError::invalid(
                "sampling.logit_bias",
                format!("token id {id} is not below vocab_size {vocab}"),
            ));
        }
        if b.is_nan() || !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b) {
            return Err(EngineError::invalid(
                "sampling.logit_bias",
                format!("the bias of token {id} must be in -100.0..=100.0 (got {b})"),
            ));
        }
    }
    Ok(bias)
}

fn in_range(field: &'static str, v: f32, lo: f32, hi: f32) -> Result<f32, EngineError> {
    if v.is_nan() || v < lo || v > hi {
        return Err(EngineError::invalid(field, format!("must be in {lo:.1}..={hi:.1} (got {v})")));
    }
    Ok(v)
}

/// A random u64 from the OS-seeded hasher keys (no RNG crate needed for seeds and ids).
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use llorch_proto::engine::v1::{SamplingParams as PbSampling, StoppingCriteria};

    use super::*;
    use crate::config::Gpt2Config;

    fn cfg() -> ModelConfig {
        Gpt2Config::preset("small").unwrap().validate().unwrap()
    }

    fn req(prompt: Vec<u32>, max_new: u32) -> GenerateRequest {
        GenerateRequest {
            prompt_ids: prompt,
            stopping: Some(StoppingCriteria { max_new_tokens: max_new, ..Default::default() }),
            ..Default::default()
        }
    }

    fn field_of(r: GenerateRequest) -> &'static str {
        match validate(r, &cfg(), 2048).unwrap_err() {
            EngineError::InvalidRequest { field, .. } => field,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let v = validate(req(vec![1, 2], 5), &cfg(), 2048).unwrap();
        assert_eq!(v.sampling.temperature, 1.0);
        assert_eq!(v.sampling.top_p, 1.0);
        assert_eq!(v.sampling.repetition_penalty, 1.0);
        assert!(v.request_id.starts_with("req-"));
        assert_eq!(v.stopping.eos_token_id, 50256);
    }

    #[test]
    fn every_invalid_field_is_named() {
        assert_eq!(field_of(req(vec![], 5)), "prompt_ids");
        assert_eq!(field_of(req(vec![50257], 5)), "prompt_ids");
        assert_eq!(field_of(req(vec![1], 0)), "stopping.max_new_tokens");
        assert_eq!(field_of(req(vec![1; 1000], 25)), "stopping.max_new_tokens");
        let sampling = |s: PbSampling| GenerateRequest { sampling: Some(s), ..req(vec![1], 1) };
        assert_eq!(
            field_of(sampling(PbSampling { temperature: Some(2.5), ..Default::default() })),
            "sampling.temperature"
        );
        assert_eq!(
            field_of(sampling(PbSampling { temperature: Some(f32::NAN), ..Default::default() })),
            "sampling.temperature"
        );
        assert_eq!(
            field_of(sampling(PbSampling { top_p: Some(-0.1), ..Default::default() })),
            "sampling.top_p"
        );
        assert_eq!(
            field_of(sampling(PbSampling { min_p: 1.5, ..Default::default() })),
            "sampling.min_p"
        );
        assert_eq!(
            field_of(sampling(PbSampling { repetition_penalty: Some(3.0), ..Default::default() })),
            "sampling.repetition_penalty"
        );
        assert_eq!(
            field_of(sampling(PbSampling { presence_penalty: -2.5, ..Default::default() })),
            "sampling.presence_penalty"
        );
        assert_eq!(
            field_of(sampling(PbSampling { frequency_penalty: f32::NAN, ..Default::default() })),
            "sampling.frequency_penalty"
        );
        let bias =
            |id: u32, b: f32| PbSampling { logit_bias: [(id, b)].into(), ..Default::default() };
        assert_eq!(field_of(sampling(bias(50257, 1.0))), "sampling.logit_bias");
        assert_eq!(field_of(sampling(bias(5, 100.5))), "sampling.logit_bias");
        assert_eq!(field_of(sampling(bias(5, f32::NAN))), "sampling.logit_bias");
        assert_eq!(
            field_of(GenerateRequest {
                stopping: Some(StoppingCriteria {
                    max_new_tokens: 1,
                    stop_token_ids: vec![50257],
                    ignore_eos: false
                }),
                ..req(vec![1], 1)
            }),
            "stopping.stop_token_ids"
        );
        assert_eq!(
            field_of(GenerateRequest { top_logprobs: 6, ..req(vec![1], 1) }),
            "top_logprobs"
        );
        assert_eq!(
            field_of(GenerateRequest { request_id: "x".repeat(300), ..req(vec![1], 1) }),
            "request_id"
        );
    }

    #[test]
    fn the_openai_penalties_and_logit_bias_are_carried_over_at_their_edges() {
        let s = PbSampling {
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            logit_bias: [(50256, -100.0), (7, 100.0), (3, 0.5)].into(),
            ..Default::default()
        };
        let v = validate(GenerateRequest { sampling: Some(s), ..req(vec![1], 1) }, &cfg(), 2048)
            .unwrap();
        assert_eq!((v.sampling.presence_penalty, v.sampling.frequency_penalty), (-2.0, 2.0));
        assert_eq!(v.sampling.logit_bias, [(3, 0.5), (7, 100.0), (50256, -100.0)], "sorted by id");
        let off = validate(req(vec![1], 1), &cfg(), 2048).unwrap().sampling;
        assert_eq!((off.presence_penalty, off.frequency_penalty), (0.0, 0.0));
        assert!(off.logit_bias.is_empty());
    }

    #[test]
    fn logit_bias_errors_name_the_token() {
        let s = PbSampling { logit_bias: [(9, -101.0)].into(), ..Default::default() };
        let err = validate(GenerateRequest { sampling: Some(s), ..req(vec![1], 1) }, &cfg(), 2048)
            .unwrap_err()
            .to_string();
        assert!(err.contains("the bias of token 9 must be in -100.0..=100.0 (got -101)"), "{err}");
    }

    #[test]
    fn the_context_limit_message_gives_the_counts() {
        let err = validate(req(vec![1; 1000], 25), &cfg(), 2048).unwrap_err().to_string();
        assert!(
            err.contains(
                "prompt (1000 tokens) + max_new_tokens (25) exceeds the context length n_ctx (1024)"
            ),
            "{err}"
        );
    }
}
