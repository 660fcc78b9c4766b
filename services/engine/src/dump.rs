//! `llorch-engine dump`: every checkpoint tensor of a prompt as `.npy`, named as in
//! `fixtures/reference`, for comparing against any reference implementation step by step.

use std::path::Path;

use ndarray::Axis;

use crate::error::EngineError;
use crate::model::{Gpt2, LogitsFor, Scratch, SeqStep, Trace};
use crate::npy;
use crate::sampling::{softmax_with_temperature, top_n_ids};

/// Writes `ln1.npy` … `block0_out.npy`, `logits.npy` and `meta.json` (greedy next id and the
/// top-5 of softmax(logits/0.8)) into `out`. Returns the written file names.
pub fn dump(model: &Gpt2, prompt: &[u32], out: &Path) -> Result<Vec<String>, EngineError> {
    let io = |e: std::io::Error| {
        EngineError::Internal(format!("cannot write into {}: {e}", out.display()))
    };
    std::fs::create_dir_all(out).map_err(io)?;
    let mut cache = model.new_cache(prompt.len());
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
    let mut written = Vec::new();
    for (name, tensor) in trace
        .tensors
        .iter()
        .map(|(n, t)| (*n, t.view()))
        .chain([("logits", logits.view().into_dyn())])
    {
        let file = format!("{name}.npy");
        npy::write_f32(&out.join(&file), tensor).map_err(io)?;
        written.push(file);
    }
    let last = logits.index_axis(Axis(0), prompt.len() - 1);
    let last = last.as_slice().unwrap_or_default();
    let top5 = top_n_ids(&softmax_with_temperature(last, 0.8), 5);
    let meta = serde_json::json!({
        "prompt_ids": prompt,
        "greedy_next": top_n_ids(last, 1)[0].1,
        "top5_t08": { "ids": top5.iter().map(|t| t.1).collect::<Vec<_>>(), "probs": top5.iter().map(|t| t.0).collect::<Vec<_>>() },
    });
    std::fs::write(out.join("meta.json"), serde_json::to_string_pretty(&meta).unwrap_or_default())
        .map_err(io)?;
    written.push("meta.json".into());
    Ok(written)
}
