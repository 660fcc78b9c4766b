//! Reading the committed reference fixtures (`fixtures/reference`, written by
//! `scripts/gen_reference.py` with Hugging Face `transformers`) and comparing with tolerances
//! that report the first bad index and the max difference.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use llorch_engine::npy;
use llorch_engine::reference::Meta;
use ndarray::ArrayD;

/// Repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fixture models: (name in fixtures/reference, model folder).
pub fn models() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("tiny", root().join("fixtures/models/tiny")),
        ("odd", root().join("fixtures/models/odd")),
        ("demo", root().join("models/default")),
    ]
}

/// The fixture prompts.
pub const PROMPTS: [&str; 2] = ["hello", "long"];

/// One (model, prompt) reference folder.
pub struct Reference {
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Reference {
    pub fn load(model: &str, prompt: &str) -> Self {
        let dir = root().join("fixtures/reference").join(model).join(prompt);
        let meta = Meta::read(&dir).unwrap();
        Self { dir, meta }
    }

    pub fn tensor(&self, name: &str) -> ArrayD<f32> {
        npy::read_f32(&self.dir.join(format!("{name}.npy"))).unwrap()
    }
}

/// Max |a - b| over entries where both are finite, with its first index; entries where one is
/// −∞ (masked) must be −∞ (or below −1e30) in both.
pub fn compare(got: &ArrayD<f32>, want: &ArrayD<f32>) -> Result<(f32, usize), String> {
    if got.shape() != want.shape() {
        return Err(format!("shape {:?} vs reference {:?}", got.shape(), want.shape()));
    }
    let mut worst = (0.0f32, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
        let masked = |v: f32| v == f32::NEG_INFINITY || v < -1e30;
        if masked(g) || masked(w) {
            if masked(g) != masked(w) {
                return Err(format!("index {i}: masked in one only (got {g}, reference {w})"));
            }
            continue;
        }
        let d = (g - w).abs();
        if d.is_nan() || d > worst.0 {
            worst = (d, i);
        }
    }
    Ok(worst)
}

/// Asserts `got` matches `want` within `tol`, naming the checkpoint and the first bad index.
#[track_caller]
pub fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f32) {
    match compare(got, want) {
        Ok((diff, at)) => {
            if diff.is_nan() || diff > tol {
                let first_bad = got
                    .iter()
                    .zip(want.iter())
                    .position(|(g, w)| (g - w).abs().is_nan() || (g - w).abs() > tol)
                    .unwrap_or(at);
                panic!(
                    "{what}: max abs diff {diff} at flat index {at} (tolerance {tol}); first index over tolerance {first_bad}: got {} want {}",
                    got.iter().nth(first_bad).unwrap(),
                    want.iter().nth(first_bad).unwrap()
                );
            }
        }
        Err(msg) => panic!("{what}: {msg}"),
    }
}

/// Whether `got` is within `tol` of `want` (for negative tests).
pub fn is_close(got: &ArrayD<f32>, want: &ArrayD<f32>, tol: f32) -> bool {
    matches!(compare(got, want), Ok((d, _)) if d <= tol)
}
