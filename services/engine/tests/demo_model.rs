//! The trained demo model that ships as `models/default` (scripts/train_demo.py) against
//! Hugging Face `transformers` (scripts/gen_reference.py, `fixtures/reference/demo`): a
//! 64-token greedy continuation with top-5 logprobs for two prompts, and the sliding-window
//! perplexity of a held-out chapter, by the library and by `llorch-engine perplexity`.
//! (The twelve checkpoints run on it in checkpoints.rs with the other fixture models.)

mod common;

use std::process::Command;

use common::root;
use llorch_engine::perplexity::{PerplexityConfig, perplexity};
use llorch_engine::request::{Stopping, ValidRequest};
use llorch_engine::sampling::SamplingParams;
use llorch_engine::sequence::DEFAULT_PREFILL_CHUNK;
use llorch_engine::{Gpt2, generate};
use serde::Deserialize;

/// The goal of issue #16 for every logprob against HF.
const LOGPROB_TOLERANCE: f64 = 1e-4;
/// Perplexity against HF for the same windows, relative.
const PERPLEXITY_RELATIVE: f64 = 1e-3;

fn demo() -> Gpt2 {
    Gpt2::load(&root().join("models/default")).unwrap()
}

#[derive(Deserialize)]
struct Continuations {
    new_tokens: usize,
    prompts: Vec<Continuation>,
}

#[derive(Deserialize)]
struct Continuation {
    name: String,
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    logprobs: Vec<f64>,
    top5: Vec<Vec<Alternative>>,
    min_margin: f64,
}

#[derive(Deserialize)]
struct Alternative {
    id: u32,
    logprob: f64,
}

#[test]
fn the_demo_model_is_named_so_nobody_mistakes_it_for_gpt2() {
    let model = demo();
    assert_eq!(model.name(), Some("llorch-demo-kjv-6x192"));
    let dir = root().join("models/default");
    let served = llorch_engine::server::served_name;
    assert_eq!(served(None, &model, &dir), "llorch-demo-kjv-6x192");
    assert_eq!(served(Some("mine"), &model, &dir), "mine", "--model-name wins");
    assert_eq!(served(Some(" "), &model, &dir), "llorch-demo-kjv-6x192", "empty is absent");
    let tiny = Gpt2::load(&root().join("fixtures/models/tiny")).unwrap();
    assert_eq!(tiny.name(), None);
    assert_eq!(served(None, &tiny, &root().join("fixtures/models/tiny")), "tiny");
}

#[test]
fn greedy_64_tokens_with_top_5_logprobs_match_hugging_face() {
    let text =
        std::fs::read_to_string(root().join("fixtures/reference/demo/continuation.json")).unwrap();
    let want: Continuations = serde_json::from_str(&text).unwrap();
    assert_eq!(want.prompts.len(), 2);
    let model = demo();
    let mut worst = (0.0f64, String::new());
    for c in &want.prompts {
        assert!(c.min_margin >= 1e-3, "{}: near-tie in the reference", c.name);
        let req = ValidRequest {
            request_id: c.name.clone(),
            prompt: c.prompt_ids.clone(),
            sampling: SamplingParams::greedy(),
            stopping: Stopping {
                max_new_tokens: want.new_tokens,
                stop_token_ids: vec![],
                ignore_eos: true,
                eos_token_id: model.config().eos_token_id,
            },
            logprobs: true,
            top_logprobs: 5,
        };
        let got = generate(&model, req, DEFAULT_PREFILL_CHUNK, |_| {}).unwrap();
        assert_eq!(got.ids(), c.ids, "{}: greedy ids", c.name);
        for (step, (t, (lp, top))) in
            got.tokens.iter().zip(c.logprobs.iter().zip(&c.top5)).enumerate()
        {
            let mut check = |what: String, ours: f32, theirs: f64| {
                let d = (f64::from(ours) - theirs).abs();
                assert!(
                    d <= LOGPROB_TOLERANCE,
                    "{} step {step} {what}: {ours} vs HF {theirs} (|Δ| {d:.2e})",
                    c.name
                );
                if d > worst.0 {
                    worst = (d, format!("{} step {step} {what}", c.name));
                }
            };
            check("chosen".into(), t.logprob, *lp);
            let ids: Vec<u32> = t.top.iter().map(|a| a.0).collect();
            let want_ids: Vec<u32> = top.iter().map(|a| a.id).collect();
            assert_eq!(ids, want_ids, "{} step {step}: top-5 ids", c.name);
            for (a, w) in t.top.iter().zip(top) {
                check(format!("top id {}", w.id), a.1, w.logprob);
            }
        }
    }
    // The number issue #16 asks to report (goal ≤ 1e-4); `--nocapture` shows it.
    println!(
        "max |Δ logprob| vs HF over 2 × 64 steps × (chosen + top 5): {:.2e} at {}",
        worst.0, worst.1
    );
}

#[derive(Deserialize)]
struct PerplexityReference {
    tokens: usize,
    cases: Vec<PerplexityCase>,
}

#[derive(Deserialize)]
struct PerplexityCase {
    window: usize,
    stride: usize,
    windows: usize,
    scored: usize,
    perplexity: f64,
}

