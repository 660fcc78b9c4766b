//! GPT-2, shaped like the checkpoint: struct fields are the tensor names (`wte`, `wpe`,
//! `h.{i}.ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ln_f`); each
//! struct has `load` and `forward`. Each `load` names its tensors with their shapes, once
//! ([`Weights::take`]). Weights are immutable and shared; all per-sequence state is in
//! [`KvCache`] and per-step buffers in [`Scratch`].
//!
//! One forward call runs either prefill chunks (`S ≥ 2` tokens each) of one or more sequences,
//! or a decode step of one token for each of several sequences. The rows of all sequences are
//! stacked so every weight matrix is streamed once for the whole step; attention runs per
//! sequence, against its own cache.

use std::path::Path;

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, s};

use crate::config::{Gpt2Config, ModelConfig};
use crate::error::EngineError;
use crate::kv_cache::KvCache;
use crate::layers::gemm::{Layout, SMALL_M};
use crate::layers::{self, Kernel};
use crate::matrix::{Matrix, WeightFormat};
use crate::weights::{Param, Weights};

mod step;

use step::record;
pub use step::{LogitsFor, Scratch, SeqStep, Trace};

/// `ln_1`, `ln_2`, `ln_f`.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &mut Weights, c: usize, eps: f32) -> Result<Self, EngineError> {
        Ok(Self { weight: w.take("weight", [c])?, bias: w.take("bias", [c])?, eps })
    }

    /// `x: (N, C)` → `out: (N, C)`.
    fn forward(&self, out: ArrayViewMut2<'_, f32>, x: ArrayView2<'_, f32>) {
        layers::layernorm(out, x, self.weight.view1(), self.bias.view1(), self.eps);
    }
}

/// Hugging Face's `Conv1D`: weight stored `[in, out]`, applied as `x·W + b`.
#[derive(Debug)]
pub struct Conv1D {
    weight: Matrix,
    bias: Param,
}

impl Conv1D {
    fn load(w: &mut Weights, n_in: usize, n_out: usize) -> Result<Self, EngineError> {
        Ok(Self {
            weight: w.take_matrix("weight", (n_in, n_out), Layout::KN)?,
            bias: w.take("bias", [n_out])?,
        })
    }

    /// `x: (N, IN)` → `out: (N, OUT)`.
    fn forward(&self, out: ArrayViewMut2<'_, f32>, x: ArrayView2<'_, f32>, kernel: Kernel) {
        layers::matmul(out, x, &self.weight, self.bias.view1(), kernel);
    }
}

/// `attn`: `c_attn` (C → 3C: Q, K, V side by side) and `c_proj` (C → C).
#[derive(Debug)]
pub struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
    n_embd: usize,
}

impl Attention {
    fn load(w: &mut Weights, cfg: &ModelConfig) -> Result<Self, EngineError> {
        let c = cfg.n_embd;
        // Hub files carry the causal mask as buffers; attention masks by position instead.
        w.ignore("bias");
        w.ignore("masked_bias");
        let c_attn = Conv1D::load(&mut w.pp("c_attn"), c, 3 * c)?;
        let c_proj = Conv1D::load(&mut w.pp("c_proj"), c, c)?;
        Ok(Self { c_attn, c_proj, n_head: cfg.n_head, n_embd: c })
    }

