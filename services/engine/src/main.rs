//! `llorch-engine`: serve GPT-2 over gRPC, or generate, dump checkpoints, write random models
//! and benchmark from the shell.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use llorch_common::probe::{self, ProbeArgs};
use llorch_common::telemetry::{self, TelemetryArgs};
use llorch_engine::matrix::WeightFormat;
use llorch_engine::random::{FileLayout, RandomModel, StorageDtype};
use llorch_engine::sequence::DEFAULT_PREFILL_CHUNK;
use llorch_engine::{Gpt2, Gpt2Config, bench, server, threads};
use llorch_proto::engine::v1 as pb;

/// GPT-2 inference engine on the CPU.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve `llorch.engine.v1.Engine` (plus health and reflection) over gRPC.
    Serve(llorch_engine::server::ServeConfig),
    /// Ask a running engine service whether it serves (`grpc.health.v1`): exit 0 when
    /// SERVING, 1 with the reason otherwise (NOT_SERVING while loading or draining).
    Health {
        #[command(flatten)]
        probe: ProbeArgs,
        /// Port of the service on this host, used when `--url` is absent.
        #[arg(long, env = "LLORCH_ENGINE_PORT", default_value_t = llorch_engine::server::defaults::PORT)]
        port: u16,
    },
    /// Print a running engine service's `Info` (model, limits, live counters) as one JSON
    /// object.
    Info {
        /// Service to ask (default: `http://127.0.0.1:<port>`).
        #[arg(long)]
        url: Option<String>,
        /// Port of the service on this host, used when `--url` is absent.
        #[arg(long, env = "LLORCH_ENGINE_PORT", default_value_t = llorch_engine::server::defaults::PORT)]
        port: u16,
    },
    /// Generate from token ids and print one JSON object.
    Generate(GenerateArgs),
    /// Write every checkpoint tensor of a prompt as .npy (plus meta.json) into a folder.
    Dump {
        /// Model folder (config.json + model.safetensors).
        #[arg(long, env = "LLORCH_MODEL", default_value = "models/default")]
        model: PathBuf,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        prompt_ids: Vec<u32>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a random-weight GPT-2 model folder (with the tokenizer files) for benchmarks.
    RandomModel {
        /// `small`, `medium`, `large`, `xl`, or a path to a config.json.
        #[arg(long)]
        config: String,
        /// RNG seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Weight storage type.
        #[arg(long, value_enum, default_value_t = StorageDtype::F32)]
        dtype: StorageDtype,
        /// Tensor naming (`save-pretrained` or the hub's).
        #[arg(long, value_enum, default_value_t = FileLayout::SavePretrained)]
        layout: FileLayout,
        /// Standard deviation of the weights (GPT-2 init: 0.02).
        #[arg(long, default_value_t = 0.02)]
        std: f32,
        /// Folder whose tokenizer files are copied along.
        #[arg(long, default_value = "models/default")]
        tokenizer_from: PathBuf,
    },
    /// Perplexity of a text file with a sliding window; prints JSON (see README "Perplexity").
    Perplexity(PerplexityArgs),
    /// Measure prefill and decode throughput; prints JSON.
    Bench {
        /// Model folder.
        #[arg(long, env = "LLORCH_MODEL", default_value = "models/default")]
        model: PathBuf,
        /// Prompt length.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens decoded per sequence.
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Compute threads (OpenBLAS and the engine's pool); 0 = all cores.
        #[arg(long, env = "LLORCH_THREADS", default_value_t = 0)]
        threads: usize,
        /// Repetitions (medians are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Prompt tokens per prefill step.
        #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
        prefill_chunk: usize,
        /// How the weight matrices are held (see `serve --help`).
        #[arg(long, env = "LLORCH_WEIGHTS", value_enum, default_value_t = WeightFormat::Stored)]
        weights: WeightFormat,
    },
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// Model folder (config.json + model.safetensors).
    #[arg(long, env = "LLORCH_MODEL", default_value = "models/default")]
    model: PathBuf,
    /// Prompt token ids, comma-separated (e.g. 15496,13 for "Hello.").
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: u32,
    /// 0.0..=2.0; below 1e-6 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Nucleus mass 0.0..=1.0 (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Relative probability floor 0.0..=1.0 (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty 0.0..=2.0 (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Presence penalty -2.0..=2.0 (0 = off; over the generated ids only).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Frequency penalty -2.0..=2.0 (0 = off; over the generated ids only).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Bias added to a token's logit at every step, `ID=BIAS` (-100.0..=100.0); repeatable
    /// (for a repeated id the last value counts).
    #[arg(long, value_parser = parse_logit_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// RNG seed (random when absent; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Report each token's log-probability and this many alternatives (0..=5).
    #[arg(long)]
    logprobs: Option<u32>,
    /// Stop after any of these ids.
    #[arg(long, value_delimiter = ',')]
    stop_token_ids: Vec<u32>,
    /// Keep going past <|endoftext|>.
    #[arg(long)]
    ignore_eos: bool,
    /// Compute threads; 0 = all cores.
    #[arg(long, env = "LLORCH_THREADS", default_value_t = 0)]
    threads: usize,
    /// Prompt tokens per prefill step.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// How the weight matrices are held (see `serve --help`).
    #[arg(long, env = "LLORCH_WEIGHTS", value_enum, default_value_t = WeightFormat::Stored)]
    weights: WeightFormat,
}

#[derive(Debug, Args)]
struct PerplexityArgs {
    /// Model folder (config.json + model.safetensors).
    #[arg(long, env = "LLORCH_MODEL", default_value = "models/default")]
    model: PathBuf,
    /// UTF-8 text file to score (tokenized whole, without special tokens).
    #[arg(long)]
    text: PathBuf,
    /// Folder with the tokenizer files (tokenizer.json, or vocab.json + merges.txt); default:
    /// the model folder.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Tokens per window, 2..=n_ctx (default: the model's context).
    #[arg(long)]
    window: Option<usize>,
    /// Tokens between window starts, 1..=window (default: half the window, rounded up).
    #[arg(long)]
    stride: Option<usize>,
    /// Compute threads; 0 = all cores.
    #[arg(long, env = "LLORCH_THREADS", default_value_t = 0)]
    threads: usize,
    /// Tokens per forward call within a window.
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// How the weight matrices are held (see `serve --help`).
    #[arg(long, env = "LLORCH_WEIGHTS", value_enum, default_value_t = WeightFormat::Stored)]
    weights: WeightFormat,
}

fn main() -> anyhow::Result<()> {
    // `health` computes nothing: answered before the OpenBLAS check (which may re-execute the
    // process), as a healthcheck runs every few seconds.
    if std::env::args().nth(1).as_deref() == Some("health") {
        health(Cli::parse().command);
    }
    // First, before anything computes: OpenBLAS reads its kernel choice only at load, so this
    // may re-execute the process once (see `blas_core`).
    let blas_core = llorch_engine::blas_core::ensure_best_core();
    let cli = Cli::parse();
    // Flushes queued spans when dropped, at the end of main.
    let _telemetry = telemetry::init(&cli.telemetry, "llorch-engine")?;
    llorch_common::failpoint::init()?;
    llorch_engine::blas_core::log_report(blas_core);
    match cli.command {
        Command::Serve(config) => serve(config),
        command @ Command::Health { .. } => health(command),
        Command::Info { url, port } => {
            info(url.unwrap_or_else(|| format!("http://127.0.0.1:{port}")))
        }
        Command::Generate(args) => generate(args),
        Command::Perplexity(args) => perplexity(args),
        Command::Dump { model, prompt_ids, out } => {
            let model = load(&model, WeightFormat::Stored)?;
            let files = llorch_engine::dump::dump(&model, &prompt_ids, &out)?;
            println!("{}", serde_json::json!({ "out": out, "files": files }));
            Ok(())
        }
        Command::RandomModel { config, seed, out, dtype, layout, std, tokenizer_from } => {
            let config = match Gpt2Config::preset(&config) {
                Some(c) => c,
                None => Gpt2Config::from_dir(Path::new(&config).parent().unwrap_or(Path::new(".")))
                    .with_context(|| {
                        format!("{config:?} is neither small/medium/large/xl nor a config.json")
                    })?,
            };
            let started = Instant::now();
            RandomModel { config, seed, std, dtype, layout }.write(&out)?;
            let copied = llorch_engine::random::copy_tokenizer_files(&tokenizer_from, &out)
                .with_context(|| {
                    format!("cannot copy the tokenizer files from {}", tokenizer_from.display())
                })?;
            tracing::info!(out = %out.display(), seconds = started.elapsed().as_secs_f64(), tokenizer_files = copied, "random model written");
            println!("{}", serde_json::json!({ "out": out, "tokenizer_files": copied }));
            Ok(())
        }
        Command::Bench {
            model,
            prompt_tokens,
            new_tokens,
            batch,
            threads: n,
            runs,
            prefill_chunk,
            weights,
        } => {
            threads::set_threads(n);
            let started = Instant::now();
            let gpt2 = load(&model, weights)?;
            let load_time = started.elapsed();
            let cfg = bench::BenchConfig {
                prompt_tokens,
                new_tokens,
                batch,
                prefill_chunk,
                runs,
                seed: 7,
            };
            let report =
                bench::run(&gpt2, &server::served_name(None, &gpt2, &model), &cfg, load_time)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

fn serve(config: llorch_engine::server::ServeConfig) -> anyhow::Result<()> {
    llorch_common::cli::check_model_dir(&config.model, "LLORCH_MODEL")?;
    // The forward pass runs on the scheduler thread and the compute pool; the runtime only
    // moves messages, so two worker threads are plenty.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let addr = std::net::SocketAddr::new(config.host, config.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot bind {addr}"))?;
        llorch_engine::server::run(config, listener, llorch_common::shutdown::signal()).await
    })
}

/// Runs `llorch-engine health` and exits with its code.
fn health(command: Command) -> ! {
    let Command::Health { probe: args, port } = command else {
        unreachable!("called for the health subcommand only")
    };
    let url = args.url(port);
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|rt| {
            let ca = args.ca()?;
            let service = llorch_proto::ENGINE_SERVICE;
            rt.block_on(probe::grpc_health(&url, service, args.timeout(), ca.as_ref()))
        });
    probe::exit_with(result)
}

/// Runs `llorch-engine info`.
fn info(url: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let info = rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .with_context(|| format!("--url {url:?} is not a valid URL"))?
            .connect_timeout(std::time::Duration::from_secs(3))
            .connect()
            .await
            .with_context(|| format!("cannot reach the engine at {url}"))?;
        let mut req = tonic::Request::new(pb::InfoRequest {});
        req.set_timeout(std::time::Duration::from_secs(3));
        let info = pb::engine_client::EngineClient::new(channel)
            .info(req)
            .await
            .with_context(|| format!("Info at {url} failed"))?;
        anyhow::Ok(info.into_inner())
    })?;
    let json = serde_json::json!({
        "model": info.model,
        "n_ctx": info.n_ctx,
        "vocab_size": info.vocab_size,
        "dtype": info.dtype,
        "max_batch": info.max_batch,
        "max_queue": info.max_queue,
        "running": info.running,
        "waiting": info.waiting,
        "kv_caches_in_use": info.kv_caches_in_use,
        "decode_steps": info.decode_steps,
        "finished": info.finished,
        "weight_bytes": info.weight_bytes,
        "openblas_core": info.openblas_core,
    });
    println!("{json}");
    Ok(())
}

