//! Perplexity of a token sequence with a sliding window (`llorch-engine perplexity`), the
//! measure of Hugging Face's "Perplexity of fixed-length models" guide with every token scored
//! exactly once.
//!
//! Windows of `window` tokens start at `0, stride, 2·stride, …` until one reaches the end.
//! The window starting at `b` and ending at `e` scores the tokens from `max(previous e, b + 1)`
//! to `e`, each from the window's tokens before it. With `stride < window` every token but the
//! first is scored once, with at least `window − stride` tokens of context when it is not near
//! the start; with `stride == window` (windows that do not overlap) the first token of each
//! window has no context and is not scored.
//! `perplexity = exp(Σ −log p / scored)`. The log-softmax is taken in f64 over the f32
//! logits. `scripts/train_demo.py` (`sliding_nll`) is the same definition in PyTorch, and the
//! tests compare the two.
//!
//! Each window is run as prefill chunks of at most [`chunk`](PerplexityConfig::chunk) tokens
//! through one reused KV cache, so memory stays at one chunk's logits whatever the window.

use serde::Serialize;

use crate::error::EngineError;
use crate::model::{Gpt2, LogitsFor, Scratch, SeqStep};

/// How the windows are laid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerplexityConfig {
    /// Tokens per window, at most the model's context.
    pub window: usize,
    /// Tokens between window starts, `1..=window`.
    pub stride: usize,
    /// Tokens per forward call within a window.
    pub chunk: usize,
}

impl PerplexityConfig {
    /// `window` (default: the model's context) and `stride` (default: half the window), checked
    /// against the model.
    pub fn new(
        model: &Gpt2,
        window: Option<usize>,
        stride: Option<usize>,
        chunk: usize,
    ) -> Result<Self, EngineError> {
        let n_ctx = model.config().n_ctx;
        let window = window.unwrap_or(n_ctx);
        if !(2..=n_ctx).contains(&window) {
            return Err(EngineError::invalid(
                "window",
                format!("must be 2..={n_ctx} (the model's context), got {window}"),
            ));
        }
        let stride = stride.unwrap_or(window.div_ceil(2));
        if !(1..=window).contains(&stride) {
            return Err(EngineError::invalid(
                "stride",
                format!("must be 1..={window} (the window), got {stride}"),
            ));
        }
        if chunk == 0 {
            return Err(EngineError::invalid("chunk", "must be at least 1"));
        }
        Ok(Self { window, stride, chunk })
    }
}

/// What `llorch-engine perplexity` prints (with the model and file added).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Perplexity {
    /// Tokens in the text.
    pub tokens: usize,
    /// Tokens scored (`tokens − 1` when `stride < window`, else `tokens − windows`).
    pub scored: usize,
    /// Windows run.
    pub windows: usize,
    /// The window and stride used.
    pub window: usize,
    /// See [`PerplexityConfig::stride`].
    pub stride: usize,
    /// `Σ −log p` over the scored tokens (nats).
    pub nll_sum: f64,
    /// `nll_sum / scored`.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
}

/// The perplexity of `ids` under `model`; `progress(windows done, windows in all)` is called
/// after each window.
pub fn perplexity(
    model: &Gpt2,
    ids: &[u32],
    cfg: PerplexityConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity, EngineError> {
    if ids.len() < 2 {
        return Err(EngineError::invalid(
            "text",
            format!("needs at least 2 tokens to score one, got {}", ids.len()),
        ));
    }
    let vocab = model.config().vocab_size;
    if let Some((i, &bad)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
        return Err(EngineError::invalid(
            "text",
            format!("token {i} is id {bad}, not below the model's vocabulary size {vocab}"),
        ));
    }
    let n = ids.len();
    let starts = window_starts(n, cfg.window, cfg.stride);
    let mut cache = model.new_cache(cfg.window);
    let mut scratch = Scratch::default();
    let (mut nll_sum, mut scored, mut prev_end, mut windows) = (0.0f64, 0usize, 0usize, 0usize);
    for (done, &b) in starts.iter().enumerate() {
        let end = (b + cfg.window).min(n);
        // Targets [first, end): each predicted by the row of the token before it.
        let first = prev_end.max(b + 1);
        prev_end = end;
        if first >= end {
            continue;
        }
        cache.reset();
        windows += 1;
        // Only the chunks that hold a predicting row (first − 1 .. end − 1) need logits, but
        // every chunk before them must run to fill the cache.
        let mut pos = b;
        while pos < end - 1 {
            let stop = (pos + cfg.chunk).min(end - 1);
            let chunk = &ids[pos..stop];
            let mut seq = [SeqStep { tokens: chunk, cache: &mut cache }];
            let which = if stop > first - 1 { LogitsFor::AllRows } else { LogitsFor::LastOfEach };
            let logits = model.forward(&mut seq, &mut scratch, which, None)?;
            if which == LogitsFor::AllRows {
                for row in (first - 1).max(pos)..stop {
                    let target = ids[row + 1] as usize;
                    let logits = logits.row(row - pos);
                    nll_sum -= log_softmax_at(logits.as_slice().expect("contiguous"), target);
                    scored += 1;
                }
            }
            pos = stop;
        }
        progress(done + 1, starts.len());
    }
    let mean_nll = nll_sum / scored as f64;
    Ok(Perplexity {
        tokens: n,
        scored,
        windows,
        window: cfg.window,
        stride: cfg.stride,
        nll_sum,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}

/// Where the windows start: `0, stride, …` up to and including the first that reaches `n`.
fn window_starts(n: usize, window: usize, stride: usize) -> Vec<usize> {
    let mut starts = vec![0];
    while starts.last().is_some_and(|&b| b + window < n) {
        starts.push(starts.last().unwrap() + stride);
    }
    starts
}

/// `log softmax(logits)[target]` in f64.
fn log_softmax_at(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_text_and_stop_at_the_first_that_reaches_the_end() {
        assert_eq!(window_starts(10, 4, 2), vec![0, 2, 4, 6]);
        assert_eq!(window_starts(4, 4, 2), vec![0]);
        assert_eq!(window_starts(5, 4, 4), vec![0, 4]);
        assert_eq!(window_starts(2, 512, 256), vec![0]);
    }

    #[test]
    fn log_softmax_matches_the_definition() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        assert!((log_softmax_at(&logits, 2) - (3.0 - z.ln())).abs() < 1e-12);
        // Large logits do not overflow.
        let big = [1000.0f32, 1000.0];
        assert!((log_softmax_at(&big, 0) - 0.5f64.ln()).abs() < 1e-12);
    }
}
