//! Q8_0 weights and their small-batch product (decode steps and the LM head).
//!
//! The layout is GGUF's `block_q8_0`: 32 consecutive weights along the product's inner
//! dimension K as `i8`, with one F16 scale `d` (`w ≈ d·q`, `d = max|w| / 127`). As in
//! llama.cpp, each row of activations is quantized the same way for the product (its scales
//! kept in F32 here, not rounded to F16), so each block's dot product is an exact integer sum.
//!
//! The canonical order, which every kernel gives bit for bit: for output `(row, col)`, eight
//! F32 lanes; for each block in order, lane `l` gets `fma(s_l, dw·dx, lane_l)`, where `s_l` is
//! the integer sum of the four products `4l..4l+4` of the block and `dw·dx` the F32 product of
//! the two scales; then the lanes are reduced by `hsum8` and the bias added. A row therefore
//! gets the same bits alone or in any batch, on any thread count and with any kernel set.

use std::ops::Range;

use super::gemm::{Isa, Layout, OutPtr, hsum8, split_columns};

/// Weights per block.
pub const QK8_0: usize = 32;

/// One block of 32 weights, as GGUF stores it (34 bytes).
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: half::f16,
    /// Quantized weights, each in `-127..=127`.
    pub qs: [i8; QK8_0],
}

/// Quantizes `x` (a multiple of 32 values) into blocks, as GGUF's `quantize_row_q8_0_ref`.
pub fn quantize_row(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK8_0, "32 values per block");
    for (xs, block) in x.chunks_exact(QK8_0).zip(out) {
        block.d = half::f16::from_f32(quantize_block(xs, &mut block.qs));
    }
}

/// One block: `d = max|x| / 127`, `q = round(x / d)` (all 0 for an all-zero block); returns
/// `d`.
#[inline]
fn quantize_block(xs: &[f32], qs: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in qs.iter_mut().zip(xs) {
        *q = (v * inv).round() as i8;
    }
    d
}

/// Widens blocks back to F32 (`d·q`), in order.
pub fn dequantize(blocks: &[BlockQ8_0], out: &mut [f32]) {
    for (block, o) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = block.d.to_f32();
        for (o, &q) in o.iter_mut().zip(&block.qs) {
            *o = d * f32::from(q);
        }
    }
}

/// A weight matrix of K·N values in `layout` as `(N, K/32)` blocks (the blocks of each output
/// column contiguous), quantized on the compute pool.
pub fn quantize_matrix(values: &[f32], layout: Layout, k: usize, n: usize) -> Vec<BlockQ8_0> {
    use rayon::prelude::*;
    assert_eq!(values.len(), k * n);
    assert_eq!(k % QK8_0, 0, "K is whole blocks");
    let nb = k / QK8_0;
    let mut blocks = vec![BlockQ8_0 { d: half::f16::ZERO, qs: [0; QK8_0] }; n * nb];
    crate::threads::pool().install(|| {
        blocks.par_chunks_mut(nb).enumerate().for_each_init(
            || vec![0.0f32; k],
            |column, (col, out)| {
                match layout {
                    Layout::NK => column.copy_from_slice(&values[col * k..(col + 1) * k]),
                    Layout::KN => column.iter_mut().enumerate().for_each(|(i, v)| {
                        *v = values[i * n + col];
                    }),
                }
                quantize_row(column, out);
            },
        );
    });
    blocks
}

/// Rows of activations quantized for a product: `qs: (B, K)`, `d: (B, K/32)` in F32.
#[derive(Debug, Default)]
pub struct QuantRows {
    qs: Vec<i8>,
    d: Vec<f32>,
}

impl QuantRows {
    /// Quantizes `x: (B, K)` block by block.
    pub fn new(x: &[f32]) -> Self {
        let mut rows = Self { qs: vec![0; x.len()], d: vec![0.0; x.len() / QK8_0] };
        for ((xs, qs), d) in
            x.chunks_exact(QK8_0).zip(rows.qs.chunks_exact_mut(QK8_0)).zip(&mut rows.d)
        {
            *d = quantize_block(xs, qs);
        }
        rows
    }
}

