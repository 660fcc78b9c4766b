//! Choosing the next token: greedy, temperature, repetition penalty, top-k, top-p, min-p, in
//! that order (WORKER_API.md), with a per-request seeded RNG; plus the log-probabilities of the
//! raw model distribution.

use std::cmp::Ordering;

/// Below this temperature sampling is greedy.
pub const GREEDY_BELOW: f32 = 1e-6;

/// How one request samples; validated (see [`crate::request`]), nothing optional left.
///
/// The same parameters and seed give the same tokens; greedy picks the argmax (ties to the
/// lowest id) whatever the seed:
///
/// ```
/// use llorch_engine::sampling::{Sampler, SamplingParams};
///
/// let logits = [1.0_f32, 3.0, 3.0, 0.5];
/// let mut greedy = Sampler::new(SamplingParams::greedy());
/// assert_eq!(greedy.sample(&logits, &[], false, 0).id, 1);
///
/// // top_k = 1 keeps only the most likely token, so even temperature 2.0 cannot leave it.
/// let top1 = SamplingParams { temperature: 2.0, top_k: 1, seed: 7, ..SamplingParams::greedy() };
/// assert!(!top1.is_greedy());
/// assert_eq!(Sampler::new(top1).sample(&logits, &[], false, 0).id, 1);
///
/// // Seeded draws repeat exactly, and logprobs come from the raw distribution.
/// let p = SamplingParams { temperature: 1.0, seed: 42, ..SamplingParams::greedy() };
/// let (mut a, mut b) = (Sampler::new(p), Sampler::new(p));
/// for _ in 0..8 {
///     let (x, y) = (a.sample(&logits, &[], true, 2), b.sample(&logits, &[], true, 2));
///     assert_eq!(x, y);
///     assert_eq!(x.top.len(), 2);
///     assert!(x.logprob <= 0.0);
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0.0..=2.0; below [`GREEDY_BELOW`] means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: u32,
    /// Nucleus mass, 0.0..=1.0; 1.0 = off.
    pub top_p: f32,
    /// Relative probability floor, 0.0..=1.0; 0.0 = off.
    pub min_p: f32,
    /// CTRL-style penalty over prompt + output, 0.0..=2.0; 1.0 (and 0.0) = off.
    pub repetition_penalty: f32,
    /// Seed of the request's RNG.
    pub seed: u64,
}

impl SamplingParams {
    /// Greedy decoding (argmax, ties to the lowest id).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    /// Whether this picks the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }

    fn penalty(&self) -> Option<f32> {
        let p = self.repetition_penalty;
        (p > 0.0 && p != 1.0).then_some(p)
    }
}

/// SplitMix64: a small, fast generator whose output is fixed forever by its definition, so a
/// seed gives the same tokens across versions of this crate and of its dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen id.
    pub id: u32,
    /// Its log-probability under the raw model distribution (softmax of the unmodified
    /// logits), when asked for; else 0.
    pub logprob: f32,
    /// The `top_n` most likely ids under the raw distribution with their log-probabilities,
    /// most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Per-request sampling state: the parameters, the RNG and reusable buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    cand: Vec<(f32, u32)>,
    seen: Vec<bool>,
}

/// Descending by value, then ascending by id (torch's argmax picks the lowest id on ties).
fn by_value_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
}

impl Sampler {
    /// A sampler whose RNG is seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self { params, rng: Rng::new(params.seed), cand: Vec::new(), seen: Vec::new() }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next id from `logits: (V)`. `history` is prompt + generated so far (for the
    /// repetition penalty). `want_logprob` and `top_n` ask for raw log-probabilities.
    pub fn sample(
        &mut self,
        logits: &[f32],
        history: &[u32],
        want_logprob: bool,
        top_n: usize,
    ) -> Sampled {
        let id = if self.params.is_greedy() {
            self.argmax(logits, history)
        } else {
            self.draw(logits, history)
        };
        let (logprob, top) = if want_logprob || top_n > 0 {
            let lse = log_sum_exp(logits);
            let top = top_n_ids(logits, top_n).into_iter().map(|(v, i)| (i, v - lse)).collect();
            (logits[id as usize] - lse, top)
        } else {
            (0.0, Vec::new())
        };
        Sampled { id, logprob, top }
    }

