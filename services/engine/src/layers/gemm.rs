//! Batch-invariant small-batch matrix products, for decode steps (a few rows at a time).
//!
//! Why not OpenBLAS here: `sgemm` packs the whole weight matrix on every call, and for a few
//! rows the packing costs more than the product. Measured on the 2-core CI machine, gpt2-small's
//! 48 block matrices: 4 rows by `sgemm` 59 ms per step against 16 ms for one row by `sgemv`
//! (docs/PERFORMANCE.md). These kernels stream each weight once for all rows.
//!
//! Why a fixed accumulation order: each output element is computed in one order (`dot_nk`:
//! eight lane sums of `fma`s over `k` in order, a fixed reduction, then the bias), whatever the
//! number of rows, the tile that computes it or the thread that runs it. So a sequence decoded
//! in a batch gets bitwise the logits it gets alone, and batching never changes a client's
//! tokens.
//!
//! Shapes: `x: (B, K)`, row-major; the model holds every weight matrix `w: (N, K)`
//! ([`Layout::NK`]: the tied head `wte` as stored, Conv1D weights transposed at load), which the
//! vector kernels take. `w: (K, N)` ([`Layout::KN`], as Conv1D weights are stored in the file)
//! is still accepted, by the plain loops, for matrices built in tests. Outputs are `(B, N)`
//! row-major.
//!
//! Weights are F32, F16 or BF16 ([`Elem`]): half-precision weights are widened to F32 as they
//! are loaded into registers (exactly: every F16 and BF16 value is an F32 value), so a model
//! held in F16 gives bitwise the results of the same values held in F32, reading half the
//! bytes. The vector kernels are AVX2 (also on CPUs with AVX-512, where only the Q8_0 kernel
//! of [`super::q8`] uses AVX-512 VNNI).

use std::ops::Range;

/// Which F32/F16/BF16 kernels a kernel set runs: `"avx512"` (several rows; one row by the AVX2
/// kernel), `"avx2"` or `"portable"`.
pub fn kernel_name(isa: Isa) -> &'static str {
    isa.as_str()
}

/// Rows up to which the engine uses these kernels instead of `sgemm`.
pub const SMALL_M: usize = 32;

/// Columns per parallel task (a multiple of every tile width).
const CHUNK_ALIGN: usize = 64;

/// A weight element type the kernels read: F32, or F16/BF16 widened to F32 on load.
pub trait Elem: Copy + Send + Sync + 'static {
    /// The value as F32 (exact for every implementor).
    fn to_f32(self) -> f32;

    /// Eight consecutive values widened to F32.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C, and `p..p+8` is readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract (F16C converts 8 halves, exactly).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract. A BF16 value is the top half of its F32 value.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                p.cast(),
            ))))
        }
    }
}

/// The instruction sets a kernel can use, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain loops (any CPU): the canonical order, for tails and as the reference.
    Portable,
    /// AVX2 + FMA + F16C, 8 lanes.
    Avx2,
    /// AVX-512F: products of several rows two rows per register (one row stays on the AVX2
    /// kernel, which reads memory as fast), and VNNI for Q8_0 where the CPU has it.
    Avx512,
}

impl Isa {
    /// The best this CPU supports (`LLORCH_ISA=portable|avx2|avx512` caps it, for measuring).
    pub fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = match std::env::var("LLORCH_ISA").as_deref() {
                Ok("portable") => Isa::Portable,
                Ok("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            Self::available().iter().copied().filter(|&i| i <= cap).max().unwrap_or(Isa::Portable)
        })
    }

    /// Every kernel set this CPU can run (tests run them all), found once.
    pub fn available() -> &'static [Self] {
        static AVAILABLE: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(|| {
            let mut out = vec![Isa::Portable];
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx2") && has!("fma") && has!("f16c") {
                    out.push(Isa::Avx2);
                    if has!("avx512f") {
                        out.push(Isa::Avx512);
                    }
                }
            }
            out
        })
    }

    /// The name in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// A matrix product of the small-batch kind.
