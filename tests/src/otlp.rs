//! A minimal OTLP/gRPC trace collector (the collector's `TraceService` from
//! `opentelemetry-proto`) that keeps every span it receives: what the tracing tests assert on,
//! and what `llorch-otlp-sink` runs for measurements.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
pub use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
pub use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// One received span with its process's `service.name`.
#[derive(Debug, Clone)]
pub struct Got {
    /// The exporting process's `service.name`.
    pub service: String,
    /// The span.
    pub span: opentelemetry_proto::tonic::trace::v1::Span,
}

impl Got {
    /// The span's name.
    pub fn name(&self) -> &str {
        &self.span.name
    }

    /// The value of attribute `key`.
    pub fn attr(&self, key: &str) -> Option<Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone())
            .and_then(|v| v.value)
    }

    /// The value of integer attribute `key`; panics when it is absent or not an integer.
    pub fn int(&self, key: &str) -> i64 {
        match self.attr(key) {
            Some(Value::IntValue(v)) => v,
            other => panic!("{}: {key} is {other:?}, not an int", self.name()),
        }
    }

    /// The span's status code.
    pub fn status(&self) -> StatusCode {
        self.span.status.as_ref().map_or(StatusCode::Unset, |s| s.code())
    }

    /// Whether `parent` is this span's parent.
    pub fn is_child_of(&self, parent: &Got) -> bool {
        self.span.parent_span_id == parent.span.span_id
    }
}

/// The test's OTLP collector.
#[derive(Clone, Default)]
pub struct Collector {
    /// Every span received, in arrival order.
    pub spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.clone()?.value)
                .map(|v| match v {
                    Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(
                    ss.spans.into_iter().map(|span| Got { service: service.clone(), span }),
                );
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Serves on `listener` until the test ends.
    pub fn serve(listener: TcpListener) -> Self {
        let collector = Self::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        collector
    }

    /// Serves on a free port of 127.0.0.1.
    pub async fn start() -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (Self::serve(listener), addr)
    }

    /// The spans received so far.
    pub fn all(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (10 s) until `done` holds for the spans received so far; returns them.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.all();
            if done(&spans) {
                return spans;
            }
            assert!(Instant::now() < until, "no {what} after 10 s; got {:#?}", names(&spans));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// (service, name) of each span.
pub fn names(spans: &[Got]) -> Vec<(String, String)> {
    spans.iter().map(|g| (g.service.clone(), g.name().to_owned())).collect()
}

/// The one span of `service` named `name` in `spans`.
pub fn one<'a>(spans: &'a [Got], service: &str, name: &str) -> &'a Got {
    let found: Vec<&Got> =
        spans.iter().filter(|g| g.service == service && g.name() == name).collect();
    assert_eq!(found.len(), 1, "{service} {name}: {:#?}", names(spans));
    found[0]
}

/// Whether `spans` has one of `service` named `name`.
pub fn has(spans: &[Got], service: &str, name: &str) -> bool {
    spans.iter().any(|g| g.service == service && g.name() == name)
}

/// `spans` as an indented tree (children under their parent, by start time): name, service,
/// kind and duration. Spans whose parent is not in `spans` are roots.
pub fn tree(spans: &[Got]) -> String {
    let mut sorted: Vec<&Got> = spans.iter().collect();
    sorted.sort_by_key(|g| g.span.start_time_unix_nano);
    let ids: std::collections::HashSet<&[u8]> =
        sorted.iter().map(|g| g.span.span_id.as_slice()).collect();
    let mut out = String::new();
    fn walk(out: &mut String, all: &[&Got], node: &Got, depth: usize) {
        let ms = node.span.end_time_unix_nano.saturating_sub(node.span.start_time_unix_nano) as f64
            / 1e6;
        let kind = node.span.kind().as_str_name().trim_start_matches("SPAN_KIND_").to_lowercase();
        out.push_str(&format!(
            "{:indent$}{} [{}, {kind}] {ms:.2} ms\n",
            "",
            node.name(),
            node.service,
            indent = depth * 2
        ));
        for child in all.iter().filter(|c| c.is_child_of(node)) {
            walk(out, all, child, depth + 1);
        }
    }
    for root in sorted.iter().filter(|g| !ids.contains(g.span.parent_span_id.as_slice())) {
        walk(&mut out, &sorted, root, 0);
    }
    out
}
