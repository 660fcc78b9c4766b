//! Q8_0 weights and their small-batch product (decode steps and the LM head).
//!
//! The layout is GGUF's `block_q8_0`: 32 consecutive weights along the product's inner
//! dimension K as `i8`, with one F16 scale `d` (`w ≈ d·q`, `d = max|w| / 127`). As in
//! llama.cpp, each row of activations is quantized the same way for the product (its scales
//! kept in F32 here, not rounded to F16), so each block's dot product is an exact integer sum.
//!
//! The canonical order, which every kernel gives bit for bit: for output `(row, col)`, one F32
//! accumulator; for each block in order, `acc = fma(s, dw·dx, acc)`, where `s` is the block's
//! exact integer sum of its 32 products and `dw·dx` the F32 product of the two scales; then the
//! bias is added. (As llama.cpp's `vec_dot_q8_0_q8_0`: one float multiply-add per block.) An
//! integer sum has no order, so kernels may add a block's products in any grouping; a row
//! therefore gets the same bits alone or in any batch, on any thread count and with any kernel
//! set.
//!
//! The blocks are held repacked 16 output columns at a time ([`Q8Matrix`], [`Tile`]): for
//! each block position, the 16 columns' weights `4l..4l+4` side by side in cache line `l`. So
//! one 512-bit `dpbusd` adds four products to each of 16 columns' block sums at once, eight of
//! them make the block, and one `fma` per block and row applies the scales to 16 columns.
//! Measured on gpt2-small (docs/PERFORMANCE.md): the GGUF block layout with four columns per
//! tile and eight lanes per output ran at 120 tok/s, the tiles with eight lanes at 133 (212 once
//! the products stopped waking sleeping threads, see [`crate::threads`]); one sum per block
//! halves the work per row, which is what batches of rows are bound by.

use std::ops::Range;

use super::gemm::{Isa, Layout, OutPtr, split_columns};

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

/// Columns per [`Tile`].
pub const TILE_N: usize = 16;

/// One block position of 16 output columns, interleaved for integer dot products: line `l`
/// holds positions `4l..4l+4` of the block for each column side by side (`qs[l][4c + m]` is
/// column `c`'s weight `4l + m`). One 512-bit `dpbusd` of a line against four activation bytes
/// broadcast gives the 16 columns' integer sums of those four products at once.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(64))]
pub struct Tile {
    /// Eight cache lines of quantized weights.
    pub qs: [[i8; 4 * TILE_N]; QK8_0 / 4],
}

/// A Q8_0 weight matrix `W: (N, K)` as the kernels read it: the `(N, K/32)` blocks repacked 16
/// columns at a time. For column group `g` and block `blk`, `tiles[g·K/32 + blk]` holds the
/// weights and `scales[(g·K/32 + blk)·16..][..16]` the 16 columns' scales, so a decode step
/// reads both as two sequential streams. The `N mod 16` last columns stay plain blocks
/// (`tail`, `(N mod 16, K/32)`). The same bytes as GGUF's blocks: 34 per 32 weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Matrix {
    k: usize,
    n: usize,
    tiles: Vec<Tile>,
    scales: Vec<half::f16>,
    tail: Vec<BlockQ8_0>,
}

impl Q8Matrix {
    /// An empty `(N, K)` matrix, to be filled by [`Q8Matrix::push_columns`].
    pub fn with_capacity(k: usize, n: usize) -> Self {
        assert_eq!(k % QK8_0, 0, "K is whole blocks");
        let (nb, groups) = (k / QK8_0, n / TILE_N);
        Self {
            k,
            n,
            tiles: Vec::with_capacity(groups * nb),
            scales: Vec::with_capacity(groups * nb * TILE_N),
            tail: Vec::with_capacity((n % TILE_N) * nb),
        }
    }

    /// Appends the next columns, given as `(cols, K/32)` blocks. Every push but the last must
    /// bring a multiple of 16 columns.
    pub fn push_columns(&mut self, blocks: &[BlockQ8_0]) {
        let nb = self.k / QK8_0;
        assert_eq!(blocks.len() % nb, 0, "whole columns");
        assert!(self.tail.is_empty(), "only the last push may leave a partial group");
        let cols = blocks.len() / nb;
        assert!(self.columns() + cols <= self.n, "more columns than N");
        let whole = cols - cols % TILE_N;
        for group in blocks[..whole * nb].chunks_exact(TILE_N * nb) {
            for blk in 0..nb {
                let mut tile = Tile { qs: [[0; 4 * TILE_N]; QK8_0 / 4] };
                for c in 0..TILE_N {
                    let b = &group[c * nb + blk];
                    self.scales.push(b.d);
                    for (j, &q) in b.qs.iter().enumerate() {
                        tile.qs[j / 4][4 * c + j % 4] = q;
                    }
                }
                self.tiles.push(tile);
            }
        }
        self.tail.extend_from_slice(&blocks[whole * nb..]);
    }

