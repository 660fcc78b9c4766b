//! Telemetry shared by every binary: the `tracing` log layer (text or JSON lines on stderr,
//! filtered by `RUST_LOG`) and, when an OTLP endpoint is configured, an OpenTelemetry layer that
//! exports llorch's spans over OTLP through a batch span processor.
//!
//! Configuration is OpenTelemetry's own environment variables, read the way every OpenTelemetry
//! SDK reads them, plus `--otlp-endpoint` (which wins over the environment):
//!
//! | variable | meaning here |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT` | where spans go; neither set (and no flag): no exporter is built, nothing changes |
//! | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` (default) or `http/protobuf` |
//! | `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_HEADERS`, `…_COMPRESSION` | as the spec says |
//! | `OTEL_SERVICE_NAME` | default `llorch-gateway`, `llorch-tokenizer`, `llorch-engine` |
//! | `OTEL_RESOURCE_ATTRIBUTES` | extra resource attributes (`key=value,…`) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | default `parentbased_always_on` |
//! | `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, `OTEL_BSP_EXPORT_TIMEOUT` | the batch span processor |
//!
//! Exporting never gets in the way of a request: finished spans go into the processor's bounded
//! queue (dropped when it is full), and the export runs on the processor's own thread over a
//! one-thread runtime of its own. A failing collector costs one WARN per
//! [`EXPORT_WARN_INTERVAL`] with the count of spans lost, not one per span. [`Telemetry`]'s
//! [`shutdown`](Telemetry::shutdown) flushes what is queued, bounded by [`FLUSH_TIMEOUT`].
//!
//! Only llorch's own spans (targets `llorch…`, INFO and above) are exported: the HTTP and gRPC
//! server spans, the gateway's `text_completion` and client spans, and the engine's phases.
//! Trace context crosses processes as W3C `traceparent`/`tracestate` and `baggage`, through the
//! global propagator: [`extract`] on the way in, [`TracePropagation`] (a tonic interceptor) on
//! the way out.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, Injector, TextMapCompositePropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::logging::{LogArgs, LogFormat};

