//! `llorch-loadgen`: a load generator for the engine (gRPC) and the gateway (HTTP/SSE).
//! For each concurrency level it keeps that many streams busy back to back and prints one JSON
//! line: aggregate generated tok/s, per-stream tok/s, time to first token p50/p99 and the
//! median inter-token latency. A command that prints numbers, never a test.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use llorch_e2e::SseReader;
use llorch_proto::engine::v1 as pb;
use serde_json::json;

/// Load generator for llorch.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// What to load.
    #[arg(long, value_enum)]
    target: Target,
    /// The engine (`http://127.0.0.1:50052`) or gateway (`http://127.0.0.1:8080`) URL.
    #[arg(long)]
    url: String,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    concurrency: Vec<usize>,
    /// Requests per level (at least the concurrency).
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Prompt length in tokens (a fixed text repeated, tokenized with models/default).
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 128)]
    new_tokens: u32,
    /// Tokenizer folder for building the prompt.
    #[arg(long, default_value = "models/default")]
    tokenizer: std::path::PathBuf,
    /// The engine whose `Info` the report names (weight type, decode kernels, OpenBLAS kernel
    /// set, peak RSS); default: `--url` for `--target engine`, else `http://127.0.0.1:50052`.
    /// Unreachable: those fields are null.
    #[arg(long)]
    engine_url: Option<String>,
    /// With `--target openai`: send `"ignore_eos": true` (llama-server's extension), so every
    /// request generates `--new-tokens`.
    #[arg(long)]
    ignore_eos: bool,
    /// With `--target openai`: send `"cache_prompt": false` (llama-server's extension), so a
    /// server that keeps the KV cache of a previous identical prompt does not skip the
    /// prefill. Every request here sends the same prompt, so without it llama-server's time to
    /// first token after the first request is not a prefill.
    #[arg(long)]
    no_prompt_cache: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    /// `llorch.engine.v1.Engine/Generate` over gRPC (greedy, EOS ignored).
    Engine,
    /// `POST /execute` over HTTP/SSE (greedy).
    Gateway,
    /// `POST /v1/completions` with `stream: true` (greedy): the gateway's OpenAI API, or any
    /// server that speaks it (llama.cpp's `llama-server`, for comparisons).
    Openai,
}

/// Timings of one request.
struct Sample {
    ttft: Duration,
    tokens: usize,
    gaps: Vec<Duration>,
    total: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tok = llorch_tokenizer::BpeTokenizer::from_dir(&args.tokenizer)
        .context("cannot load the tokenizer")?;
    let unit = " The quick brown fox jumps over the lazy dog.";
    let mut text = String::new();
    while tok.encode(&text, false)?.len() < args.prompt_tokens {
        text.push_str(unit);
    }
    let mut ids = tok.encode(&text, false)?;
    ids.truncate(args.prompt_tokens);
    let text = tok.decode(&ids, false)?;
    let model = match args.target {
        Target::Openai => openai_model(&args.url).await?,
        _ => String::new(),
    };
    for &c in &args.concurrency {
        let requests = args.requests.max(c);
        let started = Instant::now();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..c {
            let (args_url, ids, text, next, model) = (
                args.url.clone(),
                ids.clone(),
                text.clone(),
                std::sync::Arc::clone(&next),
                model.clone(),
            );
            let (target, new_tokens) = (args.target, args.new_tokens);
            let llama = LlamaExtensions {
                ignore_eos: args.ignore_eos,
                no_prompt_cache: args.no_prompt_cache,
            };
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < requests {
                    let n = out.len();
                    let s = match target {
                        Target::Engine => engine_once(&args_url, &ids, new_tokens).await,
                        Target::Gateway => gateway_once(&args_url, &text, new_tokens, n).await,
                        Target::Openai => {
                            openai_once(&args_url, &model, &text, new_tokens, llama).await
                        }
                    };
                    out.push(s?);
                }
                anyhow::Ok(out)
            }));
        }
        let mut samples = Vec::new();
        for w in workers {
            samples.extend(w.await??);
        }
        let wall = started.elapsed();
        let mut line = report(args.target, c, &samples, wall, args.prompt_tokens);
        let engine_url = match (&args.engine_url, args.target) {
            (Some(url), _) => url.clone(),
            (None, Target::Engine) => args.url.clone(),
            (None, Target::Gateway | Target::Openai) => "http://127.0.0.1:50052".into(),
        };
        line["engine"] = engine_info(&engine_url).await;
        println!("{line}");
    }
    Ok(())
}