    /// Columns pushed so far.
    fn columns(&self) -> usize {
        self.tiles.len() / (self.k / QK8_0).max(1) * TILE_N + self.tail.len() / (self.k / QK8_0)
    }

    /// Columns held in tiles (the rest are `tail`).
    fn grouped(&self) -> usize {
        self.n - self.n % TILE_N
    }

    /// Input width `K`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output width `N`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes the weights and scales take.
    pub fn bytes(&self) -> usize {
        self.tiles.len() * size_of::<Tile>()
            + self.scales.len() * size_of::<half::f16>()
            + self.tail.len() * size_of::<BlockQ8_0>()
    }

    /// Block `blk` of column `col`, as GGUF stores it.
    pub fn block(&self, col: usize, blk: usize) -> BlockQ8_0 {
        let nb = self.k / QK8_0;
        if col >= self.grouped() {
            return self.tail[(col - self.grouped()) * nb + blk];
        }
        let (at, c) = ((col / TILE_N) * nb + blk, col % TILE_N);
        let tile = &self.tiles[at];
        BlockQ8_0 {
            d: self.scales[at * TILE_N + c],
            qs: std::array::from_fn(|j| tile.qs[j / 4][4 * c + j % 4]),
        }
    }

    /// Column `col` (`K` weights) widened to F32.
    pub fn column_into(&self, col: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.k);
        for (blk, o) in out.chunks_exact_mut(QK8_0).enumerate() {
            dequantize(&[self.block(col, blk)], o);
        }
    }

    /// The matrix widened to F32, `(N, K)` row-major, split over the compute pool.
    pub fn widen_into(&self, out: &mut [f32]) {
        use rayon::prelude::*;
        assert_eq!(out.len(), self.n * self.k);
        let k = self.k;
        crate::threads::pool().install(|| {
            out.par_chunks_mut(TILE_N * k).enumerate().for_each(|(g, cols)| {
                for (c, o) in cols.chunks_exact_mut(k).enumerate() {
                    self.column_into(g * TILE_N + c, o);
                }
            });
        });
    }
}

/// A weight matrix of K·N values in `layout`, quantized on the compute pool.
pub fn quantize_matrix(values: &[f32], layout: Layout, k: usize, n: usize) -> Q8Matrix {
    let mut m = Q8Matrix::with_capacity(k, n);
    m.push_columns(&quantize_blocks(values, layout, k, n));
    m
}

