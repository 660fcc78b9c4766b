//! OpenTelemetry across the three real binaries: each runs as its own process (its own
//! `service.name`) and exports spans over OTLP/gRPC to a collector this test runs — a tonic
//! server implementing the collector's `TraceService` from `opentelemetry-proto`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llorch_common::child_log::ChildLog;
use llorch_e2e::otlp::{Collector, Got, SpanKind, StatusCode, Value, has, names, one};
use llorch_e2e::{SseReader, binary, test_model, tokenizer_dir, wait_http_ok};
use llorch_proto::engine::v1 as epb;
use serde_json::json;
use tokio::net::TcpListener;

/// A binary as a child process, killed on drop.
struct Proc {
    child: Child,
    log: ChildLog,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The three binaries, each its own process, with `env` (and no other `OTEL_*` variable).
struct Stack {
    tokenizer: Proc,
    engine: Proc,
    gateway: Proc,
    gateway_url: String,
    engine_url: String,
}

fn spawn(name: &str, args: &[&str], env: &[(&str, String)], listening: &str) -> (Proc, String) {
    let mut cmd = Command::new(binary(name).unwrap());
    cmd.args(["--log-format", "json"]).args(args).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") || k == "LLORCH_OTLP_ENDPOINT" {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let log = ChildLog::forward(&mut child).unwrap();
    let fields = log.wait_for(listening, Duration::from_secs(30)).unwrap();
    let addr = fields["addr"].as_str().unwrap().to_owned();
    (Proc { child, log }, format!("http://{addr}"))
}

impl Stack {
    fn start(env: &[(&str, String)]) -> Self {
        let (model, tokenizer) = (test_model(), tokenizer_dir());
        let (model, tokenizer) = (model.to_str().unwrap(), tokenizer.to_str().unwrap());
        let (tokenizer, tokenizer_url) = spawn(
            "llorch-tokenizer",
            &["serve", "--port", "0", "--model", tokenizer],
            env,
            "tokenizer service listening",
        );
        let (engine, engine_url) = spawn(
            "llorch-engine",
            &["serve", "--port", "0", "--threads", "1", "--model", model],
            env,
            "engine service listening",
        );
        let (gateway, gateway_url) = spawn(
            "llorch-gateway",
            &["--port", "0", "--tokenizer-url", &tokenizer_url, "--engine-url", &engine_url],
            env,
            "gateway listening",
        );
        Self { tokenizer, engine, gateway, gateway_url, engine_url }
    }

    /// Waits until the gateway is healthy (both services loaded).
    async fn ready(&self) {
        wait_http_ok(&format!("{}/health", self.gateway_url)).await.unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway_url)
    }
}

/// The environment that sends spans to `collector` quickly.
fn otel_env(collector: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
    ]
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one `/execute` to its end; returns the `end` event's data.
async fn execute(
    stack: &Stack,
    body: serde_json::Value,
    traceparent: Option<&str>,
) -> serde_json::Value {
    let mut req = reqwest::Client::new().post(stack.url("/execute")).json(&body);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = SseReader::new(resp).collect().await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "end", "{events:?}");
    last.data.clone()
}

const GATEWAY: &str = "llorch-gateway";
const TOKENIZER: &str = "llorch-tokenizer";
const ENGINE: &str = "llorch-engine";
const ENCODE: &str = "llorch.tokenizer.v1.Tokenizer/Encode";
const DECODE_STREAM: &str = "llorch.tokenizer.v1.Tokenizer/DecodeStream";
const GENERATE: &str = "llorch.engine.v1.Engine/Generate";

