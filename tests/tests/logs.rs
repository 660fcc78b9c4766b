//! Prompts and generated text never appear in the logs at INFO or above: the services' log
//! lines are captured here (this process's subscriber, at INFO, JSON with every span field) while
//! requests carry a marker in every place a client can put text, including requests that fail.

use std::io::Write;
use std::sync::{Arc, Mutex};

use llorch_e2e::{SseReader, Stack};
use serde_json::json;

const MARK: &str = "zq7secretprompt";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn prompts_and_generated_text_are_not_logged_at_info_or_above() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::INFO)
        .with_current_span(true)
        .with_span_list(true)
        .with_writer(move || writer.clone())
        .init();
    let stack = Stack::start(|_| {}, |_| {}).await.unwrap();
    let http = reqwest::Client::new();
    let prompt = format!("{MARK} Hello.");
    let stop = format!("{MARK}-stop");

    let execute = json!({"job_id": "j1", "prompt": prompt, "max_tokens": 12, "stop": [stop]});
    let resp = http.post(stack.url("/execute")).json(&execute).send().await.unwrap();
    let events = SseReader::new(resp).collect().await;
    let generated: String = events
        .iter()
        .filter(|e| e.event == "token")
        .map(|e| e.data["t"].as_str().unwrap())
        .collect();
    let completion = json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "stop": stop,
        "user": "some-user", "echo": true, "logprobs": 2});
    let resp = http.post(stack.url("/v1/completions")).json(&completion).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let tokenized = json!({"model": "tiny", "prompt": prompt});
    http.post(stack.url("/tokenize")).json(&tokenized).send().await.unwrap();
    // Refused ones: a bad field beside the prompt, a prompt over the context, a bad stop.
    let refusals = [
        json!({"job_id": "j2", "prompt": prompt, "max_tokens": 4, "temperature": 9.0}),
        json!({"job_id": "j3", "prompt": prompt.repeat(400), "max_tokens": 4}),
        json!({"job_id": "j4", "prompt": prompt, "max_tokens": 4, "stop": [MARK.repeat(20)]}),
    ];
    for body in refusals {
        let resp = http.post(stack.url("/execute")).json(&body).send().await.unwrap();
        assert!(resp.status().is_client_error(), "{body}");
    }
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("job finished"), "the capture works: {text:.2000}");
    assert!(!text.contains(MARK), "a prompt or stop string was logged:\n{text}");
    let generated = generated.trim();
    if generated.chars().count() >= 6 {
        assert!(!text.contains(generated), "generated text {generated:?} was logged");
    }
}
