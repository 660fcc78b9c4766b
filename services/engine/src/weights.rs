//! Loading GPT-2 weights from a Hugging Face `model.safetensors`.
//!
//! The file is memory-mapped once. Weight matrices ([`Weights::take_matrix`]) are held as the
//! [`WeightFormat`] asks: by default in the type the file stores, in place (borrowed from the
//! map, no copy), or converted once at load to F32, F16, BF16 or Q8_0 ([`Matrix`]); the map's
//! pages of a converted tensor are then released. Other tensors (biases, LayerNorms, `wpe`) are
//! F32: in place when the file stores F32, else an owned widened copy. Two layouts are accepted:
//!
//! * the hub's `openai-community/gpt2*` files: names without a prefix (`wte.weight`,
//!   `h.0.attn.c_attn.weight`, …), the `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` buffers
//!   present (ignored), no `lm_head.weight`;
//! * `save_pretrained` output: the same names under `transformer.`, no buffers.
//!
//! The model names each tensor and its shape once, where it takes it ([`Weights::take`], in
//! [`crate::model`]); `lm_head.weight`, when present, is used as an untied LM head. Every
//! missing, extra, misshapen or wrongly typed tensor is an error naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use ndarray::{ArrayView1, ArrayView2};
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::error::EngineError;
use crate::layers::gemm::Layout;
use crate::matrix::{FileDtype, Matrix, WeightFormat, release, widen_bytes};

/// One tensor as F32: borrowed from the memory map when the file stores F32 (and the data is
/// aligned), otherwise an owned converted copy.
#[derive(Debug)]
pub struct Param {
    data: ParamData,
    shape: Vec<usize>,
}

#[derive(Debug)]
enum ParamData {
    Mapped { map: Arc<Mmap>, start: usize, len: usize },
    Owned(Vec<f32>),
}

impl Param {
    /// A parameter from owned values (used by tests and the random-model writer).
    pub fn from_vec(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { data: ParamData::Owned(data), shape }
    }

    /// The values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        match &self.data {
            ParamData::Mapped { map, start, len } => {
                // Alignment and length were checked when the parameter was created.
                bytemuck::cast_slice(&map[*start..*start + *len * 4])
            }
            ParamData::Owned(v) => v,
        }
    }

    /// The shape as stored.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Whether the values live in the memory map (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(self.data, ParamData::Mapped { .. })
    }

    /// A 1-D view; the shape was checked at load time.
    pub fn view1(&self) -> ArrayView1<'_, f32> {
        ArrayView1::from(self.as_slice())
    }

    /// A 2-D view with the stored shape (`[in, out]` for Conv1D weights).
    pub fn view2(&self) -> ArrayView2<'_, f32> {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        ArrayView2::from_shape((rows, cols), self.as_slice()).expect("shape checked at load")
    }
}

/// Where one tensor lies in the memory map.
#[derive(Debug)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte offset in the map.
    start: usize,
    /// Byte length.
    len: usize,
}

#[derive(Debug)]
enum Source {
    /// A mapped safetensors file: its tensors by file name, and the prefix of the transformer's
    /// tensors in it (`""` or `"transformer."`).
    File { map: Arc<Mmap>, index: BTreeMap<String, Entry>, root: &'static str },
    /// No file: every required tensor is zeros, no optional one exists.
    Zeros,
}

/// The tensors of a checkpoint, handed out one at a time, candle `VarBuilder`-style: the model
/// asks for each tensor with its shape where it takes it ([`Weights::take`]), under the name
/// prefix of the struct taking it ([`Weights::pp`]), and [`Weights::finish`] refuses every
/// tensor nobody took. Names are canonical (without `transformer.`); errors name a tensor as
/// the file spells it.
#[derive(Debug)]
pub struct Weights {
    source: Source,
    /// The current name prefix, e.g. `h.3.attn.` while block 3's attention loads.
    prefix: String,
    /// File names taken or ignored.
    used: BTreeSet<String>,
    /// Canonical names and shapes taken, in order.
    taken: Vec<(String, Vec<usize>)>,
    /// How matrices are held.
    format: WeightFormat,
    /// Bytes of the parameters and matrices taken, as held.
    bytes: usize,
}

impl Weights {
    /// Maps `path` and indexes its tensors; each is checked and converted when taken.
    pub fn load(path: &Path) -> Result<Self, EngineError> {
        let file_err =
            |reason: String| EngineError::WeightsFile { path: path.display().to_string(), reason };
        let file = File::open(path).map_err(|e| file_err(e.to_string()))?;
        // SAFETY: the map is read-only; like every mmap-based loader (candle, llama.cpp) we rely
        // on the file not being truncated or rewritten while the engine runs.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| file_err(e.to_string()))?;
        let tensors = SafeTensors::deserialize(&map).map_err(|e| file_err(e.to_string()))?;
        let index: BTreeMap<String, Entry> = tensors
            .iter()
            .map(|(name, view)| {
                let entry = Entry {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start: view.data().as_ptr() as usize - map.as_ptr() as usize,
                    len: view.data().len(),
                };
                (name.to_owned(), entry)
            })
            .collect();
        let root = if index.contains_key("transformer.wte.weight") { "transformer." } else { "" };
        Ok(Self::new(Source::File { map: Arc::new(map), index, root }))
    }

