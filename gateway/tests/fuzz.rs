//! Property-based fuzzing of what the gateway reads from and writes to the network: the
//! `/execute` and `/v1/completions` bodies (any JSON, any bytes: a validation error or a valid
//! request, never a panic) and the SSE frames (any text: frames a strict SSE reader parses back
//! to the same payload). See docs/RELIABILITY.md ("Fuzzing") for why this is proptest and not
//! cargo-fuzz, and for the long-run command: `PROPTEST_CASES` sets the number of cases.

use axum::response::IntoResponse;
use axum::response::sse::{Event, Sse};
use llorch_gateway::openai::request::CompletionRequest;
use llorch_gateway::sse::SseEvent;
use llorch_gateway::validate::{ExecuteRequest, MAX_STOP_BYTES};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Map, Value, json};

/// The field names both bodies know, so that generated objects reach deep into validation.
const FIELDS: &[&str] = &[
    "job_id",
    "prompt",
    "max_tokens",
    "temperature",
    "seed",
    "top_p",
    "top_k",
    "repetition_penalty",
    "min_p",
    "stop",
    "model",
    "n",
    "best_of",
    "echo",
    "stream",
    "stream_options",
    "include_usage",
    "logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "suffix",
    "user",
    "ignore_eos",
    "stop_token_ids",
];

/// Any JSON value, with numbers at and beyond every edge (huge, negative, fractional, exponent
/// forms) and strings with control characters, NUL and non-ASCII.
fn any_json() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        (-3i64..70_000).prop_map(Value::from),
        (-1.0f64..3.0).prop_map(Value::from),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number,
        ".{0,40}".prop_map(Value::String),
        "[\u{0}\r\n\t a-z<|>é日\u{fffd}]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(FIELDS), inner), 0..8).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<Map<_, _>>())
            }),
        ]
    })
}

/// A body object: known fields with any JSON, or a valid body with up to three fields set to
/// any JSON (so that half the cases get past parsing into the range checks).
fn any_body() -> impl Strategy<Value = Value> {
    let anything = prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..12)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
    let near_valid = prop::collection::vec((prop::sample::select(FIELDS), any_json()), 0..4)
        .prop_map(|kv| {
            let mut body =
                json!({"job_id": "j", "model": "tiny", "prompt": "Hello", "max_tokens": 4});
            for (k, v) in kv {
                body[k] = v;
            }
            body
        });
    prop_oneof![anything, near_valid]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(512),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_execute_body_is_a_validation_error_or_a_request_within_limits(body in any_body()) {
        let Ok(request) = serde_json::from_value::<ExecuteRequest>(body) else { return Ok(()) };
        match request.validate() {
            Ok(valid) => {
                let t = valid.temperature;
                prop_assert!((0.0..=2.0).contains(&t), "temperature {t}");
                prop_assert!((1..=2048).contains(&valid.max_tokens));
                prop_assert!(valid.stop.len() <= 4);
                prop_assert!(valid.stop.iter().all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES));
                prop_assert!(!valid.job_id.is_empty());
            }
            Err(errors) => {
                prop_assert!(!errors.errors.is_empty());
                // The refusal renders (the 400 body the client gets).
                let resp = errors.into_response();
                prop_assert_eq!(resp.status(), 400);
            }
        }
    }

    #[test]
    fn any_completion_body_is_an_openai_error_or_a_request(body in any_body(), vocab in 1u32..60_000) {
        let bytes = serde_json::to_vec(&body).unwrap();
        match CompletionRequest::parse(&bytes).and_then(|r| r.validate(vocab)) {
            Ok(valid) => prop_assert!(valid.job.max_tokens >= 1),
            Err(e) => {
                prop_assert!(e.status.is_client_error(), "{e:?}");
                prop_assert!(e.body()["error"]["message"].is_string());
            }
        }
    }

    #[test]
    fn any_bytes_as_a_completion_body_are_refused_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = CompletionRequest::parse(&bytes) {
            prop_assert!(e.status.is_client_error());
        }
    }

    #[test]
    fn any_token_text_gives_frames_that_parse_back_to_it(
        texts in prop::collection::vec(any::<String>(), 1..6),
        raw in "[\u{0}\r\na-z:é ]{1,30}",
    ) {
        // Worker API token frames, and a raw data frame as the OpenAI stream writes.
        let mut events: Vec<Event> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| SseEvent::Token { t: t.clone(), i: i as u32 }.frame())
            .collect();
        events.push(Event::default().data(raw.clone()));
        let body = render(events);
        let frames = parse_sse(&body);
        prop_assert_eq!(frames.len(), texts.len() + 1, "{:?}", body);
        for (i, (frame, text)) in frames.iter().zip(&texts).enumerate() {
            prop_assert_eq!(frame.0.as_str(), "token");
            let data: Value = serde_json::from_str(&frame.1).expect("data is one JSON value");
            prop_assert_eq!(&data, &json!({"type": "token", "t": text, "i": i}));
        }
        // A raw payload (never empty: an empty one is no event at all) keeps its text, each
        // `\r` and `\n` in it a line break (axum cuts at both, so `\r\n` reads back as two; the
        // gateway's own payloads are JSON, whose strings escape both).
        let want = raw.replace('\r', "\n");
        prop_assert_eq!(&frames[texts.len()].1, &want);
    }
}

/// The bytes an SSE response of `events` sends.
fn render(events: Vec<Event>) -> String {
    let stream = futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>));
    let resp = Sse::new(stream).into_response();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let bytes = runtime.block_on(axum::body::to_bytes(resp.into_body(), usize::MAX)).unwrap();
    String::from_utf8(bytes.to_vec()).expect("SSE is UTF-8")
}

/// A strict reader after the HTML standard's event-stream parsing: lines end at `\r\n`, `\r`
/// or `\n`; a blank line dispatches; `data` lines join with `\n`. Returns (event, data) pairs.
fn parse_sse(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (mut event, mut data, mut has_data) = (String::new(), String::new(), false);
    let normalized = body.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalized.split('\n') {
        if line.is_empty() {
            if has_data {
                out.push((std::mem::take(&mut event), std::mem::take(&mut data)));
            }
            has_data = false;
            data.clear();
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_owned(),
            "data" => {
                if has_data {
                    data.push('\n');
                }
                data.push_str(value);
                has_data = true;
            }
            _ => {}
        }
    }
    out
}

/// `PROPTEST_CASES` when set (the long run in docs/RELIABILITY.md), else `default`: a
/// `cases` written in the config would override the variable.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
