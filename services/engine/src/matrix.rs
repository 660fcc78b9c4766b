//! Weight matrices in the type they are held in: F32, F16 or BF16 (the tied head in place in
//! the memory map when the file stores that type, else one owned converted copy), or Q8_0
//! blocks.
//!
//! Every product computes in F32. Decode steps go through the small-batch kernels, which
//! widen F16/BF16 weights to F32 in registers and accumulate exactly as for F32 weights, so an
//! F16 model gives bitwise the logits of the same model upcast to F32 while reading half the
//! bytes per token. Q8_0 is GGUF's block layout (32 weights, one F16 scale) and is lossy; its
//! kernel is an integer dot product ([`crate::layers::q8`]). Prefill chunks go through
//! `sgemm`, which needs F32: a non-F32 matrix is widened into a reused per-thread buffer, one
//! matrix at a time, before its product (see [`Matrix::with_f32`]).
//!
//! A product is `x: (B, K) · W → (B, N)`. Conv1D weights are stored `[K, N]`
//! ([`Layout::KN`]) in the file and held transposed, `[N, K]` ([`Matrix::transposed`]), like
//! the tied head `wte` ([`Layout::NK`]): each output's weights are then one sequential run.
//! Q8_0 blocks always run along K.

use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use ndarray::{ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::layers::gemm::{self, Gemm, Layout};
use crate::layers::q8::{self, Q8Matrix, QK8_0, TILE_N};

/// How the engine holds its weight matrices (`--weights`, `LLORCH_WEIGHTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightFormat {
    /// As the file stores them (F32, F16 or BF16), in place.
    #[default]
    Stored,
    /// F32 (F16/BF16 files are widened, losslessly).
    F32,
    /// F16 (F32 files are rounded to nearest; BF16 files are refused, as the conversion would
    /// lose range).
    F16,
    /// BF16 (F32 files are rounded to nearest even; F16 files are refused).
    Bf16,
    /// GGUF's Q8_0: blocks of 32 weights along the input dimension, one F16 scale each (lossy;
    /// needs every product's input width to be a multiple of 32).
    #[value(name = "q8_0")]
    Q8_0,
}

impl WeightFormat {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }
}

/// Values of one element type, borrowed from the memory map or owned.
#[derive(Debug)]
enum Store<T> {
    Mapped { map: Arc<Mmap>, start: usize, len: usize },
    Owned(Vec<T>),
}

impl<T: bytemuck::Pod> Store<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            // Alignment and length were checked when the store was made (`Store::mapped`).
            Self::Mapped { map, start, len } => {
                bytemuck::cast_slice(&map[*start..*start + *len * size_of::<T>()])
            }
            Self::Owned(v) => v,
        }
    }

    /// The bytes `start..start + len·size_of::<T>()` of `map` in place, when they are aligned
    /// for `T` (and the machine is little-endian, as the file is); `None` otherwise.
    fn mapped(map: &Arc<Mmap>, start: usize, len: usize) -> Option<Self> {
        let bytes = &map[start..start + len * size_of::<T>()];
        (cfg!(target_endian = "little") && bytemuck::try_cast_slice::<u8, T>(bytes).is_ok())
            .then(|| Self::Mapped { map: Arc::clone(map), start, len })
    }
}

#[derive(Debug)]
enum Data {
    F32(Store<f32>),
    F16(Store<half::f16>),
    Bf16(Store<half::bf16>),
    /// `(N, K/32)` blocks, repacked 16 columns at a time for the kernels ([`Q8Matrix`]).
    Q8_0(Q8Matrix),
}

/// One weight matrix of a product `x: (B, K) · W → (B, N)`.
#[derive(Debug)]
pub struct Matrix {
    data: Data,
    /// How F32/F16/BF16 values are laid out (Q8_0 is always [`Layout::NK`]).
    layout: Layout,
    k: usize,
    n: usize,
}

/// The storage type of a tensor in the file, for [`Matrix::from_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDtype {
    F32,
    F16,
    Bf16,
}

