//! The worker HTTP/SSE API over the three real services, read by a real SSE client.

use std::time::{Duration, Instant};

use llorch_e2e::{SseEvent, SseReader, Stack, repo_root, test_model, tokenizer_dir};
use llorch_proto::engine::v1::InfoRequest;
use llorch_proto::engine::v1::engine_client::EngineClient;
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn stack() -> Stack {
    Stack::start(|_| {}, |_| {}).await.unwrap()
}

async fn execute(stack: &Stack, body: Value) -> reqwest::Response {
    http().post(stack.url("/execute")).json(&body).send().await.unwrap()
}

async fn events(stack: &Stack, body: Value) -> Vec<SseEvent> {
    let resp = execute(stack, body).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    SseReader::new(resp).collect().await
}

fn text_of(events: &[SseEvent]) -> String {
    events.iter().filter(|e| e.event == "token").map(|e| e.data["t"].as_str().unwrap()).collect()
}

fn tokenizer() -> llorch_tokenizer::BpeTokenizer {
    llorch_tokenizer::BpeTokenizer::from_dir(&tokenizer_dir()).unwrap()
}

fn reference_greedy(prompt: &str) -> Vec<u32> {
    let dir = repo_root().join(format!("fixtures/reference/tiny/{prompt}"));
    llorch_engine::reference::Meta::read(&dir).unwrap().greedy_24
}

async fn engine_running(stack: &Stack) -> u32 {
    EngineClient::new(stack.engine.channel())
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .running
}