/// Every span the gateway, tokenizer and engine make for one `/execute`, once all arrived.
async fn execute_trace(collector: &Collector, trace_id: Option<&str>) -> Vec<Got> {
    let spans = collector
        .wait_until("complete trace", |s| {
            let complete = [
                (GATEWAY, "POST /execute"),
                (GATEWAY, "text_completion tiny"),
                (GATEWAY, ENCODE),
                (GATEWAY, DECODE_STREAM),
                (GATEWAY, GENERATE),
                (TOKENIZER, ENCODE),
                (TOKENIZER, DECODE_STREAM),
                (ENGINE, GENERATE),
                (ENGINE, "queue"),
                (ENGINE, "prefill"),
                (ENGINE, "decode"),
            ];
            complete.iter().all(|(service, name)| has(s, service, name))
        })
        .await;
    let trace = trace_id
        .map_or_else(|| hex(&one(&spans, GATEWAY, "POST /execute").span.trace_id), str::to_owned);
    let in_trace: Vec<Got> =
        spans.iter().filter(|g| hex(&g.span.trace_id) == trace).cloned().collect();
    // Nothing of this request went anywhere else.
    assert_eq!(in_trace.len(), spans.len(), "spans outside the trace: {:#?}", names(&spans));
    in_trace
}

#[tokio::test]
async fn one_execute_is_one_trace_across_the_three_services() {
    let (collector, addr) = Collector::start().await;
    let stack = Stack::start(&otel_env(addr));
    stack.ready().await;
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    let body = json!({"job_id": "traced", "prompt": "Hello, world", "max_tokens": 5,
                      "temperature": 0, "top_p": 0.9, "top_k": 40, "seed": 7});
    let end = execute(&stack, body, Some(&traceparent)).await;
    let spans = execute_trace(&collector, Some(TRACE_ID)).await;
    eprintln!("{}", llorch_e2e::otlp::tree(&spans));
    let services: std::collections::BTreeSet<&str> =
        spans.iter().map(|g| g.service.as_str()).collect();
    assert_eq!(services.into_iter().collect::<Vec<_>>(), [ENGINE, GATEWAY, TOKENIZER]);

    // The gateway's server span is the child of the caller's span.
    let server = one(&spans, GATEWAY, "POST /execute");
    assert_eq!(hex(&server.span.parent_span_id), CLIENT_SPAN);
    assert_eq!(server.span.kind(), SpanKind::Server);
    assert_eq!(server.int("http.response.status_code"), 200);
    assert_eq!(server.attr("http.route"), Some(Value::StringValue("/execute".into())));

    // The job's span, with the GenAI attributes of the request and of the `end` event.
    let job = one(&spans, GATEWAY, "text_completion tiny");
    assert!(job.is_child_of(server));
    let s = |v: &str| Some(Value::StringValue(v.into()));
    assert_eq!(job.attr("gen_ai.operation.name"), s("text_completion"));
    assert_eq!(job.attr("gen_ai.request.model"), s("tiny"));
    assert_eq!(job.int("gen_ai.request.max_tokens"), 5);
    assert_eq!(job.attr("gen_ai.request.temperature"), Some(Value::DoubleValue(0.0)));
    assert_eq!(job.attr("gen_ai.request.top_p"), Some(Value::DoubleValue(f64::from(0.9f32))));
    assert_eq!(job.int("gen_ai.request.top_k"), 40);
    assert_eq!(job.int("gen_ai.request.seed"), 7);
    assert_eq!(job.int("gen_ai.usage.output_tokens"), end["tokens_out"].as_i64().unwrap());
    assert_eq!(job.int("gen_ai.usage.input_tokens"), end["tokens_in"].as_i64().unwrap());
    let reason = end["stop_reason"].as_str().unwrap();
    match job.attr("gen_ai.response.finish_reasons") {
        Some(Value::ArrayValue(a)) => {
            assert_eq!(a.values.len(), 1);
            assert_eq!(a.values[0].value, s(reason));
        }
        other => panic!("finish_reasons: {other:?}"),
    }
    assert_eq!(job.status(), StatusCode::Unset);

    // Each call the job makes is a client span under it, and the service's server span is the
    // child of that client span.
    for (service, method) in [(TOKENIZER, ENCODE), (TOKENIZER, DECODE_STREAM), (ENGINE, GENERATE)] {
        let client = one(&spans, GATEWAY, method);
        assert_eq!(client.span.kind(), SpanKind::Client, "{method}");
        assert!(client.is_child_of(job), "{method}");
        assert_eq!(client.attr("rpc.system"), s("grpc"));
        let served = one(&spans, service, method);
        assert_eq!(served.span.kind(), SpanKind::Server, "{method}");
        assert!(served.is_child_of(client), "{method}");
        assert_eq!(served.int("rpc.grpc.status_code"), 0, "{method}");
    }

    // The engine: queue, prefill and decode under Generate, which ends with the stream.
    let generate = one(&spans, ENGINE, GENERATE);
    for phase in ["queue", "prefill", "decode"] {
        assert!(one(&spans, ENGINE, phase).is_child_of(generate), "{phase}");
    }
    assert_eq!(generate.int("gen_ai.usage.output_tokens"), end["tokens_out"].as_i64().unwrap());
    assert_eq!(generate.int("gen_ai.usage.input_tokens"), end["tokens_in"].as_i64().unwrap());
    assert!(
        matches!(generate.attr("gen_ai.server.time_to_first_token"), Some(Value::DoubleValue(t)) if t > 0.0)
    );
    let decode = one(&spans, ENGINE, "decode");
    assert_eq!(decode.int("steps"), end["tokens_out"].as_i64().unwrap() - 1);
    assert_eq!(one(&spans, ENGINE, "prefill").int("chunks"), 1);
    // (Generate ends at the stream's last poll, decode when the scheduler lets the sequence go:
    // either may come first by a few microseconds, so their end times are not compared.)
}

