//! `llorch-engine bench`: prefill and decode throughput of the library on one model, printed
//! as JSON. A command that prints numbers, never a timed test.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::EngineError;
use crate::model::{Gpt2, LogitsFor, Scratch, SeqStep};
use crate::sampling::{Rng, top_n_ids};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Prompt length of every sequence.
    pub prompt_tokens: usize,
    /// Tokens decoded per sequence (EOS ignored).
    pub new_tokens: usize,
    /// Sequences decoded together.
    pub batch: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
    /// Repetitions; medians are reported.
    pub runs: usize,
    /// Seed of the random prompts.
    pub seed: u64,
}

/// What `bench` prints.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Model folder name.
    pub model: String,
    /// `n_layer`, `n_head`, `n_embd`, `vocab_size`.
    pub shape: [usize; 4],
    /// Type the weight matrices are held in (`--weights`).
    pub dtype: String,
    /// Type the file stores them in.
    pub stored_dtype: String,
    /// The decode kernel set (see `Gpt2::kernel_set`).
    pub kernel: String,
    /// Bytes of weights held, in MiB.
    pub weight_mib: f64,
    /// The OpenBLAS kernel set that ran `sgemm` (e.g. `SkylakeX`).
    pub openblas_core: String,
    /// Why that kernel set.
    pub openblas_core_reason: String,
    /// Compute threads.
    pub threads: usize,
    /// Sequences per decode step.
    pub batch: usize,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// New tokens per sequence.
    pub new_tokens: usize,
    /// Prefill chunk.
    pub prefill_chunk: usize,
    /// Runs measured.
    pub runs: usize,
    /// Seconds to map and check the weights (measured by the caller).
    pub load_seconds: f64,
    /// Median prompt tokens per second (one sequence at a time).
    pub prefill_tok_per_s: f64,
    /// Median decode tokens per second of one sequence.
    pub decode_tok_per_s_per_seq: f64,
    /// Median decode tokens per second over the batch.
    pub decode_tok_per_s_aggregate: f64,
    /// Median milliseconds per decode step.
    pub decode_ms_per_step: f64,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// Every run: (prefill seconds, decode seconds).
    pub samples: Vec<(f64, f64)>,
}

/// Runs the benchmark on a loaded model.
pub fn run(
    model: &Gpt2,
    name: &str,
    cfg: &BenchConfig,
    load: Duration,
) -> Result<BenchReport, EngineError> {
    let m = model.config();
    if cfg.prompt_tokens == 0 || cfg.prompt_tokens + cfg.new_tokens > m.n_ctx {
        return Err(EngineError::invalid(
            "prompt_tokens",
            format!("prompt + new tokens must be in 1..={}", m.n_ctx),
        ));
    }
    if cfg.batch == 0 || cfg.runs == 0 || cfg.new_tokens == 0 {
        return Err(EngineError::invalid("batch", "batch, runs and new tokens must be positive"));
    }
    let mut rng = Rng::new(cfg.seed);
    let mut scratch = Scratch::default();
    let mut caches: Vec<_> =
        (0..cfg.batch).map(|_| model.new_cache(cfg.prompt_tokens + cfg.new_tokens)).collect();
    let mut samples = Vec::new();
    // One untimed warm-up run pages the weights in and sizes the buffers.
    for run in 0..=cfg.runs {
        let prompts: Vec<Vec<u32>> = (0..cfg.batch)
            .map(|_| {
                (0..cfg.prompt_tokens)
                    .map(|_| (rng.next_u64() % m.vocab_size as u64) as u32)
                    .collect()
            })
            .collect();
        let mut next = vec![0u32; cfg.batch];
        let t0 = Instant::now();
        for ((cache, prompt), next) in caches.iter_mut().zip(&prompts).zip(&mut next) {
            cache.reset();
            for chunk in prompt.chunks(cfg.prefill_chunk.max(1)) {
                let logits = model.forward(
                    &mut [SeqStep { tokens: chunk, cache }],
                    &mut scratch,
                    LogitsFor::LastOfEach,
                    None,
                )?;
                *next = top_n_ids(logits.row(0).as_slice().unwrap_or_default(), 1)[0].1;
            }
        }
        let prefill = t0.elapsed();
        let t1 = Instant::now();
        for _ in 1..cfg.new_tokens {
            let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut steps: Vec<SeqStep<'_>> = caches
                .iter_mut()
                .zip(&toks)
                .map(|(cache, t)| SeqStep { tokens: t, cache })
                .collect();
            let logits = model.forward(&mut steps, &mut scratch, LogitsFor::LastOfEach, None)?;
            for (i, n) in next.iter_mut().enumerate() {
                *n = top_n_ids(logits.row(i).as_slice().unwrap_or_default(), 1)[0].1;
            }
        }
        let decode = t1.elapsed();
        if run > 0 {
            samples.push((prefill.as_secs_f64() / cfg.batch as f64, decode.as_secs_f64()));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let prefill_s = median(samples.iter().map(|s| s.0).collect());
    let decode_s = median(samples.iter().map(|s| s.1).collect());
    let steps = (cfg.new_tokens - 1).max(1) as f64;
    let blas = crate::blas_core::report();
    Ok(BenchReport {
        model: name.to_owned(),
        shape: [m.n_layer, m.n_head, m.n_embd, m.vocab_size],
        dtype: model.dtype().to_owned(),
        stored_dtype: model.stored_dtype().to_owned(),
        kernel: model.kernel_set().to_owned(),
        weight_mib: model.weight_bytes() as f64 / (1 << 20) as f64,
        openblas_core: blas.core.clone(),
        openblas_core_reason: blas.reason.clone(),
        threads: crate::threads::current(),
        batch: cfg.batch,
        prompt_tokens: cfg.prompt_tokens,
        new_tokens: cfg.new_tokens,
        prefill_chunk: cfg.prefill_chunk,
        runs: cfg.runs,
        load_seconds: load.as_secs_f64(),
        prefill_tok_per_s: cfg.prompt_tokens as f64 / prefill_s,
        decode_tok_per_s_per_seq: steps / decode_s,
        decode_tok_per_s_aggregate: steps * cfg.batch as f64 / decode_s,
        decode_ms_per_step: decode_s / steps * 1e3,
        peak_rss_mib: peak_rss_mib(),
        samples,
    })
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
