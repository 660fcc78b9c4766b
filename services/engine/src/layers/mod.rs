//! The GPT-2 ops, one function per op, in the order of llm.c's `gpt2_forward`.
//!
//! Shape legend:
//! * `N`  rows in this step: the new tokens of every sequence in the batch, stacked
//! * `C`  channels (n_embd); `F` MLP width (n_inner, 4·C for GPT-2)
//! * `NH` heads, `HS` head size (C / NH)
//! * `V`  vocabulary
//! * `S`  new tokens of one sequence in this step; `P` its positions so far, new ones included
//!
//! Matrix products take one of two [`Kernel`]s: prefill chunks of more than
//! [`gemm::SMALL_M`] tokens go through OpenBLAS `sgemm` (ndarray's `blas` feature); decode
//! steps, shorter prefill chunks and the LM head through the batch-invariant small-batch
//! kernels of [`gemm`]; prefill attention's products are `sgemm` too. Every
//! optimised op has a plain-loop twin in [`naive`] and a test comparing the two.

pub mod gemm;
pub mod naive;
pub mod q8;

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use crate::matrix::Matrix;

/// `√(2/π)`, the constant of the tanh GELU.
const GELU_SCALE: f32 = 0.797_884_6;

/// Token plus position embedding: `wte: (V, C)` (in any weight type, widened to F32),
/// `wpe: (n_ctx, C)`, `tokens: N`, `positions: N` → `out: (N, C)`.
pub fn encoder(
    mut out: ArrayViewMut2<'_, f32>,
    wte: &Matrix,
    wpe: ArrayView2<'_, f32>,
    tokens: &[u32],
    positions: &[usize],
) {
    for ((mut row, &tok), &pos) in out.rows_mut().into_iter().zip(tokens).zip(positions) {
        let row = row.as_slice_mut().expect("rows are contiguous");
        wte.row_into(tok as usize, row);
        for (o, &p) in row.iter_mut().zip(wpe.row(pos)) {
            *o += p;
        }
    }
}

/// LayerNorm over the last dim with the biased variance (divide by C), as torch:
/// `x: (N, C), w: (C), b: (C)` → `out: (N, C)`.
pub fn layernorm(
    mut out: ArrayViewMut2<'_, f32>,
    x: ArrayView2<'_, f32>,
    w: ArrayView1<'_, f32>,
    b: ArrayView1<'_, f32>,
    eps: f32,
) {
    let (w, b) = (w.as_slice().expect("contiguous"), b.as_slice().expect("contiguous"));
    for (mut o, xr) in out.rows_mut().into_iter().zip(x.rows()) {
        let xr = xr.as_slice().expect("rows are contiguous");
        let o = o.as_slice_mut().expect("rows are contiguous");
        let c = xr.len() as f32;
        let mean = xr.iter().sum::<f32>() / c;
        let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / c;
        let rstd = 1.0 / (var + eps).sqrt();
        for i in 0..xr.len() {
            o[i] = (xr[i] - mean) * rstd * w[i] + b[i];
        }
    }
}

/// Which kernel a product uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The batch-invariant small-batch kernel ([`gemm`]): decode steps, whose rows belong to
    /// different sequences, and prefill chunks of at most [`gemm::SMALL_M`] tokens. At most
    /// [`gemm::SMALL_M`] rows.
    SmallBatch,
    /// OpenBLAS `sgemm`: longer prefill chunks, of one sequence, or of several where
    /// [`sgemm_rows_invariant`] was found to hold (`Gpt2::shared_prefill`).
    Sgemm,
}

/// Conv1D: `x: (N, IN), w: IN → OUT, b: (OUT)` → `out: (N, OUT) = x·w + b`, by `kernel`.
pub fn matmul(
    mut out: ArrayViewMut2<'_, f32>,
    x: ArrayView2<'_, f32>,
    w: &Matrix,
    b: ArrayView1<'_, f32>,
    kernel: Kernel,
) {
    let b = b.as_slice().expect("bias is contiguous");
    match kernel {
        Kernel::SmallBatch => w.small_batch(
            x.as_slice().expect("activation rows are contiguous"),
            Some(b),
            x.nrows(),
            out.as_slice_mut().expect("output rows are contiguous"),
        ),
        Kernel::Sgemm => w.sgemm(x, b, out),
    }
}

/// Whether OpenBLAS `sgemm` gives each row of `x·w` bitwise the same result whatever other
/// rows share the call (for calls of two rows or more). Prefill chunks of several sequences may
/// share one call only when this holds, so that batching never changes a stream's tokens.
/// OpenBLAS does not promise it, so the engine checks it at load time on the model's own
/// weight shapes: products of 33 and 40 rows (prefill chunks of at most 32 rows take the
/// small-batch kernel instead) against the same rows inside calls of 80 and of 256 rows (the
/// default prefill budget). Several sizes are needed: OpenBLAS has a separate kernel for small
/// products, chosen by `M·N·K`, and with the weights held `[N, K]` the tiny fixtures' calls of
/// different sizes take different ones (seen with the `SkylakeX`/`Cooperlake` kernels).
pub fn sgemm_rows_invariant(w: &Matrix) -> bool {
    w.with_f32(sgemm_rows_invariant_f32)
}

