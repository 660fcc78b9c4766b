//! The `llorch.engine.v1.Engine` gRPC service and [`run`], which loads the model, starts the
//! scheduler and serves (with health and reflection) until shutdown, then drains.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use llorch_common::grpc::{self, Health};
use llorch_proto::engine::v1 as pb;
use llorch_proto::engine::v1::engine_server::{Engine, EngineServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::error::EngineError;
use crate::layers::gemm::SMALL_M;
use crate::matrix::WeightFormat;
use crate::model::Gpt2;
use crate::request::validate;
use crate::scheduler::{self, Event, Job, SchedulerConfig, SchedulerHandle, event_capacity};
use crate::sequence::FinishReason;

/// The defaults of [`ServeConfig`], declared once for its flags and [`ServeConfig::new`].
pub mod defaults {
    use std::net::{IpAddr, Ipv4Addr};

    /// Model folder.
    pub const MODEL: &str = "models/default";
    /// Address to bind.
    pub const HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    /// Port to bind.
    pub const PORT: u16 = 50052;
    /// Most sequences decoded together.
    pub const MAX_BATCH: usize = 8;
    /// Most requests waiting for a batch slot.
    pub const MAX_QUEUE: usize = 64;
    /// Compute threads; 0 = all cores.
    pub const THREADS: usize = 0;
    /// Largest max_new_tokens a request may ask for.
    pub const MAX_NEW_TOKENS_LIMIT: usize = 2048;
    /// Prompt tokens per prefill step.
    pub const PREFILL_CHUNK: usize = crate::sequence::DEFAULT_PREFILL_CHUNK;
    /// Seconds running streams get to finish after SIGTERM/SIGINT.
    pub const GRACE_SECS: f64 = 30.0;
    /// Largest gRPC message accepted, in bytes (tonic's own limit for received messages).
    pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
}

/// How `llorch-engine serve` runs; every field is a `--flag` with an env fallback.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Model folder (config.json + model.safetensors).
    #[arg(long, env = "LLORCH_MODEL", default_value = defaults::MODEL)]
    pub model: PathBuf,
    /// Name reported by `Info` (default: `llorch_model_name` from config.json, else the model
    /// folder's name).
    #[arg(long, env = "LLORCH_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Address to bind.
    #[arg(long, env = "LLORCH_ENGINE_HOST", default_value_t = defaults::HOST)]
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one (the bound address is logged).
    #[arg(long, env = "LLORCH_ENGINE_PORT", default_value_t = defaults::PORT)]
    pub port: u16,
    /// Most sequences decoded together (1..=32).
    #[arg(long, env = "LLORCH_MAX_BATCH", default_value_t = defaults::MAX_BATCH)]
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "LLORCH_MAX_QUEUE", default_value_t = defaults::MAX_QUEUE)]
    pub max_queue: usize,
    /// Compute threads (OpenBLAS and the engine's pool); 0 = all cores.
    #[arg(long, env = "LLORCH_THREADS", default_value_t = defaults::THREADS)]
    pub threads: usize,
    /// Largest max_new_tokens a request may ask for.
    #[arg(
        long,
        env = "LLORCH_MAX_NEW_TOKENS_LIMIT",
        default_value_t = defaults::MAX_NEW_TOKENS_LIMIT
    )]
    pub max_new_tokens_limit: usize,
    /// Prompt tokens per prefill step (long prompts are cut so running streams keep flowing).
    #[arg(long, env = "LLORCH_PREFILL_CHUNK", default_value_t = defaults::PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Seconds running streams get to finish after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, env = "LLORCH_ENGINE_GRACE_SECS", default_value_t = defaults::GRACE_SECS)]
    pub grace_secs: f64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(
        long,
        env = "LLORCH_ENGINE_MAX_MESSAGE_BYTES",
        default_value_t = defaults::MAX_MESSAGE_BYTES
    )]
    pub max_message_bytes: usize,
    /// How the weight matrices are held: `stored` (as the file stores them, in place), `f32`,
    /// `f16`, `bf16` (converted at load) or `q8_0` (8-bit blocks, lossy; see README "Weight
    /// formats").
    #[arg(long, env = "LLORCH_WEIGHTS", value_enum, default_value_t = WeightFormat::Stored)]
    pub weights: WeightFormat,
    #[command(flatten)]
    pub auth: llorch_common::auth::ApiKeyArgs,
    #[command(flatten)]
    pub tls: llorch_common::tls::TlsArgs,
}

