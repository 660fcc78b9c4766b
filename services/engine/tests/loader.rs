//! Loading: both file layouts, F16/BF16 against F32, and every malformed-file case.

use std::path::Path;

use llorch_engine::random::{
    FileLayout, RandomModel, RawTensor, StorageDtype, encode, write_safetensors,
};
use llorch_engine::{EngineError, Gpt2, Gpt2Config, LogitsFor, Scratch, SeqStep};
use ndarray::Array2;
use safetensors::Dtype;

fn small_config() -> Gpt2Config {
    let mut c = Gpt2Config::preset("small").unwrap();
    (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) = (1000, 32, 24, 2, 3);
    c
}

fn spec(dtype: StorageDtype, layout: FileLayout) -> RandomModel {
    RandomModel { config: small_config(), seed: 11, std: 0.3, dtype, layout }
}

fn logits(dir: &Path) -> Array2<f32> {
    let model = Gpt2::load(dir).unwrap();
    let mut cache = model.new_cache(8);
    let tokens = [5, 900, 17, 3];
    let mut scratch = Scratch::default();
    model
        .forward(
            &mut [SeqStep { tokens: &tokens, cache: &mut cache }],
            &mut scratch,
            LogitsFor::AllRows,
            None,
        )
        .unwrap()
        .to_owned()
}

fn load_err(dir: &Path) -> EngineError {
    Gpt2::load(dir).unwrap_err()
}

/// The random model's tensors in a given naming, F32, for hand-made broken files.
fn raw_tensors(prefix: &str) -> Vec<RawTensor> {
    let s = spec(StorageDtype::F32, FileLayout::SavePretrained);
    let cfg = s.config.validate().unwrap();
    let shapes = llorch_engine::weights::expected_shapes(&cfg);
    s.tensors(&cfg)
        .into_iter()
        .map(|(name, values)| {
            let shape = shapes.iter().find(|(n, _)| *n == name).unwrap().1.clone();
            (format!("{prefix}{name}"), Dtype::F32, shape, encode(&values, StorageDtype::F32).1)
        })
        .collect()
}

fn folder_with(tensors: &[RawTensor]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&small_config()).unwrap())
        .unwrap();
    write_safetensors(&dir.path().join("model.safetensors"), tensors).unwrap();
    dir
}

#[test]
fn hub_and_save_pretrained_layouts_give_identical_logits() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    spec(StorageDtype::F32, FileLayout::Hub).write(a.path()).unwrap();
    spec(StorageDtype::F32, FileLayout::SavePretrained).write(b.path()).unwrap();
    assert_eq!(logits(a.path()), logits(b.path()));
    let model = Gpt2::load(a.path()).unwrap();
    assert_eq!(model.dtype(), "F32");
}

