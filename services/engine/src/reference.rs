//! Reference folders: the checkpoints of GPT2_REFERENCE.md for one (model, prompt), as
//! `{name}.npy` tensors plus `meta.json`. `scripts/gen_reference.py` writes them with Hugging
//! Face `transformers` (`fixtures/reference/<model>/<prompt>/`), `llorch-engine dump` writes
//! them with this engine ([`crate::dump`]), and the tests read them. [`Meta`] is the one
//! definition of `meta.json` for all of them, and [`traced_prefill`] the one traced run that
//! the dump and the checkpoint tests compare.

use std::path::Path;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::kv_cache::KvCache;
use crate::model::{Gpt2, LogitsFor, Scratch, SeqStep, Trace};
use crate::sampling::{softmax_with_temperature, top_n_ids};

/// Greedy tokens a reference holds (checkpoint 12).
pub const GREEDY_TOKENS: usize = 24;

/// `meta.json`: what a reference folder says beyond its tensors. Fields other than these (the
/// generator's `model`, `prompt`, `prompt_text`) are ignored when read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The argmax of the last prompt row's logits (checkpoint 10).
    pub greedy_next: u32,
    /// The top 5 of softmax(last logits / 0.8) (checkpoint 11).
    pub top5_t08: Top5,
    /// [`GREEDY_TOKENS`] greedy ids after the prompt, through the KV cache (checkpoint 12).
    pub greedy_24: Vec<u32>,
    /// The top-1 minus the top-2 logit at each greedy step.
    pub greedy_margins: Vec<f64>,
    /// The smallest of `greedy_margins`: how decisive the greedy ids are.
    pub min_margin: f64,
}

/// The top 5 of a softmax, largest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Top5 {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Their probabilities.
    pub probs: Vec<f32>,
}

impl Meta {
    /// Reads `dir/meta.json`.
    pub fn read(dir: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(dir.join("meta.json"))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// Writes `dir/meta.json`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("meta.json"), text + "\n")
    }

    /// The meta of a prompt from its traced prefill ([`traced_prefill`]), decoding the greedy
    /// continuation through `prefill.cache` (as many of [`GREEDY_TOKENS`] as the context
    /// holds). Greedy here is the plain argmax: end-of-text is not suppressed.
    pub fn from_prefill(
        model: &Gpt2,
        prompt: &[u32],
        prefill: &mut Prefill,
    ) -> Result<Self, EngineError> {
        let last = prefill.logits.row(prompt.len() - 1).to_vec();
        let top5 = top_n_ids(&softmax_with_temperature(&last, 0.8), 5);
        let room = prefill.cache.capacity() - prefill.cache.len() + 1;
        let mut scratch = Scratch::default();
        let (mut ids, mut margins) = (Vec::new(), Vec::new());
        let mut logits = last.clone();
        for step in 0..GREEDY_TOKENS.min(room) {
            if step > 0 {
                let token = [ids[step - 1]];
                let mut seq = [SeqStep { tokens: &token, cache: &mut prefill.cache }];
                logits = model
                    .forward(&mut seq, &mut scratch, LogitsFor::LastOfEach, None)?
                    .row(0)
                    .to_vec();
            }
            let top = top_n_ids(&logits, 2);
            ids.push(top[0].1);
            margins.push(f64::from(top[0].0 - top.get(1).map_or(f32::NEG_INFINITY, |t| t.0)));
        }
        Ok(Self {
            prompt_ids: prompt.to_vec(),
            greedy_next: top_n_ids(&last, 1)[0].1,
            top5_t08: Top5 {
                ids: top5.iter().map(|t| t.1).collect(),
                probs: top5.iter().map(|t| t.0).collect(),
            },
            min_margin: margins.iter().copied().fold(f64::INFINITY, f64::min),
            greedy_24: ids,
            greedy_margins: margins,
        })
    }
}

/// A traced prefill of one prompt.
#[derive(Debug)]
pub struct Prefill {
    /// Block 0's intermediates (checkpoints 1–7).
    pub trace: Trace,
    /// The logits of every prompt row, `(S, V)` (checkpoint 8).
    pub logits: Array2<f32>,
    /// The prompt's cache, with room for `n_ctx` positions; rows past the prompt are zero.
    pub cache: KvCache,
}

/// Runs `prompt` through `model` in one traced prefill step.
pub fn traced_prefill(model: &Gpt2, prompt: &[u32]) -> Result<Prefill, EngineError> {
    let mut cache = model.new_cache(model.config().n_ctx);
    let mut scratch = Scratch::default();
    let mut trace = Trace::default();
    let logits = model
        .forward(
            &mut [SeqStep { tokens: prompt, cache: &mut cache }],
            &mut scratch,
            LogitsFor::AllRows,
            Some(&mut trace),
        )?
        .to_owned();
    Ok(Prefill { trace, logits, cache })
}