impl Matrix {
    /// A matrix from `len = K·N` values of type `dtype` at `start..` in `map`, stored in
    /// `layout`, held as `format` says. Returns `None` when the conversion is refused (F16 ↔
    /// BF16) or impossible (Q8_0 with `K` not a multiple of 32); the caller names the tensor.
    pub fn from_file(
        map: &Arc<Mmap>,
        start: usize,
        dtype: FileDtype,
        layout: Layout,
        (k, n): (usize, usize),
        format: WeightFormat,
    ) -> Result<Self, String> {
        let len = k * n;
        let widen = || widen_bytes(&map[start..start + len * dtype.size()], dtype);
        let data = match (format, dtype) {
            (WeightFormat::Stored | WeightFormat::F32, FileDtype::F32) => {
                Data::F32(Store::mapped(map, start, len).unwrap_or_else(|| Store::Owned(widen())))
            }
            (WeightFormat::F32, _) => Data::F32(Store::Owned(widen())),
            (WeightFormat::Stored | WeightFormat::F16, FileDtype::F16) => {
                Data::F16(Store::mapped(map, start, len).unwrap_or_else(|| {
                    Store::Owned(widen().into_iter().map(half::f16::from_f32).collect())
                }))
            }
            (WeightFormat::Stored | WeightFormat::Bf16, FileDtype::Bf16) => {
                Data::Bf16(Store::mapped(map, start, len).unwrap_or_else(|| {
                    Store::Owned(widen().into_iter().map(half::bf16::from_f32).collect())
                }))
            }
            (WeightFormat::F16, FileDtype::F32) => {
                Data::F16(Store::Owned(widen().into_iter().map(half::f16::from_f32).collect()))
            }
            (WeightFormat::Bf16, FileDtype::F32) => {
                Data::Bf16(Store::Owned(widen().into_iter().map(half::bf16::from_f32).collect()))
            }
            (WeightFormat::F16 | WeightFormat::Bf16, _) => {
                return Err(format!(
                    "the file stores {dtype:?}; converting it to {} would round twice (use \
                     --weights stored or f32)",
                    format.as_str()
                ));
            }
            (WeightFormat::Q8_0, _) => {
                if k % QK8_0 != 0 {
                    return Err(format!(
                        "q8_0 needs the input width to be a multiple of {QK8_0}, and it is {k}"
                    ));
                }
                Data::Q8_0(quantize_from_file(map, start, dtype, layout, (k, n)))
            }
        };
        let matrix = Self { data, layout, k, n };
        Ok(if layout == Layout::KN { matrix.transposed() } else { matrix })
    }

    /// This matrix held `[N, K]` ([`Layout::NK`]): F32/F16/BF16 values are copied transposed
    /// (Q8_0 blocks already run along K). Conv1D weights are held so from the file, at the cost
    /// of an owned copy instead of the map: then each output's weights are one sequential run,
    /// which the decode kernels read at about twice the rate of the `[K, N]` columns
    /// (docs/PERFORMANCE.md).
    fn transposed(self) -> Self {
        if self.layout == Layout::NK || matches!(self.data, Data::Q8_0(_)) {
            return self;
        }
        let (k, n) = (self.k, self.n);
        let data = match &self.data {
            Data::F32(s) => Data::F32(Store::Owned(transpose(s.as_slice(), k, n))),
            Data::F16(s) => Data::F16(Store::Owned(transpose(s.as_slice(), k, n))),
            Data::Bf16(s) => Data::Bf16(Store::Owned(transpose(s.as_slice(), k, n))),
            Data::Q8_0(_) => unreachable!("returned above"),
        };
        Self { data, layout: Layout::NK, k, n }
    }

    /// An owned F32 matrix (tests, and models built in memory).
    pub fn from_f32(values: Vec<f32>, layout: Layout, k: usize, n: usize) -> Self {
        assert_eq!(values.len(), k * n, "a matrix of K·N values");
        Self { data: Data::F32(Store::Owned(values)), layout, k, n }
    }

    /// The matrix held as `format` (from this matrix's values widened to F32; `Stored` keeps
    /// F32). Used by tests and the Q8_0 error measurement.
    pub fn convert(&self, format: WeightFormat) -> Self {
        let values = self.to_f32_layout();
        let (k, n, layout) = (self.k, self.n, self.layout);
        let data = match format {
            WeightFormat::Stored | WeightFormat::F32 => Data::F32(Store::Owned(values)),
            WeightFormat::F16 => {
                Data::F16(Store::Owned(values.into_iter().map(half::f16::from_f32).collect()))
            }
            WeightFormat::Bf16 => {
                Data::Bf16(Store::Owned(values.into_iter().map(half::bf16::from_f32).collect()))
            }
            WeightFormat::Q8_0 => Data::Q8_0(q8::quantize_matrix(&values, layout, k, n)),
        };
        Self { data, layout, k, n }
    }

