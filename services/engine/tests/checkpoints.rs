//! The twelve checkpoints of GPT2_REFERENCE.md against the Hugging Face `transformers`
//! reference, on every fixture model and prompt, with the tolerances given there.

mod common;

use common::{PROMPTS, Reference, assert_close, models};
use llorch_engine::reference::traced_prefill;
use llorch_engine::sampling::{softmax_with_temperature, top_n_ids};
use llorch_engine::{Gpt2, LogitsFor, Scratch, SeqStep, Trace};
use ndarray::{ArrayD, Axis, s};

/// Runs `check` for every model and prompt.
fn each(check: impl Fn(&str, &Gpt2, &Reference, &Trace, &ArrayD<f32>, &llorch_engine::KvCache)) {
    for (name, dir) in models() {
        let model = Gpt2::load(&dir).unwrap();
        for prompt in PROMPTS {
            let reference = Reference::load(name, prompt);
            let p = traced_prefill(&model, &reference.meta.prompt_ids).unwrap();
            let logits = p.logits.into_dyn();
            check(&format!("{name}/{prompt}"), &model, &reference, &p.trace, &logits, &p.cache);
        }
    }
}

#[test]
fn checkpoint_01_ln_1_of_the_embeddings() {
    each(|what, _, r, t, _, _| {
        assert_close(&format!("{what} ln1"), t.get("ln1").unwrap(), &r.tensor("ln1"), 1e-5)
    });
}

#[test]
fn checkpoint_02_q_k_v_after_c_attn_and_the_split() {
    each(|what, _, r, t, _, _| {
        for name in ["q", "k", "v"] {
            assert_close(&format!("{what} {name}"), t.get(name).unwrap(), &r.tensor(name), 1e-4);
        }
    });
}

#[test]
fn checkpoint_03_kv_cache_rows_read_back_and_untouched_rows_are_zero() {
    each(|what, model, _, t, _, cache| {
        let n = t.get("k").unwrap().shape()[0];
        assert_eq!(cache.len(), n, "{what}");
        for (layer_rows, stored, name) in
            [(cache.keys(0), t.get("k").unwrap(), "k"), (cache.values(0), t.get("v").unwrap(), "v")]
        {
            assert_eq!(
                layer_rows.slice(s![..n, ..]).to_owned().into_dyn(),
                *stored,
                "{what}: cached {name} differs from what was written"
            );
        }
        for layer in 0..model.config().n_layer {
            for rows in [cache.keys(layer), cache.values(layer)] {
                assert!(
                    rows.slice(s![n.., ..]).iter().all(|&v| v == 0.0),
                    "{what}: layer {layer} has nonzero rows past {n}"
                );
                assert!(
                    rows.slice(s![..n, ..]).iter().any(|&v| v != 0.0),
                    "{what}: layer {layer} rows were not written"
                );
            }
        }
    });
}

#[test]
fn checkpoint_04_attention_scores_scaled_and_masked_before_softmax() {
    each(|what, _, r, t, _, _| {
        let got = t.get("att_scores").unwrap();
        assert_close(&format!("{what} att_scores"), got, &r.tensor("att_scores"), 1e-4);
        // The mask is there: every key after the query is −∞, row 0 sees only key 0.
        let (nh, s_len, _) = (got.shape()[0], got.shape()[1], got.shape()[2]);
        for h in 0..nh {
            for i in 0..s_len {
                for j in 0..s_len {
                    assert_eq!(
                        got[[h, i, j]] == f32::NEG_INFINITY,
                        j > i,
                        "{what} head {h} query {i} key {j}"
                    );
                }
            }
        }
    });
}

#[test]
fn checkpoint_05_attention_output_after_c_proj() {
    each(|what, _, r, t, _, _| {
        assert_close(
            &format!("{what} attn_out"),
            t.get("attn_out").unwrap(),
            &r.tensor("attn_out"),
            1e-4,
        )
    });
}

#[test]
fn checkpoint_06_mlp_output_on_the_ln_2_output() {
    each(|what, _, r, t, _, _| {
        assert_close(
            &format!("{what} mlp_in"),
            t.get("mlp_in").unwrap(),
            &r.tensor("mlp_in"),
            1e-4,
        );
        assert_close(
            &format!("{what} mlp_out"),
            t.get("mlp_out").unwrap(),
            &r.tensor("mlp_out"),
            1e-4,
        );
    });
}

#[test]
fn checkpoint_07_block_0_output_with_both_residuals() {
    each(|what, _, r, t, _, _| {
        assert_close(
            &format!("{what} block0_out"),
            t.get("block0_out").unwrap(),
            &r.tensor("block0_out"),
            1e-4,
        )
    });
}

