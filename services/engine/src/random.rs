//! Random-weight GPT-2 model folders (`llorch-engine random-model`), so benchmarks and tests
//! need neither downloads nor Python, and a safetensors writer for any set of tensors.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::config::{Gpt2Config, ModelConfig};
use crate::error::EngineError;
use crate::sampling::Rng;
use crate::weights::expected_shapes;

/// Storage type of a written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StorageDtype {
    /// 32-bit floats (used in place from the memory map).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

/// Tensor naming of a written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FileLayout {
    /// As `save_pretrained` writes: `transformer.` prefix, no mask buffers.
    SavePretrained,
    /// As the hub's `openai-community/gpt2*` files: no prefix, `attn.bias`/`attn.masked_bias`.
    Hub,
}

/// What `random-model` writes.
#[derive(Debug, Clone)]
pub struct RandomModel {
    /// The architecture.
    pub config: Gpt2Config,
    /// RNG seed.
    pub seed: u64,
    /// Standard deviation of the weights (GPT-2's init: 0.02; `c_proj` is scaled by
    /// 1/√(2·n_layer) as in GPT-2).
    pub std: f32,
    /// Storage type.
    pub dtype: StorageDtype,
    /// Tensor naming.
    pub layout: FileLayout,
}

/// One tensor to write: name, storage type, shape and little-endian bytes.
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

impl RandomModel {
    /// The F32 values of every tensor, by canonical name (without `transformer.`).
    pub fn tensors(&self, cfg: &ModelConfig) -> BTreeMap<String, Vec<f32>> {
        let mut rng = Rng::new(self.seed);
        let proj_std = self.std / (2.0 * cfg.n_layer as f32).sqrt();
        expected_shapes(cfg)
            .into_iter()
            .map(|(name, shape)| {
                let len: usize = shape.iter().product();
                let values = if name.contains(".ln_") || name.starts_with("ln_f") {
                    let one = if name.ends_with(".weight") { 1.0 } else { 0.0 };
                    vec![one; len]
                } else if name.ends_with(".bias") {
                    vec![0.0; len]
                } else {
                    let std = if name.ends_with("c_proj.weight") { proj_std } else { self.std };
                    (0..len).map(|_| normal(&mut rng) * std).collect()
                };
                (name, values)
            })
            .collect()
    }

    /// The `config.json` written beside the weights: the keys the engine reads plus those
    /// Hugging Face's `save_pretrained` writes for a `GPT2LMHeadModel` and that other tools
    /// require (`transformers`' `AutoConfig` needs `model_type`; llama.cpp's converter needs
    /// `architectures` and `n_ctx`). Dropouts and `initializer_range` are GPT-2's defaults;
    /// they only matter for training.
    pub fn config_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.config).unwrap_or_default();
        let extra = serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_ctx": self.config.n_positions,
            "bos_token_id": self.config.eos_token_id,
            "attn_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "resid_pdrop": 0.1,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": match self.dtype {
                StorageDtype::F32 => "float32",
                StorageDtype::F16 => "float16",
                StorageDtype::Bf16 => "bfloat16",
            },
        });
        if let (Some(map), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            map.extend(extra);
        }
        v
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> Result<(), EngineError> {
        let cfg = self.config.validate()?;
        let io = |e: std::io::Error| EngineError::WeightsFile {
            path: dir.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let config_json = serde_json::to_string_pretty(&self.config_json())
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        std::fs::write(dir.join("config.json"), config_json).map_err(io)?;
        let shapes: BTreeMap<String, Vec<usize>> = expected_shapes(&cfg).into_iter().collect();
        let mut raw: Vec<RawTensor> = self
            .tensors(&cfg)
            .into_iter()
            .map(|(name, values)| {
                let shape = shapes.get(&name).cloned().unwrap_or_default();
                let file_name = match self.layout {
                    FileLayout::SavePretrained => format!("transformer.{name}"),
                    FileLayout::Hub => name,
                };
                let (dtype, bytes) = encode(&values, self.dtype);
                (file_name, dtype, shape, bytes)
            })
            .collect();
        if self.layout == FileLayout::Hub {
            let n = cfg.n_ctx;
            let tril: Vec<f32> =
                (0..n * n).map(|i| if i % n <= i / n { 1.0 } else { 0.0 }).collect();
            for layer in 0..cfg.n_layer {
                raw.push((
                    format!("h.{layer}.attn.bias"),
                    Dtype::F32,
                    vec![1, 1, n, n],
                    encode(&tril, StorageDtype::F32).1,
                ));
                raw.push((
                    format!("h.{layer}.attn.masked_bias"),
                    Dtype::F32,
                    vec![],
                    (-1e4f32).to_le_bytes().to_vec(),
                ));
            }
        }
        write_safetensors(&dir.join("model.safetensors"), &raw)
    }
}

/// F32 values in the given storage type, as little-endian bytes.
pub fn encode(values: &[f32], dtype: StorageDtype) -> (Dtype, Vec<u8>) {
    match dtype {
        StorageDtype::F32 => (Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        StorageDtype::F16 => (
            Dtype::F16,
            values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        ),
        StorageDtype::Bf16 => (
            Dtype::BF16,
            values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        ),
    }
}

/// Writes tensors to a safetensors file (`{"format": "pt"}` metadata, like transformers).
pub fn write_safetensors(path: &Path, tensors: &[RawTensor]) -> Result<(), EngineError> {
    let err =
        |reason: String| EngineError::WeightsFile { path: path.display().to_string(), reason };
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = Some([("format".to_owned(), "pt".to_owned())].into_iter().collect());
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| err(e.to_string()))
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut Rng) -> f32 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Copies the tokenizer files that exist in `from` into `to`.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> std::io::Result<usize> {
    let mut copied = 0;
    for name in ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"] {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name))?;
            copied += 1;
        }
    }
    Ok(copied)
}
