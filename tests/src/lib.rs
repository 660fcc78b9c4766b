//! Shared helpers for the end-to-end tests: start the real services in-process on
//! 127.0.0.1 port 0 (the same `run` functions the binaries call), wait until their gRPC health
//! says SERVING, and stop them.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub mod otlp;

/// The repository root (tests read only committed files below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The model the end-to-end tests serve: the tiny fixed-seed random GPT-2 of
/// `scripts/gen_reference.py` (`fixtures/models/tiny`: config and weights only), with the
/// references in `fixtures/reference/tiny`.
pub fn test_model() -> PathBuf {
    repo_root().join("fixtures/models/tiny")
}

/// The GPT-2 tokenizer files (`models/default`, beside the demo model's weights); the
/// tokenizer service and the tests' own encoding read them.
pub fn tokenizer_dir() -> PathBuf {
    repo_root().join("models/default")
}

/// A service running in this process until [`Service::stop`] or drop.
pub struct Service {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    /// Binds 127.0.0.1:0 and spawns `run(listener, shutdown)`.
    pub async fn spawn<F, Fut>(run: F) -> anyhow::Result<Self>
    where
        F: FnOnce(
            tokio::net::TcpListener,
            std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
        ) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(run(listener, shutdown));
        Ok(Self { addr, stop: Some(stop), task })
    }

    /// `http://addr`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A lazily connecting channel to the service.
    pub fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).expect("valid url").connect_lazy()
    }

    /// Polls `grpc.health.v1` until `service` reports SERVING (or the task ends).
    pub async fn wait_serving(&self, service: &str) -> anyhow::Result<()> {
        let mut health = HealthClient::new(self.channel());
        for _ in 0..400 {
            if self.task.is_finished() {
                bail!("service task ended before it was serving");
            }
            let req = HealthCheckRequest { service: service.to_owned() };
            if let Ok(resp) = health.check(req).await
                && resp.into_inner().status == ServingStatus::Serving as i32
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("{service} not serving after 10 s")
    }

    /// Sends the shutdown signal and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .context("service did not stop within 30 s")??
    }

    /// Whether `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for `run` to return by itself (e.g. after a load error).
    pub async fn join(mut self) -> anyhow::Result<()> {
        self.stop.take();
        (&mut self.task).await?
    }
}

/// Starts the tokenizer service on the GPT-2 tokenizer with `config` tweaks applied.
pub async fn start_tokenizer(
    tweak: impl FnOnce(&mut llorch_tokenizer::ServeConfig),
) -> anyhow::Result<Service> {
    let mut config = llorch_tokenizer::ServeConfig {
        model: tokenizer_dir(),
        host: [127, 0, 0, 1].into(),
        port: 0,
        limits: llorch_tokenizer::Limits::default(),
        grace_secs: 5.0,
        auth: Default::default(),
        tls: Default::default(),
    };
    tweak(&mut config);
    Service::spawn(move |listener, shutdown| {
        llorch_tokenizer::server::run(config, listener, shutdown)
    })
    .await
}

/// Starts the engine service with `config` tweaks applied (the test model, port 0).
pub async fn start_engine(
    tweak: impl FnOnce(&mut llorch_engine::server::ServeConfig),
) -> anyhow::Result<Service> {
    let mut config = llorch_engine::server::ServeConfig::new(test_model());
    config.threads = 2;
    tweak(&mut config);
    Service::spawn(move |listener, shutdown| llorch_engine::server::run(config, listener, shutdown))
        .await
}