async fn wait_engine_idle(stack: &Stack) {
    let until = Instant::now() + Duration::from_secs(10);
    while engine_running(stack).await != 0 {
        assert!(Instant::now() < until, "the engine still runs the job");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn greedy_execute_streams_the_reference_text_with_every_field() {
    let stack = stack().await;
    let resp = execute(
        &stack,
        json!({"job_id": "job-1", "prompt": "Hello.", "max_tokens": 24, "temperature": 0.0}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = SseReader::new(resp).collect().await;
    for e in &events {
        assert_eq!(e.data["type"], e.event.as_str(), "every frame carries its type twice");
    }
    assert_eq!(events.first().unwrap().event, "started");
    let started = &events[0].data;
    assert_eq!(
        (started["job_id"].as_str(), started["model"].as_str()),
        (Some("job-1"), Some("tiny"))
    );
    let at = started["started_at"].as_str().unwrap();
    assert!(
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).is_ok(),
        "{at}"
    );
    let tokens: Vec<&SseEvent> = events.iter().filter(|e| e.event == "token").collect();
    assert_eq!(tokens.len(), 24);
    assert_eq!(
        tokens.iter().map(|e| e.data["i"].as_u64().unwrap()).collect::<Vec<_>>(),
        (0..24).collect::<Vec<_>>()
    );
    let want = tokenizer().decode(&reference_greedy("hello"), true).unwrap();
    assert_eq!(text_of(&events), want);
    let end = events.last().unwrap();
    assert_eq!(end.event, "end");
    assert_eq!(
        (end.data["tokens_out"].as_u64(), end.data["stop_reason"].as_str()),
        (Some(24), Some("MAX_TOKENS"))
    );
    assert!(end.data["decode_time_ms"].is_u64());
    assert!(end.data.get("stop_sequence_matched").is_none());
    assert_eq!(events.len(), 26, "started, 24 tokens, end");
    // Metrics saw it.
    let metrics = http().get(stack.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("llorch_requests_total{outcome=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("llorch_generated_tokens_total 24"));
    assert!(metrics.contains("llorch_prompt_tokens_total 2"));
    assert!(metrics.contains("llorch_time_to_first_token_seconds_count 1"));
    assert!(metrics.contains("llorch_inter_token_latency_seconds_count 23"));
    assert!(metrics.contains("llorch_queue_depth 0"));
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn health_reports_the_model_and_the_cpu() {
    let stack = stack().await;
    let resp = http().get(stack.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h: Value = resp.json().await.unwrap();
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["vram_bytes"], 0);
    assert_eq!(h["model"], "tiny");
    assert_eq!(h["capabilities"], json!(["text-gen"]));
    assert_eq!(h["protocol"], "sse");
    assert_eq!(h["memory_architecture"], "cpu");
    assert_eq!((h["context_length"].as_u64(), h["vocab_size"].as_u64()), (Some(1024), Some(50257)));
    assert!(h["memory_bytes"].as_u64().unwrap() > 6_000_000);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn every_validation_rule_alone_and_together() {
    let stack = stack().await;
    let base = json!({"job_id": "v", "prompt": "Hi", "max_tokens": 4});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases = [
        (with("job_id", json!("")), "job_id", "non_empty"),
        (with("prompt", json!("")), "prompt", "length(1..=32768)"),
        (with("prompt", json!("x".repeat(32_769))), "prompt", "length(1..=32768)"),
        (with("max_tokens", json!(0)), "max_tokens", "range(1..=2048)"),
        (with("max_tokens", json!(2049)), "max_tokens", "range(1..=2048)"),
        (with("temperature", json!(3)), "temperature", "range(0.0..=2.0)"),
        (with("temperature", json!(-0.1)), "temperature", "range(0.0..=2.0)"),
        (with("top_p", json!(1.1)), "top_p", "range(0.0..=1.0)"),
        (with("repetition_penalty", json!(2.5)), "repetition_penalty", "range(0.0..=2.0)"),
        (with("min_p", json!(-1)), "min_p", "range(0.0..=1.0)"),
        (with("stop", json!(["a", "b", "c", "d", "e"])), "stop", "max_count(4)"),
        (with("stop", json!([""])), "stop", "non_empty"),
        (with("stop", json!(["y".repeat(101)])), "stop", "max_length(100)"),
    ];
    for (body, field, constraint) in cases {
        let resp = execute(&stack, body).await;
        assert_eq!(resp.status(), 400, "{field}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["errors"].as_array().unwrap().len(), 1, "{field}: {e}");
        assert_eq!(
            (e["errors"][0]["field"].as_str(), e["errors"][0]["constraint"].as_str()),
            (Some(field), Some(constraint)),
            "{e}"
        );
        assert!(e["errors"][0]["message"].as_str().unwrap().contains(field));
        assert_eq!(
            e["errors"][0].get("value").is_none(),
            field == "prompt" || field == "stop",
            "{e}"
        );
    }
    let resp = execute(
        &stack,
        json!({"job_id": "", "prompt": "", "max_tokens": 9999, "temperature": 3, "stop": [""]}),
    )
    .await;
    let e: Value = resp.json().await.unwrap();
    let fields: Vec<&str> =
        e["errors"].as_array().unwrap().iter().map(|x| x["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["job_id", "prompt", "max_tokens", "temperature", "stop"]);
    let resp = execute(&stack, with("temperature", json!(3))).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"errors":[{"field":"temperature","constraint":"range(0.0..=2.0)","message":"temperature must be at most 2.0 (got 3)","value":"3"}]})
    );
    // Still serving.
    assert!(!text_of(&events(&stack, with("temperature", json!(0))).await).is_empty());
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

/// max_tokens limits come from the engine (its `--max-new-tokens-limit` and the model's n_ctx)
/// and are printed as the integers they are.
#[tokio::test]
async fn max_tokens_limits_follow_the_engine_and_print_as_integers() {
    let stack = Stack::start(|e| e.max_new_tokens_limit = 16, |_| {}).await.unwrap();
    let body =
        |max_tokens: u64| json!({"job_id": "m", "prompt": "Hello.", "max_tokens": max_tokens});
    let resp = execute(&stack, body(20)).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"errors":[{"field":"max_tokens","constraint":"range(1..=16)","message":"max_tokens must be at most 16, the engine's limit for this model (got 20)","value":"20"}]})
    );
    let resp = execute(&stack, body(2049)).await;
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["errors"][0]["message"], "max_tokens must be at most 2048 (got 2049)", "{e}");
    // Within the engine's limit the job runs.
    let end = events(&stack, body(16)).await;
    assert_eq!(end.last().unwrap().data["type"], "end", "{end:?}");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn context_overflow_and_malformed_bodies_get_json_errors() {
    let stack = stack().await;
    // "Hello." is 2 tokens; 2 + 1023 > 1024.
    let resp =
        execute(&stack, json!({"job_id": "c", "prompt": "Hello.", "max_tokens": 1023})).await;
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["errors"][0]["constraint"], "context_length(1024)");
    let msg = e["errors"][0]["message"].as_str().unwrap();
    assert!(msg.contains("2 tokens") && msg.contains("1023"), "{msg}");
    assert_eq!(
        execute(&stack, json!({"job_id": "c", "prompt": "Hello.", "max_tokens": 1022}))
            .await
            .status(),
        200
    );

    let post = |body: &'static str, ct: &'static str| {
        http().post(stack.url("/execute")).header("content-type", ct).body(body).send()
    };
    for (body, ct, status) in [
        ("{not json", "application/json", 400),
        (r#"{"job_id":"x","prompt":"y","max_tokens":1}"#, "text/plain", 415),
        (r#"{"job_id":"x","prompt":"y"}"#, "application/json", 422),
        (r#"{"job_id":"x","prompt":"y","max_tokens":"many"}"#, "application/json", 422),
        (r#"[1,2,3]"#, "application/json", 422),
    ] {
        let resp = post(body, ct).await.unwrap();
        assert_eq!(resp.status(), status, "{body}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(
            (e["code"].as_str(), e["retriable"].as_bool()),
            (Some("INVALID_REQUEST"), Some(false)),
            "{e}"
        );
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // An oversized body.
    let big = json!({"job_id": "x", "prompt": "z".repeat(2 << 20), "max_tokens": 1});
    assert_eq!(execute(&stack, big).await.status(), 413);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_stop_string_spanning_tokens_is_never_streamed() {
    let stack = stack().await;
    let free = events(
        &stack,
        json!({"job_id": "free", "prompt": "Hello.", "max_tokens": 24, "temperature": 0}),
    )
    .await;
    let pieces: Vec<String> = free
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| e.data["t"].as_str().unwrap().to_owned())
        .collect();
    let full: String = pieces.concat();
    // A stop string made of the end of token 5 and the start of token 6.
    let (a, b) = (&pieces[5], &pieces[6]);
    let tail: String = a.chars().rev().take(2).collect::<Vec<_>>().into_iter().rev().collect();
    let head: String = b.chars().take(2).collect();
    let stop = format!("{tail}{head}");
    let cut = full.find(&stop).unwrap();
    let stopped = events(&stack, json!({"job_id": "stop", "prompt": "Hello.", "max_tokens": 24, "temperature": 0, "stop": [stop]})).await;
    assert_eq!(text_of(&stopped), full[..cut]);
    let end = stopped.last().unwrap();
    assert_eq!(
        (end.event.as_str(), end.data["stop_reason"].as_str()),
        ("end", Some("STOP_SEQUENCE"))
    );
    assert_eq!(end.data["stop_sequence_matched"].as_str(), Some(stop.as_str()));
    let n_tokens = stopped.iter().filter(|e| e.event == "token").count() as u64;
    assert_eq!(end.data["tokens_out"].as_u64(), Some(n_tokens));
    wait_engine_idle(&stack).await;
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

/// A model scripted to emit "naïve €5 👍 日本" one byte token at a time: every multi-byte
/// character is split over tokens.
fn scripted_text_model() -> (tempfile::TempDir, String, Vec<u32>) {
    let text = "naïve €5 👍 日本".to_owned();
    let tok = tokenizer();
    let script: Vec<u32> = text.bytes().map(|b| llorch_e2e::byte_token_id(&tok, b)).collect();
    let dir = tempfile::tempdir().unwrap();
    // "Hi" is one token.
    assert_eq!(tok.encode("Hi", false).unwrap().len(), 1);
    llorch_e2e::scripted_model(dir.path(), 1, &script).unwrap();
    (dir, text, script)
}

#[tokio::test]
async fn characters_split_across_tokens_arrive_whole() {
    let (dir, text, script) = scripted_text_model();
    let model = dir.path().to_path_buf();
    let stack = Stack::start(|c| c.model = model, |_| {}).await.unwrap();
    let evs = events(
        &stack,
        json!({"job_id": "utf8", "prompt": "Hi", "max_tokens": script.len(), "temperature": 0}),
    )
    .await;
    let pieces: Vec<&str> =
        evs.iter().filter(|e| e.event == "token").map(|e| e.data["t"].as_str().unwrap()).collect();
    assert_eq!(pieces.len(), script.len(), "one event per token");
    assert_eq!(pieces.concat(), text);
    // Each character comes out whole, once, with the token that completes it.
    let mut expected = Vec::new();
    let mut pending = Vec::new();
    for b in text.bytes() {
        pending.push(b);
        match std::str::from_utf8(&pending) {
            Ok(s) => {
                expected.push(s.to_owned());
                pending.clear();
            }
            Err(_) => expected.push(String::new()),
        }
    }
    assert_eq!(pieces, expected);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_multibyte_stop_string_split_over_byte_tokens_is_never_streamed() {
    let (dir, text, script) = scripted_text_model();
    let model = dir.path().to_path_buf();
    let stack = Stack::start(|c| c.model = model, |_| {}).await.unwrap();
    let evs = events(&stack, json!({"job_id": "s", "prompt": "Hi", "max_tokens": script.len(), "temperature": 0, "stop": ["€5 👍", "zzz"]})).await;
    assert_eq!(text_of(&evs), text[..text.find('€').unwrap()]);
    assert_eq!(evs.last().unwrap().data["stop_sequence_matched"], "€5 👍");
    wait_engine_idle(&stack).await;
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

async fn started_stream(stack: &Stack, body: Value) -> SseReader {
    let resp = execute(stack, body).await;
    assert_eq!(resp.status(), 200);
    let mut r = SseReader::new(resp);
    assert_eq!(r.next().await.unwrap().event, "started");
    r
}

/// A 1000-token greedy job, read up to its first token.
async fn decoding_stream(stack: &Stack, job_id: &str) -> SseReader {
    let mut r = started_stream(
        stack,
        json!({"job_id": job_id, "prompt": "Hello.", "max_tokens": 1000, "temperature": 0}),
    )
    .await;
    assert_eq!(r.next().await.unwrap().event, "token");
    r
}

/// The rest of a cancelled [`decoding_stream`]: it ends with `error` `CANCELLED`, long before
/// its 1000 tokens.
async fn assert_ends_cancelled(r: SseReader) {
    let rest = r.collect().await;
    let last = rest.last().unwrap();
    assert_eq!((last.event.as_str(), last.data["code"].as_str()), ("error", Some("CANCELLED")));
    assert!(rest.iter().filter(|e| e.event == "token").count() < 990);
}

#[tokio::test]
async fn cancel_during_decode_ends_with_cancelled_and_frees_the_engine() {
    let stack = stack().await;
    let r = decoding_stream(&stack, "long").await;
    let resp =
        http().post(stack.url("/cancel")).json(&json!({"job_id": "long"})).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    assert_ends_cancelled(r).await;
    wait_engine_idle(&stack).await;
    // Idempotent, also for unknown and finished jobs.
    for id in ["long", "never-existed"] {
        assert_eq!(
            http()
                .post(stack.url("/cancel"))
                .json(&json!({"job_id": id}))
                .send()
                .await
                .unwrap()
                .status(),
            202
        );
    }
    assert_eq!(
        http()
            .post(stack.url("/cancel"))
            .body("nope")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

/// `POST /cancel/{job_id}` with no body (the upstream harness's form) is `POST /cancel`: the
/// same 202, the same idempotence, the same `CANCELLED` end of the stream.
#[tokio::test]
async fn cancel_by_path_is_the_same_as_cancel_with_a_body() {
    let stack = stack().await;
    let r = decoding_stream(&stack, "by path/1").await;
    // The id is one path segment, percent-encoded like any client would.
    let resp = http().post(stack.url("/cancel/by%20path%2F1")).send().await.unwrap();
    assert_eq!(resp.status(), 202);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["job_id"].as_str(), body["running"].as_bool()),
        (Some("by path/1"), Some(true))
    );
    assert_ends_cancelled(r).await;
    wait_engine_idle(&stack).await;
    // Idempotent, also for unknown and finished jobs; a body, if sent, is ignored.
    for path in ["/cancel/by%20path%2F1", "/cancel/never-existed"] {
        let resp = http().post(stack.url(path)).body("ignored").send().await.unwrap();
        assert_eq!(resp.status(), 202, "{path}");
        assert_eq!(resp.json::<Value>().await.unwrap()["running"], false, "{path}");
    }
    // Not a valid path segment: a JSON error, and the worker keeps serving.
    let resp = http().post(stack.url("/cancel/%FF")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "INVALID_REQUEST");
    let events = events(
        &stack,
        json!({"job_id": "after", "prompt": "Hello.", "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(events.last().unwrap().event, "end");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn cancel_during_prefill_ends_with_cancelled_and_frees_the_engine() {
    // One-token prefill chunks make a long prompt take hundreds of steps.
    let stack = Stack::start(|c| c.prefill_chunk = 1, |_| {}).await.unwrap();
    let prompt = "word ".repeat(800);
    let r = started_stream(
        &stack,
        json!({"job_id": "pre", "prompt": prompt, "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(
        http()
            .post(stack.url("/cancel"))
            .json(&json!({"job_id": "pre"}))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let rest = r.collect().await;
    assert_eq!(
        rest.iter().filter(|e| e.event == "token").count(),
        0,
        "cancelled before the first token"
    );
    assert_eq!(rest.last().unwrap().data["code"], "CANCELLED");
    wait_engine_idle(&stack).await;
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_job() {
    let stack = stack().await;
    let mut r = started_stream(
        &stack,
        json!({"job_id": "gone", "prompt": "Hello.", "max_tokens": 1000, "temperature": 0}),
    )
    .await;
    assert_eq!(r.next().await.unwrap().event, "token");
    assert_eq!(engine_running(&stack).await, 1);
    drop(r);
    wait_engine_idle(&stack).await;
    let metrics = http().get(stack.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    let mut m = metrics;
    while !m.contains("outcome=\"client_gone\"") {
        assert!(Instant::now() < until, "{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = http().get(stack.url("/metrics")).send().await.unwrap().text().await.unwrap();
    }
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn more_requests_than_max_in_flight_get_429_with_retry_after() {
    let stack = Stack::start(|_| {}, |g| g.max_in_flight = 2).await.unwrap();
    let mut a = started_stream(
        &stack,
        json!({"job_id": "a", "prompt": "Hello.", "max_tokens": 60, "temperature": 0}),
    )
    .await;
    let mut b = started_stream(
        &stack,
        json!({"job_id": "b", "prompt": "Hi", "max_tokens": 60, "temperature": 0}),
    )
    .await;
    let resp = execute(&stack, json!({"job_id": "c", "prompt": "Hey", "max_tokens": 5})).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let e: Value = resp.json().await.unwrap();
    assert_eq!((e["code"].as_str(), e["retriable"].as_bool()), (Some("OVERLOADED"), Some(true)));
    let mut ends = Vec::new();
    for r in [&mut a, &mut b] {
        let mut last = None;
        while let Some(e) = r.next().await {
            last = Some(e);
        }
        ends.push(last.unwrap());
    }
    assert!(ends.iter().all(|e| e.event == "end" && e.data["tokens_out"] == 60), "{ends:?}");
    assert_eq!(
        execute(&stack, json!({"job_id": "d", "prompt": "Hey", "max_tokens": 2})).await.status(),
        200
    );
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_duplicate_running_job_id_is_refused() {
    let stack = stack().await;
    let _a = started_stream(
        &stack,
        json!({"job_id": "same", "prompt": "Hello.", "max_tokens": 500, "temperature": 0}),
    )
    .await;
    let resp = execute(&stack, json!({"job_id": "same", "prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(resp.status(), 409);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn losing_the_engine_mid_stream_gives_an_error_event_and_503_until_it_returns() {
    let (tokenizer, engine, gateway) = llorch_e2e::start_with_engine_process().await.unwrap();
    let port = engine.addr.port();
    let base = gateway.url();
    let post = |body: Value| http().post(format!("{base}/execute")).json(&body).send();

    let resp =
        post(json!({"job_id": "doomed", "prompt": "Hello.", "max_tokens": 1000, "temperature": 0}))
            .await
            .unwrap();
    let mut r = SseReader::new(resp);
    assert_eq!(r.next().await.unwrap().event, "started");
    assert_eq!(r.next().await.unwrap().event, "token");
    drop(engine); // SIGKILL
    let rest = r.collect().await;
    let last = rest.last().unwrap();
    assert_eq!(
        (last.event.as_str(), last.data["code"].as_str(), last.data["retriable"].as_bool()),
        ("error", Some("INFERENCE_FAILED"), Some(true)),
        "{last:?}"
    );
    let health = http().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "unhealthy");
    let resp = post(json!({"job_id": "x", "prompt": "Hi", "max_tokens": 2})).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "WORKER_UNHEALTHY");

    // The engine comes back on the same port; the gateway reconnects by itself.
    let engine = llorch_e2e::EngineProcess::spawn(port, &test_model()).unwrap();
    llorch_e2e::wait_http_ok(&format!("{base}/health")).await.unwrap();
    let resp =
        post(json!({"job_id": "back", "prompt": "Hello.", "max_tokens": 3, "temperature": 0}))
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let evs = SseReader::new(resp).collect().await;
    assert_eq!(evs.last().unwrap().event, "end", "{evs:?}");
    gateway.stop().await.unwrap();
    drop(engine);
    tokenizer.stop().await.unwrap();
}

#[tokio::test]
async fn correlation_ids_are_echoed_when_uuids_and_generated_otherwise() {
    let stack = stack().await;
    let id = "6f1c2b1e-8c2a-4c55-9a43-0f6a3c1e2d4b";
    let resp =
        http().get(stack.url("/health")).header("x-correlation-id", id).send().await.unwrap();
    assert_eq!(resp.headers()["x-correlation-id"], id);
    for sent in [None, Some("not-a-uuid")] {
        let mut req = http().get(stack.url("/health"));
        if let Some(s) = sent {
            req = req.header("x-correlation-id", s);
        }
        let got =
            req.send().await.unwrap().headers()["x-correlation-id"].to_str().unwrap().to_owned();
        let parsed = uuid::Uuid::parse_str(&got).unwrap();
        assert_eq!(parsed.get_version_num(), 4);
    }
    let resp = http()
        .post(stack.url("/execute"))
        .header("x-correlation-id", id)
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .json(&json!({"job_id": "corr", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-correlation-id"], id);
    assert_eq!(SseReader::new(resp).collect().await.last().unwrap().event, "end");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_refuses_new_jobs_and_lets_running_streams_finish() {
    let Stack { tokenizer, engine, gateway } = stack().await;
    let base = gateway.url();
    let resp = http()
        .post(format!("{base}/execute"))
        .json(&json!({"job_id": "a", "prompt": "Hello.", "max_tokens": 300, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let mut r = SseReader::new(resp);
    assert_eq!(r.next().await.unwrap().event, "started");
    let stopping = tokio::spawn(gateway.stop());
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = http()
            .post(format!("{base}/execute"))
            .json(&json!({"job_id": "late", "prompt": "Hi", "max_tokens": 2}))
            .send()
            .await;
        match resp {
            Ok(r) if r.status() == 503 => {
                assert_eq!(r.json::<Value>().await.unwrap()["code"], "WORKER_UNHEALTHY");
                break;
            }
            Ok(r) => assert!(Instant::now() < until, "still accepting: {}", r.status()),
            Err(e) => panic!("the gateway stopped listening while a stream was running: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rest = r.collect().await;
    let end = rest.last().unwrap();
    assert_eq!((end.event.as_str(), end.data["tokens_out"].as_u64()), ("end", Some(300)));
    stopping.await.unwrap().unwrap();
    engine.stop().await.unwrap();
    tokenizer.stop().await.unwrap();
}
