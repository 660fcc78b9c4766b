//! Sampling on hand-made logits.

use super::*;

fn params() -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        seed: 7,
    }
}

/// Frequencies of each id over `n` draws.
fn histogram(p: SamplingParams, logits: &[f32], history: &[u32], n: usize) -> Vec<f64> {
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
    assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0], &[], false, 0).id, 1);
    assert_eq!(s.sample(&[5.0, 5.0], &[], false, 0).id, 0);
    assert_eq!(s.sample(&[f32::NAN, 1.0, 0.5], &[], false, 0).id, 1);
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams { seed, ..params() });
        (0..64).map(|_| s.sample(&logits, &[], false, 0).id).collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn top_k_1_equals_greedy() {
    let logits: Vec<f32> = (0..100).map(|i| ((i * 7919) % 101) as f32 * 0.05).collect();
    let want = Sampler::new(SamplingParams::greedy()).sample(&logits, &[], false, 0).id;
    for seed in 0..20 {
        let mut s = Sampler::new(SamplingParams { top_k: 1, seed, temperature: 1.7, ..params() });
        assert_eq!(s.sample(&logits, &[], false, 0).id, want);
    }
}

#[test]
fn temperature_one_draws_from_the_softmax() {
    let logits = [0.0f32, 1.0, 2.0];
    let freq = histogram(params(), &logits, &[], 40_000);
    let want = softmax_with_temperature(&logits, 1.0);
    for (f, w) in freq.iter().zip(&want) {
        assert!((f - f64::from(*w)).abs() < 0.01, "{freq:?} vs {want:?}");
    }
}

#[test]
fn top_k_keeps_only_the_k_most_likely() {
    let logits = [3.0f32, 2.9, 2.8, -1.0, 0.0];
    let freq = histogram(SamplingParams { top_k: 2, ..params() }, &logits, &[], 5000);
    assert!(freq[0] > 0.0 && freq[1] > 0.0);
    assert_eq!(freq[2] + freq[3] + freq[4], 0.0, "{freq:?}");
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_the_mass() {
    // Probabilities 0.5, 0.3, 0.2 (as logits: ln p).
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    let freq = histogram(SamplingParams { top_p: 0.75, ..params() }, &logits, &[], 20_000);
    assert_eq!(freq[2], 0.0, "0.5 + 0.3 reaches 0.75; the third is cut: {freq:?}");
    assert!((freq[0] - 0.625).abs() < 0.02, "renormalised 0.5/0.8: {freq:?}");
    let freq = histogram(SamplingParams { top_p: 0.0, ..params() }, &logits, &[], 1000);
    assert_eq!(freq[0], 1.0, "top_p 0 keeps only the top token");
}

#[test]
fn min_p_drops_tokens_below_the_relative_floor() {
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
    // Floor 0.5 · 0.5 = 0.25: keeps 0.5 and 0.3, drops 0.2.
    let freq = histogram(SamplingParams { min_p: 0.5, ..params() }, &logits, &[], 20_000);
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
    assert_eq!(Sampler::new(greedy_pen).sample(&logits, &[], false, 0).id, 0);
    assert_eq!(Sampler::new(greedy_pen).sample(&logits, &[0], false, 0).id, 1);
    // Sampling: the penalised id becomes rarer.
    let base = histogram(params(), &logits, &[0], 20_000);
    let pen =
        histogram(SamplingParams { repetition_penalty: 1.8, ..params() }, &logits, &[0], 20_000);
    assert!(pen[0] < base[0] - 0.1, "{base:?} vs {pen:?}");
    // 0.0 and 1.0 mean off.
    let off =
        histogram(SamplingParams { repetition_penalty: 0.0, ..params() }, &logits, &[0], 20_000);
    assert!((off[0] - base[0]).abs() < 0.02);
}

#[test]
fn logprobs_are_of_the_raw_distribution() {
    let logits = [1.0f32, 3.0, 2.0, 3.0];
    let mut s = Sampler::new(SamplingParams { temperature: 0.5, top_k: 1, ..params() });
    let out = s.sample(&logits, &[], true, 3);
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