impl ServeConfig {
    /// A configuration with every default, for `model`. (`host` and `port` are only read by the
    /// binary, which binds; [`run`] serves the listener it is given.)
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            model_name: None,
            host: defaults::HOST,
            port: defaults::PORT,
            max_batch: defaults::MAX_BATCH,
            max_queue: defaults::MAX_QUEUE,
            threads: defaults::THREADS,
            max_new_tokens_limit: defaults::MAX_NEW_TOKENS_LIMIT,
            prefill_chunk: defaults::PREFILL_CHUNK,
            grace_secs: defaults::GRACE_SECS,
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            weights: WeightFormat::Stored,
            auth: llorch_common::auth::ApiKeyArgs::default(),
            tls: llorch_common::tls::TlsArgs::default(),
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=SMALL_M).contains(&self.max_batch),
            "--max-batch must be in 1..={SMALL_M} (got {})",
            self.max_batch
        );
        anyhow::ensure!(self.prefill_chunk >= 1, "--prefill-chunk must be at least 1");
        anyhow::ensure!(
            self.max_new_tokens_limit >= 1,
            "--max-new-tokens-limit must be at least 1"
        );
        anyhow::ensure!(self.grace_secs >= 0.0, "--grace-secs must not be negative");
        Ok(())
    }
}

/// The loaded engine: model plus scheduler.
#[derive(Debug)]
struct Loaded {
    model: Arc<Gpt2>,
    name: String,
    scheduler: SchedulerHandle,
}

/// The gRPC handlers; `UNAVAILABLE` until the model has loaded.
#[derive(Debug, Clone)]
pub struct EngineService {
    loaded: Arc<OnceLock<Loaded>>,
    max_new_tokens_limit: usize,
}

impl EngineService {
    fn loaded(&self) -> Result<&Loaded, Status> {
        self.loaded.get().ok_or_else(|| Status::unavailable("the engine is loading the model"))
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Engine for EngineService {
    type GenerateStream = GenerateStream;

    /// Runs inside the call's server span ([`grpc::server_span`]), which the scheduler keeps
    /// as the request's span until the stream ends.
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let engine = self.loaded()?;
        if engine.scheduler.is_draining() {
            return Err(EngineError::Unavailable("draining").into());
        }
        llorch_common::failpoint::hit("engine.generate");
        let deadline = grpc::grpc_timeout(request.metadata().as_ref()).map(|d| Instant::now() + d);
        let req = validate(request.into_inner(), engine.model.config(), self.max_new_tokens_limit)?;
        let span = tracing::Span::current();
        span.record("request_id", req.request_id.as_str());
        request_attributes(&span, &req);
        // Room for every event the stream can get: the scheduler never waits on a slow reader.
        let (tx, rx) = tokio::sync::mpsc::channel(event_capacity(req.stopping.max_new_tokens));
        engine.scheduler.submit(Job { req, events: tx, deadline, span })?;
        Ok(Response::new(Box::pin(response_stream(rx))))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let engine = self.loaded()?;
        let c = engine.model.config();
        let stats = engine.scheduler.stats();
        let sc = engine.scheduler.config();
        let u = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let blas = crate::blas_core::report();
        Ok(Response::new(pb::InfoResponse {
            model: engine.name.clone(),
            n_layer: u(c.n_layer),
            n_head: u(c.n_head),
            n_embd: u(c.n_embd),
            n_ctx: u(c.n_ctx),
            vocab_size: u(c.vocab_size),
            eos_token_id: c.eos_token_id,
            dtype: engine.model.dtype().to_owned(),
            max_batch: u(sc.max_batch),
            running: u(stats.running.load(Ordering::SeqCst)),
            waiting: u(stats.waiting.load(Ordering::SeqCst)),
            max_queue: u(sc.max_queue),
            max_new_tokens_limit: u(self.max_new_tokens_limit),
            finished: stats.finished().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            kv_caches_in_use: u(stats.caches_in_use.load(Ordering::SeqCst)),
            prefill_chunk: u(sc.prefill_chunk),
            decode_steps: stats.decode_steps.load(Ordering::SeqCst),
            weight_bytes: engine.model.weight_bytes() as u64,
            openblas_core: blas.core.clone(),
            openblas_core_reason: blas.reason.clone(),
            stored_dtype: engine.model.stored_dtype().to_owned(),
            kernel: engine.model.kernel_set().to_owned(),
            peak_rss_bytes: (crate::bench::peak_rss_mib() * f64::from(1 << 20)) as u64,
        }))
    }

    #[tracing::instrument(skip_all, fields(ids = request.get_ref().request_ids.len()))]
    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let engine = self.loaded()?;
        let ids = request.into_inner().request_ids;
        if ids.len() > 1024 {
            return Err(EngineError::invalid(
                "request_ids",
                format!("{} ids; the limit is 1024", ids.len()),
            )
            .into());
        }
        let aborted = engine.scheduler.abort(ids).await?;
        Ok(Response::new(pb::AbortResponse { aborted: u32::try_from(aborted).unwrap_or(u32::MAX) }))
    }
}

