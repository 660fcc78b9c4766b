//! The model configuration: [`Gpt2Config`] mirrors Hugging Face's `config.json`;
//! [`ModelConfig`] is its validated runtime form with nothing optional left.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;

/// `config.json` of a Hugging Face GPT-2 checkpoint (the keys the engine reads; others are
/// ignored).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size (50257 for GPT-2).
    pub vocab_size: usize,
    /// Context length (learned positions).
    pub n_positions: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads per block.
    pub n_head: usize,
    /// Width of the MLP; `null` means 4 · n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Activation of the MLP; GPT-2 uses `gelu_new` (the tanh form).
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// End-of-text id.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// Whether the LM head shares `wte` (true for every GPT-2 release).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Upcast attention to f32 / reorder-and-upcast (training knobs; must be false-like here).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Whether attention scores are scaled by 1/√head_dim (true for GPT-2).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// The name the engine serves the model under (`Info`, `/health`, the `model` of every
    /// response) unless `--model-name` says otherwise; without it the folder's name is used.
    /// llorch's own key: `scripts/train_demo.py` writes it so that the demo model is never
    /// mistaken for GPT-2 (`transformers` keeps unknown keys and ignores them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llorch_model_name: Option<String>,
}

fn default_activation() -> String {
    "gelu_new".to_owned()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> u32 {
    50256
}
fn default_true() -> bool {
    true
}

impl Gpt2Config {
    /// The four released sizes (`small`, `medium`, `large`, `xl`), with GPT-2's vocabulary and
    /// context.
    pub fn preset(name: &str) -> Option<Self> {
        let (n_layer, n_head, n_embd) = match name {
            "small" | "gpt2" => (12, 12, 768),
            "medium" | "gpt2-medium" => (24, 16, 1024),
            "large" | "gpt2-large" => (36, 20, 1280),
            "xl" | "gpt2-xl" => (48, 25, 1600),
            _ => return None,
        };
        Some(Self {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            activation_function: default_activation(),
            layer_norm_epsilon: default_eps(),
            eos_token_id: default_eos(),
            tie_word_embeddings: true,
            scale_attn_by_inverse_layer_idx: false,
            scale_attn_weights: true,
            llorch_model_name: None,
        })
    }

    /// Reads `config.json` from a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self, EngineError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EngineError::Config(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| EngineError::Config(format!("invalid {}: {e}", path.display())))
    }

    /// Checks the values and fills in the defaults.
    pub fn validate(&self) -> Result<ModelConfig, EngineError> {
        let bad = |msg: String| Err(EngineError::Config(msg));
        if self.n_layer == 0 || self.n_head == 0 || self.n_embd == 0 {
            return bad(format!(
                "n_layer, n_head and n_embd must be positive (got {}, {}, {})",
                self.n_layer, self.n_head, self.n_embd
            ));
        }
        // Far over any GPT-2 (xl: 1600 wide, 48 layers), and small enough that no product of
        // two sizes overflows (a fuzzed n_embd of 5e18 overflowed `4 * n_embd`).
        for (name, v) in
            [("n_layer", self.n_layer), ("n_head", self.n_head), ("n_embd", self.n_embd)]
                .into_iter()
                .chain(self.n_inner.map(|n| ("n_inner", n)))
        {
            if v > MAX_DIM {
                return bad(format!("{name} {v} out of range (at most {MAX_DIM})"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.vocab_size == 0 || self.vocab_size > u32::MAX as usize {
            return bad(format!("vocab_size {} out of range", self.vocab_size));
        }
        if self.n_positions == 0 || self.n_positions > u32::MAX as usize {
            return bad(format!("n_positions {} out of range", self.n_positions));
        }
        if self.activation_function != "gelu_new" {
            return bad(format!(
                "activation_function {:?} is not supported (GPT-2 uses \"gelu_new\")",
                self.activation_function
            ));
        }
        if self.scale_attn_by_inverse_layer_idx || !self.scale_attn_weights {
            return bad("only GPT-2's attention scaling (1/sqrt(head_dim)) is supported".into());
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon <= 0.0 {
            return bad(format!("layer_norm_epsilon {} must be positive", self.layer_norm_epsilon));
        }
        let n_inner = self.n_inner.unwrap_or(4 * self.n_embd);
        if n_inner == 0 {
            return bad("n_inner must be positive".into());
        }
        Ok(ModelConfig {
            vocab_size: self.vocab_size,
            n_ctx: self.n_positions,
            n_embd: self.n_embd,
            n_layer: self.n_layer,
            n_head: self.n_head,
            head_size: self.n_embd / self.n_head,
            n_inner,
            eps: self.layer_norm_epsilon as f32,
            eos_token_id: self.eos_token_id,
            tie_word_embeddings: self.tie_word_embeddings,
        })
    }
}

/// The largest `n_layer`, `n_head`, `n_embd` and `n_inner` accepted.
pub const MAX_DIM: usize = 1 << 20;

/// The validated model shape the forward pass uses (legend: `V` vocab, `C` n_embd, `NH`
/// n_head, `HS` head size, `L` layers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelConfig {
    /// `V`.
    pub vocab_size: usize,
    /// Maximum positions (prompt + generated).
    pub n_ctx: usize,
    /// `C`.
    pub n_embd: usize,
    /// `L`.
    pub n_layer: usize,
    /// `NH`.
    pub n_head: usize,
    /// `HS` = C / NH.
    pub head_size: usize,
    /// MLP width (4·C unless the config says otherwise).
    pub n_inner: usize,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// End-of-text id.
    pub eos_token_id: u32,
    /// Whether the LM head is `wte` (no `lm_head.weight` needed).
    pub tie_word_embeddings: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_shapes() {
        let xl = Gpt2Config::preset("xl").unwrap().validate().unwrap();
        assert_eq!(
            (xl.n_layer, xl.n_head, xl.n_embd, xl.head_size, xl.n_inner),
            (48, 25, 1600, 64, 6400)
        );
        let small = Gpt2Config::preset("small").unwrap().validate().unwrap();
        assert_eq!((small.vocab_size, small.n_ctx, small.head_size), (50257, 1024, 64));
    }

    #[test]
    fn heads_must_divide_the_width() {
        let mut c = Gpt2Config::preset("small").unwrap();
        c.n_head = 7;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("not a multiple of n_head 7"), "{err}");
    }

    #[test]
    fn erf_gelu_is_refused() {
        let mut c = Gpt2Config::preset("small").unwrap();
        c.activation_function = "gelu".into();
        assert!(c.validate().unwrap_err().to_string().contains("gelu_new"));
    }

    #[test]
    fn n_inner_null_means_four_times_the_width() {
        let json = r#"{"vocab_size":100,"n_positions":16,"n_embd":24,"n_layer":1,"n_head":3,"n_inner":null}"#;
        let c: Gpt2Config = serde_json::from_str(json).unwrap();
        assert_eq!(c.validate().unwrap().n_inner, 96);
    }
}
