//! Plain-loop twins of the optimised ops, written to be obviously right rather than fast.
//! Tests run each optimised op against its twin; nothing on the serving path calls these.

use ndarray::{Array2, Array3, ArrayView1, ArrayView2};

/// LayerNorm, biased variance, accumulated in f64.
pub fn layernorm(
    x: ArrayView2<'_, f32>,
    w: ArrayView1<'_, f32>,
    b: ArrayView1<'_, f32>,
    eps: f32,
) -> Array2<f32> {
    let (n, c) = x.dim();
    let mut out = Array2::zeros((n, c));
    for t in 0..n {
        let mean: f64 = (0..c).map(|i| f64::from(x[[t, i]])).sum::<f64>() / c as f64;
        let var: f64 =
            (0..c).map(|i| (f64::from(x[[t, i]]) - mean).powi(2)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + f64::from(eps)).sqrt();
        for i in 0..c {
            out[[t, i]] =
                ((f64::from(x[[t, i]]) - mean) * rstd * f64::from(w[i]) + f64::from(b[i])) as f32;
        }
    }
    out
}

/// `x·w + b` by three loops, accumulated in f64.
pub fn matmul(
    x: ArrayView2<'_, f32>,
    w: ArrayView2<'_, f32>,
    b: Option<ArrayView1<'_, f32>>,
) -> Array2<f32> {
    let (n, k) = x.dim();
    let m = w.ncols();
    let mut out = Array2::zeros((n, m));
    for t in 0..n {
        for o in 0..m {
            let mut acc = b.map_or(0.0, |b| f64::from(b[o]));
            for i in 0..k {
                acc += f64::from(x[[t, i]]) * f64::from(w[[i, o]]);
            }
            out[[t, o]] = acc as f32;
        }
    }
    out
}

/// The tanh GELU in f64.
pub fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh()))
        as f32
}

/// Causal attention of one sequence, every head, by loops: `q: (S, C)` at positions
/// `[P-S, P)`, `k, v: (P, C)` → (`out: (S, C)`, masked scores before softmax `(NH, S, P)`).
pub fn attention(
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    n_head: usize,
) -> (Array2<f32>, Array3<f32>) {
    let (s_len, c) = q.dim();
    let p_len = k.nrows();
    let hs = c / n_head;
    let start = p_len - s_len;
    let mut out = Array2::zeros((s_len, c));
    let mut scores = Array3::from_elem((n_head, s_len, p_len), f32::NEG_INFINITY);
    for h in 0..n_head {
        for i in 0..s_len {
            let mut row = vec![f64::NEG_INFINITY; p_len];
            for (j, r) in row.iter_mut().enumerate().take(start + i + 1) {
                let dot: f64 = (0..hs)
                    .map(|d| f64::from(q[[i, h * hs + d]]) * f64::from(k[[j, h * hs + d]]))
                    .sum();
                *r = dot / (hs as f64).sqrt();
                scores[[h, i, j]] = *r as f32;
            }
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = row.iter().map(|&r| (r - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for d in 0..hs {
                let acc: f64 =
                    (0..p_len).map(|j| exps[j] / sum * f64::from(v[[j, h * hs + d]])).sum();
                out[[i, h * hs + d]] = acc as f32;
            }
        }
    }
    (out, scores)
}