fn sgemm_rows_invariant_f32(w: ArrayView2<'_, f32>) -> bool {
    let k = w.nrows();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let x = ndarray::Array2::from_shape_fn((256, k), |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    });
    let product = |rows: std::ops::Range<usize>| {
        let mut out = ndarray::Array2::<f32>::zeros((rows.len(), w.ncols()));
        general_mat_mul(1.0, &x.slice(s![rows, ..]), &w, 0.0, &mut out);
        out
    };
    let calls = [product(0..80), product(0..256)];
    [0..33, 33..73, 40..80].into_iter().all(|rows| {
        let part = product(rows.clone());
        calls.iter().all(|all| {
            let same = all.slice(s![rows.clone(), ..]);
            part.iter().zip(same.iter()).all(|(a, b)| a.to_bits() == b.to_bits())
        })
    })
}

/// The LM head: `x: (N, C), wte: (V, C)` → `out: (N, V) = x·wteᵀ` (no bias). Always the
/// batch-invariant kernel: the logits of a row are bitwise the same whether it is computed
/// alone, in a decode batch or among all rows of a prompt (checkpoint 9).
pub fn lm_head(mut out: ArrayViewMut2<'_, f32>, x: ArrayView2<'_, f32>, wte: &Matrix) {
    wte.small_batch(
        x.as_slice().expect("activation rows are contiguous"),
        None,
        x.nrows(),
        out.as_slice_mut().expect("output rows are contiguous"),
    );
}

/// GPT-2's GELU, the tanh form (`gelu_new`), in place: `x: (N, F)`. Large inputs (prefill)
/// are split over the compute pool; the op is elementwise, so the split changes no result.
pub fn gelu(mut x: ArrayViewMut2<'_, f32>) {
    let Some(values) = x.as_slice_mut() else {
        x.mapv_inplace(gelu_scalar);
        return;
    };
    const PER_TASK: usize = 1 << 15;
    if values.len() <= PER_TASK {
        values.iter_mut().for_each(|v| *v = gelu_scalar(*v));
        return;
    }
    crate::threads::pool().install(|| {
        values
            .par_chunks_mut(PER_TASK)
            .for_each(|chunk| chunk.iter_mut().for_each(|v| *v = gelu_scalar(*v)));
    });
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline]
pub fn gelu_scalar(x: f32) -> f32 {
    let cube = 0.044_715 * x * x * x;
    0.5 * x * (1.0 + tanh_fast(GELU_SCALE * (x + cube)))
}

/// `tanh` as a 13/6 rational polynomial (Eigen's `ptanh_float`): |error| ≤ 4e-7 absolute on
/// all of f32 (tanh is ±1 to f32 precision beyond the clamp), branch-free so the GELU loop
/// vectorises; libm's `tanhf` made GELU a tenth of a 512-token prefill. The GELU error it adds is
/// at most 0.5·|x|·4e-7, far inside checkpoint 6's 1e-4.
#[inline]
pub fn tanh_fast(x: f32) -> f32 {
    const CLAMP: f32 = 7.905_311;
    const A: [f32; 7] = [
        4.893_524_6e-3,
        6.372_619_3e-4,
        1.485_722_4e-5,
        5.122_297e-8,
        -8.604_672e-11,
        2.000_188e-13,
        -2.760_768_5e-16,
    ];
    const B: [f32; 4] = [4.893_525e-3, 2.268_434_7e-3, 1.185_347_1e-4, 1.198_258_4e-6];
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let p = ((((((A[6] * x2 + A[5]) * x2 + A[4]) * x2 + A[3]) * x2 + A[2]) * x2 + A[1]) * x2
        + A[0])
        * x;
    let q = ((B[3] * x2 + B[2]) * x2 + B[1]) * x2 + B[0];
    p / q
}

/// Residual connection in place: `x: (N, C) += y: (N, C)`.
pub fn residual(mut x: ArrayViewMut2<'_, f32>, y: ArrayView2<'_, f32>) {
    x += &y;
}