    /// `ln: (N, C)` → `proj: (N, C)`: `c_attn` to Q, K, V; each sequence's K and V written
    /// into its cache (layer `layer`); each sequence's attention against its own cache;
    /// `c_proj`. Traced: `q`, `k`, `v`, `att_scores`.
    fn forward(
        &self,
        layer: usize,
        seqs: &mut [SeqStep<'_>],
        sc: &mut Scratch,
        kernel: Kernel,
        mut trace: Option<&mut Trace>,
    ) -> Result<(), EngineError> {
        let (n, c) = (sc.tokens.len(), self.n_embd);
        let rows = s![..n, ..];
        self.c_attn.forward(sc.qkv.slice_mut(rows), sc.ln.slice(rows), kernel);
        record(&mut trace, "q", sc.qkv.slice(s![..n, ..c]));
        record(&mut trace, "k", sc.qkv.slice(s![..n, c..2 * c]));
        record(&mut trace, "v", sc.qkv.slice(s![..n, 2 * c..]));
        let mut row = 0;
        for seq in seqs.iter_mut() {
            let qkv = sc.qkv.slice(s![row..row + seq.tokens.len(), ..]);
            seq.cache.write(layer, qkv.slice(s![.., c..2 * c]), qkv.slice(s![.., 2 * c..]));
            row += seq.tokens.len();
        }
        // A one-token sequence's attention is always the decode path's, whatever else is in
        // the step, so that its bits never depend on the other sequences.
        if trace.is_none() && seqs.iter().all(|s| s.tokens.len() == 1) {
            self.attend_decode(layer, seqs, sc);
        } else {
            self.attend(layer, seqs, sc, trace)?;
        }
        self.c_proj.forward(sc.proj.slice_mut(rows), sc.atty.slice(rows), kernel);
        Ok(())
    }

    /// `qkv: (N, 3C)` → `atty: (N, C)`, one sequence after the other (a one-token sequence by
    /// the decode path, as in [`Attention::attend_decode`]).
    fn attend(
        &self,
        layer: usize,
        seqs: &[SeqStep<'_>],
        sc: &mut Scratch,
        mut trace: Option<&mut Trace>,
    ) -> Result<(), EngineError> {
        let nh = self.n_head;
        let mut row = 0;
        for seq in seqs {
            let s_len = seq.tokens.len();
            let rows = s![row..row + s_len, ..];
            let p_len = seq.cache.len() + s_len;
            let (k, v) = seq.cache.view(layer, p_len);
            if s_len == 1 && trace.is_none() {
                let mut out = sc.atty.row_mut(row);
                let input = (sc.qkv.slice(s![row, ..self.n_embd]), k, v);
                decode_one(nh, &mut out, &input, &mut Vec::new());
                row += 1;
                continue;
            }
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

    /// A decode step (one new row per sequence): the sequences' heads split evenly over the
    /// compute team, as one list of (sequence, head) items cut into a run per thread (a lone
    /// stream's heads over every core, a batch's rows and heads alike). Each head is computed
    /// the same way whatever else is in the batch or in its run.
    fn attend_decode(&self, layer: usize, seqs: &[SeqStep<'_>], sc: &mut Scratch) {
        let (nh, c, n) = (self.n_head, self.n_embd, seqs.len());
        let hs = c / nh;
        let team = crate::threads::team();
        let per = (n * nh).div_ceil(team.size());
        // Each row cut where a run begins: per thread, its (sequence, heads, output) segments.
        type Segment<'o> = (usize, std::ops::Range<usize>, &'o mut [f32]);
        let mut runs: Vec<Vec<Segment<'_>>> = (0..team.size()).map(|_| Vec::new()).collect();
        let (atty, qkv) = (&mut sc.atty, &sc.qkv);
        let mut rows = atty.slice_mut(s![..n, ..]);
        for (i, row) in rows.axis_iter_mut(ndarray::Axis(0)).enumerate() {
            let mut rest = row.into_slice().expect("rows are contiguous");
            let mut h = 0;
            while h < nh {
                let run = (i * nh + h) / per;
                let end = ((run + 1) * per - i * nh).min(nh);
                let (segment, tail) = std::mem::take(&mut rest).split_at_mut((end - h) * hs);
                runs[run].push((i, h..end, segment));
                rest = tail;
                h = end;
            }
        }
        let runs: Vec<std::sync::Mutex<Vec<Segment<'_>>>> =
            runs.into_iter().map(std::sync::Mutex::new).collect();
        team.fork(&|t| {
            let mut run = runs[t].lock().unwrap_or_else(|e| e.into_inner());
            let mut scores = Vec::new();
            for (i, heads, out) in run.iter_mut() {
                let seq = &seqs[*i];
                let (k, v) = seq.cache.view(layer, seq.cache.len() + 1);
                let q = qkv.slice(s![*i, ..c]);
                let q = q.as_slice().expect("contiguous");
                layers::attention_decode_heads(out, q, k, v, nh, heads.clone(), &mut scores);
            }
        });
    }
}

/// `mlp`: `c_fc` (C → F), tanh GELU, `c_proj` (F → C).
#[derive(Debug)]
pub struct Mlp {
    c_fc: Conv1D,
    c_proj: Conv1D,
}

impl Mlp {
    fn load(w: &mut Weights, cfg: &ModelConfig) -> Result<Self, EngineError> {
        let (c, f) = (cfg.n_embd, cfg.n_inner);
        let c_fc = Conv1D::load(&mut w.pp("c_fc"), c, f)?;
        let c_proj = Conv1D::load(&mut w.pp("c_proj"), f, c)?;
        Ok(Self { c_fc, c_proj })
    }

    /// `ln: (N, C)` → `fch: (N, F)` → `proj: (N, C)`.
    fn forward(&self, sc: &mut Scratch, kernel: Kernel) {
        let rows = s![..sc.tokens.len(), ..];
        self.c_fc.forward(sc.fch.slice_mut(rows), sc.ln.slice(rows), kernel);
        layers::gelu(sc.fch.slice_mut(rows));
        self.c_proj.forward(sc.proj.slice_mut(rows), sc.fch.slice(rows), kernel);
    }
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
    fn load(w: &mut Weights, cfg: &ModelConfig) -> Result<Self, EngineError> {
        let c = cfg.n_embd;
        // One statement each: a prefix guard lives to the end of its statement.
        let ln_1 = LayerNorm::load(&mut w.pp("ln_1"), c, cfg.eps)?;
        let attn = Attention::load(&mut w.pp("attn"), cfg)?;
        let ln_2 = LayerNorm::load(&mut w.pp("ln_2"), c, cfg.eps)?;
        let mlp = Mlp::load(&mut w.pp("mlp"), cfg)?;
        Ok(Self { ln_1, attn, ln_2, mlp })
    }

    /// `x: (N, C)` in place, layer `layer`. Traced (block 0): `ln1`, the attention's tensors,
    /// `attn_out`, `mlp_in`, `mlp_out`, `block0_out`.
    fn forward(
        &self,
        layer: usize,
        seqs: &mut [SeqStep<'_>],
        sc: &mut Scratch,
        kernel: Kernel,
        mut trace: Option<&mut Trace>,
    ) -> Result<(), EngineError> {
        let rows = s![..sc.tokens.len(), ..];
        self.ln_1.forward(sc.ln.slice_mut(rows), sc.x.slice(rows));
        record(&mut trace, "ln1", sc.ln.slice(rows));
        self.attn.forward(layer, seqs, sc, kernel, trace.as_deref_mut())?;
        record(&mut trace, "attn_out", sc.proj.slice(rows));
        layers::residual(sc.x.slice_mut(rows), sc.proj.slice(rows));
        self.ln_2.forward(sc.ln.slice_mut(rows), sc.x.slice(rows));
        record(&mut trace, "mlp_in", sc.ln.slice(rows));
        self.mlp.forward(sc, kernel);
        record(&mut trace, "mlp_out", sc.proj.slice(rows));
        layers::residual(sc.x.slice_mut(rows), sc.proj.slice(rows));
        record(&mut trace, "block0_out", sc.x.slice(rows));
        Ok(())
    }
}

/// GPT-2 with its weights.
#[derive(Debug)]
pub struct Gpt2 {
    cfg: ModelConfig,
    /// `(V, C)`: the token embedding and, tied, the LM head.
    wte: Matrix,
    wpe: Param,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// An untied LM head, when the checkpoint has `lm_head.weight`; otherwise `wte` is used.
    lm_head: Option<Matrix>,
    /// The file's storage type ("F32", "F16", "BF16").
    stored_dtype: String,
    weight_bytes: usize,
    /// `llorch_model_name` from `config.json`, when there.
    name: Option<String>,
    /// Whether prefill chunks of several sequences may share a forward call (see
    /// [`layers::sgemm_rows_invariant`]).
    shared_prefill: bool,
}

impl Gpt2 {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face model folder: every
    /// tensor the model takes must be there with its shape, and nothing else. Weight matrices
    /// are held as the file stores them.
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        Self::load_as(dir, WeightFormat::Stored)
    }

    /// [`Gpt2::load`], holding the weight matrices as `format` says (`--weights`).
    pub fn load_as(dir: &Path, format: WeightFormat) -> Result<Self, EngineError> {
        let config = Gpt2Config::from_dir(dir)?;
        let cfg = config.validate()?;
        let mut weights = Weights::load(&dir.join("model.safetensors"))?.with_format(format);
        let mut model = Self::from_weights(cfg, &mut weights)?;
        model.name = config.llorch_model_name.filter(|n| !n.trim().is_empty());
        weights.finish()?;
        let h = &model.h;
        let shared_prefill = h.first().is_none_or(|b| {
            [&b.attn.c_attn, &b.attn.c_proj, &b.mlp.c_fc, &b.mlp.c_proj]
                .iter()
                .all(|c| layers::sgemm_rows_invariant(&c.weight))
        });
        if !shared_prefill {
            tracing::info!(
                openblas_core = %crate::blas_core::report().core,
                "prompts arriving together are prefilled one at a time: this OpenBLAS kernel \
                 set's sgemm rows depend on the other rows in the call, so sharing a step would \
                 change results (correct either way; only time to first token under load differs)"
            );
        }
        model.shared_prefill = shared_prefill;
        Ok(model)
    }

    /// Takes the tensors of a GPT-2 of shape `cfg` from `w`, in checkpoint order; each is named
    /// with its shape here and in the `load` of the struct that holds it. Leftovers are for
    /// the caller ([`Weights::finish`]); prefill chunks are not shared until [`Gpt2::load`]
    /// has checked `sgemm`.
    pub(crate) fn from_weights(cfg: ModelConfig, w: &mut Weights) -> Result<Self, EngineError> {
        let (v, c) = (cfg.vocab_size, cfg.n_embd);
        let stored_dtype = w.dtype();
        let wte = w.take_matrix("wte.weight", (c, v), Layout::NK)?;
        let wpe = w.take("wpe.weight", [cfg.n_ctx, c])?;
        let h = (0..cfg.n_layer)
            .map(|i| Block::load(&mut w.pp("h").pp(i), &cfg))
            .collect::<Result<_, _>>()?;
        let ln_f = LayerNorm::load(&mut w.pp("ln_f"), c, cfg.eps)?;
        // Tied configs use `wte` unless the file has its own head; untied ones need it.
        let lm_head = if cfg.tie_word_embeddings {
            w.take_optional_matrix("lm_head.weight", (c, v), Layout::NK)?
        } else {
            Some(w.take_matrix("lm_head.weight", (c, v), Layout::NK)?)
        };
        Ok(Self {
            wte,
            wpe,
            h,
            ln_f,
            lm_head,
            stored_dtype,
            weight_bytes: w.bytes(),
            name: None,
            shared_prefill: false,
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

    /// The name `config.json` gives the model (`llorch_model_name`), if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The validated shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Type the weight matrices are held in: "F32", "F16", "BF16" or "Q8_0".
    pub fn dtype(&self) -> &str {
        self.wte.dtype()
    }

    /// Storage type of the weights file ("F32", "F16", "BF16").
    pub fn stored_dtype(&self) -> &str {
        &self.stored_dtype
    }

    /// The decode kernels this model runs on this CPU: the kernel set of its weight type
    /// (`avx512`, `avx2` or `portable`; for Q8_0 `avx512-vnni`, `avx2` or `portable`).
    pub fn kernel_set(&self) -> &'static str {
        let isa = layers::gemm::Isa::detect();
        if self.dtype() == "Q8_0" {
            layers::q8::kernel_name(isa)
        } else {
            layers::gemm::kernel_name(isa)
        }
    }

    /// Bytes of weights the model holds (mapped or owned).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// A cache for `capacity` positions (at most `n_ctx`).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(&self.cfg, capacity.min(self.cfg.n_ctx))
    }

    /// Runs one step over `seqs` and returns the logits of the rows chosen by `which`, in
    /// sequence order. Each cache advances by its sequence's token count. A step is a decode
    /// step (one new token for each of up to [`SMALL_M`] sequences) or prefill chunks; which
    /// mixes are accepted, and with which kernel, is decided in one place (`Gpt2::kernel`).
    /// With `trace`, block 0's intermediates are recorded (one sequence only). As llm.c's
    /// `gpt2_forward`: the encoder, the blocks, the head.
    pub fn forward<'s>(
        &self,
        seqs: &mut [SeqStep<'_>],
        scratch: &'s mut Scratch,
        which: LogitsFor,
        trace: Option<&mut Trace>,
    ) -> Result<ArrayView2<'s, f32>, EngineError> {
        // On a compute-pool thread, so each product's split runs there too: the calling thread
        // then takes a share of the work instead of waking the pool and sleeping until it is
        // done, twice per product (about a fifth of a decode step's time, measured).
        crate::threads::pool().install(|| self.forward_in_pool(seqs, scratch, which, trace))
    }

    fn forward_in_pool<'s>(
        &self,
        seqs: &mut [SeqStep<'_>],
        scratch: &'s mut Scratch,
        which: LogitsFor,
        mut trace: Option<&mut Trace>,
    ) -> Result<ArrayView2<'s, f32>, EngineError> {
        self.check_step(seqs)?;
        if trace.is_some() && seqs.len() != 1 {
            return Err(EngineError::Internal("a traced forward takes one sequence".into()));
        }
        let kernel = self.kernel(seqs)?;
        let logit_rows = match which {
            LogitsFor::LastOfEach => seqs.len(),
            LogitsFor::AllRows => seqs.iter().map(|s| s.tokens.len()).sum(),
        };
        scratch.prepare(&self.cfg, seqs, logit_rows);
        let sc = &mut *scratch;
        let rows = s![..sc.tokens.len(), ..];
        layers::encoder(
            sc.x.slice_mut(rows),
            &self.wte,
            self.wpe.view2(),
            &sc.tokens,
            &sc.positions,
        );
        for (layer, block) in self.h.iter().enumerate() {
            let trace = if layer == 0 { trace.as_deref_mut() } else { None };
            block.forward(layer, seqs, sc, kernel, trace)?;
        }
        for seq in seqs.iter_mut() {
            seq.cache.advance(seq.tokens.len());
        }
        Ok(self.head(seqs, scratch, which))
    }

    /// The kernel of a step's products, the one place it is chosen, from each sequence's own
    /// row count so that no row's kernel depends on the other rows of the step:
    /// * a sequence bringing at most [`SMALL_M`] rows (a decode step's one token, or a short
    ///   prefill chunk) takes the batch-invariant small-batch kernel, and so does a step of
    ///   several such sequences, up to [`SMALL_M`] rows in all. For a short prompt this is also
    ///   the faster kernel: `sgemm` packs every weight matrix for a few rows, and F16/Q8_0
    ///   matrices would first be widened to F32 (a 30-token prefill of gpt2-small takes about
    ///   half the time, docs/PERFORMANCE.md);
    /// * a longer chunk takes `sgemm`: alone, or with other long chunks when
    ///   [`Gpt2::shared_prefill`] holds.
    ///
    /// Other mixes are refused.
    fn kernel(&self, seqs: &[SeqStep<'_>]) -> Result<Kernel, EngineError> {
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        let small = |s: &SeqStep<'_>| s.tokens.len() <= SMALL_M;
        if seqs.iter().all(small) {
            if n > SMALL_M {
                return Err(EngineError::Internal(format!(
                    "a small-batch step has {n} rows, more than {SMALL_M}"
                )));
            }
            Ok(Kernel::SmallBatch)
        } else if seqs.len() == 1 {
            Ok(Kernel::Sgemm)
        } else if seqs.iter().any(small) {
            Err(EngineError::Internal(format!(
                "a step mixes sequences of at most {SMALL_M} rows (small-batch kernel) with \
                 longer prefill chunks"
            )))
        } else if !self.shared_prefill {
            Err(EngineError::Internal(
                "prefill chunks of several sequences in one step, but sgemm rows are not \
                 batch-invariant here"
                    .into(),
            ))
        } else {
            Ok(Kernel::Sgemm)
        }
    }

    /// `ln_f` on the rows `which` picks, then `logits = h·wteᵀ` (or the untied head):
    /// `(B, V)` for the last row of each sequence, `(N, V)` for all rows.
    fn head<'s>(
        &self,
        seqs: &[SeqStep<'_>],
        sc: &'s mut Scratch,
        which: LogitsFor,
    ) -> ArrayView2<'s, f32> {
        let n = sc.tokens.len();
        let out = match which {
            LogitsFor::AllRows => {
                self.ln_f.forward(sc.last.slice_mut(s![..n, ..]), sc.x.slice(s![..n, ..]));
                n
            }
            LogitsFor::LastOfEach => {
                let mut end = 0;
                for (i, seq) in seqs.iter().enumerate() {
                    end += seq.tokens.len();
                    let last = s![end - 1..end, ..];
                    self.ln_f.forward(sc.last.slice_mut(s![i..=i, ..]), sc.x.slice(last));
                }
                seqs.len()
            }
        };
        let rows = s![..out, ..];
        let head = self.lm_head.as_ref().unwrap_or(&self.wte);
        layers::lm_head(sc.logits.slice_mut(rows), sc.last.slice(rows), head);
        sc.logits.slice(rows)
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