    /// Weights without a file, to list what a model takes ([`Weights::taken`]): every
    /// [`Weights::take`] gives zeros of the asked shape (untouched zero pages from the
    /// allocator, so even a large model costs no memory), every optional tensor is absent.
    pub fn zeros() -> Self {
        Self::new(Source::Zeros)
    }

    fn new(source: Source) -> Self {
        Self {
            source,
            prefix: String::new(),
            used: BTreeSet::new(),
            taken: Vec::new(),
            format: WeightFormat::Stored,
            bytes: 0,
        }
    }

    /// Holds the matrices taken from now on as `format` says.
    #[must_use]
    pub fn with_format(mut self, format: WeightFormat) -> Self {
        self.format = format;
        self
    }

    /// Bytes of everything taken so far, as held in memory (mapped or owned).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes the weight matrix `name` of a product with input width `k` and output width `n`,
    /// stored `[k, n]` ([`Layout::KN`], Conv1D) or `[n, k]` ([`Layout::NK`], `wte`).
    pub fn take_matrix(
        &mut self,
        name: &str,
        (k, n): (usize, usize),
        layout: Layout,
    ) -> Result<Matrix, EngineError> {
        if let Source::Zeros = self.source {
            let param = self.take(name, stored_shape(layout, k, n))?;
            return Ok(Matrix::from_f32(param.as_slice().to_vec(), layout, k, n));
        }
        self.take_optional_matrix(name, (k, n), layout)?
            .ok_or_else(|| EngineError::MissingTensor(self.file_name(name)))
    }

    /// Takes the weight matrix `name` (as [`Weights::take_matrix`]) if the file has it.
    pub fn take_optional_matrix(
        &mut self,
        name: &str,
        (k, n): (usize, usize),
        layout: Layout,
    ) -> Result<Option<Matrix>, EngineError> {
        let shape = stored_shape(layout, k, n);
        let file_name = self.file_name(name);
        let Source::File { map, index, .. } = &self.source else { return Ok(None) };
        let Some(entry) = index.get(&file_name) else { return Ok(None) };
        check_shape(&file_name, entry, &shape)?;
        let dtype = file_dtype(&file_name, entry)?;
        let matrix = Matrix::from_file(map, entry.start, dtype, layout, (k, n), self.format)
            .map_err(|reason| EngineError::WeightFormat { name: file_name.clone(), reason })?;
        if !matrix.is_mapped() {
            release(map, entry.start, entry.len);
        }
        self.bytes += matrix.bytes();
        self.used.insert(file_name);
        self.taken.push((format!("{}{name}", self.prefix), shape));
        Ok(Some(matrix))
    }

    /// Appends `name.` to the name prefix until the returned guard is dropped; the guard
    /// derefs to these weights, so `Block::load(&mut w.pp("h").pp(3))` loads `h.3.*`.
    pub fn pp(&mut self, name: impl std::fmt::Display) -> Prefixed<'_> {
        let restore = self.prefix.len();
        self.prefix.push_str(&format!("{name}."));
        Prefixed { w: self, restore }
    }

    /// Takes the tensor `name` (under the current prefix), which must exist with `shape`.
    pub fn take(&mut self, name: &str, shape: impl AsRef<[usize]>) -> Result<Param, EngineError> {
        let shape = shape.as_ref();
        if let Source::Zeros = self.source {
            self.taken.push((format!("{}{name}", self.prefix), shape.to_vec()));
            let len = shape.iter().product();
            return Ok(Param::from_vec(shape.to_vec(), vec![0.0; len]));
        }
        self.take_optional(name, shape)?
            .ok_or_else(|| EngineError::MissingTensor(self.file_name(name)))
    }

    /// Takes the tensor `name` if the file has it; if it has, it must have `shape`.
    pub fn take_optional(
        &mut self,
        name: &str,
        shape: impl AsRef<[usize]>,
    ) -> Result<Option<Param>, EngineError> {
        let shape = shape.as_ref().to_vec();
        let file_name = self.file_name(name);
        let Source::File { map, index, .. } = &self.source else { return Ok(None) };
        let Some(entry) = index.get(&file_name) else { return Ok(None) };
        check_shape(&file_name, entry, &shape)?;
        let param = to_param(&file_name, entry, map, shape.clone())?;
        self.bytes += param.as_slice().len() * 4;
        self.used.insert(file_name);
        self.taken.push((format!("{}{name}", self.prefix), shape));
        Ok(Some(param))
    }