#[test]
fn checkpoint_08_logits_for_all_positions() {
    each(|what, _, r, _, logits, _| {
        assert_close(&format!("{what} logits"), logits, &r.tensor("logits"), 1e-3)
    });
}

#[test]
fn checkpoint_09_last_position_logits_equal_checkpoint_8s_last_row_exactly() {
    each(|what, model, r, _, all, _| {
        let prompt = &r.meta.prompt_ids;
        let mut cache = model.new_cache(prompt.len());
        let mut scratch = Scratch::default();
        let last = model
            .forward(
                &mut [SeqStep { tokens: prompt, cache: &mut cache }],
                &mut scratch,
                LogitsFor::LastOfEach,
                None,
            )
            .unwrap()
            .row(0)
            .to_owned();
        let want = all.index_axis(Axis(0), prompt.len() - 1);
        assert_eq!(
            last.into_dyn(),
            want.to_owned(),
            "{what}: serving-path logits differ from the all-rows pass"
        );
    });
}

#[test]
fn checkpoint_10_greedy_id() {
    each(|what, _, r, _, logits, _| {
        let last = logits.index_axis(Axis(0), logits.shape()[0] - 1);
        let (_, id) = top_n_ids(last.as_slice().unwrap(), 1)[0];
        assert_eq!(id, r.meta.greedy_next, "{what}");
    });
}

/// Checkpoint 11 tests the softmax step on its own: its input is the reference's last logits
/// row (checkpoint 8's output), as each checkpoint takes the previous step's reference output.
/// Fed our own logits instead, the 1e-6 probability tolerance would measure checkpoint 8's
/// F32 noise (up to 1.5e-5 in the logits), not the softmax; there the top-5 ids must still match.
#[test]
fn checkpoint_11_softmax_at_temperature_0_8_top_5() {
    each(|what, _, r, _, logits, _| {
        let reference = r.tensor("logits");
        let last_ref = reference.index_axis(Axis(0), reference.shape()[0] - 1);
        let probs = softmax_with_temperature(last_ref.as_slice().unwrap(), 0.8);
        let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
        assert!((total - 1.0).abs() <= 1e-6, "{what}: probabilities sum to {total}");
        let top = top_n_ids(&probs, 5);
        let ids: Vec<u32> = top.iter().map(|t| t.1).collect();
        assert_eq!(ids, r.meta.top5_t08.ids, "{what}");
        for ((p, id), want) in top.iter().zip(&r.meta.top5_t08.probs) {
            assert!(
                (p - want).abs() <= 1e-6,
                "{what}: probability of {id} is {p}, reference {want}"
            );
        }
        let ours = logits.index_axis(Axis(0), logits.shape()[0] - 1);
        let our_probs = softmax_with_temperature(ours.as_slice().unwrap(), 0.8);
        let our_ids: Vec<u32> = top_n_ids(&our_probs, 5).iter().map(|t| t.1).collect();
        assert_eq!(our_ids, r.meta.top5_t08.ids, "{what}: top-5 from our logits");
    });
}

#[test]
fn checkpoint_12_greedy_ids_with_the_kv_cache_match_and_repeat() {
    use llorch_engine::request::{Stopping, ValidRequest};
    use llorch_engine::sampling::SamplingParams;
    for (name, dir) in models() {
        let model = Gpt2::load(&dir).unwrap();
        for prompt in PROMPTS {
            let r = Reference::load(name, prompt);
            assert!(
                r.meta.min_margin >= 1e-3,
                "{name}/{prompt}: fixture margin {} too small to be decisive",
                r.meta.min_margin
            );
            let req = ValidRequest {
                request_id: "ckpt12".into(),
                prompt: r.meta.prompt_ids.clone(),
                sampling: SamplingParams::greedy(),
                stopping: Stopping {
                    max_new_tokens: r.meta.greedy_24.len(),
                    stop_token_ids: vec![],
                    ignore_eos: false,
                    eos_token_id: model.config().eos_token_id,
                },
                logprobs: false,
                top_logprobs: 0,
            };
            let first = llorch_engine::generate(
                &model,
                req.clone(),
                llorch_engine::sequence::DEFAULT_PREFILL_CHUNK,
                |_| {},
            )
            .unwrap();
            assert_eq!(first.ids(), r.meta.greedy_24, "{name}/{prompt}");
            for _ in 0..3 {
                assert_eq!(
                    llorch_engine::generate(
                        &model,
                        req.clone(),
                        llorch_engine::sequence::DEFAULT_PREFILL_CHUNK,
                        |_| {}
                    )
                    .unwrap()
                    .ids(),
                    first.ids()
                );
            }
        }
    }
}