/// The GenAI request attributes of a `Generate` span (OpenTelemetry semantic conventions).
fn request_attributes(span: &tracing::Span, req: &crate::request::ValidRequest) {
    use llorch_common::telemetry::attribute;
    if !llorch_common::telemetry::enabled() {
        return;
    }
    attribute(span, "gen_ai.operation.name", "text_completion");
    attribute(span, "gen_ai.provider.name", "llorch");
    attribute(span, "gen_ai.request.max_tokens", req.stopping.max_new_tokens as i64);
    attribute(span, "gen_ai.request.temperature", f64::from(req.sampling.temperature));
    attribute(span, "gen_ai.request.top_p", f64::from(req.sampling.top_p));
    attribute(span, "gen_ai.request.top_k", req.sampling.top_k as i64);
    attribute(span, "gen_ai.request.seed", req.sampling.seed as i64);
    attribute(span, "gen_ai.usage.input_tokens", req.prompt.len() as i64);
}

/// Scheduler events as gRPC messages. A stream that ends without `Finished` (the scheduler
/// stopped) ends with an error status instead, never silently.
fn response_stream(
    rx: tokio::sync::mpsc::Receiver<Event>,
) -> impl Stream<Item = Result<pb::GenerateResponse, Status>> {
    let mut done = false;
    ReceiverStream::new(rx).map(Some).chain(futures::stream::once(async { None })).filter_map(
        move |event| {
            let out = match event {
                _ if done => None,
                Some(Event::Token(t)) => Some(Ok(pb::GenerateResponse {
                    event: Some(pb::generate_response::Event::Token(pb::Token {
                        index: t.index as u32,
                        id: t.token.id,
                        logprob: t.token.logprob,
                        top_logprobs: t
                            .token
                            .top
                            .iter()
                            .map(|&(id, logprob)| pb::TopLogprob { id, logprob })
                            .collect(),
                        finish_reason: t.finish.map(|r| finish_reason(r) as i32),
                        queue_us: t
                            .queued
                            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
                    })),
                })),
                Some(Event::Finished(f)) => {
                    done = true;
                    Some(Ok(pb::GenerateResponse {
                        event: Some(pb::generate_response::Event::Finished(finished(&f))),
                    }))
                }
                Some(Event::Error(message)) => {
                    done = true;
                    Some(Err(Status::internal(message)))
                }
                None => {
                    done = true;
                    Some(Err(Status::unavailable("the engine stopped before the stream finished")))
                }
            };
            futures::future::ready(out)
        },
    )
}

fn finish_reason(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::StopToken => pb::FinishReason::StopToken,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
        FinishReason::Deadline => pb::FinishReason::Deadline,
    }
}

fn finished(f: &scheduler::Finished) -> pb::Finished {
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    pb::Finished {
        reason: finish_reason(f.reason) as i32,
        prompt_tokens: f.prompt_tokens as u32,
        generated_tokens: f.generated_tokens as u32,
        seed: f.seed,
        timings: Some(pb::Timings {
            queue_us: us(f.timings.queue),
            prefill_us: us(f.timings.prefill),
            decode_us: us(f.timings.decode),
        }),
    }
}