/// Which Q8_0 kernel a kernel set runs on this CPU: `"avx512-vnni"`, `"avx2"` or `"portable"`.
pub fn kernel_name(isa: Isa) -> &'static str {
    match effective(isa) {
        Isa::Avx512 => "avx512-vnni",
        Isa::Avx2 => "avx2",
        Isa::Portable => "portable",
    }
}

/// The integer-dot instructions `isa` gives: AVX-512 means VNNI on 256-bit vectors (which
/// needs AVX512-VNNI and AVX512-VL; without them the AVX2 kernel runs).
fn effective(isa: Isa) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512
        && !(std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl"))
    {
        return Isa::Avx2;
    }
    isa
}

/// `out: (B, N) = x·W (+ bias)` for `x: (B, K)` and `W` as `(N, K/32)` blocks, by the best
/// kernel set of this CPU.
pub fn run(
    x: &[f32],
    w: &[BlockQ8_0],
    bias: Option<&[f32]>,
    b: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    run_with(Isa::detect(), x, w, bias, b, k, n, out);
}

/// [`run`] with a given kernel set, which the CPU must support.
#[allow(clippy::too_many_arguments)]
pub fn run_with(
    isa: Isa,
    x: &[f32],
    w: &[BlockQ8_0],
    bias: Option<&[f32]>,
    b: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    assert_eq!(k % QK8_0, 0, "K is whole blocks");
    assert_eq!(x.len(), b * k, "x is (B, K)");
    assert_eq!(w.len(), n * k / QK8_0, "w is (N, K/32) blocks");
    assert_eq!(out.len(), b * n, "out is (B, N)");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "bias is (N)");
    }
    assert!(Isa::available().contains(&isa), "{isa:?} kernels on a CPU without them");
    let q = Product { x: QuantRows::new(x), w, bias, b, k, n };
    let isa = effective(isa);
    split_columns(n, out, |cols, ptr| {
        // SAFETY: the lengths were asserted above and the CPU supports `isa` (the VNNI kernel
        // only where `effective` found its features); `split_columns` hands each task
        // disjoint columns within N of `out`.
        unsafe { columns(isa, &q, cols, ptr) }
    });
}

/// One product's operands, lengths checked by [`run_with`].
struct Product<'a> {
    x: QuantRows,
    w: &'a [BlockQ8_0],
    bias: Option<&'a [f32]>,
    b: usize,
    k: usize,
    n: usize,
}

impl Product<'_> {
    /// One element in the canonical order.
    fn dot(&self, row: usize, col: usize) -> f32 {
        let nb = self.k / QK8_0;
        let mut lanes = [0.0f32; 8];
        for blk in 0..nb {
            let wb = &self.w[col * nb + blk];
            let xq = &self.x.qs[row * self.k + blk * QK8_0..][..QK8_0];
            let d = wb.d.to_f32() * self.x.d[row * nb + blk];
            for (l, lane) in lanes.iter_mut().enumerate() {
                let s: i32 =
                    (4 * l..4 * l + 4).map(|j| i32::from(xq[j]) * i32::from(wb.qs[j])).sum();
                *lane = (s as f32).mul_add(d, *lane);
            }
        }
        hsum8(lanes) + self.bias.map_or(0.0, |b| b[col])
    }
}

