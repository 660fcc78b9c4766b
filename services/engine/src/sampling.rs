//! Choosing the next token, with a per-request seeded RNG, plus the log-probabilities of the
//! raw model distribution. The pipeline runs in the order vLLM and Hugging Face
//! `transformers` use (each step's HF counterpart in brackets; the reference tests in
//! `tests/sampling_reference.rs` compare every step with it):
//!
//! 1. `logit_bias`: `logits[id] += bias` (`SequenceBiasLogitsProcessor` with one-token
//!    sequences; OpenAI's and vLLM's `logit_bias`);
//! 2. repetition penalty over every id of the prompt and the output so far
//!    (`RepetitionPenaltyLogitsProcessor`);
//! 3. frequency, then presence penalty over the output so far only, OpenAI's formula
//!    `logits[j] -= c[j]·frequency + (c[j] > 0)·presence` (vLLM's order and token set);
//! 4. temperature (`TemperatureLogitsWarper`);
//! 5. top-k, 6. top-p, 7. min-p (`TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`,
//!    in `generate`'s order);
//! 8. argmax (greedy: steps 4–7 never change the argmax, so they are skipped) or a seeded draw.
//!
//! Steps 2 and 4 commute in real arithmetic, so this is also WORKER_API.md's order
//! "temperature, repetition penalty, top-k, top-p, min-p".

use std::cmp::Ordering;

/// Below this temperature sampling is greedy.
pub const GREEDY_BELOW: f32 = 1e-6;

/// How one request samples; validated (see [`crate::request`]), nothing optional left.
///
/// The same parameters and seed give the same tokens; greedy picks the argmax (ties to the
/// lowest id) whatever the seed:
///
/// ```
/// use llorch_engine::sampling::{History, Sampler, SamplingParams};
///
/// let logits = [1.0_f32, 3.0, 2.5, 0.5];
/// let none = History::default();
/// let mut greedy = Sampler::new(SamplingParams::greedy());
/// assert_eq!(greedy.sample(&logits, none, false, 0).id, 1);
///
/// // top_k = 1 keeps only the most likely token, so even temperature 2.0 cannot leave it.
/// let top1 = SamplingParams { temperature: 2.0, top_k: 1, seed: 7, ..SamplingParams::greedy() };
/// assert!(!top1.is_greedy());
/// assert_eq!(Sampler::new(top1).sample(&logits, none, false, 0).id, 1);
///
/// // logit_bias is added before everything else, so it moves greedy choices too.
/// let biased = SamplingParams { logit_bias: vec![(3, 3.0)], ..SamplingParams::greedy() };
/// assert_eq!(Sampler::new(biased).sample(&logits, none, false, 0).id, 3);
///
/// // Presence and frequency penalties count only generated tokens, not the prompt.
/// let pres = SamplingParams { presence_penalty: 1.0, ..SamplingParams::greedy() };
/// let mut s = Sampler::new(pres);
/// assert_eq!(s.sample(&logits, History { prompt: &[1], generated: &[] }, false, 0).id, 1);
/// assert_eq!(s.sample(&logits, History { prompt: &[], generated: &[1] }, false, 0).id, 2);
///
/// // Seeded draws repeat exactly, and logprobs come from the raw distribution.
/// let p = SamplingParams { temperature: 1.0, seed: 42, ..SamplingParams::greedy() };
/// let (mut a, mut b) = (Sampler::new(p.clone()), Sampler::new(p));
/// for _ in 0..8 {
///     let (x, y) = (a.sample(&logits, none, true, 2), b.sample(&logits, none, true, 2));
///     assert_eq!(x, y);
///     assert_eq!(x.top.len(), 2);
///     assert!(x.logprob <= 0.0);
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0.0..=2.0; below [`GREEDY_BELOW`] means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens and every token tied with the k-th; 0 = off.
    pub top_k: u32,
    /// Nucleus mass, 0.0..=1.0; 1.0 = off.
    pub top_p: f32,
    /// Relative probability floor, 0.0..=1.0; 0.0 = off.
    pub min_p: f32,
    /// CTRL-style penalty over prompt + output, 0.0..=2.0; 1.0 (and 0.0) = off.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty over the generated tokens, -2.0..=2.0; 0.0 = off.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty over the generated tokens, -2.0..=2.0; 0.0 = off.
    pub frequency_penalty: f32,
    /// `(id, bias)` added to the logits first; ids unique and below the vocabulary size, biases
    /// -100.0..=100.0, sorted by id. Empty = off.
    pub logit_bias: Vec<(u32, f32)>,
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
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
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

