//! Sampling on hand-made logits.

use super::*;

fn params() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 7,
        ..SamplingParams::greedy()
    }
}

const NONE: History<'static> = History { prompt: &[], generated: &[] };

fn prompt(ids: &[u32]) -> History<'_> {
    History { prompt: ids, generated: &[] }
}

/// Frequencies of each id over `n` draws.
fn histogram(p: SamplingParams, logits: &[f32], history: History<'_>, n: usize) -> Vec<f64> {
    let mut s = Sampler::new(p);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[s.sample(logits, history, false, 0).id as usize] += 1;
    }
    counts.into_iter().map(|c| c as f64 / n as f64).collect()
}

#[test]
fn greedy_picks_the_argmax_and_the_lowest_id_on_ties() {
    let mut s = Sampler::new(SamplingParams::greedy());
    assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0], NONE, false, 0).id, 1);
    assert_eq!(s.sample(&[5.0, 5.0], NONE, false, 0).id, 0);
    assert_eq!(s.sample(&[f32::NAN, 1.0, 0.5], NONE, false, 0).id, 1);
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams { seed, ..params() });
        (0..64).map(|_| s.sample(&logits, NONE, false, 0).id).collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn top_k_1_equals_greedy() {
    let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 101) as f32 * 0.05).collect();
    let want = Sampler::new(SamplingParams::greedy()).sample(&logits, NONE, false, 0).id;
    for seed in 0..20 {
        let mut s = Sampler::new(SamplingParams { top_k: 1, seed, temperature: 1.7, ..params() });
        assert_eq!(s.sample(&logits, NONE, false, 0).id, want);
    }
}

#[test]
fn temperature_one_draws_from_the_softmax() {
    let logits = [0.0f32, 1.0, 2.0];
    let freq = histogram(params(), &logits, NONE, 40_000);
    let want = softmax_with_temperature(&logits, 1.0);
    for (f, w) in freq.iter().zip(&want) {
        assert!((f - f64::from(*w)).abs() < 0.01, "{freq:?} vs {want:?}");
    }
}

#[test]
fn top_k_keeps_only_the_k_most_likely() {
    let logits = [3.0f32, 2.9, 2.8, -1.0, 0.0];
    let freq = histogram(SamplingParams { top_k: 2, ..params() }, &logits, NONE, 5000);
    assert!(freq[0] > 0.0 && freq[1] > 0.0);
    assert_eq!(freq[2] + freq[3] + freq[4], 0.0, "{freq:?}");
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_the_mass() {
    // Probabilities 0.5, 0.3, 0.2 (as logits: ln p).
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let freq = histogram(SamplingParams { top_p: 0.75, ..params() }, &logits, NONE, 20_000);
    assert_eq!(freq[2], 0.0, "0.5 + 0.3 reaches 0.75; the third is cut: {freq:?}");
    assert!((freq[0] - 0.625).abs() < 0.02, "renormalised 0.5/0.8: {freq:?}");
    let freq = histogram(SamplingParams { top_p: 0.0, ..params() }, &logits, NONE, 1000);
    assert_eq!(freq[0], 1.0, "top_p 0 keeps only the top token");
}

#[test]
fn min_p_drops_tokens_below_the_relative_floor() {
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    // Floor 0.5 · 0.5 = 0.25: keeps 0.5 and 0.3, drops 0.2.
    let freq = histogram(SamplingParams { min_p: 0.5, ..params() }, &logits, NONE, 20_000);
    assert_eq!(freq[2], 0.0, "{freq:?}");
    assert!(freq[1] > 0.3, "{freq:?}");
}

#[test]
fn repetition_penalty_shrinks_positive_and_grows_negative_logits_of_seen_ids() {
    assert_eq!(penalize(2.0, 2.0), 1.0);
    assert_eq!(penalize(-2.0, 2.0), -4.0);
    // Greedy: id 0 is the argmax until it is in the history.
    let logits = [2.0f32, 1.5, -1.0];
    let greedy_pen = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
    assert_eq!(Sampler::new(greedy_pen.clone()).sample(&logits, NONE, false, 0).id, 0);
    assert_eq!(Sampler::new(greedy_pen).sample(&logits, prompt(&[0]), false, 0).id, 1);
    // Sampling: the penalised id becomes rarer.
    let base = histogram(params(), &logits, prompt(&[0]), 20_000);
    let pen = histogram(
        SamplingParams { repetition_penalty: 1.8, ..params() },
        &logits,
        prompt(&[0]),
        20_000,
    );
    assert!(pen[0] < base[0] - 0.1, "{base:?} vs {pen:?}");
    // 0.0 and 1.0 mean off.
    let off = histogram(
        SamplingParams { repetition_penalty: 0.0, ..params() },
        &logits,
        prompt(&[0]),
        20_000,
    );
    assert!((off[0] - base[0]).abs() < 0.02);
}

#[test]
fn logprobs_are_of_the_raw_distribution() {
    let logits = [1.0f32, 3.0, 2.0, 3.0];
    let mut s = Sampler::new(SamplingParams { temperature: 0.0, ..params() });
    let out = s.sample(&logits, NONE, true, 3);
    let lse = log_sum_exp(&logits);
    assert_eq!(out.id, 1);
    assert!((out.logprob - (3.0 - lse)).abs() < 1e-6);
    let ids: Vec<u32> = out.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, [1, 3, 2], "most likely first, ties to the lower id");
    let total: f32 = logits.iter().map(|l| (l - lse).exp()).sum();
    assert!((total - 1.0).abs() < 1e-6);
}

