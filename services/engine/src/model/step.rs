//! What one forward step takes and uses besides the weights: each sequence's tokens and
//! cache ([`SeqStep`]), which rows get logits ([`LogitsFor`]), the reused activation buffers
//! ([`Scratch`]) and the optional record of block 0 ([`Trace`]).

use ndarray::{Array2, ArrayD, ArrayView2};

use crate::config::ModelConfig;
use crate::kv_cache::KvCache;

/// One sequence's part of a forward step: its new tokens and its cache (which already holds
/// `cache.len()` earlier positions).
#[derive(Debug)]
pub struct SeqStep<'a> {
    /// The new tokens (a prefill chunk, or one decode token).
    pub tokens: &'a [u32],
    /// The sequence's KV cache; advanced by `tokens.len()` when the step ends.
    pub cache: &'a mut KvCache,
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last new row of each sequence (what sampling needs): `(B, V)`.
    LastOfEach,
    /// Every new row: `(N, V)` (checkpoint 8, the dump tool).
    AllRows,
}

/// Intermediate tensors of block 0 recorded by a traced forward (one sequence), named as in
/// `fixtures/reference`: `ln1`, `q`, `k`, `v`, `att_scores` `(NH, S, P)`, `attn_out`, `mlp_in`,
/// `mlp_out`, `block0_out`.
#[derive(Debug, Default)]
pub struct Trace {
    /// `(name, tensor)` in the order recorded.
    pub tensors: Vec<(&'static str, ArrayD<f32>)>,
}

impl Trace {
    pub(super) fn record(&mut self, name: &'static str, t: ArrayD<f32>) {
        self.tensors.push((name, t));
    }

    /// The tensor recorded under `name`.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }
}

/// Records a copy of `t` under `name` when the forward is traced.
pub(super) fn record(trace: &mut Option<&mut Trace>, name: &'static str, t: ArrayView2<'_, f32>) {
    if let Some(trace) = trace {
        trace.record(name, t.to_owned().into_dyn());
    }
}

/// Per-step activation buffers, reused across steps: the `(N, ·)` activations are allocated
/// only when a step has more rows (or logit rows, or attention scores) than every step before
/// it. Steps still make small allocations of their own: decode attention's per-sequence views
/// and score vectors, and the compute pool's task handles.
#[derive(Debug, Default)]
pub struct Scratch {
    /// Rows the `(N, ·)` buffers hold.
    pub(super) rows: usize,
    /// `(N, C)`: the residual stream.
    pub(super) x: Array2<f32>,
    /// `(N, C)`: the output of `ln_1` or `ln_2`.
    pub(super) ln: Array2<f32>,
    /// `(N, 3C)`: Q, K, V.
    pub(super) qkv: Array2<f32>,
    /// `(N, C)`: attention's output, before `c_proj`.
    pub(super) atty: Array2<f32>,
    /// `(N, C)`: a `c_proj` output, before the residual.
    pub(super) proj: Array2<f32>,
    /// `(N, F)`: the MLP's hidden rows.
    pub(super) fch: Array2<f32>,
    /// `(B or N, C)`: `ln_f` of the rows that get logits.
    pub(super) last: Array2<f32>,
    /// `(B or N, V)`.
    pub(super) logits: Array2<f32>,
    /// `S·P`: one head's attention weights of one sequence.
    pub(super) att: Vec<f32>,
    /// This step's tokens, all sequences stacked: `N` of them.
    pub(super) tokens: Vec<u32>,
    /// The position of each of `tokens`.
    pub(super) positions: Vec<usize>,
}

impl Scratch {
    /// Sizes the buffers for `seqs` and `logit_rows`, and stacks their tokens and positions.
    pub(super) fn prepare(&mut self, cfg: &ModelConfig, seqs: &[SeqStep<'_>], logit_rows: usize) {
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let att = seqs
            .iter()
            .map(|s| s.tokens.len() * (s.cache.len() + s.tokens.len()))
            .max()
            .unwrap_or(0);
        let c = cfg.n_embd;
        if n > self.rows {
            self.rows = n;
            self.x = Array2::zeros((n, c));
            self.ln = Array2::zeros((n, c));
            self.qkv = Array2::zeros((n, 3 * c));
            self.atty = Array2::zeros((n, c));
            self.proj = Array2::zeros((n, c));
            self.fch = Array2::zeros((n, cfg.n_inner));
        }
        if logit_rows > self.logits.nrows() {
            self.last = Array2::zeros((logit_rows, c));
            self.logits = Array2::zeros((logit_rows, cfg.vocab_size));
        }
        if att > self.att.len() {
            self.att.resize(att, 0.0);
        }
        self.tokens.clear();
        self.positions.clear();
        for seq in seqs {
            self.tokens.extend_from_slice(seq.tokens);
            self.positions.extend(seq.cache.len()..seq.cache.len() + seq.tokens.len());
        }
    }
}
