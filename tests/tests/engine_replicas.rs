//! Engine replicas behind one gateway (two real `llorch-engine serve` processes): streams are
//! spread by fewest in flight, a replica that dies takes only its own streams, `/health` stays
//! healthy while one serves and says how many do, and a replica that comes back is used again.

use std::time::{Duration, Instant};

use llorch_e2e::{EngineProcess, Service, SseReader, test_model, wait_http_ok};
use llorch_proto::engine::v1::InfoRequest;
use llorch_proto::engine::v1::engine_client::EngineClient;
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// `/health`'s status code and body.
async fn health(base: &str) -> (u16, Value) {
    let resp = http().get(format!("{base}/health")).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Polls `/health` until `engines_up` is `up` (10 s).
async fn wait_engines_up(base: &str, up: u64) -> (u16, Value) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = health(base).await;
        if body["engines_up"].as_u64() == Some(up) {
            return (code, body);
        }
        assert!(Instant::now() < until, "engines_up never became {up}: {code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Streams finished by an engine since it started, over every reason.
async fn finished(engine: &EngineProcess) -> u64 {
    let channel = tonic::transport::Channel::from_shared(engine.url()).unwrap().connect_lazy();
    let info = EngineClient::new(channel).info(InfoRequest {}).await.unwrap().into_inner();
    info.finished.values().sum()
}

/// A greedy 1000-token stream read up to its first token; it then waits for its reader.
async fn started_stream(base: &str, job_id: &str) -> SseReader {
    let body = json!({"job_id": job_id, "prompt": "Hello.", "max_tokens": 1000, "temperature": 0});
    let resp = http().post(format!("{base}/execute")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{job_id}");
    let mut r = SseReader::new(resp);
    assert_eq!(r.next().await.unwrap().event, "started");
    assert_eq!(r.next().await.unwrap().event, "token");
    r
}

#[tokio::test]
async fn streams_spread_over_replicas_and_a_dead_one_takes_only_its_own() {
    let tokenizer = llorch_e2e::start_tokenizer(|_| {}).await.unwrap();
    tokenizer.wait_serving(llorch_proto::TOKENIZER_SERVICE).await.unwrap();
    let a = EngineProcess::spawn(0, &test_model()).unwrap();
    let b = EngineProcess::spawn(0, &test_model()).unwrap();
    let a_port = a.addr.port();
    let mut config = llorch_gateway::GatewayConfig::new(tokenizer.url(), a.url());
    config.engine_urls.push(b.url());
    let gateway =
        Service::spawn(move |l, s| llorch_gateway::server::run(config, l, s)).await.unwrap();
    let base = gateway.url();
    wait_http_ok(&format!("{base}/health")).await.unwrap();
    let (code, body) = wait_engines_up(&base, 2).await;
    assert_eq!((code, body["engines"].as_u64()), (200, Some(2)), "{body}");

    // Eight streams at once: four on each replica (the gateway counts them until they end).
    let b_before = finished(&b).await;
    let mut streams = Vec::new();
    for i in 0..8 {
        streams.push(started_stream(&base, &format!("s{i}")).await);
    }
    drop(a); // SIGKILL, mid-stream
    let mut ends = Vec::new();
    for s in streams {
        let last = s.collect().await.pop().unwrap();
        ends.push((last.event, last.data["code"].as_str().map(str::to_owned)));
    }
    let errors = ends.iter().filter(|(e, _)| e == "error").count();
    assert_eq!(errors, 4, "only the dead replica's four streams fail: {ends:?}");
    for (event, code) in &ends {
        assert!(event == "end" || code.as_deref() == Some("INFERENCE_FAILED"), "{event} {code:?}");
    }
    assert_eq!(finished(&b).await - b_before, 4, "the live replica finished its four");

    // Healthy on one, and says so; new requests go to it.
    let (code, body) = wait_engines_up(&base, 1).await;
    assert_eq!(
        (code, body["engines"].as_u64(), body["status"].as_str()),
        (200, Some(2), Some("healthy"))
    );
    for i in 0..3 {
        let body = json!({"job_id": format!("after{i}"), "prompt": "Hi", "max_tokens": 4});
        let resp = http().post(format!("{base}/execute")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let last = SseReader::new(resp).collect().await.pop().unwrap();
        assert_eq!(last.event, "end", "{last:?}");
    }

    // The dead replica comes back on its port and takes streams again.
    let a = EngineProcess::spawn(a_port, &test_model()).unwrap();
    wait_engines_up(&base, 2).await;
    let (a_before, b_before) = (finished(&a).await, finished(&b).await);
    let streams = vec![started_stream(&base, "back0").await, started_stream(&base, "back1").await];
    for s in streams {
        assert_eq!(s.collect().await.pop().unwrap().event, "end");
    }
    assert_eq!(
        (finished(&a).await - a_before, finished(&b).await - b_before),
        (1, 1),
        "one stream on each replica"
    );

    // Both gone: unhealthy, with the count.
    drop(a);
    drop(b);
    wait_engines_up(&base, 0).await;
    // Asked again: the probes have marked both down.
    let (code, body) = health(&base).await;
    assert_eq!((code, body["status"].as_str()), (503, Some("unhealthy")), "{body}");
    assert_eq!((body["engines_up"].as_u64(), body["engines"].as_u64()), (Some(0), Some(2)));
    assert!(body["reason"].as_str().unwrap().contains("engine"), "{body}");
    gateway.stop().await.unwrap();
    tokenizer.stop().await.unwrap();
}
