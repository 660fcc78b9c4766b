//! A panic in a request path ends that request with a clear error and the server serves on; a
//! panic in the engine's scheduler thread ends its streams with an error, and the engine exits
//! non-zero so that a supervisor restarts it. The panics are injected with failpoints
//! (`llorch_common::failpoint`): configured in this process for the in-process services, through
//! `LLORCH_FAILPOINTS` for the engine binary. (`make test` runs each test in its own process, so
//! one test's failpoints never reach another.)

use std::time::Duration;

use futures::StreamExt;
use llorch_common::failpoint;
use llorch_e2e::{EngineProcess, SseReader, Stack, start_tokenizer, test_model};
use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::engine::v1::{GenerateRequest, SamplingParams, StoppingCriteria};
use llorch_proto::tokenizer::v1::tokenizer_client::TokenizerClient;
use llorch_proto::tokenizer::v1::{DecodeStreamRequest, EncodeRequest};
use serde_json::{Value, json};
use tonic::Code;

fn request(id: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_ids: vec![15496, 13],
        sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
        stopping: Some(StoppingCriteria {
            max_new_tokens: 8,
            stop_token_ids: vec![],
            ignore_eos: true,
        }),
        logprobs: false,
        top_logprobs: 0,
    }
}

/// Runs a Generate stream to its end: the number of tokens, or the first error.
async fn generate(
    client: &mut EngineClient<tonic::transport::Channel>,
    id: &str,
) -> Result<usize, tonic::Status> {
    let mut stream = client.generate(request(id)).await?.into_inner();
    let mut tokens = 0;
    while let Some(msg) = stream.next().await {
        if let Some(llorch_proto::engine::v1::generate_response::Event::Token(_)) = msg?.event {
            tokens += 1;
        }
    }
    Ok(tokens)
}

#[tokio::test]
async fn a_panicking_generate_handler_ends_that_call_with_internal_and_the_engine_serves_on() {
    failpoint::configure("engine.generate=panic*1").unwrap();
    let stack = Stack::start(|_| {}, |_| {}).await.unwrap();
    let mut client = EngineClient::new(stack.engine.channel());
    let err = generate(&mut client, "first").await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("see its log"), "{err:?}");
    // The same connection and the service go on.
    assert_eq!(generate(&mut client, "second").await.unwrap(), 8);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_scheduler_panic_fails_its_streams_and_the_engine_exits_non_zero() {
    let env = [(failpoint::ENV, "engine.scheduler=panic*1")];
    let engine = EngineProcess::spawn_with_env(0, &test_model(), &env).unwrap();
    let channel = tonic::transport::Channel::from_shared(engine.url()).unwrap().connect_lazy();
    let mut client = EngineClient::new(channel);
    let err = generate(&mut client, "doomed").await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("scheduler thread panicked"), "{err:?}");
    // It stops by itself, with a failure status a supervisor acts on.
    let status = exit_status(engine, Duration::from_secs(10))
        .await
        .expect("the engine still runs 10 s after its scheduler panicked");
    assert!(!status.success(), "exit status {status}");
}