    /// Input width `K`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output width `N`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// "F32", "F16", "BF16" or "Q8_0".
    pub fn dtype(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "F32",
            Data::F16(_) => "F16",
            Data::Bf16(_) => "BF16",
            Data::Q8_0(_) => "Q8_0",
        }
    }

    /// Bytes the values take.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(s) => s.as_slice().len() * 4,
            Data::F16(s) => s.as_slice().len() * 2,
            Data::Bf16(s) => s.as_slice().len() * 2,
            Data::Q8_0(m) => m.bytes(),
        }
    }

    /// Whether the values are used in place from the memory map.
    pub fn is_mapped(&self) -> bool {
        matches!(
            &self.data,
            Data::F32(Store::Mapped { .. })
                | Data::F16(Store::Mapped { .. })
                | Data::Bf16(Store::Mapped { .. })
        )
    }

    /// `out: (B, N) = x·W (+ bias)` by the batch-invariant small-batch kernel of this type.
    pub fn small_batch(&self, x: &[f32], bias: Option<&[f32]>, b: usize, out: &mut [f32]) {
        let (k, n, layout) = (self.k, self.n, self.layout);
        match &self.data {
            Data::F32(s) => gemm::run(Gemm { x, w: s.as_slice(), bias, b, k, n }, layout, out),
            Data::F16(s) => gemm::run(Gemm { x, w: s.as_slice(), bias, b, k, n }, layout, out),
            Data::Bf16(s) => gemm::run(Gemm { x, w: s.as_slice(), bias, b, k, n }, layout, out),
            Data::Q8_0(m) => q8::run(x, m, bias, b, out),
        }
    }

    /// `out = x·W + bias` by OpenBLAS `sgemm` (prefill): on the F32 values in place, or on a
    /// per-thread F32 copy of this matrix made for the call.
    pub fn sgemm(&self, x: ArrayView2<'_, f32>, bias: &[f32], mut out: ArrayViewMut2<'_, f32>) {
        let bias = ndarray::ArrayView1::from(bias);
        let dim = out.raw_dim();
        out.assign(&bias.broadcast(dim).expect("bias matches the output width"));
        self.with_f32(|w| ndarray::linalg::general_mat_mul(1.0, &x, &w, 1.0, &mut out));
    }

    /// Calls `f` with the matrix as an F32 `(K, N)` view: in place for F32, else widened (split
    /// over the compute pool) into a buffer the process keeps and reuses, which grows to the
    /// largest matrix of the model (e.g. 9.4 MB for gpt2-small). The buffer is taken out of
    /// its slot for the call, not locked: a call that finds it taken (products on several
    /// threads at once) widens into a buffer of its own, and no lock is held while the pool
    /// works (a pool thread waiting for its share may run another forward pass meanwhile).
    pub fn with_f32<R>(&self, f: impl FnOnce(ArrayView2<'_, f32>) -> R) -> R {
        if let Data::F32(s) = &self.data {
            return f(self.view_of(s.as_slice()));
        }
        static WIDE: Mutex<Vec<f32>> = Mutex::new(Vec::new());
        let take = || std::mem::take(&mut *WIDE.lock().unwrap_or_else(|e| e.into_inner()));
        let mut buf = take();
        buf.resize(self.k * self.n, 0.0);
        self.widen_into(&mut buf);
        let result = f(self.view_of(&buf));
        let mut slot = WIDE.lock().unwrap_or_else(|e| e.into_inner());
        if slot.capacity() < buf.capacity() {
            *slot = buf;
        }
        result
    }

    /// A `(K, N)` view of values laid out as this matrix's F32 form (Q8_0 widens to `(N, K)`).
    fn view_of<'a>(&self, values: &'a [f32]) -> ArrayView2<'a, f32> {
        let shape = match self.stored_layout() {
            Layout::KN => (self.k, self.n),
            Layout::NK => (self.n, self.k),
        };
        let view = ArrayView2::from_shape(shape, values).expect("K·N values");
        match self.stored_layout() {
            Layout::KN => view,
            Layout::NK => view.reversed_axes(),
        }
    }

    fn stored_layout(&self) -> Layout {
        if matches!(self.data, Data::Q8_0(_)) { Layout::NK } else { self.layout }
    }

    /// The values widened to F32 in [`Matrix::stored_layout`] order, split over the pool.
    fn widen_into(&self, out: &mut [f32]) {
        const PER_TASK: usize = 1 << 16;
        fn par<T: Sync>(
            src: &[T],
            out: &mut [f32],
            per: usize,
            f: impl Fn(&[T], &mut [f32]) + Sync,
        ) {
            crate::threads::pool().install(|| {
                out.par_chunks_mut(per).zip(src.par_chunks(per)).for_each(|(o, s)| f(s, o));
            });
        }
        match &self.data {
            Data::F32(s) => out.copy_from_slice(s.as_slice()),
            Data::F16(s) => par(s.as_slice(), out, PER_TASK, |s, o| {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(s, o)
            }),
            Data::Bf16(s) => par(s.as_slice(), out, PER_TASK, |s, o| {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(s, o)
            }),
            Data::Q8_0(m) => m.widen_into(out),
        }
    }

    /// The values as F32 in this matrix's logical layout (`layout`), row-major.
    fn to_f32_layout(&self) -> Vec<f32> {
        let mut wide = vec![0.0; self.k * self.n];
        self.widen_into(&mut wide);
        if self.stored_layout() == self.layout {
            return wide;
        }
        // Q8_0 of a Conv1D weight: (N, K) back to (K, N).
        let view = ArrayView2::from_shape((self.n, self.k), &wide[..]).expect("N·K values");
        view.t().iter().copied().collect()
    }

    /// Row `i` of an `NK` matrix (an embedding lookup of `wte`), widened into `out: (K)`.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        assert_eq!(self.stored_layout(), Layout::NK, "rows are looked up in [N, K] matrices");
        let k = self.k;
        match &self.data {
            Data::F32(s) => out.copy_from_slice(&s.as_slice()[i * k..(i + 1) * k]),
            Data::F16(s) => {
                s.as_slice()[i * k..(i + 1) * k].iter().zip(out).for_each(|(v, o)| *o = v.to_f32())
            }
            Data::Bf16(s) => {
                s.as_slice()[i * k..(i + 1) * k].iter().zip(out).for_each(|(v, o)| *o = v.to_f32())
            }
            Data::Q8_0(m) => m.column_into(i, out),
        }
    }
}

