//! Stalled upstreams: the engine or the tokenizer process is frozen with SIGSTOP (it keeps its
//! sockets open and answers nothing, as a wedged or swapped-out process does). The gateway's
//! callers get a clear TIMEOUT within `--request-timeout` (never a hang), the gateway keeps
//! serving, and once the process is continued everything works again and nothing is left over.

use std::time::{Duration, Instant};

use llorch_e2e::{EngineProcess, Service, SseReader, test_model};
use serde_json::{Value, json};

const TIMEOUT_SECS: f64 = 1.5;

/// A gateway (in this process) over the two upstream processes.
async fn gateway(tokenizer: &EngineProcess, engine: &EngineProcess) -> Service {
    let mut config = llorch_gateway::GatewayConfig::new(tokenizer.url(), engine.url());
    config.request_timeout = TIMEOUT_SECS;
    let gateway = Service::spawn(move |listener, shutdown| {
        llorch_gateway::server::run(config, listener, shutdown)
    })
    .await
    .unwrap();
    llorch_e2e::wait_http_ok(&format!("{}/health", gateway.url())).await.unwrap();
    gateway
}

/// Runs `/execute` and `/v1/completions` (streamed and not) once each and returns, for each,
/// how it ended: the last SSE event's code (`end` for a finished stream), or the HTTP status
/// and the body's code; and the longest any took.
async fn run_all(gateway: &Service, tag: &str) -> (Vec<String>, Duration) {
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", gateway.url());
    let mut out = Vec::new();
    let mut longest = Duration::ZERO;
    let bodies = [
        ("/execute", json!({"job_id": format!("{tag}-x"), "prompt": "Hello.", "max_tokens": 4})),
        ("/v1/completions", json!({"model": "tiny", "prompt": "Hello.", "max_tokens": 4})),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "Hello.", "max_tokens": 4, "stream": true}),
        ),
    ];
    for (path, body) in bodies {
        let started = Instant::now();
        let resp = http.post(url(path)).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        let sse = resp.headers()["content-type"] == "text/event-stream";
        let ended = if sse {
            let events = SseReader::new(resp).collect().await;
            let last = events.last().cloned().expect("a stream has a last event");
            match (last.event.as_str(), &last.data) {
                ("end", _) => "end".to_owned(),
                ("error", data) => format!("error {}", data["code"].as_str().unwrap_or("?")),
                (_, Value::String(done)) if done == "[DONE]" => {
                    let error = events.iter().rev().find_map(|e| e.data.get("error").cloned());
                    error.map_or("end".to_owned(), |e| format!("error {}", e["code"]))
                }
                other => format!("unexpected {other:?}"),
            }
        } else {
            let body: Value = resp.json().await.unwrap();
            let code = body["code"].as_str().or(body["error"]["code"].as_str()).unwrap_or("");
            if status == 200 { "end".to_owned() } else { format!("{status} {code}") }
        };
        longest = longest.max(started.elapsed());
        out.push(ended);
    }
    (out, longest)
}

async fn stalled_upstream_times_out(stop_engine: bool) {
    let tokenizer = EngineProcess::spawn_tokenizer().unwrap();
    let engine = EngineProcess::spawn(0, &test_model()).unwrap();
    let gateway = gateway(&tokenizer, &engine).await;
    let (ended, _) = run_all(&gateway, "before").await;
    assert_eq!(ended, ["end", "end", "end"]);

    let frozen = if stop_engine { &engine } else { &tokenizer };
    frozen.signal("STOP").unwrap();
    let (ended, longest) = run_all(&gateway, "stalled").await;
    // Each within its budget (plus scheduling slack), each a clear timeout in its own shape.
    assert!(longest < Duration::from_secs_f64(TIMEOUT_SECS + 3.0), "took {longest:?}");
    // (Once the gateway's prober has found a frozen engine unresponsive, it refuses at once
    // with 503, which is as clear.)
    let clear = |e: &String| e.eq_ignore_ascii_case("504 timeout") || e.starts_with("503 ");
    assert!(ended.iter().all(clear), "stalled engine {stop_engine}: {ended:?}");
    assert!(ended[0] == "504 TIMEOUT", "stalled engine {stop_engine}: {ended:?}");
    // The gateway itself serves meanwhile (its health says what is wrong, quickly).
    let started = Instant::now();
    let health = reqwest::get(format!("{}/health", gateway.url())).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(6), "health took {:?}", started.elapsed());
    assert_eq!(health.status(), 503);

    frozen.signal("CONT").unwrap();
    llorch_e2e::wait_http_ok(&format!("{}/health", gateway.url())).await.unwrap();
    let (ended, _) = run_all(&gateway, "after").await;
    assert_eq!(ended, ["end", "end", "end"]);
    // Every slot given back (a job releases its slot just after its last event).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = reqwest::get(format!("{}/metrics", gateway.url())).await.unwrap();
        let text = metrics.text().await.unwrap();
        if text.contains("llorch_in_flight_requests 0") {
            break;
        }
        assert!(Instant::now() < until, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.stop().await.unwrap();
}

#[tokio::test]
async fn a_stalled_engine_gives_timeouts_within_the_budget_and_recovers() {
    stalled_upstream_times_out(true).await;
}

#[tokio::test]
async fn a_stalled_tokenizer_gives_timeouts_within_the_budget_and_recovers() {
    stalled_upstream_times_out(false).await;
}