/// A weight matrix of K·N values in `layout` as `(N, K/32)` blocks (the blocks of each output
/// column contiguous), quantized on the compute pool.
pub fn quantize_blocks(values: &[f32], layout: Layout, k: usize, n: usize) -> Vec<BlockQ8_0> {
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

/// Rows of activations quantized for a product: `qs: (B, K)`, `d: (B, K/32)` in F32, and for
/// each block `-128 ×` the sum of its values (`neg_sums: (B, K/32)`), which the VNNI kernel
/// starts from to undo its unsigned view of the weights.
#[derive(Debug, Default)]
pub struct QuantRows {
    qs: Vec<i8>,
    d: Vec<f32>,
    neg_sums: Vec<i32>,
}

impl QuantRows {
    /// Quantizes `x: (B, K)` block by block.
    pub fn new(x: &[f32]) -> Self {
        let mut rows =
            Self { qs: vec![0; x.len()], d: vec![0.0; x.len() / QK8_0], neg_sums: vec![] };
        for ((xs, qs), d) in
            x.chunks_exact(QK8_0).zip(rows.qs.chunks_exact_mut(QK8_0)).zip(&mut rows.d)
        {
            *d = quantize_block(xs, qs);
        }
        rows.neg_sums = rows
            .qs
            .chunks_exact(QK8_0)
            .map(|b| -128 * b.iter().map(|&q| i32::from(q)).sum::<i32>())
            .collect();
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

/// The integer-dot instructions `isa` gives: AVX-512 means 512-bit VNNI (which needs
/// AVX512-VNNI and AVX512-BW; without them the AVX2 kernel runs).
fn effective(isa: Isa) -> Isa {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512
        && !(std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw"))
    {
        return Isa::Avx2;
    }
    isa
}

/// `out: (B, N) = x·W (+ bias)` for `x: (B, K)` and `W: (N, K)`, by the best kernel set of
/// this CPU.
pub fn run(x: &[f32], w: &Q8Matrix, bias: Option<&[f32]>, b: usize, out: &mut [f32]) {
    run_with(Isa::detect(), x, w, bias, b, out);
}

/// [`run`] with a given kernel set, which the CPU must support.
pub fn run_with(
    isa: Isa,
    x: &[f32],
    w: &Q8Matrix,
    bias: Option<&[f32]>,
    b: usize,
    out: &mut [f32],
) {
    let (k, n) = (w.k, w.n);
    assert_eq!(w.columns(), n, "every column pushed");
    assert_eq!(x.len(), b * k, "x is (B, K)");
    assert_eq!(out.len(), b * n, "out is (B, N)");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "bias is (N)");
    }
    assert!(Isa::available().contains(&isa), "{isa:?} kernels on a CPU without them");
    let q = Product { x: QuantRows::new(x), w, bias, b };
    let isa = effective(isa);
    split_columns(n, out, |cols, ptr| {
        // SAFETY: the lengths were asserted above and the CPU supports `isa` (the VNNI kernel
        // only where `effective` found its features); `split_columns` hands each task
        // disjoint columns within N of `out`, starting at a multiple of 64 (so of 16).
        unsafe { columns(isa, &q, cols, ptr) }
    });
}

/// One product's operands, lengths checked by [`run_with`].
struct Product<'a> {
    x: QuantRows,
    w: &'a Q8Matrix,
    bias: Option<&'a [f32]>,
    b: usize,
}

impl Product<'_> {
    /// One element in the canonical order.
    fn dot(&self, row: usize, col: usize) -> f32 {
        let (k, nb) = (self.w.k, self.w.k / QK8_0);
        let mut acc = 0.0f32;
        for blk in 0..nb {
            let wb = self.w.block(col, blk);
            let xq = &self.x.qs[row * k + blk * QK8_0..][..QK8_0];
            let d = wb.d.to_f32() * self.x.d[row * nb + blk];
            let s: i32 = xq.iter().zip(&wb.qs).map(|(&x, &w)| i32::from(x) * i32::from(w)).sum();
            acc = (s as f32).mul_add(d, acc);
        }
        acc + self.bias.map_or(0.0, |b| b[col])
    }
}