/// Output columns `cols` for every row.
///
/// # Safety
/// The CPU supports `isa` (VNNI included when it is [`Isa::Avx512`]); `q`'s lengths are as
/// [`run_with`] asserts; `cols` lies within `0..N`; `out` points to a `(B, N)` row-major
/// buffer in which no other thread touches columns `cols` during the call.
unsafe fn columns(isa: Isa, q: &Product<'_>, cols: Range<usize>, out: OutPtr) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: this function's contract is the kernels'.
    unsafe {
        match isa {
            Isa::Avx512 => return x86::vnni(q, cols, out.0),
            Isa::Avx2 => return x86::avx2(q, cols, out.0),
            Isa::Portable => {}
        }
    }
    for col in cols {
        for row in 0..q.b {
            // SAFETY: row < B and col < N lie inside `out`, in columns no one else touches.
            unsafe { *out.0.add(row * q.n + col) = q.dot(row, col) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Four output columns at a time, every row of the batch against them while their blocks
    //! are in L1. Block sums by `maddubs`+`madd` (AVX2) or `dpbusd` (VNNI): both give lane `l`
    //! the exact sum of products `4l..4l+4` (no saturation: |products| ≤ 127·127).

    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Product, QK8_0, hsum8};

    /// Columns per tile.
    const NC: usize = 4;
    /// How many tiles ahead the weights are prefetched.
    const PREFETCH_TILES: usize = 6;

    /// # Safety
    /// As `super::columns`, with AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2(q: &Product<'_>, cols: Range<usize>, out: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe {
            tiles(q, cols, out, |ax, sy| {
                _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
            })
        }
    }

    /// # Safety
    /// As `super::columns`, with AVX512-VNNI and AVX512-VL besides AVX2, FMA and F16C.
    #[target_feature(enable = "avx512vnni,avx512vl,avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn vnni(q: &Product<'_>, cols: Range<usize>, out: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { tiles(q, cols, out, |ax, sy| _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)) }
    }

    /// # Safety
    /// As `super::columns`, called from a function with AVX2, FMA and F16C enabled.
    #[inline(always)]
    unsafe fn tiles(
        q: &Product<'_>,
        cols: Range<usize>,
        out: *mut f32,
        block_sums: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        let nb = q.k / QK8_0;
        let mut col = cols.start;
        // SAFETY: every row index is below B, every column in `cols`, every block below
        // N·K/32 and every activation byte below B·K: the lengths `run_with` asserted.
        unsafe {
            while col + NC <= cols.end {
                // The tile's blocks are NC·nb·34 contiguous bytes, read as NC interleaved
                // streams, which the hardware prefetchers follow poorly: pull the tile
                // `PREFETCH_TILES` ahead into L1 as this one computes (on the first row; later
                // rows find this tile in cache).
                let ahead =
                    q.w.as_ptr().wrapping_add((col + PREFETCH_TILES * NC) * nb).cast::<u8>();
                for row in 0..q.b {
                    let mut acc = [_mm256_setzero_ps(); NC];
                    let xq = q.x.qs.as_ptr().add(row * q.k);
                    let xd = q.x.d.as_ptr().add(row * nb);
                    for blk in 0..nb {
                        if row == 0 {
                            // NC·34 ≤ 192 bytes of the tile ahead per block: three lines.
                            let p = ahead.wrapping_add(blk * NC * size_of::<super::BlockQ8_0>());
                            _mm_prefetch::<_MM_HINT_T0>(p.cast());
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64).cast());
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(128).cast());
                        }
                        let xv = _mm256_loadu_si256(xq.add(blk * QK8_0).cast());
                        let ax = _mm256_sign_epi8(xv, xv);
                        let dx = *xd.add(blk);
                        for (j, acc) in acc.iter_mut().enumerate() {
                            let wb = q.w.as_ptr().add((col + j) * nb + blk);
                            let wv = _mm256_loadu_si256((&raw const (*wb).qs).cast());
                            let sums = block_sums(ax, _mm256_sign_epi8(wv, xv));
                            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                                (*wb).d.to_bits(),
                            ))));
                            *acc = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(sums),
                                _mm256_set1_ps(dw * dx),
                                *acc,
                            );
                        }
                    }
                    for (j, a) in acc.iter().enumerate() {
                        let mut lanes = [0.0f32; 8];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                        let c = col + j;
                        *out.add(row * q.n + c) = hsum8(lanes) + q.bias.map_or(0.0, |b| b[c]);
                    }
                }
                col += NC;
            }
            for c in col..cols.end {
                for row in 0..q.b {
                    *out.add(row * q.n + c) = q.dot(row, c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::gemm::tests::filled;

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        let x = filled(4 * QK8_0, 1);
        let mut blocks = vec![BlockQ8_0 { d: half::f16::ZERO, qs: [0; QK8_0] }; 4];
        quantize_row(&x, &mut blocks);
        let mut back = vec![0.0; x.len()];
        dequantize(&blocks, &mut back);
        for (blk, b) in blocks.iter().enumerate() {
            let d = b.d.to_f32();
            // The largest value of each block maps to ±127.
            assert_eq!(b.qs.iter().map(|q| q.unsigned_abs()).max(), Some(127));
            for i in blk * QK8_0..(blk + 1) * QK8_0 {
                // Half a step of the F16 scale, plus the scale's own rounding (2^-11 relative).
                assert!((back[i] - x[i]).abs() <= 0.5 * d + 127.0 * d * 1e-3, "{i}");
            }
        }
        let mut zeros = vec![BlockQ8_0 { d: half::f16::ONE, qs: [1; QK8_0] }];
        quantize_row(&[0.0; QK8_0], &mut zeros);
        assert_eq!(zeros[0], BlockQ8_0 { d: half::f16::ZERO, qs: [0; QK8_0] });
    }

    /// Every kernel set against the canonical order (bitwise) and against f64 on the
    /// dequantized operands (within the activations' rounding).
    #[test]
    fn every_kernel_set_gives_the_canonical_bits() {
        for (b, k, n) in [(1, 64, 203), (2, 96, 130), (3, 32, 77), (5, 128, 16), (16, 64, 300)] {
            let (x, w, bias) = (filled(b * k, 1), filled(k * n, 2), filled(n, 3));
            let blocks = quantize_matrix(&w, Layout::KN, k, n);
            let q = Product { x: QuantRows::new(&x), w: &blocks, bias: Some(&bias), b, k, n };
            let mut wide = vec![0.0; k * n];
            dequantize(&blocks, &mut wide);
            for &isa in Isa::available() {
                let mut out = vec![0.0; b * n];
                run_with(isa, &x, &blocks, Some(&bias), b, k, n, &mut out);
                for row in 0..b {
                    for col in 0..n {
                        let v = out[row * n + col];
                        assert_eq!(v.to_bits(), q.dot(row, col).to_bits(), "{isa:?} ({row},{col})");
                        let exact: f64 = (0..k)
                            .map(|i| f64::from(x[row * k + i]) * f64::from(wide[col * k + i]))
                            .sum::<f64>()
                            + f64::from(bias[col]);
                        // |x| ≤ 0.5 quantized in steps of ≤ 0.5/127: ≤ 0.002 per term, times
                        // |w| ≤ 0.5, over K terms — far less in practice (errors cancel).
                        assert!((f64::from(v) - exact).abs() < 2e-3 * k as f64 / 8.0, "{isa:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
        let (k, n) = (96, 1000);
        let blocks = quantize_matrix(&filled(k * n, 5), Layout::NK, k, n);
        let xs = filled(16 * k, 6);
        for &isa in Isa::available() {
            let mut batch = vec![0.0; 16 * n];
            run_with(isa, &xs, &blocks, None, 16, k, n, &mut batch);
            for row in [0, 3, 15] {
                let mut alone = vec![0.0; n];
                run_with(isa, &xs[row * k..(row + 1) * k], &blocks, None, 1, k, n, &mut alone);
                assert_eq!(alone, batch[row * n..(row + 1) * n], "{isa:?} row {row}");
            }
        }
        crate::threads::set_threads(1);
        let mut one = vec![0.0; 16 * n];
        run(&xs, &blocks, None, 16, k, n, &mut one);
        crate::threads::set_threads(2);
        let mut two = vec![0.0; 16 * n];
        run(&xs, &blocks, None, 16, k, n, &mut two);
        assert_eq!(one, two);
    }

    #[test]
    fn kn_and_nk_layouts_quantize_the_same_columns() {
        let (k, n) = (64, 10);
        let w_kn = filled(k * n, 9);
        let w_nk: Vec<f32> = (0..n)
            .flat_map(|c| (0..k).map(move |i| (c, i)))
            .map(|(c, i)| w_kn[i * n + c])
            .collect();
        assert_eq!(
            quantize_matrix(&w_kn, Layout::KN, k, n),
            quantize_matrix(&w_nk, Layout::NK, k, n)
        );
    }
}