#[derive(Debug, Clone, Copy)]
pub struct Gemm<'a, T = f32> {
    /// `x: (B, K)` row-major.
    pub x: &'a [f32],
    /// The weights.
    pub w: &'a [T],
    /// `(N)` added at the end, or none.
    pub bias: Option<&'a [f32]>,
    /// Rows.
    pub b: usize,
    /// Inner dimension.
    pub k: usize,
    /// Output columns.
    pub n: usize,
}

/// Which layout `w` has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `w: (K, N)`.
    KN,
    /// `w: (N, K)`.
    NK,
}

/// Raw output pointer shared by tasks that write disjoint column ranges.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: the pointer is only dereferenced by `columns`, whose tasks write disjoint column
// ranges of one output buffer that outlives them (see `run`); sending it adds no sharing.
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`: tasks sharing it write disjoint columns and never read each other's.
unsafe impl Sync for OutPtr {}

/// `out: (B, N)` = the product, split by columns over the compute pool, by the best kernel set
/// of this CPU ([`Isa::detect`]).
pub fn run<T: Elem>(g: Gemm<'_, T>, layout: Layout, out: &mut [f32]) {
    run_with(Isa::detect(), g, layout, out);
}

/// [`run`] with a given kernel set, which the CPU must support (tests compare them all).
pub fn run_with<T: Elem>(isa: Isa, g: Gemm<'_, T>, layout: Layout, out: &mut [f32]) {
    assert_eq!(g.x.len(), g.b * g.k, "x is (B, K)");
    assert_eq!(g.w.len(), g.k * g.n, "w has K·N entries");
    assert_eq!(out.len(), g.b * g.n, "out is (B, N)");
    if let Some(bias) = g.bias {
        assert_eq!(bias.len(), g.n, "bias is (N)");
    }
    assert!(Isa::available().contains(&isa), "{isa:?} kernels on a CPU without them");
    split_columns(g.n, out, |cols, ptr| {
        // SAFETY: the lengths of x, w, bias and out were asserted above, and the CPU supports
        // `isa`; `split_columns` hands each task disjoint columns within N of `out`.
        unsafe { columns(isa, g, layout, cols, ptr) }
    });
}

/// Runs `task` over column ranges covering `0..n` of `out: (B, n)`, split over the compute
/// team ([`crate::threads::Team`]: one range per thread, aligned to 64 columns). Each call gets
/// a range no other call gets, and the pointer to `out`, which is borrowed mutably until every
/// task has finished.
pub(crate) fn split_columns(n: usize, out: &mut [f32], task: impl Fn(Range<usize>, OutPtr) + Sync) {
    let team = crate::threads::team();
    let tasks = team.size();
    let per = n.div_ceil(tasks).div_ceil(CHUNK_ALIGN) * CHUNK_ALIGN;
    let ptr = OutPtr(out.as_mut_ptr());
    if tasks == 1 || n <= CHUNK_ALIGN {
        task(0..n, ptr);
        return;
    }
    team.fork(&|i| {
        let start = (i * per).min(n);
        let cols = start..(start + per).min(n);
        if !cols.is_empty() {
            task(cols, ptr);
        }
    });
}

/// Computes output columns `cols` for every row.
///
/// # Safety
/// The CPU supports `isa`; `g.x`, `g.w` and `g.bias` have the lengths [`run`] asserts (`B·K`,
/// `K·N`, `N`); `cols` lies within `0..N`; `out` points to a `(B, N)` row-major buffer, valid
/// for writes, in which no other thread reads or writes columns `cols` during the call.
unsafe fn columns<T: Elem>(
    isa: Isa,
    g: Gemm<'_, T>,
    layout: Layout,
    cols: Range<usize>,
    out: OutPtr,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU supports `isa` (this function's contract); the lengths, `cols` and the
    // output are this function's own contract, which is the kernels' contract too.
    unsafe {
        match (isa, layout) {
            (Isa::Avx512, Layout::NK) if g.b >= 2 => return avx512::nk(g, cols, out.0),
            (Isa::Avx2 | Isa::Avx512, Layout::NK) => return avx2::nk(g, cols, out.0),
            _ => {}
        }
    }
    for col in cols {
        for row in 0..g.b {
            let v = match layout {
                Layout::KN => dot_kn(g, row, col),
                Layout::NK => dot_nk(g, row, col),
            };
            // SAFETY: row < B and col < N, so the element is inside `out`; its column is in
            // `cols`, which no other thread touches.
            unsafe { *out.0.add(row * g.n + col) = v };
        }
    }
}

/// One element, `w: (K, N)`: one `fma` chain over `k` in order (the only path for this
/// layout, which no loaded model uses).
#[inline]
fn dot_kn<T: Elem>(g: Gemm<'_, T>, row: usize, col: usize) -> f32 {
    let x = &g.x[row * g.k..(row + 1) * g.k];
    let mut acc = 0.0f32;
    for (kk, &xv) in x.iter().enumerate() {
        acc = xv.mul_add(g.w[kk * g.n + col].to_f32(), acc);
    }
    acc + g.bias.map_or(0.0, |b| b[col])
}

/// One element, `w: (N, K)`: eight lane sums over `k` in order, reduced by [`hsum8`], then the
/// `K mod 8` tail in order — the same arithmetic as the vector kernel.
#[inline]
fn dot_nk<T: Elem>(g: Gemm<'_, T>, row: usize, col: usize) -> f32 {
    let x = &g.x[row * g.k..(row + 1) * g.k];
    let w = &g.w[col * g.k..(col + 1) * g.k];
    let main = g.k - g.k % 8;
    let mut lanes = [0.0f32; 8];
    for c in (0..main).step_by(8) {
        for l in 0..8 {
            lanes[l] = x[c + l].mul_add(w[c + l].to_f32(), lanes[l]);
        }
    }
    finish(g, lanes, row, col)
}

/// Output `(row, col)` from its eight lane sums over `k < K - K mod 8`: the fixed reduction,
/// then the `K mod 8` tail in order, then the bias — the end of `dot_nk`, shared by the tiles.
#[inline(always)]
fn finish<T: Elem>(g: Gemm<'_, T>, lanes: [f32; 8], row: usize, col: usize) -> f32 {
    let main = g.k - g.k % 8;
    let (x, w) = (&g.x[row * g.k..(row + 1) * g.k], &g.w[col * g.k..(col + 1) * g.k]);
    let mut s = hsum8(lanes);
    for t in main..g.k {
        s = x[t].mul_add(w[t].to_f32(), s);
    }
    s + g.bias.map_or(0.0, |b| b[col])
}

/// The fixed reduction tree of eight lanes.
#[inline]
pub(crate) fn hsum8(l: [f32; 8]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let h = [q[0] + q[2], q[1] + q[3]];
    h[0] + h[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA tiles. Every element is computed with the arithmetic of `dot_nk`.

    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Elem, Gemm, dot_nk, finish};

    /// `w: (N, K)`: tiles of `BB` rows × `VV` output columns (rows of w), `k` innermost in
    /// steps of 8.
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C, and the contract of [`super::columns`] holds: `g`'s
    /// slices have the lengths `run` asserts, `cols` lies within `0..N`, and `out` is a
    /// `(B, N)` row-major buffer whose columns `cols` no other thread touches during the call.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn nk<T: Elem>(g: Gemm<'_, T>, cols: Range<usize>, out: *mut f32) {
        let mut col = cols.start;
        let end = cols.end;
        // SAFETY: this function's contract; each tile gets `row + BB ≤ B` and
        // `col + VV ≤ cols.end`, as `tile_nk` needs, and the tail indexes rows below B and
        // columns in `cols`.
        unsafe {
            while col + 4 <= end {
                if g.b == 1 && col + 8 <= end {
                    tile_nk::<T, 1, 8>(g, 0, col, out);
                    col += 8;
                    continue;
                }
                let mut row = 0;
                while row + 2 <= g.b {
                    tile_nk::<T, 2, 4>(g, row, col, out);
                    row += 2;
                }
                if row < g.b {
                    tile_nk::<T, 1, 4>(g, row, col, out);
                }
                col += 4;
            }
            for c in col..end {
                for row in 0..g.b {
                    *out.add(row * g.n + c) = dot_nk(g, row, c);
                }
            }
        }
    }

    /// `out[row..row+BB][col..col+VV]`, each element a full `dot_nk`.
    ///
    /// # Safety
    /// [`nk`]'s contract, with `row + BB ≤ B` and `col..col + VV` inside the caller's `cols`.
    #[inline(always)]
    unsafe fn tile_nk<T: Elem, const BB: usize, const VV: usize>(
        g: Gemm<'_, T>,
        row: usize,
        col: usize,
        out: *mut f32,
    ) {
        // SAFETY: this function's contract: rows `row..row+BB` of x, rows `col..col+VV` of w
        // (K floats each, read below `main ≤ K` then to K) and those output elements exist.
        unsafe {
            let main = g.k - g.k % 8;
            let mut acc = [[_mm256_setzero_ps(); VV]; BB];
            let x = g.x.as_ptr().add(row * g.k);
            let w = g.w.as_ptr().add(col * g.k);
            // Eight values of each row at `c` into the accumulators.
            let step = |c: usize, acc: &mut [[__m256; VV]; BB]| {
                let mut wv = [_mm256_setzero_ps(); VV];
                for (v, slot) in wv.iter_mut().enumerate() {
                    *slot = T::load8(w.add(v * g.k + c));
                }
                for (b, acc_b) in acc.iter_mut().enumerate() {
                    let xb = _mm256_loadu_ps(x.add(b * g.k + c));
                    for v in 0..VV {
                        acc_b[v] = _mm256_fmadd_ps(xb, wv[v], acc_b[v]);
                    }
                }
            };
            // A cache line of each row per round, with one prefetch per row: the next tile's
            // rows at the same offset (never faults, even past the end).
            let line = 64 / size_of::<T>();
            let mut c = 0;
            while c + line <= main {
                for v in 0..VV {
                    _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((VV + v) * g.k + c).cast());
                }
                for cc in (c..c + line).step_by(8) {
                    step(cc, &mut acc);
                }
                c += line;
            }
            while c < main {
                step(c, &mut acc);
                c += 8;
            }
            for (b, acc_b) in acc.iter().enumerate() {
                for (v, &a) in acc_b.iter().enumerate() {
                    let mut lanes = [0.0f32; 8];
                    _mm256_storeu_ps(lanes.as_mut_ptr(), a);
                    *out.add((row + b) * g.n + col + v) = finish(g, lanes, row + b, col + v);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512F tiles for two rows or more: the rows in pairs, a pair's eight values at `k`
    //! side by side in one 512-bit register (`[x_r[k..k+8], x_{r+1}[k..k+8]]`) and each weight
    //! row's eight values broadcast to both halves, so one `fma` advances the eight canonical
    //! lanes of two outputs. Every element is computed with the arithmetic of `dot_nk`.

    use std::arch::x86_64::*;
    use std::cell::RefCell;
    use std::ops::Range;

    use super::{Elem, Gemm, dot_nk, finish};

    /// Output columns per tile.
    const VV: usize = 4;
    /// Row pairs per tile, at most.
    const RP: usize = 4;

    thread_local! {
        /// The rows interleaved by pairs, reused between calls.
        static PAIRS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// `w: (N, K)`, `B ≥ 2`.
    ///
    /// # Safety
    /// The CPU supports AVX-512F, AVX2, FMA and F16C, and the contract of
    /// [`super::columns`] holds: `g`'s slices have the lengths `run` asserts, `cols` lies
    /// within `0..N`, and `out` is a `(B, N)` row-major buffer whose columns `cols` no other
    /// thread touches during the call.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn nk<T: Elem>(g: Gemm<'_, T>, cols: Range<usize>, out: *mut f32) {
        let main = g.k - g.k % 8;
        let pairs = g.b.div_ceil(2);
        PAIRS.with_borrow_mut(|xi| {
            // pairs[p][c/8] = [x[2p][c..c+8], x[2p+1][c..c+8]]; an odd last row is paired with
            // itself (its second half is computed and dropped).
            xi.clear();
            xi.reserve(pairs * main * 2);
            for p in 0..pairs {
                let (r0, r1) = (2 * p, (2 * p + 1).min(g.b - 1));
                for c in (0..main).step_by(8) {
                    xi.extend_from_slice(&g.x[r0 * g.k + c..r0 * g.k + c + 8]);
                    xi.extend_from_slice(&g.x[r1 * g.k + c..r1 * g.k + c + 8]);
                }
            }
            let mut col = cols.start;
            // SAFETY: this function's contract; each tile gets `col + VV ≤ cols.end` and pairs
            // below `pairs`, as `tile` needs; the tail indexes rows below B and columns in
            // `cols`.
            unsafe {
                while col + VV <= cols.end {
                    let mut p0 = 0;
                    while p0 < pairs {
                        match pairs - p0 {
                            1 => tile::<T, 1>(g, xi, p0, col, out),
                            2 => tile::<T, 2>(g, xi, p0, col, out),
                            3 => tile::<T, 3>(g, xi, p0, col, out),
                            _ => tile::<T, RP>(g, xi, p0, col, out),
                        }
                        p0 += RP;
                    }
                    col += VV;
                }
                for c in col..cols.end {
                    for row in 0..g.b {
                        *out.add(row * g.n + c) = dot_nk(g, row, c);
                    }
                }
            }
        });
    }

    /// Pairs `p0..p0+PP` (rows `2·p0..`, those below B) × columns `col..col+VV`.
    ///
    /// # Safety
    /// [`nk`]'s contract, with `xi` the interleaved pairs, `p0 + PP ≤` their count and
    /// `col + VV` inside the caller's `cols`.
    #[inline(always)]
    unsafe fn tile<T: Elem, const PP: usize>(
        g: Gemm<'_, T>,
        xi: &[f32],
        p0: usize,
        col: usize,
        out: *mut f32,
    ) {
        // SAFETY: this function's contract: rows `col..col+VV` of w (K values each, read below
        // `main` then to K), pairs `p0..p0+PP` of `xi` (`main·2` floats each) and the output
        // elements of rows below B exist; prefetches never fault.
        unsafe {
            let main = g.k - g.k % 8;
            let mut acc = [[_mm512_setzero_ps(); VV]; PP];
            let w = g.w.as_ptr().add(col * g.k);
            let x = xi.as_ptr().add(p0 * main * 2);
            let line = 64 / size_of::<T>();
            let mut c = 0;
            while c < main {
                if p0 == 0 && c % line == 0 {
                    for v in 0..VV {
                        _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add((VV + v) * g.k + c).cast());
                    }
                }
                let mut wv = [_mm512_setzero_ps(); VV];
                for (v, slot) in wv.iter_mut().enumerate() {
                    let z = _mm512_castps256_ps512(T::load8(w.add(v * g.k + c)));
                    *slot = _mm512_shuffle_f32x4::<0b01_00_01_00>(z, z);
                }
                for (p, acc_p) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add((p * main + c) * 2));
                    for v in 0..VV {
                        acc_p[v] = _mm512_fmadd_ps(xv, wv[v], acc_p[v]);
                    }
                }
                c += 8;
            }
            for (p, acc_p) in acc.iter().enumerate() {
                for half in 0..2 {
                    let row = 2 * (p0 + p) + half;
                    if row >= g.b {
                        continue;
                    }
                    for (v, &a) in acc_p.iter().enumerate() {
                        let mut both = [0.0f32; 16];
                        _mm512_storeu_ps(both.as_mut_ptr(), a);
                        let mut lanes = [0.0f32; 8];
                        lanes.copy_from_slice(&both[8 * half..8 * half + 8]);
                        *out.add(row * g.n + col + v) = finish(g, lanes, row, col + v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5) (xorshift), for the kernel tests here and in `q8`.
    pub(crate) fn filled(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    fn product(
        layout: Layout,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        b: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        let mut out = vec![0.0; b * n];
        run(Gemm { x, w, bias, b, k, n }, layout, &mut out);
        out
    }

    /// Every kernel set of this CPU, F32 and F16 weights, against the canonical order.
    #[test]
    fn every_kernel_set_gives_the_canonical_bits_for_f32_and_f16() {
        let shapes =
            [(1, 40, 203), (2, 64, 130), (3, 19, 77), (5, 24, 16), (9, 101, 9), (32, 96, 300)];
        for (b, k, n) in shapes {
            let (x, w, bias) = (filled(b * k, 1), filled(k * n, 2), filled(n, 3));
            let w16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            for &isa in Isa::available() {
                for bias in [Some(&bias[..]), None] {
                    let g = Gemm { x: &x, w: &w[..], bias, b, k, n };
                    let mut out = vec![0.0; b * n];
                    run_with(isa, g, Layout::NK, &mut out);
                    let g16 = Gemm { x: &x, w: &w16[..], bias, b, k, n };
                    let mut out16 = vec![0.0; b * n];
                    run_with(isa, g16, Layout::NK, &mut out16);
                    for row in 0..b {
                        for col in 0..n {
                            let at = row * n + col;
                            let (want, want16) = (dot_nk(g, row, col), dot_nk(g16, row, col));
                            assert_eq!(
                                out[at].to_bits(),
                                want.to_bits(),
                                "{isa:?} F32 {b}x{k}x{n} ({row},{col})"
                            );
                            assert_eq!(
                                out16[at].to_bits(),
                                want16.to_bits(),
                                "{isa:?} F16 {b}x{k}x{n} ({row},{col})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Against f64 loops, and bitwise against the one-element reference of each layout.
    #[test]
    fn kernels_match_the_plain_loops_for_every_tile_shape() {
        for layout in [Layout::KN, Layout::NK] {
            for (b, k, n) in
                [(1, 37, 203), (2, 64, 130), (3, 19, 77), (5, 24, 16), (7, 101, 9), (16, 32, 300)]
            {
                let (x, w, bias) = (filled(b * k, 1), filled(k * n, 2), filled(n, 3));
                let got = product(layout, &x, &w, Some(&bias), b, k, n);
                let g = Gemm { x: &x, w: &w, bias: Some(&bias), b, k, n };
                for row in 0..b {
                    for col in 0..n {
                        let (exact, canonical) = match layout {
                            Layout::KN => (
                                (0..k)
                                    .map(|i| f64::from(x[row * k + i]) * f64::from(w[i * n + col]))
                                    .sum::<f64>(),
                                dot_kn(g, row, col),
                            ),
                            Layout::NK => (
                                (0..k)
                                    .map(|i| f64::from(x[row * k + i]) * f64::from(w[col * k + i]))
                                    .sum::<f64>(),
                                dot_nk(g, row, col),
                            ),
                        };
                        let v = got[row * n + col];
                        assert!(
                            (f64::from(v) - exact - f64::from(bias[col])).abs() < 1e-5,
                            "{layout:?} {b}x{k}x{n} at ({row},{col})"
                        );
                        assert_eq!(
                            v.to_bits(),
                            canonical.to_bits(),
                            "{layout:?} {b}x{k}x{n} at ({row},{col}): tile differs from the canonical order"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_in_any_batch() {
        let (k, n) = (96, 1000);
        let w = filled(k * n, 5);
        let xs = filled(16 * k, 6);
        for layout in [Layout::KN, Layout::NK] {
            let batch = product(layout, &xs, &w, None, 16, k, n);
            for row in [0, 3, 15] {
                let alone = product(layout, &xs[row * k..(row + 1) * k], &w, None, 1, k, n);
                assert_eq!(alone, batch[row * n..(row + 1) * n], "{layout:?} row {row}");
            }
            let three = product(layout, &xs[..3 * k], &w, None, 3, k, n);
            assert_eq!(three, batch[..3 * n], "{layout:?}");
        }
    }

    #[test]
    fn thread_count_does_not_change_the_bits() {
        let (b, k, n) = (4, 64, 777);
        let (x, w) = (filled(b * k, 8), filled(k * n, 9));
        crate::threads::set_threads(1);
        let one = product(Layout::KN, &x, &w, None, b, k, n);
        crate::threads::set_threads(2);
        let two = product(Layout::KN, &x, &w, None, b, k, n);
        assert_eq!(one, two);
    }
}