fn load(dir: &Path, weights: WeightFormat) -> anyhow::Result<Gpt2> {
    llorch_common::cli::check_model_dir(dir, "LLORCH_MODEL")?;
    let started = Instant::now();
    let model = Gpt2::load_as(dir, weights)
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    tracing::info!(
        model = %dir.display(),
        dtype = model.dtype(),
        stored_dtype = model.stored_dtype(),
        kernel = model.kernel_set(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(model)
}

fn perplexity(a: PerplexityArgs) -> anyhow::Result<()> {
    use llorch_engine::perplexity::{PerplexityConfig, perplexity};
    threads::set_threads(a.threads);
    let text = std::fs::read_to_string(&a.text)
        .with_context(|| format!("cannot read --text {} as UTF-8", a.text.display()))?;
    let tok_dir = a.tokenizer.as_ref().unwrap_or(&a.model);
    let tokenizer = llorch_tokenizer::BpeTokenizer::from_dir(tok_dir).with_context(|| {
        format!("cannot load the tokenizer in {} (set --tokenizer)", tok_dir.display())
    })?;
    let ids = tokenizer.encode(&text, false)?;
    let model = load(&a.model, a.weights)?;
    let cfg = PerplexityConfig::new(&model, a.window, a.stride, a.prefill_chunk)?;
    tracing::info!(tokens = ids.len(), window = cfg.window, stride = cfg.stride, "scoring");
    let started = Instant::now();
    let mut last_log = Instant::now();
    let report = perplexity(&model, &ids, cfg, |done, all| {
        if last_log.elapsed().as_secs() >= 5 || done == all {
            last_log = Instant::now();
            tracing::info!(
                windows = done,
                of = all,
                seconds = started.elapsed().as_secs_f64(),
                "perplexity progress"
            );
        }
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let mut json = serde_json::to_value(&report)?;
    json["model"] = server::served_name(None, &model, &a.model).into();
    json["text"] = a.text.display().to_string().into();
    json["seconds"] = seconds.into();
    json["tokens_per_second"] = (report.scored as f64 / seconds).into();
    println!("{json}");
    Ok(())
}

/// `ID=BIAS` of `--logit-bias` (the ranges are checked with the rest of the request).
fn parse_logit_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ID=BIAS"))?;
    let id = id.trim().parse().map_err(|e| format!("token id {id:?}: {e}"))?;
    let bias = bias.trim().parse().map_err(|e| format!("bias {bias:?}: {e}"))?;
    Ok((id, bias))
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    threads::set_threads(a.threads);
    let model = load(&a.model, a.weights)?;
    let request = pb::GenerateRequest {
        request_id: "cli".into(),
        prompt_ids: a.prompt_ids.clone(),
        sampling: Some(pb::SamplingParams {
            temperature: Some(a.temperature),
            top_k: a.top_k,
            top_p: Some(a.top_p),
            min_p: a.min_p,
            repetition_penalty: Some(a.repetition_penalty),
            seed: a.seed,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            logit_bias: a.logit_bias.iter().copied().collect(),
        }),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: a.max_new_tokens,
            stop_token_ids: a.stop_token_ids,
            ignore_eos: a.ignore_eos,
        }),
        logprobs: a.logprobs.is_some(),
        top_logprobs: a.logprobs.unwrap_or(0),
    };
    let valid = llorch_engine::validate(request, model.config(), model.config().n_ctx)?;
    let seed = valid.sampling.seed;
    let out = llorch_engine::generate(&model, valid, a.prefill_chunk, |_| {})?;
    let logprobs: Vec<serde_json::Value> = if a.logprobs.is_some() {
        out.tokens
            .iter()
            .map(|t| {
                let top: Vec<_> = t
                    .top
                    .iter()
                    .map(|(id, lp)| serde_json::json!({ "id": id, "logprob": lp }))
                    .collect();
                serde_json::json!({ "id": t.id, "logprob": t.logprob, "top": top })
            })
            .collect()
    } else {
        Vec::new()
    };
    let json = serde_json::json!({
        "prompt_ids": a.prompt_ids,
        "generated_ids": out.ids(),
        "finish_reason": out.finish.as_str(),
        "seed": seed,
        "logprobs": logprobs,
    });
    println!("{json}");
    Ok(())
}
