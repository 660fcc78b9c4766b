//! The `llorch-engine serve` binary as a child process, on the default model: it logs its
//! bound address, serves, names the model, and on SIGTERM drains and exits 0.

use std::process::{Command, Stdio};
use std::time::Duration;

use llorch_common::child_log::ChildLog;
use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::engine::v1::{GenerateRequest, InfoRequest, SamplingParams, StoppingCriteria};

#[tokio::test]
async fn serve_logs_its_address_serves_and_exits_0_on_sigterm() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut child = Command::new(env!("CARGO_BIN_EXE_llorch-engine"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--port",
            "0",
            "--threads",
            "1",
            "--grace-secs",
            "10",
        ])
        .current_dir(&root)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = ChildLog::forward(&mut child).unwrap();
    let wait = Duration::from_secs(30);
    let listening = log.wait_for("engine service listening", wait).unwrap();
    let addr = listening["addr"].as_str().unwrap().to_owned();
    log.wait_for("ready", wait).unwrap();
    let mut client = EngineClient::connect(format!("http://{addr}")).await.unwrap();
    // The default model (models/default, the trained demo) is served under the name its
    // config.json gives, so nobody mistakes it for GPT-2.
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model, "llorch-demo-kjv-6x192");
    let req = GenerateRequest {
        prompt_ids: vec![15496, 13],
        sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
        stopping: Some(StoppingCriteria { max_new_tokens: 3, ..Default::default() }),
        ..Default::default()
    };
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(msg) = futures::StreamExt::next(&mut stream).await {
        msg.unwrap();
        n += 1;
    }
    assert_eq!(n, 4, "three tokens and Finished");

    assert!(
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test]
async fn a_closed_stderr_does_not_stop_the_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_llorch-engine"))
        .args(["serve", "--threads", "1", "--port", &port.to_string()])
        .current_dir(&root)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close our end at once: every log line the engine writes now fails with EPIPE.
    drop(child.stderr.take());
    let url = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let mut client = loop {
        assert!(child.try_wait().unwrap().is_none(), "the engine exited while starting");
        assert!(started.elapsed() < Duration::from_secs(30), "the engine did not start");
        match EngineClient::connect(url.clone()).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    for _ in 0..3 {
        let req = GenerateRequest {
            prompt_ids: vec![15496, 13],
            stopping: Some(StoppingCriteria { max_new_tokens: 3, ..Default::default() }),
            ..Default::default()
        };
        let mut stream = loop {
            assert!(child.try_wait().unwrap().is_none(), "the engine exited");
            assert!(started.elapsed() < Duration::from_secs(30), "the engine never got ready");
            match client.generate(req.clone()).await {
                Ok(s) => break s.into_inner(),
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e:?}"),
            }
        };
        let mut n = 0;
        while let Some(msg) = futures::StreamExt::next(&mut stream).await {
            msg.unwrap();
            n += 1;
        }
        assert_eq!(n, 4);
    }
    assert!(child.try_wait().unwrap().is_none(), "the engine exited");
    child.kill().unwrap();
    child.wait().unwrap();
}