/// An engine service (the test model) that stays loading until [`LoadingEngine::load`]: its
/// `config.json` is a FIFO, so the model load blocks reading it.
pub struct LoadingEngine {
    /// The service; its health says NOT_SERVING until the load finishes.
    pub service: Service,
    fifo: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts an engine whose model load waits for [`LoadingEngine::load`].
pub async fn start_engine_loading() -> anyhow::Result<LoadingEngine> {
    let dir = tempfile::tempdir()?;
    let weights = "model.safetensors";
    std::fs::copy(test_model().join(weights), dir.path().join(weights))?;
    let fifo = dir.path().join("config.json");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    anyhow::ensure!(made.success(), "mkfifo {} failed: {made}", fifo.display());
    let model_dir = dir.path().to_path_buf();
    let service = start_engine(move |c| c.model = model_dir).await?;
    Ok(LoadingEngine { service, fifo, _dir: dir })
}

impl LoadingEngine {
    /// Lets the load go on (writes the config into the FIFO), waits until the engine serves
    /// and returns it. (The model folder is removed then: both files have been read.)
    pub async fn load(self) -> anyhow::Result<Service> {
        let config = std::fs::read(test_model().join("config.json"))?;
        let fifo = self.fifo.clone();
        tokio::task::spawn_blocking(move || std::fs::write(fifo, config)).await??;
        self.service.wait_serving(llorch_proto::ENGINE_SERVICE).await?;
        Ok(self.service)
    }
}

impl Service {
    /// Stops the service abruptly, as a crash would: its task is dropped and every connection
    /// with it.
    pub async fn kill(mut self) {
        self.stop.take();
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

/// The three services of a worker, started in-process.
pub struct Stack {
    /// Tokenizer service.
    pub tokenizer: Service,
    /// Engine service.
    pub engine: Service,
    /// Gateway.
    pub gateway: Service,
}

impl Stack {
    /// Starts tokenizer, engine and gateway (each on port 0), waits until all serve.
    pub async fn start(
        engine_tweak: impl FnOnce(&mut llorch_engine::server::ServeConfig),
        gateway_tweak: impl FnOnce(&mut llorch_gateway::GatewayConfig),
    ) -> anyhow::Result<Self> {
        Self::start_with(|_| {}, engine_tweak, gateway_tweak).await
    }

    /// [`Stack::start`] with the tokenizer's configuration tweaked too.
    pub async fn start_with(
        tokenizer_tweak: impl FnOnce(&mut llorch_tokenizer::ServeConfig),
        engine_tweak: impl FnOnce(&mut llorch_engine::server::ServeConfig),
        gateway_tweak: impl FnOnce(&mut llorch_gateway::GatewayConfig),
    ) -> anyhow::Result<Self> {
        let tokenizer = start_tokenizer(tokenizer_tweak).await?;
        let engine = start_engine(engine_tweak).await?;
        tokenizer.wait_serving(llorch_proto::TOKENIZER_SERVICE).await?;
        engine.wait_serving(llorch_proto::ENGINE_SERVICE).await?;
        let mut config = llorch_gateway::GatewayConfig::new(tokenizer.url(), engine.url());
        gateway_tweak(&mut config);
        let gateway = Service::spawn(move |listener, shutdown| {
            llorch_gateway::server::run(config, listener, shutdown)
        })
        .await?;
        wait_http_ok(&format!("{}/health", gateway.url())).await?;
        Ok(Self { tokenizer, engine, gateway })
    }

    /// `http://gateway/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.url())
    }

    /// The engine's `Info`.
    pub async fn engine_info(&self) -> anyhow::Result<llorch_proto::engine::v1::InfoResponse> {
        let mut engine =
            llorch_proto::engine::v1::engine_client::EngineClient::new(self.engine.channel());
        Ok(engine.info(llorch_proto::engine::v1::InfoRequest {}).await?.into_inner())
    }

    /// The gateway's `llorch_in_flight_requests` gauge.
    pub async fn gateway_in_flight(&self) -> anyhow::Result<f64> {
        gateway_in_flight(&self.gateway.url()).await
    }

    /// Waits (10 s at most) until nothing is left of earlier work: the gateway's in-flight
    /// gauge, and the engine's running, waiting and KV caches in use, all 0. What every fault
    /// test checks after its fault.
    pub async fn settled(&self) -> anyhow::Result<()> {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let i = self.engine_info().await?;
            let in_flight = self.gateway_in_flight().await?;
            let left = (in_flight, i.running, i.waiting, i.kv_caches_in_use);
            if left == (0.0, 0, 0, 0) {
                return Ok(());
            }
            if std::time::Instant::now() >= until {
                bail!("not settled after 10 s: (in flight, running, waiting, caches) = {left:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops all three.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.gateway.stop().await?;
        self.engine.stop().await?;
        self.tokenizer.stop().await
    }
}

/// The `llorch_in_flight_requests` gauge of the gateway at `base` (`http://host:port`).
pub async fn gateway_in_flight(base: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("{base}/metrics")).await?.text().await?;
    text.lines()
        .find_map(|l| l.strip_prefix("llorch_in_flight_requests "))
        .context("no llorch_in_flight_requests in /metrics")?
        .trim()
        .parse()
        .context("llorch_in_flight_requests is not a number")
}

/// A worker whose engine is a child process (so that a test can kill it as a crash would),
/// with the tokenizer and the gateway in-process; returned once the gateway's `/health` is 200.
pub async fn start_with_engine_process() -> anyhow::Result<(Service, EngineProcess, Service)> {
    let tokenizer = start_tokenizer(|_| {}).await?;
    tokenizer.wait_serving(llorch_proto::TOKENIZER_SERVICE).await?;
    let engine = EngineProcess::spawn(0, &test_model())?;
    let config = llorch_gateway::GatewayConfig::new(tokenizer.url(), engine.url());
    let gateway = Service::spawn(move |l, s| llorch_gateway::server::run(config, l, s)).await?;
    wait_http_ok(&format!("{}/health", gateway.url())).await?;
    Ok((tokenizer, engine, gateway))
}

/// Polls `url` until it answers 200 (10 s).
pub async fn wait_http_ok(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("{url} not healthy after 10 s")
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The `event:` line.
    pub event: String,
    /// The `data:` payload, parsed.
    pub data: serde_json::Value,
}

/// A real SSE reader over a streaming HTTP response: frames are split on blank lines,
/// `event:`/`data:` fields read, comments (keep-alives) skipped.
pub struct SseReader {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes_type::Bytes>> + Send>>,
    buf: String,
}

/// Re-export so tests need no direct dependency on `bytes`.
pub mod bytes_type {
    pub use axum::body::Bytes;
}

impl SseReader {
    /// Reads the events of `resp` (which must be `text/event-stream`).
    pub fn new(resp: reqwest::Response) -> Self {
        Self { body: Box::pin(resp.bytes_stream()), buf: String::new() }
    }

    /// The next event; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        use futures::StreamExt;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let mut event = String::new();
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim_start().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                let data = serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data));
                return Some(SseEvent { event, data });
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// Every remaining event.
    pub async fn collect(mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

/// The `llorch-engine` binary of this build (built by `cargo nextest run --workspace` /
/// `cargo build --workspace`), found next to the test executable.
pub fn engine_binary() -> anyhow::Result<PathBuf> {
    binary("llorch-engine")
}

/// The binary `name` of this build (`llorch-engine`, `llorch-tokenizer`, `llorch-gateway`),
/// found next to the test executable.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("test executable has no target dir")?;
    let bin = dir.join(name);
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    Ok(bin)
}

/// `llorch-engine serve` (or `llorch-tokenizer serve`) as a child process, killed (and first
/// continued, should a test have stopped it) on drop.
pub struct EngineProcess {
    /// The child.
    pub child: std::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl EngineProcess {
    /// Starts the engine binary on `port` (0 = any) and waits until it is ready.
    pub fn spawn(port: u16, model: &Path) -> anyhow::Result<Self> {
        Self::spawn_with_env(port, model, &[])
    }

    /// [`EngineProcess::spawn`] with the variables `env` set (e.g. `LLORCH_FAILPOINTS`).
    pub fn spawn_with_env(port: u16, model: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut command = std::process::Command::new(engine_binary()?);
        command.envs(env.iter().copied()).args([
            "--log-format",
            "json",
            "serve",
            "--threads",
            "1",
            "--port",
            &port.to_string(),
            "--model",
        ]);
        command.arg(model);
        Self::start(command, "engine")
    }

    /// `llorch-tokenizer serve` on any port (the GPT-2 tokenizer), as the same kind of child.
    pub fn spawn_tokenizer() -> anyhow::Result<Self> {
        let mut command = std::process::Command::new(binary("llorch-tokenizer")?);
        command.args(["--log-format", "json", "serve", "--port", "0", "--model"]);
        command.arg(tokenizer_dir());
        Self::start(command, "tokenizer")
    }

    /// Runs `command` (a `serve` with JSON logs) and waits until the `service` logs that it
    /// listens and is ready.
    fn start(mut command: std::process::Command, service: &str) -> anyhow::Result<Self> {
        let mut child = command.stderr(std::process::Stdio::piped()).spawn()?;
        let log = llorch_common::child_log::ChildLog::forward(&mut child)?;
        let wait = Duration::from_secs(30);
        let not_ready = format!("the {service} stopped logging before it was ready");
        let listening = log
            .wait_for(&format!("{service} service listening"), wait)
            .context(not_ready.clone())?;
        let addr = listening["addr"].as_str().and_then(|a| a.parse().ok());
        log.wait_for("ready", wait).context(not_ready)?;
        Ok(Self { child, addr: addr.context("no address logged")? })
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`, ...) to the process, as `kill -<signal>` does.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed: {status}");
        Ok(())
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GPT-2's byte-to-unicode table: the token id that is exactly `byte`.
pub fn byte_token_id(tok: &llorch_tokenizer::BpeTokenizer, byte: u8) -> u32 {
    let printable = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
    let ch = if printable(byte) {
        char::from(byte)
    } else {
        let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
        char::from_u32(256 + rank).expect("valid")
    };
    tok.token_to_id(&ch.to_string()).expect("every byte has a token")
}

/// Writes a model folder whose greedy output is `script` whatever the prompt: generated token
/// `i` after a prompt of `prompt_len` tokens is `script[i]`. Blocks are zero (identity), each
/// scripted id gets its own axis in `wte`, and `wpe` points each position at the next id, so
/// the test decides exactly which ids the engine emits (e.g. one byte token at a time).
pub fn scripted_model(dir: &Path, prompt_len: usize, script: &[u32]) -> anyhow::Result<()> {
    use llorch_engine::random::{FileLayout, RandomModel, StorageDtype, encode, write_safetensors};
    let (c, n_pos) = (64usize, 128usize);
    let mut config = llorch_engine::Gpt2Config::preset("small").context("preset")?;
    (config.n_embd, config.n_layer, config.n_head, config.n_positions) = (c, 1, 2, n_pos);
    let cfg = config.validate()?;
    let mut tensors = RandomModel {
        config: config.clone(),
        seed: 1,
        std: 0.0,
        dtype: StorageDtype::F32,
        layout: FileLayout::SavePretrained,
    }
    .tensors(&cfg);
    let mut axes: Vec<u32> = script.to_vec();
    axes.sort_unstable();
    axes.dedup();
    anyhow::ensure!(axes.len() <= c, "at most {c} distinct scripted ids");
    let wte = tensors.get_mut("wte.weight").context("wte")?;
    let mut rng = llorch_engine::sampling::Rng::new(5);
    for v in wte.iter_mut() {
        *v = (rng.next_f64() as f32 - 0.5) * 0.02;
    }
    for (axis, &id) in axes.iter().enumerate() {
        let row = &mut wte[id as usize * c..(id as usize + 1) * c];
        row.fill(0.0);
        row[axis] = 100.0;
    }
    let wpe = tensors.get_mut("wpe.weight").context("wpe")?;
    wpe.fill(0.0);
    for (i, &id) in script.iter().enumerate() {
        let pos = prompt_len - 1 + i;
        let axis = axes.binary_search(&id).map_err(|_| anyhow::anyhow!("axis"))?;
        wpe[pos * c + axis] = 1000.0;
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let shapes = llorch_engine::weights::expected_shapes(&cfg);
    let raw: Vec<_> = tensors
        .into_iter()
        .map(|(name, values)| {
            let shape =
                shapes.iter().find(|(n, _)| *n == name).map(|(_, s)| s.clone()).unwrap_or_default();
            let (dtype, bytes) = encode(&values, StorageDtype::F32);
            (format!("transformer.{name}"), dtype, shape, bytes)
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &raw)?;
    llorch_engine::random::copy_tokenizer_files(&tokenizer_dir(), dir)?;
    Ok(())
}

/// What a server's reflection says, asked once over each protocol version (`v1`, `v1alpha`):
/// the services it lists (sorted), and whether it can describe `symbol` (the file that
/// defines it, as `grpcurl describe` asks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reflected {
    /// `ListServices`, sorted.
    pub services: Vec<String>,
    /// `FileContainingSymbol(symbol)` answered with at least one file descriptor.
    pub describes_symbol: bool,
}

/// One reflection client function per protocol version: the two versions' messages are the
/// same, in different generated modules.
macro_rules! reflect_fn {
    ($(#[$doc:meta])* $name:ident, $version:ident) => {
        $(#[$doc])*
        pub async fn $name(channel: Channel, symbol: &str) -> anyhow::Result<Reflected> {
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, ServerReflectionResponse,
            };

            let req =
                |m| ServerReflectionRequest { host: String::new(), message_request: Some(m) };
            let reqs = [
                req(MessageRequest::ListServices(String::new())),
                req(MessageRequest::FileContainingSymbol(symbol.to_owned())),
            ];
            let resp = ServerReflectionClient::new(channel)
                .server_reflection_info(futures::stream::iter(reqs))
                .await?
                .into_inner();
            let answers: Vec<ServerReflectionResponse> =
                futures::StreamExt::collect::<Vec<_>>(resp)
                    .await
                    .into_iter()
                    .collect::<Result<_, _>>()?;
            let mut out = Reflected { services: Vec::new(), describes_symbol: false };
            for a in answers {
                match a.message_response {
                    Some(MessageResponse::ListServicesResponse(l)) => {
                        out.services = l.service.into_iter().map(|s| s.name).collect();
                    }
                    Some(MessageResponse::FileDescriptorResponse(f)) => {
                        out.describes_symbol = !f.file_descriptor_proto.is_empty();
                    }
                    other => bail!("unexpected reflection answer {other:?}"),
                }
            }
            out.services.sort();
            Ok(out)
        }
    };
}

reflect_fn!(
    /// Asks `channel`'s reflection over `grpc.reflection.v1`: list, then describe `symbol`.
    reflect_v1,
    v1
);
reflect_fn!(
    /// The same over `grpc.reflection.v1alpha`, the version Python's `grpcio-reflection` and
    /// many `grpcurl` builds speak.
    reflect_v1alpha,
    v1alpha
);

/// Asserts that the reflection on `channel` lists exactly `service` and `grpc.health.v1.Health`
/// and describes `service`, over both protocol versions.
pub async fn assert_reflection_lists_only(channel: Channel, service: &str) {
    let want = Reflected {
        services: vec![llorch_common::grpc::HEALTH_SERVICE.to_owned(), service.to_owned()],
        describes_symbol: true,
    };
    assert_eq!(reflect_v1(channel.clone(), service).await.unwrap(), want, "v1");
    assert_eq!(reflect_v1alpha(channel, service).await.unwrap(), want, "v1alpha");
}