#[test]
fn the_rng_stream_is_fixed() {
    // SplitMix64's published first output for seed 0.
    assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
}

#[test]
fn top_k_keeps_every_token_tied_with_the_kth_as_hf_does() {
    // HF's TopKLogitsWarper removes only scores below the k-th largest: ids 1 and 3 tie.
    let logits = [1.0f32, 3.0, 2.0, 3.0, 2.0];
    let mut s = Sampler::new(SamplingParams { top_k: 1, ..params() });
    s.process(&logits, NONE);
    let mut kept: Vec<u32> = s.truncate().iter().map(|c| c.1).collect();
    kept.sort_unstable();
    assert_eq!(kept, [1, 3]);
    let mut s = Sampler::new(SamplingParams { top_k: 2, ..params() });
    s.process(&logits, NONE);
    let mut kept: Vec<u32> = s.truncate().iter().map(|c| c.1).collect();
    kept.sort_unstable();
    assert_eq!(kept, [1, 3], "the 2nd largest is 3.0 too, so 2.0 is out");
    let mut s = Sampler::new(SamplingParams { top_k: 3, ..params() });
    s.process(&logits, NONE);
    let mut kept: Vec<u32> = s.truncate().iter().map(|c| c.1).collect();
    kept.sort_unstable();
    assert_eq!(kept, [1, 2, 3, 4]);
}

#[test]
fn presence_and_frequency_count_only_generated_tokens() {
    let logits = [1.0f32, 2.0, 3.0, 4.0];
    let p = SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..params() };
    let mut s = Sampler::new(p);
    let h = History { prompt: &[0, 0, 1], generated: &[3, 2, 3, 3] };
    // id 3: 4 - 3·0.25 - 0.5; id 2: 3 - 1·0.25 - 0.5; prompt-only ids untouched.
    assert_eq!(s.process(&logits, h), [1.0, 2.0, 2.25, 2.75]);
    // Negative values reward repeats.
    let p = SamplingParams { presence_penalty: -2.0, frequency_penalty: -1.0, ..params() };
    assert_eq!(Sampler::new(p).process(&logits, h), [1.0, 2.0, 6.0, 9.0]);
}

#[test]
fn the_pipeline_runs_bias_then_penalties_then_temperature() {
    let logits = [2.0f32, -1.0, 0.5];
    let p = SamplingParams {
        temperature: 0.5,
        repetition_penalty: 2.0,
        presence_penalty: 1.0,
        logit_bias: vec![(0, 2.0), (1, -1.0)],
        ..params()
    };
    let h = History { prompt: &[1], generated: &[0] };
    // id 0: ((2 + 2) / 2 - 1) / 0.5 = 2; id 1: ((-1 - 1) · 2) / 0.5 = -8; id 2: 0.5 / 0.5 = 1.
    assert_eq!(Sampler::new(p).process(&logits, h), [2.0, -8.0, 1.0]);
}

#[test]
fn greedy_follows_the_bias_and_penalties_but_not_temperature_or_truncation() {
    let logits = [2.0f32, 1.9, -1.0];
    let pick = |p: SamplingParams, h: History<'_>| Sampler::new(p).sample(&logits, h, false, 0).id;
    let g = SamplingParams::greedy;
    assert_eq!(pick(g(), NONE), 0);
    assert_eq!(pick(SamplingParams { logit_bias: vec![(2, 3.5)], ..g() }, NONE), 2);
    assert_eq!(pick(SamplingParams { logit_bias: vec![(0, -100.0)], ..g() }, NONE), 1);
    let once = History { prompt: &[], generated: &[0] };
    assert_eq!(pick(SamplingParams { presence_penalty: 0.2, ..g() }, once), 1);
    assert_eq!(pick(SamplingParams { frequency_penalty: 0.2, ..g() }, once), 1);
    assert_eq!(pick(SamplingParams { frequency_penalty: 0.05, ..g() }, once), 0);
    // The prompt does not count for presence/frequency...
    assert_eq!(pick(SamplingParams { presence_penalty: 2.0, ..g() }, prompt(&[0])), 0);
    // ...but does for the repetition penalty.
    assert_eq!(pick(SamplingParams { repetition_penalty: 1.1, ..g() }, prompt(&[0])), 1);
}

#[test]
fn a_tiny_temperature_is_greedy_even_with_truncation() {
    let logits = [0.3f32, 0.2, 0.1];
    let p = SamplingParams { temperature: 1e-7, top_k: 2, top_p: 0.1, min_p: 0.9, ..params() };
    for seed in 0..10 {
        assert_eq!(
            Sampler::new(SamplingParams { seed, ..p.clone() }).sample(&logits, NONE, false, 0).id,
            0
        );
    }
}