fn perplexity_fixture() -> (String, PerplexityReference) {
    let dir = root().join("fixtures/reference/demo/perplexity");
    let text = std::fs::read_to_string(dir.join("text.txt")).unwrap();
    let reference = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    (text, serde_json::from_str(&reference).unwrap())
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn perplexity_equals_hugging_face_for_the_same_windows() {
    let (text, want) = perplexity_fixture();
    let tokenizer =
        llorch_tokenizer::BpeTokenizer::from_dir(&root().join("models/default")).unwrap();
    let ids = tokenizer.encode(&text, false).unwrap();
    assert_eq!(ids.len(), want.tokens);
    let model = demo();
    assert!(want.cases.len() >= 3);
    for case in &want.cases {
        // Small chunks too: a window's rows must not depend on how it is cut into calls.
        for chunk in [DEFAULT_PREFILL_CHUNK, 37] {
            let cfg =
                PerplexityConfig::new(&model, Some(case.window), Some(case.stride), chunk).unwrap();
            let mut calls = 0;
            let got = perplexity(&model, &ids, cfg, |_, _| calls += 1).unwrap();
            let what = format!("window {} stride {} chunk {chunk}", case.window, case.stride);
            assert_eq!((got.windows, got.scored), (case.windows, case.scored), "{what}");
            // Every token but the first once; without overlap, not each window's first.
            let unscored = if case.stride < case.window { 1 } else { got.windows };
            assert_eq!(got.scored, ids.len() - unscored, "{what}");
            assert_eq!(calls, got.windows, "{what}: progress after each window");
            let rel = relative(got.perplexity, case.perplexity);
            assert!(
                rel <= PERPLEXITY_RELATIVE,
                "{what}: {} vs HF {} (relative {rel:.2e})",
                got.perplexity,
                case.perplexity
            );
            println!(
                "{what}: {:.6} vs HF {:.6} (relative {rel:.1e})",
                got.perplexity, case.perplexity
            );
        }
    }
}

#[test]
fn perplexity_refuses_bad_windows_and_short_texts() {
    let model = demo();
    let n_ctx = model.config().n_ctx;
    for (window, stride, field) in [
        (Some(n_ctx + 1), None, "window"),
        (Some(1), None, "window"),
        (Some(0), None, "window"),
        (Some(64), Some(0), "stride"),
        (Some(64), Some(65), "stride"),
    ] {
        let err = PerplexityConfig::new(&model, window, stride, 256).unwrap_err().to_string();
        assert!(err.contains(field), "{window:?}/{stride:?}: {err}");
    }
    let cfg = PerplexityConfig::new(&model, None, None, 256).unwrap();
    assert_eq!((cfg.window, cfg.stride), (n_ctx, n_ctx / 2));
    for ids in [&[][..], &[464][..]] {
        let err = perplexity(&model, ids, cfg, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("at least 2 tokens"), "{err}");
    }
    // An id past the vocabulary anywhere (also the last, which is only ever a target).
    for ids in [&[464, 50257][..], &[50300, 464][..]] {
        let err = perplexity(&model, ids, cfg, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("vocabulary size 50257"), "{err}");
    }
}

fn engine() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llorch-engine"));
    cmd.current_dir(root()).env_remove("LLORCH_MODEL").env("RUST_LOG", "warn");
    cmd
}

#[test]
fn the_perplexity_command_prints_json_equal_to_the_reference() {
    let (_, want) = perplexity_fixture();
    let case = want.cases.iter().find(|c| c.window == 128).unwrap();
    let out = engine()
        .args([
            "perplexity",
            "--text",
            "fixtures/reference/demo/perplexity/text.txt",
            "--window",
            "128",
            "--stride",
            "64",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "llorch-demo-kjv-6x192");
    assert_eq!((v["window"].as_u64(), v["stride"].as_u64()), (Some(128), Some(64)));
    assert_eq!(v["windows"].as_u64(), Some(case.windows as u64));
    assert_eq!(v["tokens"].as_u64(), Some(want.tokens as u64));
    let ppl = v["perplexity"].as_f64().unwrap();
    assert!(relative(ppl, case.perplexity) <= PERPLEXITY_RELATIVE, "{ppl} vs {}", case.perplexity);
    let mean = v["mean_nll"].as_f64().unwrap();
    assert!((mean.exp() - ppl).abs() <= 1e-9 * ppl);
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_perplexity_command_fails_clearly_on_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let binary = dir.path().join("binary.txt");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let text = "fixtures/reference/demo/perplexity/text.txt";
    let empty = empty.to_str().unwrap();
    let binary = binary.to_str().unwrap();
    for (args, says) in [
        (vec!["--text", empty], "at least 2 tokens"),
        (vec!["--text", binary], "UTF-8"),
        (vec!["--text", "no/such/file.txt"], "cannot read --text"),
        (vec!["--text", text, "--window", "100000"], "window"),
        (vec!["--text", text, "--stride", "0"], "stride"),
        (vec!["--text", text, "--model", "fixtures/models/tiny"], "--tokenizer"),
    ] {
        let out = engine().arg("perplexity").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    // The tiny model with the tokenizer of models/default works.
    let out = engine()
        .args(["perplexity", "--text", text, "--model", "fixtures/models/tiny"])
        .args(["--tokenizer", "models/default", "--threads", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