#[tokio::test]
async fn a_panicking_job_ends_its_sse_stream_with_an_error_event() {
    failpoint::configure("gateway.job=panic*1").unwrap();
    let stack = Stack::start(|_| {}, |_| {}).await.unwrap();
    let body = json!({"job_id": "j1", "prompt": "Hello.", "max_tokens": 4, "temperature": 0});
    let http = reqwest::Client::new();
    let resp = http.post(stack.url("/execute")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = SseReader::new(resp).collect().await;
    let last = events.last().expect("at least one frame");
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(last.data["code"], "INFERENCE_FAILED", "{events:?}");
    // The permit was given back and the next job runs.
    stack.settled().await.unwrap();
    let body = json!({"job_id": "j2", "prompt": "Hello.", "max_tokens": 4, "temperature": 0});
    let resp = http.post(stack.url("/execute")).json(&body).send().await.unwrap();
    let events = SseReader::new(resp).collect().await;
    assert_eq!(events.last().unwrap().event, "end", "{events:?}");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn panicking_http_handlers_answer_500_in_each_routes_error_shape() {
    failpoint::configure("gateway.execute=panic*1,gateway.completions=panic*1").unwrap();
    let stack = Stack::start(|_| {}, |_| {}).await.unwrap();
    let http = reqwest::Client::new();
    let execute = json!({"job_id": "j1", "prompt": "Hi", "max_tokens": 2});
    let completion = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2});

    let resp = http.post(stack.url("/execute")).json(&execute).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["code"].as_str(), body["retriable"].as_bool()),
        (Some("INFERENCE_FAILED"), Some(false))
    );

    let resp = http.post(stack.url("/v1/completions")).json(&completion).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error", "{body}");

    // Both serve again.
    let resp = http.post(stack.url("/execute")).json(&execute).send().await.unwrap();
    assert_eq!(SseReader::new(resp).collect().await.last().unwrap().event, "end");
    let resp = http.post(stack.url("/v1/completions")).json(&completion).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn panicking_tokenizer_calls_end_with_internal_and_it_serves_on() {
    failpoint::configure("tokenizer.encode=panic*1,tokenizer.decode_stream=panic*1").unwrap();
    let svc = start_tokenizer(|_| {}).await.unwrap();
    svc.wait_serving(llorch_proto::TOKENIZER_SERVICE).await.unwrap();
    let mut client = TokenizerClient::new(svc.channel());
    let encode = || EncodeRequest { text: "Hello.".into(), add_special_tokens: false };

    let err = client.encode(encode()).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(client.encode(encode()).await.unwrap().into_inner().ids, [15496, 13]);

    let decode = |ids: Vec<u32>| {
        futures::stream::iter([DecodeStreamRequest { ids, skip_special_tokens: false }])
    };
    let mut replies = client.decode_stream(decode(vec![15496])).await.unwrap().into_inner();
    let err = replies.next().await.expect("an answer, not a silent end").unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    let mut replies = client.decode_stream(decode(vec![15496])).await.unwrap().into_inner();
    assert_eq!(replies.next().await.unwrap().unwrap().text, "Hello");
    svc.stop().await.unwrap();
}

/// A scheduler panic while the engine drains after SIGTERM: the running stream gets its error
/// and the engine exits non-zero at once (before, it waited out the grace period and exited 0,
/// so nothing told a supervisor that the engine had failed).
#[tokio::test]
async fn a_scheduler_panic_while_draining_still_exits_non_zero() {
    let env = [(failpoint::ENV, "engine.scheduler_draining=panic*1")];
    let engine = EngineProcess::spawn_with_env(0, &test_model(), &env).unwrap();
    let channel = tonic::transport::Channel::from_shared(engine.url()).unwrap().connect_lazy();
    let mut client = EngineClient::new(channel);
    let req = GenerateRequest {
        request_id: "long".into(),
        prompt_ids: vec![15496, 13],
        stopping: Some(StoppingCriteria {
            max_new_tokens: 900,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(req).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("a first token");
    engine.signal("TERM").unwrap();
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::Internal, "{end:?}");
    let status = exit_status(engine, Duration::from_secs(5))
        .await
        .expect("the engine still runs 5 s after its scheduler panicked while draining");
    assert!(!status.success(), "exit status {status}");
}

/// The child's exit status once it has exited, or `None` if it still runs after `wait`.
async fn exit_status(
    mut engine: EngineProcess,
    wait: Duration,
) -> Option<std::process::ExitStatus> {
    tokio::task::spawn_blocking(move || {
        let until = std::time::Instant::now() + wait;
        while std::time::Instant::now() < until {
            if let Some(status) = engine.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    })
    .await
    .unwrap()
}
