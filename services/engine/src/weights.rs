//! Loading GPT-2 weights from a Hugging Face `model.safetensors`.
//!
//! The file is memory-mapped once. F32 tensors are used in place (borrowed from the map, no
//! copy); F16 and BF16 tensors are converted to one owned F32 copy at load time, since compute
//! is always F32. Two layouts are accepted:
//!
//! * the hub's `openai-community/gpt2*` files: names without a prefix (`wte.weight`,
//!   `h.0.attn.c_attn.weight`, …), the `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` buffers
//!   present (ignored), no `lm_head.weight`;
//! * `save_pretrained` output: the same names under `transformer.`, no buffers.
//!
//! `lm_head.weight`, when present, is used as an untied LM head. Every missing, extra,
//! misshapen or wrongly typed tensor is an error naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use ndarray::{ArrayView1, ArrayView2};
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;
use crate::error::EngineError;

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

/// The tensors of a checkpoint, by canonical name (without `transformer.`), checked against a
/// model shape.
#[derive(Debug)]
pub struct Weights {
    params: BTreeMap<String, Param>,
    /// Storage type of `wte.weight` ("F32", "F16" or "BF16").
    pub dtype: String,
}

impl Weights {
    /// Maps `path` and checks it holds exactly the tensors of a GPT-2 with shape `cfg`.
    pub fn load(path: &Path, cfg: &ModelConfig) -> Result<Self, EngineError> {
        let file_err =
            |reason: String| EngineError::WeightsFile { path: path.display().to_string(), reason };
        let file = File::open(path).map_err(|e| file_err(e.to_string()))?;
        // SAFETY: the map is read-only; like every mmap-based loader (candle, llama.cpp) we rely
        // on the file not being truncated or rewritten while the engine runs.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| file_err(e.to_string()))?;
        let map = Arc::new(map);
        let tensors = SafeTensors::deserialize(&map).map_err(|e| file_err(e.to_string()))?;
        Self::from_safetensors(&tensors, &map, cfg)
    }

    fn from_safetensors(
        tensors: &SafeTensors<'_>,
        map: &Arc<Mmap>,
        cfg: &ModelConfig,
    ) -> Result<Self, EngineError> {
        let names: BTreeSet<String> = tensors.names().into_iter().map(str::to_owned).collect();
        let prefixed = names.contains("transformer.wte.weight");
        let prefix = if prefixed { "transformer." } else { "" };
        let mut expected = expected_shapes(cfg);
        let has_lm_head = names.contains("lm_head.weight");
        if has_lm_head || !cfg.tie_word_embeddings {
            expected.push(("lm_head.weight".to_owned(), vec![cfg.vocab_size, cfg.n_embd]));
        }

        let mut used = BTreeSet::new();
        let mut params = BTreeMap::new();
        for (name, shape) in expected {
            let file_name =
                if name == "lm_head.weight" { name.clone() } else { format!("{prefix}{name}") };
            let view = tensors
                .tensor(&file_name)
                .map_err(|_| EngineError::MissingTensor(file_name.clone()))?;
            if view.shape() != shape.as_slice() {
                return Err(EngineError::TensorShape {
                    name: file_name,
                    expected: shape,
                    got: view.shape().to_vec(),
                });
            }
            let param = to_param(&file_name, &view, map, shape)?;
            used.insert(file_name);
            params.insert(name, param);
        }
        for name in &names {
            if !used.contains(name) && !is_ignored_buffer(name, prefix, cfg.n_layer) {
                return Err(EngineError::UnexpectedTensor(name.clone()));
            }
        }
        let dtype = tensors
            .tensor(&format!("{prefix}wte.weight"))
            .map(|t| format!("{:?}", t.dtype()))
            .unwrap_or_default();
        Ok(Self { params, dtype })
    }

