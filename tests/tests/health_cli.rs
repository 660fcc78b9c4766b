//! The `health` subcommands the container healthchecks run: each binary asks its service
//! (gRPC health for the tokenizer and the engine, `GET /health` for the gateway) and exits 0
//! when it serves, 1 with a one-line reason otherwise.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::Context;
use llorch_e2e::{SseReader, Stack, start_engine_loading, start_tokenizer};
use serde_json::json;

/// A binary of this build, next to the test executable's `deps/` folder.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|d| d.parent()).unwrap().join(name);
    assert!(bin.is_file(), "{} not found: build the workspace first", bin.display());
    bin
}

/// Runs `<bin> health --url URL` (on a blocking thread: the services run on this runtime).
async fn health(bin: &str, url: &str) -> Output {
    let bin = binary(bin);
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(["health", "--url", &url, "--timeout-secs", "5"])
            // The port variables must not matter when --url is given.
            .env("LLORCH_ENGINE_PORT", "1")
            .env("LLORCH_TOKENIZER_PORT", "1")
            .env("LLORCH_GATEWAY_PORT", "1")
            .output()
            .context("cannot run the health subcommand")
    })
    .await
    .unwrap()
    .unwrap()
}

/// Exit code, stdout and stderr, for assertion messages.
fn show(out: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_healthy(out: &Output, says: &str) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains(says), "{}", show(out));
    assert_eq!(stdout.lines().count(), 1, "one line: {}", show(out));
}

/// Exit 1 with one stderr line containing every one of `reasons`.
fn assert_unhealthy(out: &Output, reasons: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", show(out));
    assert_eq!(stderr.lines().count(), 1, "one line: {}", show(out));
    assert!(stderr.starts_with("unhealthy: "), "{}", show(out));
    for reason in reasons {
        assert!(stderr.contains(reason), "no {reason:?} in {}", show(out));
    }
}

/// A URL nothing listens on (a port bound and released).
async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn tokenizer_health_is_0_while_serving_and_1_with_the_reason_once_stopped() {
    let svc = start_tokenizer(|_| {}).await.unwrap();
    svc.wait_serving(llorch_proto::TOKENIZER_SERVICE).await.unwrap();
    let url = svc.url();
    assert_healthy(&health("llorch-tokenizer", &url).await, "SERVING");
    svc.stop().await.unwrap();
    assert_unhealthy(
        &health("llorch-tokenizer", &url).await,
        &["cannot reach", "llorch.tokenizer.v1.Tokenizer", &url],
    );
}

#[tokio::test]
async fn engine_health_is_1_while_the_model_loads_and_0_once_it_serves() {
    let loading = start_engine_loading().await.unwrap();
    let url = loading.service.url();
    assert_unhealthy(
        &health("llorch-engine", &url).await,
        &["llorch.engine.v1.Engine", "NOT_SERVING", &url],
    );
    let svc = loading.load().await.unwrap();
    svc.wait_serving(llorch_proto::ENGINE_SERVICE).await.unwrap();
    assert_healthy(&health("llorch-engine", &url).await, "SERVING");
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn nothing_listening_and_a_bad_url_are_reasons_not_hangs() {
    let url = dead_url().await;
    for bin in ["llorch-tokenizer", "llorch-engine", "llorch-gateway"] {
        assert_unhealthy(&health(bin, &url).await, &["cannot reach", &url]);
    }
    for bin in ["llorch-tokenizer", "llorch-engine"] {
        assert_unhealthy(&health(bin, "not a url").await, &["--url", "not a url"]);
    }
}

#[tokio::test]
async fn gateway_health_is_0_while_healthy_and_1_while_draining() {
    let stack = Stack::start(|_| {}, |c| c.grace_secs = 30.0).await.unwrap();
    let url = stack.gateway.url();
    assert_healthy(&health("llorch-gateway", &url).await, "HTTP 200");

    // A long stream keeps the gateway draining after its shutdown signal.
    let body =
        json!({"job_id": "long", "prompt": "Hello.", "max_tokens": 1000, "temperature": 0.0});
    let resp = reqwest::Client::new().post(stack.url("/execute")).json(&body).send().await.unwrap();
    let mut events = SseReader::new(resp);
    while let Some(e) = events.next().await {
        if e.event == "token" {
            break;
        }
    }
    let Stack { tokenizer, engine, gateway } = stack;
    let stopping = tokio::spawn(gateway.stop());
    let mut out = health("llorch-gateway", &url).await;
    for _ in 0..100 {
        if !out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        out = health("llorch-gateway", &url).await;
    }
    assert_unhealthy(&out, &["HTTP 503", "unhealthy", "draining"]);
    let last = events.collect().await.pop().unwrap();
    assert_eq!(last.event, "end", "the running stream finishes: {last:?}");
    stopping.await.unwrap().unwrap();
    engine.stop().await.unwrap();
    tokenizer.stop().await.unwrap();
}
