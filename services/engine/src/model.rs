//! GPT-2, shaped like the checkpoint: struct fields are the tensor names (`wte`, `wpe`,
//! `h.{i}.ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ln_f`); each
//! struct has `load` and `forward`. Weights are immutable and shared; all per-sequence state is
//! in [`KvCache`] and per-step buffers in [`Scratch`].
//!
//! One forward call runs either prefill chunks (`S ≥ 2` tokens each) of one or more sequences,
//! or a decode step of one token for each of several sequences. The rows of all sequences are
//! stacked so every weight matrix is streamed once for the whole step; attention runs per
//! sequence, against its own cache.

use std::path::Path;

use ndarray::{Array2, ArrayD, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, s};

use crate::config::{Gpt2Config, ModelConfig};
use crate::error::EngineError;
use crate::kv_cache::KvCache;
use crate::layers::gemm::SMALL_M;
use crate::layers::{self, Kernel};
use crate::weights::{Param, Weights};

/// `ln_1`, `ln_2`, `ln_f`.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &mut Weights, prefix: &str, eps: f32) -> Result<Self, EngineError> {
        Ok(Self {
            weight: w.take(&format!("{prefix}.weight"))?,
            bias: w.take(&format!("{prefix}.bias"))?,
            eps,
        })
    }

    /// `x: (N, C)` → `out: (N, C)`.
    fn forward(&self, out: ArrayViewMut2<'_, f32>, x: ArrayView2<'_, f32>) {
        layers::layernorm(out, x, self.weight.view1(), self.bias.view1(), self.eps);
    }
}

/// Hugging Face's `Conv1D`: weight stored `[in, out]`, applied as `x·W + b`.
#[derive(Debug)]
pub struct Conv1D {
    weight: Param,
    bias: Param,
}

impl Conv1D {
    fn load(w: &mut Weights, prefix: &str) -> Result<Self, EngineError> {
        Ok(Self {
            weight: w.take(&format!("{prefix}.weight"))?,
            bias: w.take(&format!("{prefix}.bias"))?,
        })
    }

    /// `x: (N, IN)` → `out: (N, OUT)`.
    fn forward(&self, out: ArrayViewMut2<'_, f32>, x: ArrayView2<'_, f32>, kernel: Kernel) {
        layers::matmul(out, x, self.weight.view2(), self.bias.view1(), kernel);
    }
}

/// `attn`: `c_attn` (C → 3C: Q, K, V side by side) and `c_proj` (C → C).
#[derive(Debug)]
pub struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
}

/// `mlp`: `c_fc` (C → F), tanh GELU, `c_proj` (F → C).
#[derive(Debug)]
pub struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
}

/// `h.{i}`: pre-norm block, `h = x + attn(ln_1(x))`, `out = h + mlp(ln_2(h))`.
#[derive(Debug)]
pub struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(w: &mut Weights, i: usize, eps: f32) -> Result<Self, EngineError> {
        let p = |s: &str| format!("h.{i}.{s}");
        Ok(Self {
            ln_1: LayerNorm::load(w, &p("ln_1"), eps)?,
            attn: Attention {
                c_attn: Conv1D::load(w, &p("attn.c_attn"))?,
                c_proj: Conv1D::load(w, &p("attn.c_proj"))?,
            },
            ln_2: LayerNorm::load(w, &p("ln_2"), eps)?,
            mlp: Mlp {
                c_fc: Conv1D::load(w, &p("mlp.c_fc"))?,
                c_proj: Conv1D::load(w, &p("mlp.c_proj"))?,
            },
        })
    }
}

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
    fn record(&mut self, name: &'static str, t: ArrayD<f32>) {
        self.tensors.push((name, t));
    }

    /// The tensor recorded under `name`.
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }
}