/// Output columns `cols` for every row.
///
/// # Safety
/// The CPU supports `isa` (VNNI and AVX512-BW included when it is [`Isa::Avx512`]); `q`'s
/// lengths are as [`run_with`] asserts; `cols` lies within `0..N` and starts at a multiple of
/// 16; `out` points to a `(B, N)` row-major buffer in which no other thread touches columns
/// `cols` during the call.
unsafe fn columns(isa: Isa, q: &Product<'_>, cols: Range<usize>, out: OutPtr) {
    let mut col = cols.start;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: this function's contract is the kernels'; each call gets one whole group of 16
    // columns inside `cols` and rows `row..row + R` below B.
    unsafe {
        let groups_end = cols.end.min(q.w.grouped());
        while isa != Isa::Portable && col + TILE_N <= groups_end {
            let mut row = 0;
            if isa == Isa::Avx512 {
                while row < q.b {
                    let g = col / TILE_N;
                    row += match q.b - row {
                        1 => x86::vnni::<1>(q, g, row, out.0),
                        2 | 3 => x86::vnni::<2>(q, g, row, out.0),
                        4..=7 => x86::vnni::<4>(q, g, row, out.0),
                        _ => x86::vnni::<8>(q, g, row, out.0),
                    };
                }
            } else {
                for row in 0..q.b {
                    x86::avx2(q, col / TILE_N, row, out.0);
                }
            }
            col += TILE_N;
        }
    }
    for c in col..cols.end {
        for row in 0..q.b {
            // SAFETY: row < B and c < N lie inside `out`, in columns no one else touches.
            unsafe { *out.0.add(row * q.w.n + c) = q.dot(row, c) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! One group of 16 output columns at a time ([`super::Tile`]), each vector lane one
    //! column: per block, the eight lines of the tile against the row's activation bytes
    //! `4l..4l+4` broadcast add up every column's exact block sum `s`, then
    //! `acc = fma(s, dw·dx, acc)`: the canonical order's arithmetic for 16 (or 8) outputs.

    use std::arch::x86_64::*;

    use super::{Product, QK8_0, TILE_N};

    /// Tiles ahead (of 512 bytes) that the weights are prefetched.
    const PREFETCH_TILES: usize = 4;

    /// Rows `row..row + R` of group `g` (columns `16g..16g+16`), 512-bit VNNI; returns `R`.
    /// `dpbusd` takes unsigned bytes: the weights are read as `w + 128` (`w ^ 0x80`), and each
    /// block sum starts at `-128 ×` the sum of the block's activations, so `s` is exact. The
    /// tile's eight lines stay in registers for all `R` rows.
    ///
    /// # Safety
    /// AVX512-F/BW/VNNI, AVX2, FMA and F16C; `16g + 16 ≤` the grouped columns, `row + R ≤ B`,
    /// `q`'s lengths as `run_with` asserts, and `out` a `(B, N)` buffer whose columns
    /// `16g..16g+16` no other thread touches.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn vnni<const R: usize>(
        q: &Product<'_>,
        g: usize,
        row: usize,
        out: *mut f32,
    ) -> usize {
        let nb = q.w.k / QK8_0;
        // SAFETY: the contract above: tiles `g·nb..g·nb + nb` and their scales exist, as do
        // rows `row..row + R` of the quantized activations; prefetches never fault.
        unsafe {
            let tiles = q.w.tiles.as_ptr().add(g * nb);
            let scales = q.w.scales.as_ptr().add(g * nb * TILE_N);
            let flip = _mm512_set1_epi8(-128);
            let xq = q.x.qs.as_ptr().cast::<i32>();
            let mut acc = [_mm512_setzero_ps(); R];
            for blk in 0..nb {
                let tile = &*tiles.add(blk);
                let ahead = tiles.wrapping_add(blk + PREFETCH_TILES).cast::<u8>();
                let mut w = [_mm512_setzero_si512(); QK8_0 / 4];
                for (l, (w, line)) in w.iter_mut().zip(&tile.qs).enumerate() {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l).cast());
                    *w = _mm512_xor_si512(_mm512_load_si512(line.as_ptr().cast()), flip);
                }
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(blk * TILE_N).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let at = (row + r) * nb + blk;
                    let x4 = |l: usize| _mm512_set1_epi32(xq.add(at * 8 + l).read_unaligned());
                    // Two chains (even and odd lines) for latency; integer sums are exact.
                    let mut s0 = _mm512_set1_epi32(*q.x.neg_sums.get_unchecked(at));
                    let mut s1 = _mm512_setzero_si512();
                    for l in (0..QK8_0 / 4).step_by(2) {
                        s0 = _mm512_dpbusd_epi32(s0, w[l], x4(l));
                        s1 = _mm512_dpbusd_epi32(s1, w[l + 1], x4(l + 1));
                    }
                    let s = _mm512_add_epi32(s0, s1);
                    let d = _mm512_mul_ps(dw, _mm512_set1_ps(*q.x.d.get_unchecked(at)));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), d, *acc);
                }
            }
            let col = g * TILE_N;
            let bias = q.bias.map_or(_mm512_setzero_ps(), |b| _mm512_loadu_ps(b.as_ptr().add(col)));
            for (r, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.add((row + r) * q.w.n + col), _mm512_add_ps(*a, bias));
            }
        }
        R
    }

    /// Row `row` of group `g`, AVX2, eight columns at a time: `maddubs(|x|, sign(w, x))` then
    /// `madd` by ones gives four products' exact sums (no saturation: |pair sums| ≤ 2·127·127),
    /// added up over the block's eight lines.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; otherwise as [`vnni`] with `R = 1`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2(q: &Product<'_>, g: usize, row: usize, out: *mut f32) {
        let nb = q.w.k / QK8_0;
        // SAFETY: as in `vnni`.
        unsafe {
            let tiles = q.w.tiles.as_ptr().add(g * nb);
            let scales = q.w.scales.as_ptr().add(g * nb * TILE_N);
            let ones = _mm256_set1_epi16(1);
            let xq = q.x.qs.as_ptr().cast::<i32>();
            for half in 0..2 {
                let mut acc = _mm256_setzero_ps();
                for blk in 0..nb {
                    let tile = &*tiles.add(blk);
                    let at = row * nb + blk;
                    let mut s = _mm256_setzero_si256();
                    for (l, line) in tile.qs.iter().enumerate() {
                        let xb = _mm256_set1_epi32(xq.add(at * 8 + l).read_unaligned());
                        let w = _mm256_load_si256(line.as_ptr().add(32 * half).cast());
                        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(xb), _mm256_sign_epi8(w, xb));
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                    }
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                        scales.add(blk * TILE_N + 8 * half).cast(),
                    ));
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(*q.x.d.get_unchecked(at)));
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc);
                }
                let col = g * TILE_N + 8 * half;
                let bias =
                    q.bias.map_or(_mm256_setzero_ps(), |b| _mm256_loadu_ps(b.as_ptr().add(col)));
                _mm256_storeu_ps(out.add(row * q.w.n + col), _mm256_add_ps(acc, bias));
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
    /// dequantized operands (within the activations' rounding). The shapes cover whole groups
    /// of 16 columns, tails, one group, odd row counts and two-thread splits.
    #[test]
    fn every_kernel_set_gives_the_canonical_bits() {
        for (b, k, n) in [(1, 64, 203), (2, 96, 130), (3, 32, 77), (5, 128, 16), (16, 64, 300)] {
            let (x, w, bias) = (filled(b * k, 1), filled(k * n, 2), filled(n, 3));
            let m = quantize_matrix(&w, Layout::KN, k, n);
            let mut wide = vec![0.0; k * n];
            m.widen_into(&mut wide);
            for &isa in Isa::available() {
                for bias in [Some(&bias[..]), None] {
                    let mut out = vec![0.0; b * n];
                    run_with(isa, &x, &m, bias, b, &mut out);
                    let q = Product { x: QuantRows::new(&x), w: &m, bias, b };
                    for row in 0..b {
                        for col in 0..n {
                            let v = out[row * n + col];
                            let want = q.dot(row, col);
                            assert_eq!(v.to_bits(), want.to_bits(), "{isa:?} ({row},{col})");
                        }
                    }
                }
                let mut out = vec![0.0; b * n];
                run_with(isa, &x, &m, Some(&bias), b, &mut out);
                for row in 0..b {
                    for col in 0..n {
                        let exact: f64 = (0..k)
                            .map(|i| f64::from(x[row * k + i]) * f64::from(wide[col * k + i]))
                            .sum::<f64>()
                            + f64::from(bias[col]);
                        // |x| ≤ 0.5 quantized in steps of ≤ 0.5/127: ≤ 0.002 per term, times
                        // |w| ≤ 0.5, over K terms — far less in practice (errors cancel).
                        let v = out[row * n + col];
                        assert!((f64::from(v) - exact).abs() < 2e-3 * k as f64 / 8.0, "{isa:?}");
                    }
                }
            }
        }
    }

    /// The repacked tiles give back every block as quantized, whether the columns came in one
    /// push or in several (as the loader pushes slices of a large matrix).
    #[test]
    fn tiles_hold_the_blocks_they_were_given() {
        let (k, n) = (96, 16 * 5 + 7);
        let nb = k / QK8_0;
        let blocks = quantize_blocks(&filled(k * n, 4), Layout::NK, k, n);
        let mut pushed = Q8Matrix::with_capacity(k, n);
        pushed.push_columns(&blocks[..32 * nb]);
        pushed.push_columns(&blocks[32 * nb..64 * nb]);
        pushed.push_columns(&blocks[64 * nb..]);
        let whole = quantize_matrix(&filled(k * n, 4), Layout::NK, k, n);
        assert_eq!(pushed, whole);
        assert_eq!(whole.bytes(), n * nb * size_of::<BlockQ8_0>());
        for col in 0..n {
            for blk in 0..nb {
                assert_eq!(whole.block(col, blk), blocks[col * nb + blk], "({col},{blk})");
            }
            let (mut got, mut want) = (vec![0.0; k], vec![0.0; k]);
            whole.column_into(col, &mut got);
            dequantize(&blocks[col * nb..(col + 1) * nb], &mut want);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
        let (k, n) = (96, 1000);
        let m = quantize_matrix(&filled(k * n, 5), Layout::NK, k, n);
        let xs = filled(16 * k, 6);
        for &isa in Isa::available() {
            let mut batch = vec![0.0; 16 * n];
            run_with(isa, &xs, &m, None, 16, &mut batch);
            for row in [0, 3, 15] {
                let mut alone = vec![0.0; n];
                run_with(isa, &xs[row * k..(row + 1) * k], &m, None, 1, &mut alone);
                assert_eq!(alone, batch[row * n..(row + 1) * n], "{isa:?} row {row}");
            }
            let mut three = vec![0.0; 3 * n];
            run_with(isa, &xs[3 * k..6 * k], &m, None, 3, &mut three);
            assert_eq!(three, batch[3 * n..6 * n], "{isa:?} rows 3..6");
        }
        crate::threads::set_threads(1);
        let mut one = vec![0.0; 16 * n];
        run(&xs, &m, None, 16, &mut one);
        crate::threads::set_threads(2);
        let mut two = vec![0.0; 16 * n];
        run(&xs, &m, None, 16, &mut two);
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
