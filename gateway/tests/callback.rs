//! The ready callback of the `llorch-gateway` binary: the documented body once the port is
//! open, skipped in test mode, and a non-zero exit when the receiver keeps failing.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use llorch_common::child_log::ChildLog;
use serde_json::{Value, json};

/// Callback bodies received, with whether the worker's port was open at that moment.
type Seen = Arc<Mutex<Vec<(Value, bool)>>>;

/// Every field of both receivers' vocabularies, typed: the worker API spec's (llama-orch pool
/// manager) and the upstream `rbee-hive`'s `POST /v1/workers/ready` (`worker_id`, `url`,
/// `model_ref`, `backend`, `device: u32`). Like `rbee-hive`'s axum `Json` extractor, the stand-in
/// answers 422 to a body lacking or mistyping any of them.
#[derive(Debug, serde::Deserialize)]
#[allow(dead_code)] // Deserialising is the check.
struct ReadyUnion {
    worker_id: String,
    vram_bytes: u64,
    uri: String,
    model_ref: String,
    memory_bytes: u64,
    memory_architecture: String,
    worker_type: String,
    capabilities: Vec<String>,
    url: String,
    backend: String,
    device: u32,
}

/// A pool manager stand-in: refuses (422) a body that is not a [`ReadyUnion`], else records the body and whether the worker's port was already open when it arrived and
/// answers with `status`.
async fn receiver(status: StatusCode) -> (String, Seen) {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route(
            "/ready",
            post(
                |State((seen, status)): State<(Seen, StatusCode)>,
                 Json(body): Json<Value>| async move {
                    if serde_json::from_value::<ReadyUnion>(body.clone()).is_err() {
                        return StatusCode::UNPROCESSABLE_ENTITY;
                    }
                    let addr = body["uri"]
                        .as_str()
                        .unwrap_or_default()
                        .trim_start_matches("http://")
                        .to_owned();
                    let open = tokio::net::TcpStream::connect(addr).await.is_ok();
                    seen.lock().unwrap().push((body, open));
                    status
                },
            ),
        )
        .with_state((Arc::clone(&seen), status));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ready", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

fn gateway(callback: &str) -> (Child, ChildLog) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llorch-gateway"))
        .args(["--log-format", "json", "--port", "0", "--worker-id", "w-7", "--model", "gpt2-test"])
        .args([
            "--callback-url",
            callback,
            "--callback-attempts",
            "3",
            "--callback-backoff-secs",
            "0.01",
        ])
        .args(["--tokenizer-url", "http://127.0.0.1:1", "--engine-url", "http://127.0.0.1:1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = ChildLog::forward(&mut child).unwrap();
    (child, log)
}

/// Waits for a log line whose message is `message`; returns its fields.
fn wait_log(log: &ChildLog, message: &str) -> Value {
    log.wait_for(message, Duration::from_secs(30)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_gets_exactly_the_documented_body_once_the_port_is_open() {
    let (url, seen) = receiver(StatusCode::OK).await;
    let (mut child, log) = gateway(&url);
    let addr = wait_log(&log, "gateway listening")["addr"].as_str().unwrap().to_owned();
    wait_log(&log, "ready callback accepted");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (body, port_open) = &seen[0];
    assert!(port_open, "the callback came before the port was open");
    assert_eq!(
        *body,
        json!({
            "worker_id": "w-7", "vram_bytes": 0, "uri": format!("http://{addr}"), "model_ref": "gpt2-test",
            "memory_bytes": 0, "memory_architecture": "cpu", "worker_type": "cpu", "capabilities": ["text-gen"],
            "url": format!("http://{addr}"), "backend": "cpu", "device": 0
        })
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_mode_skips_the_callback() {
    let (mut child, log) = gateway("http://localhost:9999/ready");
    wait_log(&log, "test mode: ready callback skipped");
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "the gateway exited in test mode");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_makes_the_gateway_exit_non_zero_after_the_retries() {
    let (url, seen) = receiver(StatusCode::INTERNAL_SERVER_ERROR).await;
    let (mut child, log) = gateway(&url);
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(!status.success(), "{status:?}");
    assert_eq!(seen.lock().unwrap().len(), 3, "three attempts");
    // The child exited: every line up to its end.
    let lines: Vec<String> = tokio::task::spawn_blocking(move || log.rest()).await.unwrap();
    assert!(
        lines.iter().any(|l| l.contains("failed after 3 attempts") && l.contains("HTTP 500")),
        "no clear final message in {lines:#?}"
    );
}