/// Causal self-attention of one sequence for its `S` new rows.
///
/// `qkv: (S, 3C)` is this step's `c_attn` output (Q in columns `[0, C)`); `k, v: (P, C)` are the
/// sequence's cached keys and values, this step's rows already written at `[P-S, P)`.
/// Scores are `Q·Kᵀ / √HS`, key positions after the query's are masked (−∞), softmax with the
/// max subtracted, times V → `out: (S, C)`, heads side by side. `scratch` holds at least `S·P`
/// floats. When `scores_out: (NH·S, P)` is given, the masked scores before softmax are copied
/// there (checkpoint 4).
pub fn attention(
    mut out: ArrayViewMut2<'_, f32>,
    qkv: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    n_head: usize,
    scratch: &mut [f32],
    mut scores_out: Option<ArrayViewMut2<'_, f32>>,
) {
    let (s_len, p_len) = (qkv.nrows(), k.nrows());
    let c = k.ncols();
    let hs = c / n_head;
    let start = p_len - s_len;
    let scale = 1.0 / (hs as f32).sqrt();
    let mut att = ArrayViewMut2::from_shape((s_len, p_len), &mut scratch[..s_len * p_len])
        .expect("scratch holds S·P floats");
    let pool = crate::threads::pool();
    for h in 0..n_head {
        let cols = h * hs..(h + 1) * hs;
        let q_h = qkv.slice(s![.., cols.clone()]);
        let k_h = k.slice(s![.., cols.clone()]);
        let v_h = v.slice(s![.., cols.clone()]);
        // scores = q·kᵀ·scale
        general_mat_mul(scale, &q_h, &k_h.t(), 0.0, &mut att);
        if let Some(dst) = scores_out.as_mut() {
            let mut dst = dst.slice_mut(s![h * s_len..(h + 1) * s_len, ..]);
            dst.assign(&att);
            for (i, mut row) in dst.axis_iter_mut(Axis(0)).enumerate() {
                // Query i sits at position start + i; later keys are masked.
                row.slice_mut(s![start + i + 1..]).fill(f32::NEG_INFINITY);
            }
        }
        // Softmax over each row's visible keys, masked keys set to 0: the same bits as a
        // softmax over the row with −∞ at the masked keys (exp(−∞) = 0 adds nothing), without
        // the work. Rows are independent, so they are split over the compute pool.
        pool.install(|| {
            let rows = att.as_slice_mut().expect("contiguous scratch");
            rows.par_chunks_mut(p_len).enumerate().for_each(|(i, row)| {
                let (visible, masked) = row.split_at_mut(start + i + 1);
                softmax(visible);
                masked.fill(0.0);
            });
        });
        let mut out_h = out.slice_mut(s![.., cols]);
        general_mat_mul(1.0, &att, &v_h, 0.0, &mut out_h);
    }
}

/// Attention of one new row (a decode step): `q: (C)` at the last position, `k, v: (P, C)` the
/// sequence's cached keys and values (this step's row included) → `out: (C)`. No mask is needed:
/// every cached position precedes the query. The same math as [`attention`], as loops: one pass
/// over the keys for all heads, softmax per head, one pass over the values. `scores` is
/// scratch, resized to `NH·P`.
pub fn attention_decode(
    out: &mut [f32],
    q: &[f32],
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    n_head: usize,
    scores: &mut Vec<f32>,
) {
    attention_decode_heads(out, q, k, v, n_head, 0..n_head, scores);
}

/// [`attention_decode`] for heads `heads` only: `out` is their `heads.len()·HS` outputs. Each
/// head's arithmetic is the same whichever heads are computed together, so a row split by
/// heads over threads gets the bits of the row computed whole.
pub fn attention_decode_heads(
    out: &mut [f32],
    q: &[f32],
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    n_head: usize,
    heads: std::ops::Range<usize>,
    scores: &mut Vec<f32>,
) {
    let (p_len, c) = k.dim();
    let hs = c / n_head;
    let scale = 1.0 / (hs as f32).sqrt();
    let (ks, vs) = (
        k.as_slice().expect("cache rows are contiguous"),
        v.as_slice().expect("cache rows are contiguous"),
    );
    let (h0, nh) = (heads.start, heads.len());
    assert_eq!(out.len(), nh * hs, "out holds the heads' outputs");
    scores.clear();
    scores.resize(nh * p_len, 0.0);
    for (j, krow) in ks.chunks_exact(c).enumerate() {
        for h in 0..nh {
            let at = (h0 + h) * hs..(h0 + h + 1) * hs;
            scores[h * p_len + j] = dot(&q[at.clone()], &krow[at]) * scale;
        }
    }
    for h in 0..nh {
        softmax(&mut scores[h * p_len..(h + 1) * p_len]);
    }
    out.fill(0.0);
    for (j, vrow) in vs.chunks_exact(c).enumerate() {
        for h in 0..nh {
            let w = scores[h * p_len + j];
            let (o, vr) = (&mut out[h * hs..(h + 1) * hs], &vrow[(h0 + h) * hs..(h0 + h + 1) * hs]);
            for (o, &x) in o.iter_mut().zip(vr) {
                *o += w * x;
            }
        }
    }
}

/// Dot product in eight lanes (so it vectorises without reassociating a single sum).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Softmax in place with the max subtracted; −∞ entries become 0. The sum is accumulated in
/// f64: over a 50257-entry vocabulary an f32 running sum drifts by ~1e-4.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests;
