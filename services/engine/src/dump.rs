//! `llorch-engine dump`: a reference folder ([`crate::reference`]) of a prompt as this engine
//! computes it, every checkpoint tensor as `.npy` and `meta.json`, named as in
//! `fixtures/reference`, for comparing against any reference implementation step by step.

use std::path::Path;

use crate::error::EngineError;
use crate::model::Gpt2;
use crate::npy;
use crate::reference::{Meta, traced_prefill};

/// Writes `ln1.npy` … `block0_out.npy`, `logits.npy` and `meta.json` (greedy next id, the
/// top-5 of softmax(logits/0.8), the greedy continuation and its margins) into `out`. Returns
/// the written file names.
pub fn dump(model: &Gpt2, prompt: &[u32], out: &Path) -> Result<Vec<String>, EngineError> {
    let io = |e: std::io::Error| {
        EngineError::Internal(format!("cannot write into {}: {e}", out.display()))
    };
    std::fs::create_dir_all(out).map_err(io)?;
    let mut prefill = traced_prefill(model, prompt)?;
    let mut written = Vec::new();
    for (name, tensor) in prefill
        .trace
        .tensors
        .iter()
        .map(|(n, t)| (*n, t.view()))
        .chain([("logits", prefill.logits.view().into_dyn())])
    {
        let file = format!("{name}.npy");
        npy::write_f32(&out.join(&file), tensor).map_err(io)?;
        written.push(file);
    }
    Meta::from_prefill(model, prompt, &mut prefill)?.write(out).map_err(io)?;
    written.push("meta.json".into());
    Ok(written)
}