/// Per-step activation buffers, grown on demand and reused across steps so the decode loop does
/// not allocate.
#[derive(Debug, Default)]
pub struct Scratch {
    rows: usize,
    x: Array2<f32>,
    ln: Array2<f32>,
    qkv: Array2<f32>,
    atty: Array2<f32>,
    proj: Array2<f32>,
    fch: Array2<f32>,
    last: Array2<f32>,
    logits: Array2<f32>,
    att: Vec<f32>,
    tokens: Vec<u32>,
    positions: Vec<usize>,
}

impl Scratch {
    fn ensure(&mut self, cfg: &ModelConfig, rows: usize, logit_rows: usize, att: usize) {
        let c = cfg.n_embd;
        if rows > self.rows {
            self.rows = rows;
            self.x = Array2::zeros((rows, c));
            self.ln = Array2::zeros((rows, c));
            self.qkv = Array2::zeros((rows, 3 * c));
            self.atty = Array2::zeros((rows, c));
            self.proj = Array2::zeros((rows, c));
            self.fch = Array2::zeros((rows, cfg.n_inner));
        }
        if logit_rows > self.logits.nrows() {
            self.last = Array2::zeros((logit_rows, c));
            self.logits = Array2::zeros((logit_rows, cfg.vocab_size));
        }
        if att > self.att.len() {
            self.att.resize(att, 0.0);
        }
    }
}

/// GPT-2 with its weights.
#[derive(Debug)]
pub struct Gpt2 {
    cfg: ModelConfig,
    wte: Param,
    wpe: Param,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// An untied LM head, when the checkpoint has `lm_head.weight`; otherwise `wte` is used.
    lm_head: Option<Param>,
    dtype: String,
    /// Whether prefill chunks of several sequences may share a forward call (see
    /// [`layers::sgemm_rows_invariant`]).
    shared_prefill: bool,
}

