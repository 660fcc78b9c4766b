//! The OpenAI-compatible routes over the three real services: completions equal to what
//! `/execute` streams for the same greedy request, streaming, logprobs, stop, token-id prompts,
//! every kind of bad input (with the server still serving after each), admission and
//! cancellation shared with `/execute`.

use std::time::{Duration, Instant};

use llorch_e2e::{SseEvent, SseReader, Stack};
use llorch_proto::engine::v1::InfoRequest;
use llorch_proto::engine::v1::engine_client::EngineClient;
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn stack() -> Stack {
    Stack::start(|_| {}, |_| {}).await.unwrap()
}

async fn post(stack: &Stack, path: &str, body: Value) -> reqwest::Response {
    http().post(stack.url(path)).json(&body).send().await.unwrap()
}

/// A non-streamed completion that must succeed.
async fn complete(stack: &Stack, body: Value) -> Value {
    let resp = post(stack, "/v1/completions", body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The text `/execute` streams for the same greedy request.
async fn execute_text(stack: &Stack, prompt: &str, max_tokens: u32) -> String {
    let body = json!({"job_id": format!("ref-{}", uuid::Uuid::new_v4()), "prompt": prompt,
        "max_tokens": max_tokens, "temperature": 0});
    let resp = post(stack, "/execute", body).await;
    assert_eq!(resp.status(), 200);
    let events = SseReader::new(resp).collect().await;
    assert_eq!(events.last().unwrap().event, "end");
    events.iter().filter(|e| e.event == "token").map(|e| e.data["t"].as_str().unwrap()).collect()
}

/// Asserts an OpenAI-shaped error with `status` and `param`; returns its message.
async fn assert_error(resp: reqwest::Response, status: u16, param: Option<&str>) -> String {
    assert_eq!(resp.status(), status);
    let body: Value = resp.json().await.unwrap();
    let e = &body["error"];
    assert!(e["type"].is_string() && e.get("code").is_some(), "{body}");
    assert_eq!(e["param"].as_str(), param, "{body}");
    e["message"].as_str().unwrap().to_owned()
}

async fn engine_running(stack: &Stack) -> u32 {
    let mut engine = EngineClient::new(stack.engine.channel());
    engine.info(InfoRequest {}).await.unwrap().into_inner().running
}

async fn wait_engine_idle(stack: &Stack) {
    let until = Instant::now() + Duration::from_secs(10);
    while engine_running(stack).await != 0 {
        assert!(Instant::now() < until, "the engine still runs the job");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `data:` payloads of a streamed completion, `[DONE]` included.
async fn chunks(stack: &Stack, body: Value) -> Vec<Value> {
    let resp = post(stack, "/v1/completions", body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events: Vec<SseEvent> = SseReader::new(resp).collect().await;
    assert!(events.iter().all(|e| e.event.is_empty()), "OpenAI chunks carry no event name");
    events.into_iter().map(|e| e.data).collect()
}

#[tokio::test]
async fn models_lists_the_served_model_with_its_context_length() {
    let stack = stack().await;
    let v: Value = http().get(stack.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["object"], "list");
    let models = v["data"].as_array().unwrap();
    assert_eq!(models.len(), 1);
    assert_eq!(
        (models[0]["id"].as_str(), models[0]["object"].as_str()),
        (Some("tiny"), Some("model"))
    );
    assert_eq!(models[0]["context_length"], 1024);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_greedy_completion_is_the_execute_text_with_usage() {
    let stack = stack().await;
    let want = execute_text(&stack, "Hello.", 24).await;
    let v = complete(
        &stack,
        json!({"model": "tiny", "prompt": "Hello.", "max_tokens": 24, "temperature": 0}),
    )
    .await;
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], "tiny");
    let choice = &v["choices"][0];
    assert_eq!(choice["text"].as_str().unwrap(), want);
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null());
    let prompt_tokens = llorch_tokenizer::BpeTokenizer::from_dir(&llorch_e2e::tokenizer_dir())
        .unwrap()
        .encode("Hello.", false)
        .unwrap()
        .len();
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 24, "total_tokens": prompt_tokens + 24})
    );
    // max_tokens defaults to 16 (OpenAI's default).
    let v = complete(&stack, json!({"prompt": "Hello.", "temperature": 0})).await;
    assert_eq!(v["usage"]["completion_tokens"], 16);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_streamed_completion_concatenates_to_the_same_text_then_done() {
    let stack = stack().await;
    let want = execute_text(&stack, "Hello.", 24).await;
    let body = json!({"prompt": "Hello.", "max_tokens": 24, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}});
    let data = chunks(&stack, body).await;
    assert_eq!(data.last().unwrap(), &Value::String("[DONE]".into()));
    let objects = &data[..data.len() - 1];
    let (usage_chunk, parts) = objects.split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 24);
    let text: String = parts.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, want);
    let (last, tokens) = parts.split_last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(
        tokens.iter().all(|c| c["choices"][0]["finish_reason"].is_null() && c["usage"].is_null())
    );
    assert!(tokens.len() > 1, "tokens are streamed one by one");
    // Without include_usage: no usage chunk, no usage field.
    let data = chunks(&stack, json!({"prompt": "Hi", "max_tokens": 3, "stream": true})).await;
    assert!(data.iter().all(|c| c.get("usage").is_none()), "{data:?}");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn logprobs_have_the_openai_shape_and_the_greedy_token_is_the_top_one() {
    let stack = stack().await;
    let v = complete(
        &stack,
        json!({"prompt": "Hello.", "max_tokens": 8, "temperature": 0, "logprobs": 3}),
    )
    .await;
    let text = v["choices"][0]["text"].as_str().unwrap();
    let lp = &v["choices"][0]["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    let offsets = lp["text_offset"].as_array().unwrap();
    for list in [tokens, token_logprobs, top, offsets] {
        assert_eq!(list.len(), 8);
    }
    for i in 0..8 {
        let logprob = token_logprobs[i].as_f64().unwrap();
        assert!(logprob <= 0.0);
        let alternatives = top[i].as_object().unwrap();
        assert!((1..=3).contains(&alternatives.len()));
        let best = alternatives.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert_eq!(logprob, best, "greedy picks the most likely token at step {i}");
        assert_eq!(alternatives[tokens[i].as_str().unwrap()].as_f64(), Some(logprob));
    }
    let offsets: Vec<u64> = offsets.iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
    assert!(offsets.iter().all(|&o| o as usize <= text.chars().count()));
    // Streamed: one chunk per token, each with its one-token logprobs.
    let body = json!({"prompt": "Hello.", "max_tokens": 8, "temperature": 0, "logprobs": 2, "stream": true});
    let data = chunks(&stack, body).await;
    let with_lp: Vec<&Value> =
        data.iter().filter(|c| c["choices"][0]["logprobs"].is_object()).collect();
    assert_eq!(with_lp.len(), 8);
    for (i, c) in with_lp.iter().enumerate() {
        let lp = &c["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"][0], tokens[i]);
        assert_eq!(lp["text_offset"][0], offsets[i]);
    }
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_stop_string_ends_the_text_before_it_with_finish_reason_stop() {
    let stack = stack().await;
    let full = execute_text(&stack, "Hello.", 24).await;
    // A stop string taken from the middle of the greedy text.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = &full[..full.find(&stop).unwrap()];
    let v = complete(
        &stack,
        json!({"prompt": "Hello.", "max_tokens": 24, "temperature": 0, "stop": stop}),
    )
    .await;
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let v = complete(
        &stack,
        json!({"prompt": "Hello.", "max_tokens": 24, "temperature": 0, "stop": ["\u{1}", stop]}),
    )
    .await;
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), cut);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_token_id_prompt_and_echo_give_the_text_prompt_result() {
    let stack = stack().await;
    let ids = llorch_tokenizer::BpeTokenizer::from_dir(&llorch_e2e::tokenizer_dir())
        .unwrap()
        .encode("Hello.", false)
        .unwrap();
    let by_text =
        complete(&stack, json!({"prompt": "Hello.", "max_tokens": 10, "temperature": 0})).await;
    let by_ids = complete(&stack, json!({"prompt": ids, "max_tokens": 10, "temperature": 0})).await;
    assert_eq!(by_ids["choices"][0]["text"], by_text["choices"][0]["text"]);
    assert_eq!(by_ids["usage"], by_text["usage"]);
    let echoed = complete(
        &stack,
        json!({"prompt": [ids], "max_tokens": 10, "temperature": 0, "echo": true, "logprobs": 1}),
    )
    .await;
    let text = by_text["choices"][0]["text"].as_str().unwrap();
    assert_eq!(echoed["choices"][0]["text"].as_str().unwrap(), format!("Hello.{text}"));
    let lp = &echoed["choices"][0]["logprobs"];
    let n = ids.len();
    assert_eq!(lp["tokens"].as_array().unwrap().len(), n + 10);
    assert!(lp["token_logprobs"].as_array().unwrap()[..n].iter().all(Value::is_null));
    assert_eq!(lp["text_offset"][n], 6, "the first generated token starts after the echo");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let stack = Stack::start(|_| {}, |g| g.max_body_bytes = 4096).await.unwrap();
    let ok = json!({"prompt": "Hi", "max_tokens": 2});
    let raw = |body: &'static str| {
        http()
            .post(stack.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let cases: Vec<(reqwest::Response, u16, Option<&str>, &str)> = vec![
        (raw("{\"prompt\": \"Hi\"").await.unwrap(), 400, None, "not valid JSON"),
        (raw("[1, 2]").await.unwrap(), 400, None, "JSON object"),
        (
            post(&stack, "/v1/completions", json!({"prompt": "Hi", "temperature": "warm"})).await,
            400,
            Some("temperature"),
            "invalid type",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 1.5})).await,
            400,
            Some("max_tokens"),
            "invalid type",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": "Hi", "temperature": 3})).await,
            400,
            Some("temperature"),
            "temperature must be at most 2.0 (got 3)",
        ),
        (
            post(
                &stack,
                "/v1/completions",
                json!({"prompt": "Hi", "top_p": -1, "presence_penalty": 9}),
            )
            .await,
            400,
            Some("top_p"),
            "presence_penalty must be at most 2.0",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": "Hi", "logprobs": 6})).await,
            400,
            Some("logprobs"),
            "logprobs must be at most 5 (got 6)",
        ),
        (
            post(
                &stack,
                "/v1/completions",
                json!({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}),
            )
            .await,
            400,
            Some("stop"),
            "at most 4",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": "Hi", "logit_bias": {"x": 1}})).await,
            400,
            Some("logit_bias"),
            "token ids",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": "Hi", "n": 2})).await,
            400,
            Some("n"),
            "only n = 1",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": ""})).await,
            400,
            Some("prompt"),
            "prompt must be 1 to",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": []})).await,
            400,
            Some("prompt"),
            "prompt must be 1 to",
        ),
        (
            post(&stack, "/v1/completions", json!({"max_tokens": 3})).await,
            400,
            Some("prompt"),
            "required",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": ["a", "b"]})).await,
            400,
            Some("prompt"),
            "2 prompts",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": [15496, 50257]})).await,
            400,
            Some("prompt"),
            "token id 50257 is not below the vocabulary size 50257",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": "Hi", "stop_token_ids": [70000]}))
                .await,
            400,
            Some("stop_token_ids"),
            "70000",
        ),
        (
            post(&stack, "/v1/completions", json!({"model": "gpt-4", "prompt": "Hi"})).await,
            404,
            Some("model"),
            "gpt-4",
        ),
        (
            post(&stack, "/v1/completions", json!({"prompt": "x".repeat(5000)})).await,
            413,
            None,
            "length limit",
        ),
        (
            post(
                &stack,
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "Hi"}]}),
            )
            .await,
            400,
            Some("messages"),
            "no chat template",
        ),
    ];
    for (resp, status, param, part) in cases {
        let message = assert_error(resp, status, param).await;
        assert!(message.contains(part), "{part:?} not in {message:?}");
        assert_eq!(
            post(&stack, "/v1/completions", ok.clone()).await.status(),
            200,
            "still serving after {part:?}"
        );
    }
    let resp = post(&stack, "/v1/completions", json!({"model": "gpt-4", "prompt": "Hi"})).await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_context_overflow_names_both_numbers() {
    let stack = stack().await;
    let resp =
        post(&stack, "/v1/completions", json!({"prompt": "Hello.", "max_tokens": 1023})).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert_eq!(body["error"]["param"], "max_tokens");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("max_tokens (1023)") && message.contains("1024"), "{message}");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip_through_the_tokenizer() {
    let stack = stack().await;
    let want = llorch_tokenizer::BpeTokenizer::from_dir(&llorch_e2e::tokenizer_dir())
        .unwrap()
        .encode("Hello, wörld!", false)
        .unwrap();
    let v: Value =
        post(&stack, "/tokenize", json!({"prompt": "Hello, wörld!"})).await.json().await.unwrap();
    assert_eq!(v["tokens"], json!(want));
    assert_eq!(
        (v["count"].as_u64(), v["max_model_len"].as_u64()),
        (Some(want.len() as u64), Some(1024))
    );
    let llama: Value =
        post(&stack, "/tokenize", json!({"content": "Hello, wörld!"})).await.json().await.unwrap();
    assert_eq!(llama["tokens"], v["tokens"]);
    let back: Value =
        post(&stack, "/detokenize", json!({"tokens": want})).await.json().await.unwrap();
    assert_eq!(
        (back["prompt"].as_str(), back["content"].as_str()),
        (Some("Hello, wörld!"), Some("Hello, wörld!"))
    );
    let resp = post(&stack, "/detokenize", json!({"tokens": [99999]})).await;
    assert_error(resp, 400, Some("tokens")).await;
    let resp = post(&stack, "/tokenize", json!({"model": "other", "prompt": "x"})).await;
    assert_error(resp, 404, Some("model")).await;
    let resp = post(&stack, "/tokenize", json!({"text": "x"})).await;
    assert_error(resp, 400, Some("prompt")).await;
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_cancels_its_job_and_it_is_counted() {
    let stack = stack().await;
    let body = json!({"prompt": "Hello.", "max_tokens": 1000, "temperature": 0, "stream": true});
    let resp = post(&stack, "/v1/completions", body).await;
    assert_eq!(resp.status(), 200);
    let mut r = SseReader::new(resp);
    assert!(r.next().await.unwrap().data["choices"].is_array());
    assert_eq!(engine_running(&stack).await, 1);
    drop(r);
    wait_engine_idle(&stack).await;
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let m = http().get(stack.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if m.contains("outcome=\"client_gone\"") {
            break;
        }
        assert!(Instant::now() < until, "{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn admission_is_shared_with_execute_429_with_retry_after() {
    let stack = Stack::start(|_| {}, |g| g.max_in_flight = 1).await.unwrap();
    let resp = post(
        &stack,
        "/execute",
        json!({"job_id": "hold", "prompt": "Hello.", "max_tokens": 200, "temperature": 0}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut hold = SseReader::new(resp);
    assert_eq!(hold.next().await.unwrap().event, "started");
    let resp = post(&stack, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(hold.collect().await.last().unwrap().event, "end");
    let correlation = uuid::Uuid::new_v4().to_string();
    let resp = http()
        .post(stack.url("/v1/completions"))
        .header("x-correlation-id", &correlation)
        .json(&json!({"prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-correlation-id"], correlation.as_str());
    let m = http().get(stack.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(m.contains("llorch_requests_total{outcome=\"overloaded\"} 1"), "{m}");
    assert!(m.contains("llorch_requests_total{outcome=\"ok\"} 2"), "{m}");
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_that_leaves_before_a_whole_completion_cancels_its_job() {
    use tokio::io::AsyncWriteExt;
    let stack = stack().await;
    let body = json!({"prompt": "Hello.", "max_tokens": 1000, "temperature": 0}).to_string();
    let mut conn = tokio::net::TcpStream::connect(stack.gateway.addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: llorch\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while engine_running(&stack).await != 1 {
        assert!(Instant::now() < until, "the job never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(conn);
    wait_engine_idle(&stack).await;
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let m = http().get(stack.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if m.contains("outcome=\"client_gone\"") {
            assert!(!m.contains("outcome=\"ok\""), "the job ran to its end: {m}");
            break;
        }
        assert!(Instant::now() < until, "{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn an_engine_that_is_down_gives_503_in_openai_shape() {
    // A real process: killing it closes every connection, as a crash does.
    let (tokenizer, engine, gateway) = llorch_e2e::start_with_engine_process().await.unwrap();
    let url = |path: &str| format!("{}{path}", gateway.url());
    let complete = || {
        http().post(url("/v1/completions")).json(&json!({"prompt": "Hi", "max_tokens": 2})).send()
    };
    assert_eq!(complete().await.unwrap().status(), 200);
    drop(engine); // SIGKILL
    let resp = complete().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert_eq!(body["error"]["code"], "worker_unhealthy", "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("engine"), "{body}");
    gateway.stop().await.unwrap();
    tokenizer.stop().await.unwrap();
}

/// The engine dies (SIGKILL) in the middle of a streamed completion: the stream ends with an
/// `error` chunk (retriable, server_error) and `[DONE]`, never a silent end or a hang; the
/// gateway answers 503 until the engine is back on its port, then completes again.
#[tokio::test]
async fn an_engine_killed_mid_stream_ends_the_completion_with_an_error_chunk_then_done() {
    let (tokenizer, engine, gateway) = llorch_e2e::start_with_engine_process().await.unwrap();
    let port = engine.addr.port();
    let url = |path: &str| format!("{}{path}", gateway.url());
    let body = json!({"prompt": "Hello.", "max_tokens": 1000, "temperature": 0, "stream": true});
    let resp = http().post(url("/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut r = SseReader::new(resp);
    let first = r.next().await.unwrap();
    assert!(first.data["choices"][0]["text"].is_string(), "{first:?}");
    drop(engine); // SIGKILL
    let rest = tokio::time::timeout(Duration::from_secs(10), r.collect()).await.unwrap();
    let n = rest.len();
    assert!(n >= 2, "{rest:?}");
    assert_eq!(rest[n - 1].data, "[DONE]", "{rest:?}");
    let error = &rest[n - 2].data["error"];
    assert_eq!(error["type"], "server_error", "{rest:?}");
    let resp = http().post(url("/v1/completions")).json(&json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(resp.send().await.unwrap().status(), 503);

    let engine = llorch_e2e::EngineProcess::spawn(port, &llorch_e2e::test_model()).unwrap();
    llorch_e2e::wait_http_ok(&url("/health")).await.unwrap();
    let resp = http().post(url("/v1/completions")).json(&json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(resp.send().await.unwrap().status(), 200);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let in_flight = llorch_e2e::gateway_in_flight(&gateway.url()).await.unwrap();
        if in_flight == 0.0 {
            break;
        }
        assert!(Instant::now() < until, "in-flight not back to 0: {in_flight}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.stop().await.unwrap();
    drop(engine);
    tokenizer.stop().await.unwrap();
}

/// SIGTERM while a completion streams: new completions get 503 (OpenAI shape) at once, the
/// running one streams to its last token and `[DONE]`, then the gateway returns.
#[tokio::test]
async fn shutdown_refuses_new_completions_and_lets_running_streams_finish() {
    let Stack { tokenizer, engine, gateway } = stack().await;
    let base = gateway.url();
    let body = json!({"prompt": "Hello.", "max_tokens": 300, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}});
    let resp = http().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut r = SseReader::new(resp);
    r.next().await.unwrap();
    let stopping = tokio::spawn(gateway.stop());
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let late = json!({"prompt": "Hi", "max_tokens": 2});
        match http().post(format!("{base}/v1/completions")).json(&late).send().await {
            Ok(resp) if resp.status() == 503 => {
                let body: Value = resp.json().await.unwrap();
                assert_eq!(body["error"]["type"], "server_error", "{body}");
                break;
            }
            Ok(resp) => assert!(Instant::now() < until, "still accepting: {}", resp.status()),
            Err(e) => panic!("the gateway stopped listening while a stream was running: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rest = r.collect().await;
    let n = rest.len();
    assert_eq!(rest[n - 1].data, "[DONE]");
    assert_eq!(rest[n - 2].data["usage"]["completion_tokens"], 300, "{:?}", &rest[n - 2]);
    stopping.await.unwrap().unwrap();
    engine.stop().await.unwrap();
    tokenizer.stop().await.unwrap();
}