#[tokio::test]
async fn a_request_without_traceparent_gets_a_fresh_trace_over_the_three_services() {
    let (collector, addr) = Collector::start().await;
    let stack = Stack::start(&otel_env(addr));
    stack.ready().await;
    // A malformed traceparent is ignored like an absent one.
    for traceparent in [None, Some("00-zz-not-a-traceparent")] {
        collector.spans.lock().unwrap().clear();
        let body = json!({"job_id": "fresh", "prompt": "Hi", "max_tokens": 2, "temperature": 0});
        execute(&stack, body, traceparent).await;
        // One trace, rooted at the gateway, over all three services.
        let spans = execute_trace(&collector, None).await;
        let server = one(&spans, GATEWAY, "POST /execute");
        assert!(server.span.parent_span_id.is_empty(), "{traceparent:?}");
        assert_ne!(hex(&server.span.trace_id), TRACE_ID);
    }
}

#[tokio::test]
async fn cancel_and_engine_errors_set_the_span_status() {
    let (collector, addr) = Collector::start().await;
    let stack = Stack::start(&otel_env(addr));
    stack.ready().await;

    // Cancelled through the worker API while generating.
    let http = reqwest::Client::new();
    let resp = http
        .post(stack.url("/execute"))
        .json(&json!({"job_id": "to-cancel", "prompt": "Once", "max_tokens": 500,
                      "temperature": 0.8, "seed": 1}))
        .send()
        .await
        .unwrap();
    let mut events = SseReader::new(resp);
    assert_eq!(events.next().await.unwrap().event, "started");
    assert_eq!(events.next().await.unwrap().event, "token");
    let cancel = http.post(stack.url("/cancel")).json(&json!({"job_id": "to-cancel"}));
    assert_eq!(cancel.send().await.unwrap().status(), 202);
    let last = events.collect().await.pop().unwrap();
    assert_eq!((last.event.as_str(), &last.data["code"]), ("error", &json!("CANCELLED")));
    let spans = collector
        .wait_until("the cancelled job's spans", |s| {
            has(s, GATEWAY, "text_completion tiny") && has(s, ENGINE, GENERATE)
        })
        .await;
    let job = one(&spans, GATEWAY, "text_completion tiny");
    assert_eq!(job.status(), StatusCode::Error);
    assert_eq!(job.attr("error.type"), Some(Value::StringValue("CANCELLED".into())));
    let generate = one(&spans, ENGINE, GENERATE);
    assert_eq!(generate.status(), StatusCode::Error);
    assert_eq!(generate.span.status.as_ref().unwrap().message, "CANCELLED");
    collector.spans.lock().unwrap().clear();

    // The engine refusing a call: its server span carries the gRPC code and fails.
    let mut engine =
        epb::engine_client::EngineClient::connect(stack.engine_url.clone()).await.unwrap();
    let mut req = tonic::Request::new(epb::GenerateRequest {
        prompt_ids: vec![],
        stopping: Some(epb::StoppingCriteria { max_new_tokens: 1, ..Default::default() }),
        ..Default::default()
    });
    let tp = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    req.metadata_mut().insert("traceparent", tp.parse().unwrap());
    let status = engine.generate(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let spans = collector.wait_until("the refused call", |s| has(s, ENGINE, GENERATE)).await;
    let refused = one(&spans, ENGINE, GENERATE);
    assert_eq!(refused.int("rpc.grpc.status_code"), tonic::Code::InvalidArgument as i64);
    assert_eq!(refused.status(), StatusCode::Error);
    assert_eq!(hex(&refused.span.trace_id), TRACE_ID);
    assert_eq!(hex(&refused.span.parent_span_id), CLIENT_SPAN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_at_sigterm_are_flushed_before_exit() {
    let (collector, addr) = Collector::start().await;
    // The processor would wait ten minutes before its first export: only shutdown sends.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned()),
    ];
    let mut stack = Stack::start(&env);
    stack.ready().await;
    let body = json!({"job_id": "flushed", "prompt": "Hi", "max_tokens": 3, "temperature": 0});
    execute(&stack, body, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(collector.all().is_empty(), "{:#?}", names(&collector.all()));
    for proc in [&mut stack.gateway, &mut stack.engine, &mut stack.tokenizer] {
        let pid = proc.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = tokio::task::block_in_place(|| proc.child.wait()).unwrap();
        assert!(status.success(), "{status}");
    }
    let spans = execute_trace(&collector, None).await;
    assert_eq!(one(&spans, GATEWAY, "POST /execute").int("http.response.status_code"), 200);
}

#[tokio::test]
async fn a_collector_that_is_down_changes_nothing_for_requests() {
    // A port that was free a moment ago and has nobody listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let stack = Stack::start(&otel_env(closed));
    stack.ready().await;
    let started = Instant::now();
    for i in 0..3 {
        let body = json!({"job_id": format!("down-{i}"), "prompt": "Hi", "max_tokens": 4,
                          "temperature": 0});
        let end = execute(&stack, body, None).await;
        assert_eq!(end["tokens_out"], 4);
    }
    // Far inside the exporter's 10 s timeout: nothing waited on the collector.
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
    let health = reqwest::get(stack.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    // The failure is reported, once, by each process (not once per span).
    for proc in [&stack.gateway, &stack.engine, &stack.tokenizer] {
        proc.log
            .wait_for(
                "OTLP span export failing; requests are not affected (next report in 60s at most)",
                Duration::from_secs(10),
            )
            .unwrap();
    }
}

#[tokio::test]
async fn without_any_otel_variable_no_exporter_is_built() {
    // Where an SDK with defaults would send (the OTLP gRPC port), if this machine lets us listen.
    let default_port = TcpListener::bind("127.0.0.1:4317").await.ok().map(Collector::serve);
    if default_port.is_none() {
        eprintln!("127.0.0.1:4317 is taken: only the logs are checked");
    }
    // Other OTEL variables alone do not turn export on.
    let env = [("OTEL_SERVICE_NAME", "x".to_owned()), ("OTEL_BSP_SCHEDULE_DELAY", "10".into())];
    let stack = Stack::start(&env);
    stack.ready().await;
    let body = json!({"job_id": "untraced", "prompt": "Hi", "max_tokens": 2, "temperature": 0});
    execute(&stack, body, Some(&format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for proc in [&stack.gateway, &stack.engine, &stack.tokenizer] {
        let seen = proc.log.seen();
        assert!(!seen.iter().any(|m| m == "exporting spans over OTLP"), "{seen:?}");
    }
    if let Some(collector) = default_port {
        assert!(collector.all().is_empty(), "{:#?}", names(&collector.all()));
    }
}
