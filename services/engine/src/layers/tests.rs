//! Each optimised op against its plain-loop twin in [`super::naive`].

use ndarray::{Array1, Array2, s};

use super::*;
use crate::matrix::WeightFormat;

/// Deterministic pseudo-random values in [-scale, scale).
fn filled(shape: (usize, usize), seed: u64, scale: f32) -> Array2<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    Array2::from_shape_fn(shape, |_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    })
}

fn max_abs_diff(a: &Array2<f32>, b: &Array2<f32>) -> (f32, usize) {
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b.iter()).enumerate().fold((0.0, 0), |(m, at), (i, (x, y))| {
        let d = (x - y).abs();
        if d > m { (d, i) } else { (m, at) }
    })
}

#[track_caller]
fn assert_close(got: &Array2<f32>, want: &Array2<f32>, tol: f32) {
    let (diff, at) = max_abs_diff(got, want);
    assert!(diff <= tol, "max abs diff {diff} at flat index {at} (tolerance {tol})");
}

#[test]
fn layernorm_matches_the_loop_version() {
    let x = filled((5, 48), 1, 3.0);
    let (w, b) =
        (filled((1, 48), 2, 1.0).row(0).to_owned(), filled((1, 48), 3, 1.0).row(0).to_owned());
    let mut out = Array2::zeros((5, 48));
    layernorm(out.view_mut(), x.view(), w.view(), b.view(), 1e-5);
    assert_close(&out, &naive::layernorm(x.view(), w.view(), b.view(), 1e-5), 1e-5);
}

/// The values a matrix held as `format` stands for, widened back to F32 (`(K, N)`).
fn held(w: &Array2<f32>, format: WeightFormat, layout: gemm::Layout) -> (Matrix, Array2<f32>) {
    let (k, n) = match layout {
        gemm::Layout::KN => w.dim(),
        gemm::Layout::NK => (w.ncols(), w.nrows()),
    };
    let m = Matrix::from_f32(w.iter().copied().collect(), layout, k, n).convert(format);
    let mut wide = Array2::zeros((k, n));
    m.with_f32(|v| wide.assign(&v));
    (m, wide)
}

const FORMATS: [WeightFormat; 4] =
    [WeightFormat::F32, WeightFormat::F16, WeightFormat::Bf16, WeightFormat::Q8_0];

#[test]
fn matmul_matches_the_loop_version_for_one_and_many_rows_in_every_weight_type() {
    let w = filled((64, 72), 4, 0.5);
    let b = filled((1, 72), 5, 0.5).row(0).to_owned();
    for format in FORMATS {
        let (m, wide) = held(&w, format, gemm::Layout::KN);
        // sgemm, and the small-batch kernels of F32, F16 and BF16, compute on the held values
        // exactly; Q8_0's kernel also rounds the activations to 8 bits per block (steps of
        // max|x|/127 ≤ 1/127 here, times |w| ≤ 0.5, over 64 terms: ≤ 0.13, far less in fact).
        let tol = if format == WeightFormat::Q8_0 { 0.1 } else { 1e-5 };
        for n in [1, 2, 7] {
            let x = filled((n, 64), 6 + n as u64, 1.0);
            let want = naive::matmul(x.view(), wide.view(), Some(b.view()));
            for kernel in [Kernel::SmallBatch, Kernel::Sgemm] {
                let mut out = Array2::zeros((n, 72));
                matmul(out.view_mut(), x.view(), &m, b.view(), kernel);
                assert_close(&out, &want, if kernel == Kernel::Sgemm { 1e-5 } else { tol });
            }
        }
    }
}

#[test]
fn half_precision_weights_give_the_bits_of_their_f32_values() {
    let w = filled((64, 72), 4, 0.5);
    for format in [WeightFormat::F16, WeightFormat::Bf16] {
        for layout in [gemm::Layout::KN, gemm::Layout::NK] {
            let (m, wide) = held(&w, format, layout);
            let values = match layout {
                gemm::Layout::KN => wide.iter().copied().collect(),
                gemm::Layout::NK => wide.t().iter().copied().collect(),
            };
            let upcast = Matrix::from_f32(values, layout, m.k(), m.n());
            let x = filled((5, m.k()), 11, 1.0);
            for rows in [1, 5] {
                let xs = x.slice(s![..rows, ..]);
                let (mut a, mut b) = (vec![0.0; rows * m.n()], vec![0.0; rows * m.n()]);
                m.small_batch(xs.as_slice().unwrap(), None, rows, &mut a);
                upcast.small_batch(xs.as_slice().unwrap(), None, rows, &mut b);
                assert_eq!(a, b, "{format:?} {layout:?} {rows} rows");
            }
        }
    }
}

#[test]
fn lm_head_is_x_times_wte_transposed() {
    let wte = filled((100, 64), 7, 1.0);
    for format in FORMATS {
        let (m, wide) = held(&wte, format, gemm::Layout::NK);
        let tol = if format == WeightFormat::Q8_0 { 0.2 } else { 1e-5 };
        for n in [1, 3] {
            let x = filled((n, 64), 8, 1.0);
            let mut out = Array2::zeros((n, 100));
            lm_head(out.view_mut(), x.view(), &m);
            assert_close(&out, &naive::matmul(x.view(), wide.view(), None), tol);
        }
    }
}