    /// Builds weights from owned parameters (random models, tests). Shapes are checked.
    pub fn from_params(
        params: BTreeMap<String, Param>,
        cfg: &ModelConfig,
    ) -> Result<Self, EngineError> {
        let mut expected = expected_shapes(cfg);
        if params.contains_key("lm_head.weight") || !cfg.tie_word_embeddings {
            expected.push(("lm_head.weight".to_owned(), vec![cfg.vocab_size, cfg.n_embd]));
        }
        for (name, shape) in &expected {
            let p = params.get(name).ok_or_else(|| EngineError::MissingTensor(name.clone()))?;
            if p.shape() != shape.as_slice() {
                return Err(EngineError::TensorShape {
                    name: name.clone(),
                    expected: shape.clone(),
                    got: p.shape().to_vec(),
                });
            }
        }
        if let Some(extra) = params.keys().find(|k| !expected.iter().any(|(n, _)| n == *k)) {
            return Err(EngineError::UnexpectedTensor(extra.clone()));
        }
        Ok(Self { params, dtype: "F32".into() })
    }

    /// Removes and returns a parameter (the model takes ownership of each once).
    pub fn take(&mut self, name: &str) -> Result<Param, EngineError> {
        self.params.remove(name).ok_or_else(|| EngineError::MissingTensor(name.to_owned()))
    }

    /// Removes and returns a parameter if present.
    pub fn take_optional(&mut self, name: &str) -> Option<Param> {
        self.params.remove(name)
    }
}

/// Every tensor of a GPT-2 of shape `cfg` (canonical names, without `transformer.`), with its
/// shape. Conv1D weights are `[in, out]`.
pub fn expected_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (c, f) = (cfg.n_embd, cfg.n_inner);
    let mut out = vec![
        ("wte.weight".to_owned(), vec![cfg.vocab_size, c]),
        ("wpe.weight".to_owned(), vec![cfg.n_ctx, c]),
    ];
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("h.{i}.{s}");
        out.extend([
            (p("ln_1.weight"), vec![c]),
            (p("ln_1.bias"), vec![c]),
            (p("attn.c_attn.weight"), vec![c, 3 * c]),
            (p("attn.c_attn.bias"), vec![3 * c]),
            (p("attn.c_proj.weight"), vec![c, c]),
            (p("attn.c_proj.bias"), vec![c]),
            (p("ln_2.weight"), vec![c]),
            (p("ln_2.bias"), vec![c]),
            (p("mlp.c_fc.weight"), vec![c, f]),
            (p("mlp.c_fc.bias"), vec![f]),
            (p("mlp.c_proj.weight"), vec![f, c]),
            (p("mlp.c_proj.bias"), vec![c]),
        ]);
    }
    out.extend([("ln_f.weight".to_owned(), vec![c]), ("ln_f.bias".to_owned(), vec![c])]);
    out
}

/// The causal-mask buffers that hub files carry and the engine does not need.
fn is_ignored_buffer(name: &str, prefix: &str, n_layer: usize) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|n| n.strip_prefix("h.")) else {
        return false;
    };
    let Some((layer, tail)) = rest.split_once('.') else { return false };
    layer.parse::<usize>().is_ok_and(|l| l < n_layer)
        && (tail == "attn.bias" || tail == "attn.masked_bias")
}

fn to_param(
    name: &str,
    view: &safetensors::tensor::TensorView<'_>,
    map: &Arc<Mmap>,
    shape: Vec<usize>,
) -> Result<Param, EngineError> {
    let bytes = view.data();
    let data = match view.dtype() {
        Dtype::F32 => {
            let start = bytes.as_ptr() as usize - map.as_ptr() as usize;
            let aligned = bytemuck::try_cast_slice::<u8, f32>(bytes).is_ok();
            if aligned && cfg!(target_endian = "little") {
                ParamData::Mapped { map: Arc::clone(map), start, len: bytes.len() / 4 }
            } else {
                ParamData::Owned(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                )
            }
        }
        Dtype::F16 => ParamData::Owned(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => ParamData::Owned(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        other => {
            return Err(EngineError::TensorDtype {
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            });
        }
    };
    Ok(Param { data, shape })
}