#[test]
fn f16_and_bf16_files_agree_with_f32_within_the_storage_rounding() {
    let f32_dir = tempfile::tempdir().unwrap();
    spec(StorageDtype::F32, FileLayout::SavePretrained).write(f32_dir.path()).unwrap();
    let full = logits(f32_dir.path());
    for (dtype, round, tol) in [
        (StorageDtype::F16, (|v: f32| half::f16::from_f32(v).to_f32()) as fn(f32) -> f32, 2e-2),
        (StorageDtype::Bf16, |v: f32| half::bf16::from_f32(v).to_f32(), 1.5e-1),
    ] {
        let half_dir = tempfile::tempdir().unwrap();
        spec(dtype, FileLayout::SavePretrained).write(half_dir.path()).unwrap();
        let got = logits(half_dir.path());
        // Exact: the upcast is lossless, so an F32 file holding the rounded values gives the
        // same bits.
        let rounded: Vec<RawTensor> = raw_tensors("transformer.")
            .into_iter()
            .map(|(n, d, s, bytes)| {
                let v: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| round(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .collect();
                (n, d, s, encode(&v, StorageDtype::F32).1)
            })
            .collect();
        assert_eq!(got, logits(folder_with(&rounded).path()), "{dtype:?} upcast is not exact");
        // Close to the unrounded model: the storage rounding (2^-11 relative for F16, 2^-8 for
        // BF16) propagated through two blocks; logits here are of order 10.
        let diff = (&got - &full).mapv(f32::abs).fold(0.0f32, |a, &b| a.max(b));
        assert!(diff > 0.0 && diff < tol, "{dtype:?}: max logit difference {diff}");
        assert_eq!(
            Gpt2::load(half_dir.path()).unwrap().dtype(),
            if dtype == StorageDtype::F16 { "F16" } else { "BF16" }
        );
    }
}

#[test]
fn f32_weights_are_used_in_place_from_the_memory_map() {
    let dir = tempfile::tempdir().unwrap();
    spec(StorageDtype::F32, FileLayout::SavePretrained).write(dir.path()).unwrap();
    let cfg = small_config().validate().unwrap();
    let mut weights =
        llorch_engine::weights::Weights::load(&dir.path().join("model.safetensors")).unwrap();
    assert!(weights.take("wte.weight", [cfg.vocab_size, cfg.n_embd]).unwrap().is_mapped());
    assert!(weights.take("h.1.mlp.c_fc.weight", [cfg.n_embd, cfg.n_inner]).unwrap().is_mapped());
}

#[test]
fn an_untied_lm_head_is_used_when_present() {
    let tied = folder_with(&raw_tensors("transformer."));
    let mut with_head = raw_tensors("transformer.");
    let wte = with_head.iter().find(|t| t.0 == "transformer.wte.weight").unwrap().clone();
    let flipped: Vec<f32> =
        wte.3.chunks_exact(4).map(|b| -f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    with_head.push((
        "lm_head.weight".into(),
        Dtype::F32,
        wte.2.clone(),
        encode(&flipped, StorageDtype::F32).1,
    ));
    let untied = folder_with(&with_head);
    assert_eq!(logits(untied.path()), -logits(tied.path()));
}

#[test]
fn a_missing_tensor_is_named() {
    let mut t = raw_tensors("");
    t.retain(|t| t.0 != "h.1.mlp.c_proj.bias");
    let err = load_err(folder_with(&t).path());
    assert!(matches!(&err, EngineError::MissingTensor(n) if n == "h.1.mlp.c_proj.bias"), "{err}");
}

#[test]
fn an_extra_tensor_is_named() {
    let mut t = raw_tensors("transformer.");
    t.push(("transformer.h.7.attn.c_attn.weight".into(), Dtype::F32, vec![1], vec![0; 4]));
    let err = load_err(folder_with(&t).path());
    assert!(
        err.to_string().contains("unexpected tensor \"transformer.h.7.attn.c_attn.weight\""),
        "{err}"
    );
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let mut t = raw_tensors("");
    let i = t.iter().position(|t| t.0 == "h.0.attn.c_attn.weight").unwrap();
    t[i].2 = vec![72, 24]; // transposed: [out, in] instead of [in, out]
    let err = load_err(folder_with(&t).path()).to_string();
    assert_eq!(err, "tensor \"h.0.attn.c_attn.weight\" has shape [72, 24], expected [24, 72]");
}

#[test]
fn a_wrong_dtype_is_named() {
    let mut t = raw_tensors("");
    let i = t.iter().position(|t| t.0 == "ln_f.bias").unwrap();
    t[i].1 = Dtype::I32;
    let err = load_err(folder_with(&t).path()).to_string();
    assert_eq!(err, "tensor \"ln_f.bias\" is stored as I32; expected F32, F16 or BF16");
}

#[test]
fn truncated_corrupt_and_empty_files_are_errors_not_panics() {
    let good = folder_with(&raw_tensors(""));
    let bytes = std::fs::read(good.path().join("model.safetensors")).unwrap();
    for (what, content) in [
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
        ("header cut", bytes[..20].to_vec()),
        ("garbage", b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header".to_vec()),
        ("empty", Vec::new()),
        ("bad json", [&16u64.to_le_bytes()[..], b"{\"a\": [1, 2, 3 ]"].concat()),
    ] {
        std::fs::write(good.path().join("model.safetensors"), &content).unwrap();
        let err = load_err(good.path());
        assert!(matches!(err, EngineError::WeightsFile { .. }), "{what}: {err}");
    }
    std::fs::remove_file(good.path().join("model.safetensors")).unwrap();
    assert!(load_err(good.path()).to_string().contains("No such file"));
}

#[test]
fn config_problems_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    assert!(load_err(dir.path()).to_string().contains("cannot read"));
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert!(load_err(dir.path()).to_string().contains("invalid"));
    let mut c = small_config();
    c.n_head = 5;
    std::fs::write(dir.path().join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
    assert!(load_err(dir.path()).to_string().contains("not a multiple of n_head 5"));
}

/// `random-model` writes a `config.json` that other tools accept: the keys `save_pretrained`
/// writes for a `GPT2LMHeadModel` (`transformers` needs `model_type`, llama.cpp's converter
/// `architectures` and `n_ctx`), and it still loads here with the same shape.
#[test]
fn a_random_models_config_is_what_save_pretrained_writes() {
    let dir = tempfile::tempdir().unwrap();
    spec(StorageDtype::F16, FileLayout::SavePretrained).write(dir.path()).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    let c = small_config();
    assert_eq!(v["model_type"], "gpt2");
    assert_eq!(v["architectures"], serde_json::json!(["GPT2LMHeadModel"]));
    assert_eq!(v["n_ctx"], c.n_positions);
    assert_eq!(v["n_positions"], c.n_positions);
    assert_eq!(v["torch_dtype"], "float16");
    assert_eq!(
        (v["bos_token_id"].as_u64(), v["eos_token_id"].as_u64()),
        (Some(50256), Some(50256))
    );
    assert_eq!(*Gpt2::load(dir.path()).unwrap().config(), c.validate().unwrap());
}