/// The tokens one step is conditioned on: the prompt and the tokens generated so far. The
/// repetition penalty looks at both, the presence and frequency penalties at `generated` only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct History<'a> {
    /// The request's prompt.
    pub prompt: &'a [u32],
    /// The tokens generated so far, in order.
    pub generated: &'a [u32],
}

impl<'a> History<'a> {
    /// Every id of the prompt, then of the output.
    fn all(self) -> impl Iterator<Item = u32> + 'a {
        self.prompt.iter().chain(self.generated).copied()
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
    /// The current step's processed logits (steps 1–4).
    work: Vec<f32>,
    /// The current step's candidates, `(processed logit, id)` (steps 5–7).
    cand: Vec<(f32, u32)>,
    /// Per-id counters for the penalties; all zero between steps.
    counts: Vec<u32>,
}

/// Descending by value, then ascending by id (torch's argmax picks the lowest id on ties).
fn by_value_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
}

impl Sampler {
    /// A sampler whose RNG is seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng, work: Vec::new(), cand: Vec::new(), counts: Vec::new() }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next id from `logits: (V)` after `history`. `want_logprob` and `top_n` ask
    /// for raw log-probabilities.
    pub fn sample(
        &mut self,
        logits: &[f32],
        history: History<'_>,
        want_logprob: bool,
        top_n: usize,
    ) -> Sampled {
        self.process(logits, history);
        let id = if self.params.is_greedy() {
            argmax(&self.work)
        } else {
            self.truncate();
            self.draw()
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

    /// Steps 1–4 of the pipeline on `logits: (V)`: logit bias, repetition penalty, frequency
    /// and presence penalties, temperature (left out when greedy: it cannot move the argmax).
    /// Returns the processed logits, the values HF's processors give.
    pub fn process(&mut self, logits: &[f32], history: History<'_>) -> &[f32] {
        let p = &self.params;
        self.work.clear();
        self.work.extend_from_slice(logits);
        for &(id, bias) in &p.logit_bias {
            if let Some(v) = self.work.get_mut(id as usize) {
                *v += bias;
            }
        }
        if let Some(penalty) = p.penalty() {
            repetition_penalty(&mut self.work, history, penalty, &mut self.counts);
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            let (frequency, presence) = (p.frequency_penalty, p.presence_penalty);
            frequency_presence(
                &mut self.work,
                history.generated,
                frequency,
                presence,
                &mut self.counts,
            );
        }
        // x / 1.0 == x exactly, so skipping it changes nothing.
        if !p.is_greedy() && p.temperature != 1.0 {
            let t = p.temperature;
            self.work.iter_mut().for_each(|v| *v /= t);
        }
        &self.work
    }

    /// Steps 5–7 on the logits of the last [`Sampler::process`]: top-k, top-p, min-p. Returns
    /// the survivors as `(processed logit, id)` (HF's warpers set every other logit to −∞).
    pub fn truncate(&mut self) -> &[(f32, u32)] {
        let p = &self.params;
        self.cand.clear();
        self.cand.extend(self.work.iter().enumerate().map(|(i, &z)| (z, i as u32)));
        top_k(&mut self.cand, p.top_k as usize);
        top_p(&mut self.cand, p.top_p);
        min_p(&mut self.cand, p.min_p);
        &self.cand
    }

    /// Step 8 for sampling: a draw from the softmax of the candidates, in their order.
    fn draw(&mut self) -> u32 {
        let max = self.cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = self.cand.iter().map(|c| f64::from((c.0 - max).exp())).sum();
        let mut u = self.rng.next_f64() * total;
        for c in &self.cand {
            u -= f64::from((c.0 - max).exp());
            if u < 0.0 {
                return c.1;
            }
        }
        self.cand.last().map_or(0, |c| c.1)
    }
}

/// The index of the largest value, the lowest on ties (as torch's argmax); NaN never wins.
fn argmax(x: &[f32]) -> u32 {
    let mut best = (x.first().copied().unwrap_or(f32::NEG_INFINITY), 0u32);
    for (i, &v) in x.iter().enumerate().skip(1) {
        // Strictly greater: on ties the lowest id stays.
        if v > best.0 || best.0.is_nan() {
            best = (v, i as u32);
        }
    }
    best.1
}

/// Step 2 (HF `RepetitionPenaltyLogitsProcessor`): each distinct id of prompt + output once.
/// `seen` is all zero on entry and on return.
fn repetition_penalty(logits: &mut [f32], history: History<'_>, penalty: f32, seen: &mut Vec<u32>) {
    if seen.len() < logits.len() {
        seen.resize(logits.len(), 0);
    }
    let n = logits.len();
    for id in history.all().map(|id| id as usize).filter(|&i| i < n) {
        if seen[id] == 0 {
            seen[id] = 1;
            logits[id] = penalize(logits[id], penalty);
        }
    }
    for id in history.all().map(|id| id as usize).filter(|&i| i < n) {
        seen[id] = 0;
    }
}

/// Step 3 (OpenAI, vLLM): `logits[j] = logits[j] - c[j]·frequency - presence` for every id
/// with `c[j] > 0` occurrences in `generated`, in f32 and in that order. `counts` is all zero
/// on entry and on return.
fn frequency_presence(
    logits: &mut [f32],
    generated: &[u32],
    frequency: f32,
    presence: f32,
    counts: &mut Vec<u32>,
) {
    if counts.len() < logits.len() {
        counts.resize(logits.len(), 0);
    }
    let n = logits.len();
    let ids = || generated.iter().map(|&id| id as usize).filter(move |&i| i < n);
    for i in ids() {
        counts[i] += 1;
    }
    for i in ids() {
        let c = std::mem::take(&mut counts[i]);
        if c > 0 {
            logits[i] = logits[i] - c as f32 * frequency - presence;
        }
    }
}

/// Step 5 (HF `TopKLogitsWarper`, vLLM): keeps the `k` largest and every candidate tied with
/// the k-th; 0 = off.
fn top_k(cand: &mut Vec<(f32, u32)>, k: usize) {
    if k == 0 || k >= cand.len() {
        return;
    }
    cand.select_nth_unstable_by(k - 1, by_value_desc);
    let kth = cand[k - 1].0;
    // Ties with the k-th sit after it; move them up behind the first k.
    let mut keep = k;
    for i in k..cand.len() {
        if cand[i].0 == kth {
            cand.swap(keep, i);
            keep += 1;
        }
    }
    cand.truncate(keep);
}

/// Step 6 (HF `TopPLogitsWarper`): the smallest most-likely-first prefix whose probability
/// reaches `top_p` (at least one); 1.0 = off. Leaves the candidates sorted.
fn top_p(cand: &mut Vec<(f32, u32)>, top_p: f32) {
    if top_p >= 1.0 || cand.is_empty() {
        return;
    }
    cand.sort_unstable_by(by_value_desc);
    let max = cand[0].0;
    let total: f64 = cand.iter().map(|c| f64::from((c.0 - max).exp())).sum();
    let target = f64::from(top_p) * total;
    let mut mass = 0.0;
    let mut keep = cand.len();
    for (i, c) in cand.iter().enumerate() {
        mass += f64::from((c.0 - max).exp());
        if mass >= target {
            keep = i + 1;
            break;
        }
    }
    cand.truncate(keep.max(1));
}

/// Step 7 (HF `MinPLogitsWarper`): drops candidates whose probability is below `min_p` times
/// the top one's, i.e. `exp(z - max) < min_p`; 0.0 = off.
fn min_p(cand: &mut Vec<(f32, u32)>, min_p: f32) {
    if min_p <= 0.0 {
        return;
    }
    let max = cand.iter().map(|c| c.0).fold(f32::NEG_INFINITY, f32::max);
    cand.retain(|c| (c.0 - max).exp() >= min_p);
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