    /// Accepts the tensor `name` (under the current prefix) if the file has it, unused.
    pub fn ignore(&mut self, name: &str) {
        let file_name = self.file_name(name);
        if let Source::File { index, .. } = &self.source
            && index.contains_key(&file_name)
        {
            self.used.insert(file_name);
        }
    }

    /// Refuses the first tensor (by file name) that was neither taken nor ignored.
    pub fn finish(&self) -> Result<(), EngineError> {
        let Source::File { index, .. } = &self.source else { return Ok(()) };
        match index.keys().find(|name| !self.used.contains(*name)) {
            Some(extra) => Err(EngineError::UnexpectedTensor(extra.clone())),
            None => Ok(()),
        }
    }

    /// Canonical names and shapes of the tensors taken so far, in the order taken.
    pub fn taken(&self) -> &[(String, Vec<usize>)] {
        &self.taken
    }

    /// Storage type of `wte.weight` ("F32", "F16" or "BF16"; "F32" for [`Weights::zeros`]).
    pub fn dtype(&self) -> String {
        match &self.source {
            Source::File { index, root, .. } => index
                .get(&format!("{root}wte.weight"))
                .map(|e| format!("{:?}", e.dtype))
                .unwrap_or_default(),
            Source::Zeros => "F32".into(),
        }
    }

    /// How the file spells `name` under the current prefix: `save_pretrained` puts the
    /// transformer's tensors under `transformer.` and the LM head beside it.
    fn file_name(&self, name: &str) -> String {
        let canonical = format!("{}{name}", self.prefix);
        match &self.source {
            Source::File { root, .. } if canonical != "lm_head.weight" => {
                format!("{root}{canonical}")
            }
            _ => canonical,
        }
    }
}

/// [`Weights`] with a name prefix pushed by [`Weights::pp`]; dropping it pops the prefix.
#[derive(Debug)]
pub struct Prefixed<'w> {
    w: &'w mut Weights,
    restore: usize,
}

impl std::ops::Deref for Prefixed<'_> {
    type Target = Weights;

    fn deref(&self) -> &Weights {
        self.w
    }
}

impl std::ops::DerefMut for Prefixed<'_> {
    fn deref_mut(&mut self) -> &mut Weights {
        self.w
    }
}

impl Drop for Prefixed<'_> {
    fn drop(&mut self) {
        self.w.prefix.truncate(self.restore);
    }
}

/// Every tensor a GPT-2 of shape `cfg` takes (canonical names, without `transformer.`), with
/// its shape, in the order the model takes them: the model's loader run on
/// [`Weights::zeros`]. Conv1D weights are `[in, out]`.
pub fn expected_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut w = Weights::zeros();
    // Zeros give every required tensor, so building cannot fail.
    crate::model::Gpt2::from_weights(*cfg, &mut w).expect("every tensor exists in Weights::zeros");
    w.taken
}

/// How a matrix of a product `K → N` is stored in `layout`.
fn stored_shape(layout: Layout, k: usize, n: usize) -> Vec<usize> {
    match layout {
        Layout::KN => vec![k, n],
        Layout::NK => vec![n, k],
    }
}

fn check_shape(file_name: &str, entry: &Entry, shape: &[usize]) -> Result<(), EngineError> {
    if entry.shape == shape {
        return Ok(());
    }
    Err(EngineError::TensorShape {
        name: file_name.to_owned(),
        expected: shape.to_vec(),
        got: entry.shape.clone(),
    })
}

/// The tensor's storage type, if the engine reads it.
fn file_dtype(name: &str, entry: &Entry) -> Result<FileDtype, EngineError> {
    FileDtype::of(entry.dtype).ok_or_else(|| EngineError::TensorDtype {
        name: name.to_owned(),
        dtype: format!("{:?}", entry.dtype),
    })
}

fn to_param(
    name: &str,
    entry: &Entry,
    map: &Arc<Mmap>,
    shape: Vec<usize>,
) -> Result<Param, EngineError> {
    let bytes = &map[entry.start..entry.start + entry.len];
    let dtype = file_dtype(name, entry)?;
    let aligned = bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok();
    let data = if dtype == FileDtype::F32 && aligned && cfg!(target_endian = "little") {
        ParamData::Mapped { map: Arc::clone(map), start: entry.start, len: entry.len / 4 }
    } else {
        ParamData::Owned(widen_bytes(bytes, dtype))
    };
    Ok(Param { data, shape })
}