#[test]
fn gelu_is_the_tanh_form() {
    let x = filled((1, 200), 9, 6.0);
    let mut y = x.clone();
    gelu(y.view_mut());
    let want = x.mapv(naive::gelu);
    // The fast tanh is within 4e-7, so GELU within 0.5·|x|·4e-7 (≤ 1.2e-6 here) plus rounding.
    for (i, (&g, &w)) in y.iter().zip(want.iter()).enumerate() {
        let bound = 0.5 * x[[0, i]].abs() * 4e-7 + 2e-7 * w.abs().max(1.0);
        assert!((g - w).abs() <= bound, "x = {}: {g} vs {w}", x[[0, i]]);
    }
    // Known values of the tanh form; the erf form gives -0.015524 and 0.841345 here, off by
    // more than the 1e-4 checkpoint tolerance.
    assert!((gelu_scalar(-2.5) - (-0.015_084_266)).abs() < 1e-6, "{}", gelu_scalar(-2.5));
    assert!((gelu_scalar(1.0) - 0.841_192).abs() < 1e-6, "{}", gelu_scalar(1.0));
}

#[test]
fn attention_matches_the_loop_version_for_prefill_and_decode() {
    let (c, nh) = (24, 3);
    for (start, s_len) in [(0, 6), (5, 1), (4, 3)] {
        let p = start + s_len;
        let qkv = filled((s_len, 3 * c), 10 + p as u64, 2.0);
        let k = filled((p, c), 20 + p as u64, 2.0);
        let v = filled((p, c), 30 + p as u64, 2.0);
        let mut out = Array2::zeros((s_len, c));
        let mut scores = Array2::zeros((nh * s_len, p));
        let mut scratch = vec![0.0; s_len * p];
        attention(
            out.view_mut(),
            qkv.view(),
            k.view(),
            v.view(),
            nh,
            &mut scratch,
            Some(scores.view_mut()),
        );
        let (want, want_scores) = naive::attention(qkv.slice(s![.., ..c]), k.view(), v.view(), nh);
        assert_close(&out, &want, 1e-5);
        let want_scores = want_scores.into_shape_with_order((nh * s_len, p)).unwrap();
        for (got, want) in scores.iter().zip(want_scores.iter()) {
            assert!(got == want || (got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
}

#[test]
fn softmax_ignores_masked_entries_and_sums_to_one() {
    let mut x = vec![1.0, f32::NEG_INFINITY, 3.0, -2.0];
    softmax(&mut x);
    assert_eq!(x[1], 0.0);
    assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    let _ = Array1::<f32>::zeros(1);
}

#[test]
fn decode_attention_matches_the_loop_version() {
    let (c, nh) = (24, 3);
    for p in [1, 2, 9, 40] {
        let qkv = filled((1, 3 * c), 50 + p as u64, 2.0);
        let k = filled((p, c), 60 + p as u64, 2.0);
        let v = filled((p, c), 70 + p as u64, 2.0);
        let mut out = vec![0.0; c];
        let mut scores = Vec::new();
        attention_decode(
            &mut out,
            qkv.slice(s![0, ..c]).as_slice().unwrap(),
            k.view(),
            v.view(),
            nh,
            &mut scores,
        );
        let (want, _) = naive::attention(qkv.slice(s![.., ..c]), k.view(), v.view(), nh);
        // Split by heads (as a lone sequence's attention runs over threads): the same bits.
        let q = qkv.slice(s![0, ..c]);
        let q = q.as_slice().unwrap();
        let hs = c / nh;
        let mut split = vec![0.0; c];
        attention_decode_heads(&mut split[..hs], q, k.view(), v.view(), nh, 0..1, &mut scores);
        attention_decode_heads(&mut split[hs..], q, k.view(), v.view(), nh, 1..3, &mut scores);
        assert_eq!(split, out, "split by heads, {p} positions");
        let got = Array2::from_shape_vec((1, c), out).unwrap();
        assert_close(&got, &want, 1e-5);
    }
}

#[test]
fn fast_tanh_is_within_4e_7_everywhere() {
    let mut worst = 0.0f64;
    for i in -2_000_000..=2_000_000 {
        let x = i as f32 * 1e-5 * 12.0;
        let d = (f64::from(tanh_fast(x)) - f64::from(x).tanh()).abs();
        worst = worst.max(d);
    }
    assert!(worst <= 4e-7, "max error {worst}");
    assert_eq!(tanh_fast(1e9), tanh_fast(7.905_311));
    assert!(tanh_fast(f32::MAX) <= 1.0 && tanh_fast(-f32::MAX) >= -1.0);
}

/// Prefill attention softmaxes only each row's visible keys; that must give the bits of a
/// softmax over the whole row with −∞ at the masked keys.
#[test]
fn softmax_of_the_visible_prefix_equals_softmax_of_the_masked_row_bitwise() {
    let row = filled((1, 300), 11, 6.0);
    for visible in [1, 2, 37, 299, 300] {
        let mut masked = row.row(0).to_vec();
        masked[visible..].fill(f32::NEG_INFINITY);
        softmax(&mut masked);
        let mut prefix = row.row(0).to_vec();
        softmax(&mut prefix[..visible]);
        prefix[visible..].fill(0.0);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&prefix), bits(&masked), "{visible} visible keys");
    }
}