impl Gpt2 {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face model folder.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let cfg = Gpt2Config::from_dir(dir)?.validate()?;
        let weights = Weights::load(&dir.join("model.safetensors"), &cfg)?;
        Self::from_weights(cfg, weights)
    }

    /// Builds the model from checked weights.
    pub fn from_weights(cfg: ModelConfig, mut w: Weights) -> Result<Self, EngineError> {
        let h: Vec<Block> =
            (0..cfg.n_layer).map(|i| Block::load(&mut w, i, cfg.eps)).collect::<Result<_, _>>()?;
        let shared_prefill = h.first().is_none_or(|b| {
            [&b.attn.c_attn, &b.attn.c_proj, &b.mlp.c_fc, &b.mlp.c_proj]
                .iter()
                .all(|c| layers::sgemm_rows_invariant(c.weight.view2()))
        });
        if !shared_prefill {
            tracing::info!(
                openblas_core = %crate::blas_core::report().core,
                "prompts arriving together are prefilled one at a time: this OpenBLAS kernel \
                 set's sgemm rows depend on the other rows in the call, so sharing a step would \
                 change results (correct either way; only time to first token under load differs)"
            );
        }
        Ok(Self {
            shared_prefill,
            wte: w.take("wte.weight")?,
            wpe: w.take("wpe.weight")?,
            h,
            ln_f: LayerNorm::load(&mut w, "ln_f", cfg.eps)?,
            lm_head: w.take_optional("lm_head.weight"),
            dtype: w.dtype.clone(),
            cfg,
        })
    }

    /// Whether [`Gpt2::forward`] accepts prefill chunks of several sequences in one step: true
    /// when `sgemm` was found to compute each row independently of the others in the call.
    pub fn shared_prefill(&self) -> bool {
        self.shared_prefill
    }

    /// Turns shared prefill steps off whatever the load-time check found (only ever safe in
    /// this direction): the model then prefills one sequence per step, as on a machine whose
    /// `sgemm` rows are not batch-invariant. Tests use it to run that branch on every machine.
    #[must_use]
    pub fn without_shared_prefill(mut self) -> Self {
        self.shared_prefill = false;
        self
    }

    /// The validated shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Storage type of the weights file ("F32", "F16", "BF16").
    pub fn dtype(&self) -> &str {
        &self.dtype
    }

    /// Bytes of F32 weights the model holds (mapped or owned).
    pub fn weight_bytes(&self) -> usize {
        let params = self.h.iter().flat_map(|b| {
            [
                &b.ln_1.weight,
                &b.ln_1.bias,
                &b.attn.c_attn.weight,
                &b.attn.c_attn.bias,
                &b.attn.c_proj.weight,
                &b.attn.c_proj.bias,
                &b.ln_2.weight,
                &b.ln_2.bias,
                &b.mlp.c_fc.weight,
                &b.mlp.c_fc.bias,
                &b.mlp.c_proj.weight,
                &b.mlp.c_proj.bias,
            ]
        });
        let top = [&self.wte, &self.wpe, &self.ln_f.weight, &self.ln_f.bias]
            .into_iter()
            .chain(self.lm_head.as_ref());
        params.chain(top).map(|p| p.as_slice().len() * 4).sum()
    }

    /// A cache for `capacity` positions (at most `n_ctx`).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(&self.cfg, capacity.min(self.cfg.n_ctx))
    }

    /// Runs one step over `seqs` and returns the logits of the rows chosen by `which`, in
    /// sequence order. Each cache advances by its sequence's token count. A step is either a
    /// decode step (one new token for each of up to [`SMALL_M`] sequences, computed by the
    /// batch-invariant kernels), a prefill chunk of one sequence (any length, `sgemm`), or —
    /// when [`Gpt2::shared_prefill`] holds — prefill chunks of two or more tokens each of several
    /// sequences (`sgemm`); other mixes are refused, as each row's kernel must not depend on
    /// the other rows of the step. With `trace`, block 0's intermediates are recorded (one
    /// sequence only).
    pub fn forward<'s>(
        &self,
        seqs: &mut [SeqStep<'_>],
        scratch: &'s mut Scratch,
        which: LogitsFor,
        mut trace: Option<&mut Trace>,
    ) -> Result<ArrayView2<'s, f32>, EngineError> {
        let cfg = &self.cfg;
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        self.check_step(seqs)?;
        if trace.is_some() && seqs.len() != 1 {
            return Err(EngineError::Internal("a traced forward takes one sequence".into()));
        }
        let logit_rows = match which {
            LogitsFor::LastOfEach => seqs.len(),
            LogitsFor::AllRows => n,
        };
        let att = seqs
            .iter()
            .map(|s| s.tokens.len() * (s.cache.len() + s.tokens.len()))
            .max()
            .unwrap_or(0);
        scratch.ensure(cfg, n, logit_rows, att);
        scratch.tokens.clear();
        scratch.positions.clear();
        for seq in seqs.iter() {
            scratch.tokens.extend_from_slice(seq.tokens);
            scratch.positions.extend(seq.cache.len()..seq.cache.len() + seq.tokens.len());
        }
        let rows = s![..n, ..];
        let sc = &mut *scratch;
        // Decode steps (one new token per sequence) take the batch-invariant kernel; prefill
        // chunks take sgemm, shared by several sequences only where its rows were checked to be
        // independent of each other.
        let kernel = if seqs.iter().all(|s| s.tokens.len() == 1) {
            if n > SMALL_M {
                return Err(EngineError::Internal(format!(
                    "a decode step has {n} rows, more than {SMALL_M}"
                )));
            }
            Kernel::SmallBatch
        } else if seqs.len() == 1 {
            Kernel::Sgemm
        } else if seqs.iter().any(|s| s.tokens.len() == 1) {
            return Err(EngineError::Internal(
                "a step mixes single-token rows with prefill chunks of other sequences".into(),
            ));
        } else if !self.shared_prefill {
            return Err(EngineError::Internal(
                "prefill chunks of several sequences in one step, but sgemm rows are not \
                 batch-invariant here"
                    .into(),
            ));
        } else {
            Kernel::Sgemm
        };

        // 1. encoder: x = wte[tokens] + wpe[positions]
        layers::encoder(
            sc.x.slice_mut(rows),
            self.wte.view2(),
            self.wpe.view2(),
            &sc.tokens,
            &sc.positions,
        );
        for (l, block) in self.h.iter().enumerate() {
            let mut tr = if l == 0 { trace.as_deref_mut() } else { None };
            // 2. ln_1
            block.ln_1.forward(sc.ln.slice_mut(rows), sc.x.slice(rows));
            // 3. c_attn → Q, K, V
            block.attn.c_attn.forward(sc.qkv.slice_mut(rows), sc.ln.slice(rows), kernel);
            if let Some(t) = tr.as_deref_mut() {
                let c = cfg.n_embd;
                t.record("ln1", sc.ln.slice(rows).to_owned().into_dyn());
                t.record("q", sc.qkv.slice(s![..n, ..c]).to_owned().into_dyn());
                t.record("k", sc.qkv.slice(s![..n, c..2 * c]).to_owned().into_dyn());
                t.record("v", sc.qkv.slice(s![..n, 2 * c..]).to_owned().into_dyn());
            }
            // 4. attention, per sequence against its own cache
            self.attention(l, seqs, sc, tr.as_deref_mut())?;
            // 5. c_proj, 6. residual
            block.attn.c_proj.forward(sc.proj.slice_mut(rows), sc.atty.slice(rows), kernel);
            layers::residual(sc.x.slice_mut(rows), sc.proj.slice(rows));
            if let Some(t) = tr.as_deref_mut() {
                t.record("attn_out", sc.proj.slice(rows).to_owned().into_dyn());
            }
            // 7. ln_2, 8. c_fc, 9. gelu, 10. c_proj + residual
            block.ln_2.forward(sc.ln.slice_mut(rows), sc.x.slice(rows));
            block.mlp.c_fc.forward(sc.fch.slice_mut(rows), sc.ln.slice(rows), kernel);
            layers::gelu(sc.fch.slice_mut(rows));
            block.mlp.c_proj.forward(sc.proj.slice_mut(rows), sc.fch.slice(rows), kernel);
            layers::residual(sc.x.slice_mut(rows), sc.proj.slice(rows));
            if let Some(t) = tr {
                t.record("mlp_in", sc.ln.slice(rows).to_owned().into_dyn());
                t.record("mlp_out", sc.proj.slice(rows).to_owned().into_dyn());
                t.record("block0_out", sc.x.slice(rows).to_owned().into_dyn());
            }
        }
        for seq in seqs.iter_mut() {
            seq.cache.advance(seq.tokens.len());
        }

        // Head: ln_f on the chosen rows, then logits = h·wteᵀ.
        let out_rows = s![..logit_rows, ..];
        match which {
            LogitsFor::AllRows => self.ln_f.forward(sc.last.slice_mut(out_rows), sc.x.slice(rows)),
            LogitsFor::LastOfEach => {
                let mut end = 0;
                for (i, seq) in seqs.iter().enumerate() {
                    end += seq.tokens.len();
                    sc.last.row_mut(i).assign(&sc.x.row(end - 1));
                }
                let picked = sc.last.slice(out_rows).to_owned();
                self.ln_f.forward(sc.last.slice_mut(out_rows), picked.view());
            }
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.wte);
        layers::lm_head(sc.logits.slice_mut(out_rows), sc.last.slice(out_rows), head.view2());
        Ok(scratch.logits.slice(out_rows))
    }

    /// Writes this step's K and V into each sequence's cache, then attends.
    fn attention(
        &self,
        layer: usize,
        seqs: &mut [SeqStep<'_>],
        sc: &mut Scratch,
        mut trace: Option<&mut Trace>,
    ) -> Result<(), EngineError> {
        let c = self.cfg.n_embd;
        let nh = self.cfg.n_head;
        let mut row = 0;
        for seq in seqs.iter_mut() {
            let rows = s![row..row + seq.tokens.len(), ..];
            let qkv = sc.qkv.slice(rows);
            seq.cache.write(layer, qkv.slice(s![.., c..2 * c]), qkv.slice(s![.., 2 * c..]));
            row += seq.tokens.len();
        }
        if trace.is_none() && seqs.iter().all(|s| s.tokens.len() == 1) {
            self.attention_decode(layer, seqs, sc);
            return Ok(());
        }
        let mut row = 0;
        for seq in seqs.iter() {
            let s_len = seq.tokens.len();
            let rows = s![row..row + s_len, ..];
            let p_len = seq.cache.len() + s_len;
            let (k, v) = seq.cache.view(layer, p_len);
            let mut scores = trace.as_ref().map(|_| Array2::<f32>::zeros((nh * s_len, p_len)));
            layers::attention(
                sc.atty.slice_mut(rows),
                sc.qkv.slice(rows),
                k,
                v,
                nh,
                &mut sc.att,
                scores.as_mut().map(|a| a.view_mut()),
            );
            if let (Some(t), Some(scores)) = (trace.as_deref_mut(), scores) {
                let scores = scores
                    .into_shape_with_order((nh, s_len, p_len))
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                t.record("att_scores", scores.into_dyn());
            }
            row += s_len;
        }
        Ok(())
    }

    /// A decode step (one new row per sequence): each sequence's attention on the pool, in
    /// parallel; each is computed the same way whatever else is in the batch.
    fn attention_decode(&self, layer: usize, seqs: &[SeqStep<'_>], sc: &mut Scratch) {
        use rayon::prelude::*;
        let nh = self.cfg.n_head;
        let c = self.cfg.n_embd;
        let n = seqs.len();
        let inputs: Vec<_> = seqs
            .iter()
            .enumerate()
            .map(|(i, seq)| {
                let (k, v) = seq.cache.view(layer, seq.cache.len() + 1);
                (sc.qkv.slice(s![i, ..c]), k, v)
            })
            .collect();
        let mut rows = sc.atty.slice_mut(s![..n, ..]);
        let mut outs: Vec<ArrayViewMut1<'_, f32>> = rows.axis_iter_mut(ndarray::Axis(0)).collect();
        if n == 1 {
            let mut scores = Vec::new();
            outs.iter_mut()
                .zip(&inputs)
                .for_each(|(out, input)| decode_one(nh, out, input, &mut scores));
        } else {
            crate::threads::pool().install(|| {
                outs.par_iter_mut()
                    .zip(inputs.par_iter())
                    .for_each_init(Vec::new, |scores, (out, input)| {
                        decode_one(nh, out, input, scores)
                    });
            });
        }
    }

    fn check_step(&self, seqs: &[SeqStep<'_>]) -> Result<(), EngineError> {
        for seq in seqs {
            if seq.tokens.is_empty() {
                return Err(EngineError::Internal("a sequence step has no tokens".into()));
            }
            if let Some(&bad) = seq.tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(EngineError::invalid(
                    "prompt_ids",
                    format!(
                        "token id {bad} is not below the vocabulary size {}",
                        self.cfg.vocab_size
                    ),
                ));
            }
            let end = seq.cache.len() + seq.tokens.len();
            if end > seq.cache.capacity() {
                return Err(EngineError::Internal(format!(
                    "step needs {end} positions, the cache holds {}",
                    seq.cache.capacity()
                )));
            }
        }
        Ok(())
    }
}

/// One decode row's attention input: `q: (C)`, cached `k, v: (P, C)`.
type DecodeInput<'a> = (ArrayView1<'a, f32>, ArrayView2<'a, f32>, ArrayView2<'a, f32>);

fn decode_one(
    n_head: usize,
    out: &mut ArrayViewMut1<'_, f32>,
    (q, k, v): &DecodeInput<'_>,
    scores: &mut Vec<f32>,
) {
    let out = out.as_slice_mut().expect("rows are contiguous");
    layers::attention_decode(
        out,
        q.as_slice().expect("contiguous"),
        k.view(),
        v.view(),
        n_head,
        scores,
    );
}