    /// Argmax after the repetition penalty (temperature and the truncations never change it).
    fn argmax(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let penalty = self.params.penalty();
        if penalty.is_some() {
            self.mark_seen(logits.len(), history);
        }
        let value = |i: usize| match penalty {
            Some(p) if self.seen[i] => penalize(logits[i], p),
            _ => logits[i],
        };
        // Strictly greater: on ties the lowest id stays.
        let mut best = (value(0), 0u32);
        for i in 1..logits.len() {
            let v = value(i);
            if v > best.0 || best.0.is_nan() {
                best = (v, i as u32);
            }
        }
        best.1
    }

    /// Temperature, repetition penalty, top-k, top-p, min-p, then a draw.
    fn draw(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = self.params;
        let penalty = p.penalty();
        if penalty.is_some() {
            self.mark_seen(logits.len(), history);
        }
        self.cand.clear();
        self.cand.extend(logits.iter().enumerate().map(|(i, &l)| {
            let z = l / p.temperature;
            let z = match penalty {
                Some(pen) if self.seen[i] => penalize(z, pen),
                _ => z,
            };
            (z, i as u32)
        }));
        let k = p.top_k as usize;
        if k > 0 && k < self.cand.len() {
            self.cand.select_nth_unstable_by(k - 1, by_value_desc);
            self.cand.truncate(k);
        }
        if p.top_p < 1.0 {
            self.cand.sort_unstable_by(by_value_desc);
        }
        // Probabilities over the survivors (softmax with the max subtracted).
        let max = self.cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for c in &mut self.cand {
            c.0 = (c.0 - max).exp();
            total += f64::from(c.0);
        }
        if p.top_p < 1.0 {
            // Smallest prefix (sorted) whose mass reaches top_p; always at least one token.
            let target = f64::from(p.top_p) * total;
            let mut mass = 0.0;
            let mut keep = self.cand.len();
            for (i, c) in self.cand.iter().enumerate() {
                mass += f64::from(c.0);
                if mass >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            // exp(max - max) = 1 is the top probability (unnormalised).
            let floor = p.min_p;
            self.cand.retain(|c| c.0 >= floor);
        }
        let total: f64 = self.cand.iter().map(|c| f64::from(c.0)).sum();
        let mut u = self.rng.next_f64() * total;
        for c in &self.cand {
            u -= f64::from(c.0);
            if u < 0.0 {
                return c.1;
            }
        }
        self.cand.last().map_or(0, |c| c.1)
    }

    fn mark_seen(&mut self, vocab: usize, history: &[u32]) {
        self.seen.clear();
        self.seen.resize(vocab, false);
        for &id in history {
            if let Some(s) = self.seen.get_mut(id as usize) {
                *s = true;
            }
        }
    }
}

/// CTRL / Hugging Face repetition penalty: positive logits shrink, negative ones grow.
fn penalize(logit: f32, penalty: f32) -> f32 {
    if logit > 0.0 { logit / penalty } else { logit * penalty }
}

/// `log Σ exp(x)` with the max subtracted.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| f64::from((v - max).exp())).sum();
    max + sum.ln() as f32
}

/// `softmax(logits / temperature)` in f32, max subtracted (checkpoint 11).
pub fn softmax_with_temperature(logits: &[f32], temperature: f32) -> Vec<f32> {
    let mut p: Vec<f32> = logits.iter().map(|&l| l / temperature).collect();
    crate::layers::softmax(&mut p);
    p
}

/// The `n` largest values with their ids, largest first, ties to the lower id.
pub fn top_n_ids(x: &[f32], n: usize) -> Vec<(f32, u32)> {
    let mut all: Vec<(f32, u32)> = x.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
    let n = n.min(all.len());
    if n == 0 {
        return Vec::new();
    }
    all.select_nth_unstable_by(n - 1, by_value_desc);
    all.truncate(n);
    all.sort_unstable_by(by_value_desc);
    all
}

#[cfg(test)]
mod tests;