/// `src: (K, N)` row-major as `(N, K)` row-major, in tiles (so both sides are read and written
/// a cache line at a time), split over the compute pool by output rows.
fn transpose<T: Copy + Default + Send + Sync>(src: &[T], k: usize, n: usize) -> Vec<T> {
    const TILE: usize = 64;
    assert_eq!(src.len(), k * n, "K·N values");
    let mut out = vec![T::default(); k * n];
    crate::threads::pool().install(|| {
        out.par_chunks_mut(TILE * k).enumerate().for_each(|(tile, rows)| {
            let n0 = tile * TILE;
            let n_rows = rows.len() / k;
            for k0 in (0..k).step_by(TILE) {
                for kk in k0..(k0 + TILE).min(k) {
                    let from = &src[kk * n + n0..kk * n + n0 + n_rows];
                    for (r, &v) in from.iter().enumerate() {
                        rows[r * k + kk] = v;
                    }
                }
            }
        });
    });
    out
}

/// Q8_0 blocks of a matrix in the map. An `NK` matrix (`wte`, 154 MB as F32 for gpt2-small)
/// is quantized a few MB of columns at a time, each slice's pages released when done, so the
/// load never holds the F32 matrix and its blocks at once; a `KN` one (at most 41 MB, for
/// gpt2-xl's MLP) is widened whole, as its columns are strided.
fn quantize_from_file(
    map: &Arc<Mmap>,
    start: usize,
    dtype: FileDtype,
    layout: Layout,
    (k, n): (usize, usize),
) -> Q8Matrix {
    let size = dtype.size();
    let widen = |bytes: &[u8]| widen_bytes(bytes, dtype);
    if layout == Layout::KN {
        let values = widen(&map[start..start + k * n * size]);
        return q8::quantize_matrix(&values, layout, k, n);
    }
    const SLICE_BYTES: usize = 4 << 20;
    // Slices of whole column groups: only the last push may end in a partial one.
    let per = (SLICE_BYTES / (k * size)).max(1).next_multiple_of(TILE_N);
    let mut blocks = Q8Matrix::with_capacity(k, n);
    for c0 in (0..n).step_by(per) {
        let cols = per.min(n - c0);
        let (from, len) = (start + c0 * k * size, cols * k * size);
        let values = widen(&map[from..from + len]);
        blocks.push_columns(&q8::quantize_blocks(&values, Layout::NK, k, cols));
        release(map, from, len);
    }
    blocks
}

/// Little-endian values of `dtype` as F32 (exact).
pub(crate) fn widen_bytes(bytes: &[u8], dtype: FileDtype) -> Vec<f32> {
    match dtype {
        FileDtype::F32 => {
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
        FileDtype::F16 => {
            bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        }
        FileDtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// Drops the map's pages of bytes that were converted (so a converted model does not also keep
/// the file's copy resident); the map stays valid and reads them back from the file if touched.
pub(crate) fn release(map: &Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    // SAFETY: the map is a read-only shared mapping of a file, so dropping its pages loses
    // nothing: a later read faults them back in from the file.
    let result =
        unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    #[cfg(not(unix))]
    let result: std::io::Result<()> = Ok(());
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not release the pages of a converted tensor");
    }
}

impl FileDtype {
    /// The safetensors type, if the engine reads it.
    pub fn of(dtype: safetensors::Dtype) -> Option<Self> {
        match dtype {
            safetensors::Dtype::F32 => Some(Self::F32),
            safetensors::Dtype::F16 => Some(Self::F16),
            safetensors::Dtype::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}