/// Longest a graceful shutdown waits for queued spans to be exported.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Least time between two WARNs about failed exports.
pub const EXPORT_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Telemetry flags every binary takes (global: accepted before or after a subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    #[command(flatten)]
    log: LogArgs,
    /// OTLP endpoint to export spans to (e.g. `http://collector:4317` for gRPC); overrides
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`. Unset everywhere:
    /// no spans are exported. See the README's "Tracing" section for the other `OTEL_*`
    /// variables.
    #[arg(long, global = true, env = "LLORCH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Whether spans are exported (set once by [`init`]). When not, nothing builds OpenTelemetry
/// contexts: the server spans take no parent and the interceptor injects nothing.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How spans leave the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (tonic), the default.
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
}

/// Where and how to export, from the flag and the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The endpoint given by `--otlp-endpoint`, if any (else the exporter reads the env).
    pub endpoint_flag: Option<String>,
    /// The endpoint that will be used, for the log line.
    pub endpoint: String,
    /// The protocol.
    pub protocol: Protocol,
}

impl ExportConfig {
    /// The export configuration for `flag` and the environment read by `var`; `None` when no
    /// endpoint is set anywhere.
    pub fn resolve(
        flag: Option<&str>,
        var: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let flag = flag.map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        let endpoint = match flag
            .clone()
            .or_else(|| set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        {
            Some(e) => e,
            None => return Ok(None),
        };
        let protocol = set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .map(|p| ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", p))
            .or_else(|| {
                set("OTEL_EXPORTER_OTLP_PROTOCOL").map(|p| ("OTEL_EXPORTER_OTLP_PROTOCOL", p))
            });
        let protocol = match protocol {
            None => Protocol::Grpc,
            Some((_, p)) if p.trim() == "grpc" => Protocol::Grpc,
            Some((_, p)) if p.trim() == "http/protobuf" => Protocol::HttpProtobuf,
            Some((name, p)) => anyhow::bail!(
                "{name}={p:?} is not supported: use \"grpc\" (the default) or \"http/protobuf\""
            ),
        };
        Ok(Some(Self { endpoint_flag: flag, endpoint, protocol }))
    }
}

/// The running telemetry; keep it alive for the life of the process and call
/// [`shutdown`](Self::shutdown) at the end to flush queued spans.
#[derive(Debug)]
pub struct Telemetry {
    export: Option<Export>,
}

#[derive(Debug)]
struct Export {
    provider: SdkTracerProvider,
    /// Drives the exporter's I/O, away from the service's own runtime.
    runtime: tokio::runtime::Runtime,
}

/// Installs the global subscriber (logs, and spans when an endpoint is configured) and the
/// global W3C propagator. Call once, first thing in `main`; `service` is the default
/// `service.name` (`OTEL_SERVICE_NAME` wins).
pub fn init(args: &TelemetryArgs, service: &'static str) -> anyhow::Result<Telemetry> {
    let export = ExportConfig::resolve(args.otlp_endpoint.as_deref(), |k| std::env::var(k).ok())?;
    let log = log_layer(&args.log);
    let Some(config) = export else {
        tracing_subscriber::registry()
            .with(log)
            .try_init()
            .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
        tracing::debug!("no OTLP endpoint configured: spans are not exported");
        return Ok(Telemetry { export: None });
    };
    let export = Export::start(&config, service)?;
    let tracer = export.provider.tracer("llorch");
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_filter(exported());
    tracing_subscriber::registry()
        .with(log)
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(
        endpoint = %config.endpoint,
        protocol = ?config.protocol,
        "exporting spans over OTLP"
    );
    Ok(Telemetry { export: Some(export) })
}

/// What the OpenTelemetry layer sees: llorch's own spans and events, INFO and above. A static
/// filter, so every other callsite (h2's and hyper's per-frame `trace!`s among them) stays
/// disabled at the callsite; a dynamic one (`filter_fn`) makes each of them ask at run time,
/// which measured 116–125 against 144–167 tok/s at 8 streams (docs/PERFORMANCE.md).
fn exported() -> tracing_subscriber::filter::Targets {
    ["llorch_common", "llorch_gateway", "llorch_tokenizer", "llorch_engine"]
        .into_iter()
        .fold(tracing_subscriber::filter::Targets::new(), |t, target| {
            t.with_target(target, tracing::Level::INFO)
        })
}

/// The log layer: `RUST_LOG` (default `info`) decides what is printed, whatever is exported.
fn log_layer(args: &LogArgs) -> Box<dyn Layer<Registry> + Send + Sync> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A failed log write (stderr closed by a supervisor) must not take the server down:
    // by default the subscriber reports it with `eprintln!`, which panics when stderr is gone.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match args.log_format {
        LogFormat::Text => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().with_filter(filter).boxed(),
    }
}

impl Export {
    fn start(config: &ExportConfig, service: &'static str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()?;
        // The tonic channel spawns its worker where it is built: on the export runtime.
        let exporter = {
            let _enter = runtime.enter();
            build_exporter(config)?
        };
        let exporter = CountingExporter::new(exporter, runtime.handle().clone());
        let mut resource = Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.trim().is_empty()) {
            resource = resource.with_service_name(service);
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance_id()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_resource(resource)
            .build();
        Ok(Self { provider, runtime })
    }
}

fn build_exporter(config: &ExportConfig) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let exporter = match config.protocol {
        Protocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(e) = &config.endpoint_flag {
                b = b.with_endpoint(e.clone());
            }
            b.build()
        }
        Protocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
            if let Some(e) = &config.endpoint_flag {
                // Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL, the signal's path appended.
                b = b.with_endpoint(format!("{}/v1/traces", e.trim_end_matches('/')));
            }
            b.build()
        }
    };
    exporter
        .map_err(|e| anyhow::anyhow!("cannot build the OTLP exporter for {}: {e}", config.endpoint))
}

/// `<hostname>-<pid>-<start time>`: unique per process, readable in a trace viewer.
fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{host}-{}-{started}", std::process::id())
}

impl Telemetry {
    /// Exports what is still queued (within [`FLUSH_TIMEOUT`]) and stops the exporter. Safe to
    /// call from inside an async runtime: it blocks only the calling thread.
    pub fn shutdown(mut self) {
        if let Some(export) = self.export.take() {
            export.shutdown();
        }
    }
}

impl Export {
    fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            tracing::warn!(error = %e, "spans still queued at shutdown were not exported");
        }
        // Never blocks, so this is fine inside another runtime's async context.
        self.runtime.shutdown_background();
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(export) = self.export.take() {
            export.shutdown();
        }
    }
}

/// Wraps the OTLP exporter: runs each export on the export runtime (the batch processor calls
/// it from its own plain thread), and counts spans lost to failed exports, reporting them in one
/// WARN per [`EXPORT_WARN_INTERVAL`].
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
    failed_spans: AtomicU64,
    last_warn: Mutex<Option<Instant>>,
}

impl<E> CountingExporter<E> {
    fn new(inner: E, runtime: tokio::runtime::Handle) -> Self {
        Self { inner, runtime, failed_spans: AtomicU64::new(0), last_warn: Mutex::new(None) }
    }

    /// Counts `spans` lost to `error`; logs when the last WARN is old enough (or there was none).
    fn failed(&self, spans: usize, error: &dyn std::fmt::Display) {
        let lost = self.failed_spans.fetch_add(spans as u64, Ordering::Relaxed) + spans as u64;
        let mut last = self.last_warn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= EXPORT_WARN_INTERVAL) {
            *last = Some(now);
            self.failed_spans.fetch_sub(lost, Ordering::Relaxed);
            tracing::warn!(
                spans_lost = lost,
                error = %error,
                "OTLP span export failing; requests are not affected (next report in {}s at most)",
                EXPORT_WARN_INTERVAL.as_secs()
            );
        }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        // Called from the batch processor's thread, never from inside a runtime.
        let result = self.runtime.block_on(self.inner.export(batch));
        if let Err(e) = &result {
            self.failed(n, e);
        }
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Reads W3C trace context (and baggage) from HTTP headers or gRPC metadata.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span` the child of the trace context in `headers` (a malformed or absent
/// `traceparent` leaves it the root of a new trace). Does nothing when spans are not exported.
pub fn extract(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() {
        return;
    }
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    // Fails only when the span is disabled or already started; then it keeps its own parent.
    let _ = span.set_parent(cx);
}

/// Sets an OpenTelemetry attribute on `span` (not a log field). Does nothing when spans are not
/// exported.
pub fn attribute(span: &tracing::Span, key: &'static str, value: impl Into<opentelemetry::Value>) {
    if enabled() {
        span.set_attribute(key, value);
    }
}

/// Marks `span` failed with `description` (OpenTelemetry status `ERROR`).
pub fn error(span: &tracing::Span, description: impl Into<std::borrow::Cow<'static, str>>) {
    if enabled() {
        span.set_status(opentelemetry::trace::Status::error(description));
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// A tonic interceptor that puts the current span's trace context into every outgoing call's
/// metadata (`traceparent`, `tracestate`, `baggage`). Make the call inside the client span.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracePropagation;

impl tonic::service::Interceptor for TracePropagation {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if enabled() {
            let cx = tracing::Span::current().context();
            opentelemetry::global::get_text_map_propagator(|p| {
                p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()));
            });
        }
        Ok(req)
    }
}

/// The client span of one call to `method` (`package.Service/Method`), named and attributed
/// after the OpenTelemetry RPC conventions. Make the call inside it.
pub fn client_span(method: &'static str) -> tracing::Span {
    let span = tracing::info_span!("rpc_client", otel.name = method, otel.kind = "client");
    rpc_attributes(&span, method);
    span
}

/// Runs the gRPC call `call` to `method` inside a new [`client_span`] and records a failed
/// call's status on it. The span is returned for what comes after: a unary caller records
/// status 0 on it at once ([`grpc_status`]), a streaming caller when its stream ends.
pub async fn client_call<T>(
    method: &'static str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> (tracing::Span, Result<T, tonic::Status>) {
    use tracing::Instrument;
    let span = client_span(method);
    let result = call.instrument(span.clone()).await;
    if let Err(status) = &result {
        grpc_status(&span, status.code() as i32, status.message());
    }
    (span, result)
}

/// `rpc.system`, `rpc.service` and `rpc.method` of a `package.Service/Method` name.
pub fn rpc_attributes(span: &tracing::Span, full_method: &str) {
    if !enabled() {
        return;
    }
    let (service, method) = full_method.split_once('/').unwrap_or((full_method, ""));
    span.set_attribute("rpc.system", "grpc");
    span.set_attribute("rpc.service", service.to_owned());
    span.set_attribute("rpc.method", method.to_owned());
}

/// Records a gRPC status code on `span` (`rpc.grpc.status_code`; non-zero codes also mark it
/// failed, as the RPC conventions say for servers and clients alike).
pub fn grpc_status(span: &tracing::Span, code: i32, message: &str) {
    if !enabled() {
        return;
    }
    span.set_attribute("rpc.grpc.status_code", i64::from(code));
    if code != 0 {
        let description = if message.is_empty() {
            tonic::Code::from_i32(code).description().to_owned()
        } else {
            message.to_owned()
        };
        span.set_status(opentelemetry::trace::Status::error(description));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve(flag: Option<&str>, env: &[(&str, &str)]) -> anyhow::Result<Option<ExportConfig>> {
        let env: HashMap<String, String> =
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        ExportConfig::resolve(flag, |k| env.get(k).cloned())
    }

    #[test]
    fn no_endpoint_anywhere_means_no_exporter() {
        assert_eq!(resolve(None, &[]).unwrap(), None);
        assert_eq!(resolve(Some("  "), &[("OTEL_EXPORTER_OTLP_ENDPOINT", "")]).unwrap(), None);
        // Other OTEL variables alone do not turn export on.
        assert_eq!(resolve(None, &[("OTEL_SERVICE_NAME", "x")]).unwrap(), None);
    }

    #[test]
    fn the_flag_wins_then_the_traces_variable_then_the_generic_one() {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ];
        let c = resolve(Some("http://flag:4317"), &env).unwrap().unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.endpoint_flag.as_deref()),
            ("http://flag:4317", Some("http://flag:4317"))
        );
        let c = resolve(None, &env).unwrap().unwrap();
        assert_eq!((c.endpoint.as_str(), c.endpoint_flag), ("http://traces:4317", None));
        let c = resolve(None, &env[..1]).unwrap().unwrap();
        assert_eq!(c.endpoint, "http://generic:4317");
        assert_eq!(c.protocol, Protocol::Grpc);
    }

    #[test]
    fn protocols_grpc_and_http_protobuf_only() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let p = |env: &[(&str, &str)]| resolve(None, env).map(|c| c.unwrap().protocol);
        assert_eq!(
            p(&[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).unwrap(),
            Protocol::HttpProtobuf
        );
        assert_eq!(p(&[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap(), Protocol::Grpc);
        // The per-signal variable wins.
        let both = [
            ep,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ];
        assert_eq!(p(&both).unwrap(), Protocol::HttpProtobuf);
        let err = p(&[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap_err().to_string();
        assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && err.contains("http/json"), "{err}");
    }
}