async fn engine_once(url: &str, ids: &[u32], new_tokens: u32) -> anyhow::Result<Sample> {
    let mut client = pb::engine_client::EngineClient::connect(url.to_owned()).await?;
    let req = pb::GenerateRequest {
        prompt_ids: ids.to_vec(),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: new_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let mut stamps = Vec::new();
    while let Some(msg) = stream.next().await {
        if let Some(pb::generate_response::Event::Token(_)) = msg?.event {
            stamps.push(t0.elapsed());
        }
    }
    Ok(sample(stamps, t0.elapsed()))
}

async fn gateway_once(url: &str, text: &str, new_tokens: u32, n: usize) -> anyhow::Result<Sample> {
    let body = json!({"job_id": format!("load-{}-{n}", uuid::Uuid::new_v4()), "prompt": text, "max_tokens": new_tokens, "temperature": 0});
    let t0 = Instant::now();
    let resp = reqwest::Client::new().post(format!("{url}/execute")).json(&body).send().await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let mut sse = SseReader::new(resp);
    let mut stamps = Vec::new();
    while let Some(e) = sse.next().await {
        match e.event.as_str() {
            "token" => stamps.push(t0.elapsed()),
            "error" => anyhow::bail!("stream error: {}", e.data),
            _ => {}
        }
    }
    Ok(sample(stamps, t0.elapsed()))
}

/// The first model `GET /v1/models` lists (the name completions must ask for).
async fn openai_model(url: &str) -> anyhow::Result<String> {
    let models: serde_json::Value =
        reqwest::get(format!("{url}/v1/models")).await?.error_for_status()?.json().await?;
    models["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no model in {url}/v1/models: {models}"))
}

/// Fields of llama-server's own that `--target openai` may send (for comparisons).
#[derive(Debug, Clone, Copy)]
struct LlamaExtensions {
    ignore_eos: bool,
    no_prompt_cache: bool,
}

async fn openai_once(
    url: &str,
    model: &str,
    text: &str,
    new_tokens: u32,
    llama: LlamaExtensions,
) -> anyhow::Result<Sample> {
    let mut body = json!({"model": model, "prompt": text, "max_tokens": new_tokens, "temperature": 0, "stream": true});
    if llama.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if llama.no_prompt_cache {
        body["cache_prompt"] = json!(false);
    }
    let t0 = Instant::now();
    let resp =
        reqwest::Client::new().post(format!("{url}/v1/completions")).json(&body).send().await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
    let mut sse = SseReader::new(resp);
    let mut stamps = Vec::new();
    while let Some(e) = sse.next().await {
        if e.data.as_str().is_some_and(|d| d.trim() == "[DONE]") {
            break;
        }
        let chunk = e.data;
        anyhow::ensure!(chunk.is_object(), "not a completion chunk: {chunk}");
        anyhow::ensure!(chunk.get("error").is_none(), "stream error: {chunk}");
        // One chunk per generated token; a last chunk may carry only the finish reason.
        if chunk["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty())
            || chunk["choices"][0]["finish_reason"].is_null()
        {
            stamps.push(t0.elapsed());
        }
    }
    Ok(sample(stamps, t0.elapsed()))
}

fn sample(stamps: Vec<Duration>, total: Duration) -> Sample {
    let gaps = stamps.windows(2).map(|w| w[1] - w[0]).collect();
    Sample { ttft: stamps.first().copied().unwrap_or(total), tokens: stamps.len(), gaps, total }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

/// What the engine says it runs, after the level: null fields when it cannot be asked.
async fn engine_info(url: &str) -> serde_json::Value {
    let info = async {
        let mut client = pb::engine_client::EngineClient::connect(url.to_owned()).await?;
        anyhow::Ok(client.info(pb::InfoRequest {}).await?.into_inner())
    };
    match tokio::time::timeout(Duration::from_secs(5), info).await {
        Ok(Ok(i)) => json!({
            "model": i.model,
            "dtype": i.dtype,
            "stored_dtype": i.stored_dtype,
            "kernel": i.kernel,
            "openblas_core": i.openblas_core,
            "peak_rss_mib": i.peak_rss_bytes as f64 / f64::from(1 << 20),
        }),
        _ => {
            json!({"model": null, "dtype": null, "stored_dtype": null, "kernel": null, "openblas_core": null, "peak_rss_mib": null})
        }
    }
}

fn report(
    target: Target,
    c: usize,
    samples: &[Sample],
    wall: Duration,
    prompt_tokens: usize,
) -> serde_json::Value {
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_stream: Vec<f64> = samples
        .iter()
        .filter(|s| s.tokens > 1)
        .map(|s| (s.tokens - 1) as f64 / (s.total - s.ttft).as_secs_f64())
        .collect();
    let gaps: Vec<f64> = samples.iter().flat_map(|s| s.gaps.iter().map(|g| ms(*g))).collect();
    json!({
        "target": format!("{target:?}").to_lowercase(),
        "concurrency": c,
        "requests": samples.len(),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": tokens,
        "wall_s": wall.as_secs_f64(),
        "aggregate_tok_per_s": tokens as f64 / wall.as_secs_f64(),
        "per_stream_tok_per_s_median": percentile(per_stream, 0.5),
        "ttft_ms_p50": percentile(samples.iter().map(|s| ms(s.ttft)).collect(), 0.5),
        "ttft_ms_p99": percentile(samples.iter().map(|s| ms(s.ttft)).collect(), 0.99),
        "inter_token_ms_median": percentile(gaps, 0.5),
    })
}