/// Serves the engine on `listener` until `shutdown` resolves. Health is NOT_SERVING until the
/// model is loaded. On shutdown: NOT_SERVING, new requests refused (`UNAVAILABLE`), running
/// streams get [`ServeConfig::grace_secs`] to finish, the rest end with `CANCELLED`, then the
/// server stops.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.check()?;
    let access = grpc::Access::load(&config.auth, &config.tls)?;
    let tls = access.tls.is_some();
    let addr = listener.local_addr()?;
    let health = Health::new(llorch_proto::ENGINE_SERVICE).await;
    let service = EngineService {
        loaded: Arc::new(OnceLock::new()),
        max_new_tokens_limit: config.max_new_tokens_limit,
    };
    let engine_server = EngineServer::new(service.clone())
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    tracing::info!(%addr, tls, model = %config.model.display(), "engine service listening");

    let lifecycle = async {
        let started = Instant::now();
        crate::threads::set_threads(config.threads);
        let dir = config.model.clone();
        let weights = config.weights;
        let model = tokio::task::spawn_blocking(move || Gpt2::load_as(&dir, weights)).await??;
        let model = Arc::new(model);
        let name = served_name(config.model_name.as_deref(), &model, &config.model);
        tracing::info!(
            model = %name,
            dtype = model.dtype(),
            stored_dtype = model.stored_dtype(),
            kernel = model.kernel_set(),
            n_layer = model.config().n_layer,
            weight_mib = model.weight_bytes() as f64 / (1 << 20) as f64,
            threads = crate::threads::current(),
            shared_prefill = model.shared_prefill(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        let sc = SchedulerConfig {
            max_batch: config.max_batch,
            max_queue: config.max_queue,
            prefill_chunk: config.prefill_chunk,
        };
        let (scheduler, thread) = scheduler::spawn(Arc::clone(&model), sc)?;
        let _ = service.loaded.set(Loaded { model, name, scheduler: scheduler.clone() });
        health.ready().await;

        tokio::select! {
            () = shutdown => {}
            () = scheduler.failed() => {
                // Not serving: load balancers stop sending, and the process exits non-zero
                // (once the failed streams have had their error) so that a supervisor
                // restarts it.
                health.draining().await;
                scheduler.start_draining();
                anyhow::bail!("the engine's scheduler thread panicked (see the log above)");
            }
        }
        health.draining().await;
        scheduler.start_draining();
        let grace = Duration::from_secs_f64(config.grace_secs);
        tracing::info!(
            grace_secs = config.grace_secs,
            "draining: new requests refused, running streams finishing"
        );
        let failed = anyhow::anyhow!("the engine's scheduler thread panicked while draining");
        let idle = tokio::select! {
            idle = scheduler.wait_idle(grace) => idle,
            // Its streams have had their error (the scheduler's drop sends it); exit non-zero.
            () = scheduler.failed() => return Err(failed),
        };
        if !idle {
            tracing::warn!("grace period over: cancelling the remaining streams");
            scheduler.cancel_all();
            scheduler.wait_idle(Duration::from_secs(5)).await;
        }
        scheduler.stop();
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        anyhow::ensure!(!scheduler.has_failed(), failed);
        anyhow::Ok(())
    };
    // Streams are drained (or cancelled) before the server is told to stop; its short grace
    // only covers clients that keep idle connections open.
    let grace = Duration::from_secs(5);
    grpc::serve(listener, &health, Routes::new(engine_server), access, lifecycle, grace).await?;
    tracing::info!("engine service stopped");
    Ok(())
}

/// The name a model is served under: `flag` (`--model-name`; empty counts as absent, as an
/// empty `LLORCH_MODEL_NAME` does), else the `llorch_model_name` of its config.json, else its
/// folder's name.
pub fn served_name(flag: Option<&str>, model: &Gpt2, dir: &std::path::Path) -> String {
    if let Some(name) = flag.filter(|f| !f.trim().is_empty()).or(model.name()) {
        return name.to_owned();
    }
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned())
}
