//! One generation in progress: its request, KV cache, sampler and history. The library's
//! [`generate`] and the scheduler drive the same type, so a stream served in a batch is the
//! same stream generated alone.

use std::time::Duration;

use ndarray::ArrayView1;

use crate::error::EngineError;
use crate::kv_cache::KvCache;
use crate::model::{Gpt2, LogitsFor, Scratch, SeqStep};
use crate::request::ValidRequest;
use crate::sampling::{History, Sampled, Sampler};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// `max_new_tokens` were generated.
    Length,
    /// The end-of-text token was generated.
    Eos,
    /// A stop token id was generated.
    StopToken,
    /// Aborted, the client left, or the server drained.
    Cancelled,
    /// The request's deadline passed.
    Deadline,
}

impl FinishReason {
    /// The contract's name (`LENGTH`, `EOS`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "LENGTH",
            Self::Eos => "EOS",
            Self::StopToken => "STOP_TOKEN",
            Self::Cancelled => "CANCELLED",
            Self::Deadline => "DEADLINE",
        }
    }
}

/// One generated token and whether it ended the sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// 0-based index among the generated tokens.
    pub index: usize,
    /// The sampled token with its log-probabilities.
    pub token: Sampled,
    /// Set when this token ends the generation.
    pub finish: Option<FinishReason>,
    /// How long the request waited for a batch slot; set by the scheduler on the first token.
    pub queued: Option<std::time::Duration>,
}

/// A generation in progress.
#[derive(Debug)]
pub struct Sequence {
    req: ValidRequest,
    cache: KvCache,
    sampler: Sampler,
    /// Prompt followed by every generated token.
    history: Vec<u32>,
}

impl Sequence {
    /// Starts `req` with `cache` (reset here; it must hold prompt + max_new_tokens positions).
    /// When it cannot, the request comes back with the error, so its owner can still answer it.
    #[expect(
        clippy::result_large_err,
        reason = "the request is no larger than the Sequence it would be part of"
    )]
    pub fn new(req: ValidRequest, mut cache: KvCache) -> Result<Self, (ValidRequest, EngineError)> {
        cache.reset();
        let need = req.prompt.len() + req.stopping.max_new_tokens;
        if cache.capacity() < need {
            let err = EngineError::Internal(format!(
                "cache holds {} positions, {need} needed",
                cache.capacity()
            ));
            return Err((req, err));
        }
        let history = req.prompt.clone();
        Ok(Self { sampler: Sampler::new(req.sampling.clone()), req, cache, history })
    }

    /// The request.
    pub fn request(&self) -> &ValidRequest {
        &self.req
    }

    /// Whether prompt tokens remain to be prefilled.
    pub fn is_prefilling(&self) -> bool {
        self.cache.len() < self.req.prompt.len()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.history.len() - self.req.prompt.len()
    }

    /// Prompt tokens still to prefill.
    pub fn prompt_remaining(&self) -> usize {
        self.req.prompt.len().saturating_sub(self.cache.len())
    }

    /// The next input of at most `max_tokens` tokens (a prefill chunk, or the last generated
    /// token) together with the cache, for [`Gpt2::forward`].
    pub fn step(&mut self, max_tokens: usize) -> SeqStep<'_> {
        let start = self.cache.len();
        let end = (start + max_tokens.max(1)).min(self.history.len());
        SeqStep { tokens: &self.history[start..end], cache: &mut self.cache }
    }

    /// After a forward step: if every known token is now in the cache, samples the next one
    /// from `logits` and says whether it ends the generation; `None` while prefill continues.
    pub fn accept(&mut self, logits: ArrayView1<'_, f32>) -> Option<TokenEvent> {
        if self.cache.len() < self.history.len() {
            return None;
        }
        let logits = logits.as_slice().expect("logit rows are contiguous");
        let (prompt, generated) = self.history.split_at(self.req.prompt.len());
        let history = History { prompt, generated };
        let token = self.sampler.sample(logits, history, self.req.logprobs, self.req.top_logprobs);
        self.history.push(token.id);
        let index = self.generated() - 1;
        let stop = &self.req.stopping;
        let finish = if token.id == stop.eos_token_id && !stop.ignore_eos {
            Some(FinishReason::Eos)
        } else if stop.stop_token_ids.contains(&token.id) {
            Some(FinishReason::StopToken)
        } else if self.generated() >= stop.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        Some(TokenEvent { index, token, finish, queued: None })
    }

    /// Gives the cache back (for reuse by the next sequence).
    pub fn into_cache(self) -> KvCache {
        self.cache
    }
}

/// What [`generate`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Every generated token, in order.
    pub tokens: Vec<Sampled>,
    /// Why it stopped.
    pub finish: FinishReason,
    /// Time spent on the prompt.
    pub prefill: Duration,
    /// Time spent after the prompt.
    pub decode: Duration,
}

impl Generation {
    /// The generated ids.
    pub fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

/// Prompt tokens per prefill step unless configured otherwise. The scheduler and [`generate`]
/// must cut prompts the same way for a batched stream to equal the same request run alone.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// Generates for one request on the calling thread (the prompt in chunks of `prefill_chunk`
/// tokens, then one token per step), calling `on_token` for each token as it is made.
pub fn generate(
    model: &Gpt2,
    req: ValidRequest,
    prefill_chunk: usize,
    mut on_token: impl FnMut(&TokenEvent),
) -> Result<Generation, EngineError> {
    let cache = model.new_cache(req.prompt.len() + req.stopping.max_new_tokens);
    let mut seq = Sequence::new(req, cache).map_err(|(_, err)| err)?;
    let mut scratch = Scratch::default();
    let mut tokens = Vec::new();
    let started = std::time::Instant::now();
    let mut prefill = None;
    loop {
        let logits = model.forward(
            &mut [seq.step(prefill_chunk)],
            &mut scratch,
            LogitsFor::LastOfEach,
            None,
        )?;
        let Some(event) = seq.accept(logits.row(0)) else { continue };
        let prefill_time = *prefill.get_or_insert_with(|| started.elapsed());
        on_token(&event);
        tokens.push(event.token);
        if let Some(finish) = event.finish {
            return Ok(Generation {
                tokens,
                finish,
                prefill: prefill_time,
                decode: started.elapsed() - prefill_time,
            });
        }
    }
}
