//! The engine service over a real socket: generation equals the library and the reference,
//! batching is invisible, cancellation frees sequences, admission refuses cleanly, shutdown
//! drains, health follows loading.

use std::time::{Duration, Instant};

use futures::StreamExt;
use llorch_e2e::{Service, repo_root, start_engine, test_model};
use llorch_engine::sequence::DEFAULT_PREFILL_CHUNK;
use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::engine::v1::generate_response::Event;
use llorch_proto::engine::v1::{
    AbortRequest, FinishReason, Finished, GenerateRequest, InfoRequest, InfoResponse,
    SamplingParams, StoppingCriteria, Token,
};
use tonic::Code;
use tonic::transport::Channel;

type Client = EngineClient<Channel>;

async fn started(tweak: impl FnOnce(&mut llorch_engine::server::ServeConfig)) -> (Service, Client) {
    let svc = start_engine(tweak).await.unwrap();
    svc.wait_serving(llorch_proto::ENGINE_SERVICE).await.unwrap();
    let client = EngineClient::new(svc.channel());
    (svc, client)
}

fn request(id: &str, prompt: Vec<u32>, max_new: u32, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        prompt_ids: prompt,
        sampling: Some(sampling),
        stopping: Some(StoppingCriteria {
            max_new_tokens: max_new,
            stop_token_ids: vec![],
            ignore_eos: true,
        }),
        logprobs: true,
        top_logprobs: 2,
    }
}

fn greedy() -> SamplingParams {
    SamplingParams { temperature: Some(0.0), ..Default::default() }
}

/// Runs a stream to its end.
async fn collect(
    client: &mut Client,
    req: GenerateRequest,
) -> Result<(Vec<Token>, Finished), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg?.event {
            Some(Event::Token(t)) => tokens.push(t),
            Some(Event::Finished(f)) => {
                assert!(stream.next().await.is_none(), "messages after Finished");
                return Ok((tokens, f));
            }
            None => panic!("empty event"),
        }
    }
    panic!("stream ended without Finished");
}

async fn info(client: &mut Client) -> InfoResponse {
    client.info(InfoRequest {}).await.unwrap().into_inner()
}

/// Polls Info until `pred` holds (or 10 s pass).
async fn wait_info(
    client: &mut Client,
    what: &str,
    pred: impl Fn(&InfoResponse) -> bool,
) -> InfoResponse {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let i = info(client).await;
        if pred(&i) {
            return i;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}: {i:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn reference_ids(model: &str, prompt: &str) -> (Vec<u32>, Vec<u32>) {
    let dir = repo_root().join(format!("fixtures/reference/{model}/{prompt}"));
    let meta = llorch_engine::reference::Meta::read(&dir).unwrap();
    (meta.prompt_ids, meta.greedy_24)
}

/// The same request run alone by the library, as (ids, logprobs).
fn alone(req: &GenerateRequest) -> (Vec<u32>, Vec<f32>) {
    let model = llorch_engine::Gpt2::load(&test_model()).unwrap();
    let valid = llorch_engine::validate(req.clone(), model.config(), 2048).unwrap();
    let g = llorch_engine::generate(&model, valid, DEFAULT_PREFILL_CHUNK, |_| {}).unwrap();
    (g.ids(), g.tokens.iter().map(|t| t.logprob).collect())
}

/// Reflection on the engine's port lists the engine and health only (not the tokenizer), in
/// both protocol versions, and describes the engine for `grpcurl`.
#[tokio::test]
async fn reflection_lists_only_this_ports_services_in_v1_and_v1alpha() {
    let (svc, _client) = started(|_| {}).await;
    llorch_e2e::assert_reflection_lists_only(svc.channel(), llorch_proto::ENGINE_SERVICE).await;
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn greedy_generate_over_grpc_equals_the_library_and_the_hf_reference() {
    let (svc, mut client) = started(|_| {}).await;
    for prompt in ["hello", "long"] {
        let (prompt_ids, want) = reference_ids("tiny", prompt);
        let req = request(prompt, prompt_ids.clone(), 24, greedy());
        let (tokens, fin) = collect(&mut client, req.clone()).await.unwrap();
        let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
        assert_eq!(ids, want, "{prompt}: HF reference");
        assert_eq!(ids, alone(&req).0, "{prompt}: library");
        assert_eq!(tokens.iter().map(|t| t.index).collect::<Vec<_>>(), (0..24).collect::<Vec<_>>());
        assert_eq!(fin.reason, FinishReason::Length as i32);
        assert_eq!((fin.prompt_tokens, fin.generated_tokens), (prompt_ids.len() as u32, 24));
        assert!(tokens.iter().all(|t| t.top_logprobs.len() == 2 && t.top_logprobs[0].id == t.id));
    }
    let i = info(&mut client).await;
    assert_eq!(
        (i.model.as_str(), i.n_layer, i.n_head, i.n_embd, i.n_ctx, i.vocab_size, i.eos_token_id),
        ("tiny", 2, 4, 32, 1024, 50257, 50256)
    );
    assert_eq!((i.dtype.as_str(), i.stored_dtype.as_str()), ("F32", "F32"));
    assert!(["avx512", "avx2", "portable"].contains(&i.kernel.as_str()), "{}", i.kernel);
    if cfg!(target_os = "linux") {
        assert!(i.peak_rss_bytes > 1 << 20, "peak RSS {}", i.peak_rss_bytes);
    }
    assert_eq!(i.finished.get("LENGTH"), Some(&2));
    svc.stop().await.unwrap();
}

/// `--weights q8_0`: Info names the format, and a stream equals the library's run of the same
/// request on the same Q8_0 model (the format is lossy, but deterministic).
#[tokio::test]
async fn a_q8_0_engine_streams_what_the_library_computes_with_q8_0() {
    use llorch_engine::matrix::WeightFormat;
    let (svc, mut client) = started(|c| c.weights = WeightFormat::Q8_0).await;
    let i = info(&mut client).await;
    assert_eq!((i.dtype.as_str(), i.stored_dtype.as_str()), ("Q8_0", "F32"));
    assert!(["avx512-vnni", "avx2", "portable"].contains(&i.kernel.as_str()), "{}", i.kernel);
    let req = request("q8", vec![15496, 13, 314, 716], 16, greedy());
    let (tokens, fin) = collect(&mut client, req.clone()).await.unwrap();
    let model = llorch_engine::Gpt2::load_as(&test_model(), WeightFormat::Q8_0).unwrap();
    let valid = llorch_engine::validate(req, model.config(), 2048).unwrap();
    let want = llorch_engine::generate(&model, valid, DEFAULT_PREFILL_CHUNK, |_| {}).unwrap();
    assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), want.ids());
    assert_eq!(fin.generated_tokens, 16);
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn sixteen_concurrent_streams_each_equal_the_request_run_alone() {
    let (svc, client) = started(|c| c.max_batch = 8).await;
    let reqs: Vec<GenerateRequest> = (0..16u32)
        .map(|i| {
            let prompt: Vec<u32> =
                (0..(1 + i * 5)).map(|j| (i * 7919 + j * 104_729) % 50_000).collect();
            let sampling = match i % 4 {
                0 => greedy(),
                1 => SamplingParams {
                    temperature: Some(0.8),
                    seed: Some(u64::from(i)),
                    ..Default::default()
                },
                2 => SamplingParams {
                    temperature: Some(1.3),
                    top_k: 50,
                    top_p: Some(0.9),
                    seed: Some(7),
                    ..Default::default()
                },
                _ => SamplingParams {
                    temperature: Some(1.0),
                    min_p: 0.05,
                    repetition_penalty: Some(1.3),
                    seed: Some(99),
                    ..Default::default()
                },
            };
            request(&format!("r{i}"), prompt, 8 + i * 3, sampling)
        })
        .collect();
    let expected: Vec<(Vec<u32>, Vec<f32>)> = reqs.iter().map(alone).collect();
    let handles: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let mut client = client.clone();
            tokio::spawn(async move { collect(&mut client, req).await })
        })
        .collect();
    for (i, (h, (ids, logprobs))) in handles.into_iter().zip(expected).enumerate() {
        let (tokens, fin) = h.await.unwrap().unwrap();
        assert_eq!(tokens.iter().map(|t| t.id).collect::<Vec<_>>(), ids, "stream {i}");
        assert_eq!(
            tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
            logprobs,
            "stream {i}: logprobs are not bitwise equal"
        );
        assert_eq!(fin.reason, FinishReason::Length as i32);
    }
    let mut client = client.clone();
    let i = wait_info(&mut client, "idle", |i| i.running == 0 && i.waiting == 0).await;
    assert_eq!((i.kv_caches_in_use, i.finished.get("LENGTH")), (0, Some(&16)));
    assert!(i.decode_steps < 16 * 50, "streams were not batched: {} decode steps", i.decode_steps);
    svc.stop().await.unwrap();
}

/// Starts a long greedy stream and waits for its first token; returns the open stream.
async fn running_stream(
    client: &mut Client,
    id: &str,
    prompt: Vec<u32>,
) -> tonic::Streaming<llorch_proto::engine::v1::GenerateResponse> {
    let mut req = request(id, prompt, 1000, greedy());
    req.logprobs = false;
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Token(_))));
    stream
}

#[tokio::test]
async fn a_dropped_stream_is_freed_within_a_decode_step() {
    let (svc, mut client) = started(|_| {}).await;
    let _keep = running_stream(&mut client, "keep", vec![1, 2, 3]).await;
    let doomed = running_stream(&mut client, "doomed", vec![4, 5, 6]).await;
    wait_info(&mut client, "two running", |i| i.running == 2).await;
    drop(doomed);
    let at_drop = info(&mut client).await.decode_steps;
    let freed =
        wait_info(&mut client, "one running", |i| i.running == 1 && i.kv_caches_in_use == 1).await;
    // The scheduler frees a sequence at the first step after its channel closes (tested
    // exactly in services/engine/tests/scheduler.rs). Over gRPC the close first travels as an
    // HTTP/2 RST_STREAM through the runtime this test shares with the server, while the
    // scheduler thread keeps stepping this tiny model every ~1 ms; under a loaded CI machine
    // that is several steps. 100 steps still proves the 1000-token stream was cut at once.
    assert!(
        freed.decode_steps <= at_drop + 100,
        "freed after {} steps",
        freed.decode_steps - at_drop
    );
    assert_eq!(freed.finished.get("CANCELLED"), Some(&1));
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn abort_ends_a_decoding_stream_with_cancelled() {
    let (svc, mut client) = started(|_| {}).await;
    let mut stream = running_stream(&mut client, "victim", vec![7, 8, 9]).await;
    let aborted = client
        .abort(AbortRequest { request_ids: vec!["victim".into(), "nobody".into()] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aborted.aborted, 1);
    let mut last = None;
    while let Some(msg) = stream.next().await {
        last = msg.unwrap().event;
    }
    let Some(Event::Finished(f)) = last else { panic!("no Finished: {last:?}") };
    assert_eq!(f.reason, FinishReason::Cancelled as i32);
    assert!(f.generated_tokens >= 1 && f.generated_tokens < 1000);
    let i = wait_info(&mut client, "idle", |i| i.running == 0).await;
    assert_eq!(i.kv_caches_in_use, 0);
    // Aborting again, or an unknown id, is harmless.
    assert_eq!(
        client
            .abort(AbortRequest { request_ids: vec!["victim".into()] })
            .await
            .unwrap()
            .into_inner()
            .aborted,
        0
    );
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn abort_reaches_a_queued_request_and_one_in_a_long_prefill() {
    // One slot, one-token prefill chunks: a 900-token prompt takes 900 prefill steps.
    let (svc, mut client) = started(|c| {
        c.max_batch = 1;
        c.prefill_chunk = 1;
    })
    .await;
    let long_prompt: Vec<u32> = (0..900).map(|i| (i * 37) % 50_000).collect();
    let mut c2 = client.clone();
    let prefilling = tokio::spawn(async move {
        collect(&mut c2, request("prefill", long_prompt, 5, greedy())).await
    });
    wait_info(&mut client, "prefill running", |i| i.running == 1).await;
    let mut c3 = client.clone();
    let queued =
        tokio::spawn(
            async move { collect(&mut c3, request("queued", vec![1, 2], 5, greedy())).await },
        );
    wait_info(&mut client, "one waiting", |i| i.waiting == 1).await;

    assert_eq!(
        client
            .abort(AbortRequest { request_ids: vec!["queued".into()] })
            .await
            .unwrap()
            .into_inner()
            .aborted,
        1
    );
    let (tokens, fin) = queued.await.unwrap().unwrap();
    assert_eq!((tokens.len(), fin.reason), (0, FinishReason::Cancelled as i32));

    assert_eq!(
        client
            .abort(AbortRequest { request_ids: vec!["prefill".into()] })
            .await
            .unwrap()
            .into_inner()
            .aborted,
        1
    );
    let (tokens, fin) = prefilling.await.unwrap().unwrap();
    assert_eq!(
        (tokens.len(), fin.reason),
        (0, FinishReason::Cancelled as i32),
        "aborted during prefill"
    );
    let i = wait_info(&mut client, "idle", |i| i.running == 0 && i.waiting == 0).await;
    assert_eq!(i.kv_caches_in_use, 0);
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn a_short_deadline_ends_the_stream_and_frees_it() {
    let (svc, mut client) = started(|_| {}).await;
    let mut req = tonic::Request::new(request("late", vec![1, 2, 3], 1000, greedy()));
    req.set_timeout(Duration::from_millis(300));
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut outcome = None;
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(m) => {
                if let Some(Event::Finished(f)) = m.event {
                    outcome = Some(Ok(f.reason));
                }
            }
            Err(status) => {
                outcome = Some(Err(status.code()));
                break;
            }
        }
    }
    // Either the engine's Finished{DEADLINE} or the client's own deadline arrives first.
    assert!(
        matches!(outcome, Some(Ok(r)) if r == FinishReason::Deadline as i32)
            || matches!(outcome, Some(Err(Code::DeadlineExceeded | Code::Cancelled))),
        "{outcome:?}"
    );
    let i = wait_info(&mut client, "idle", |i| i.running == 0).await;
    assert_eq!(i.kv_caches_in_use, 0);
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn every_invalid_field_is_refused_by_name_and_the_server_keeps_serving() {
    let (svc, mut client) = started(|c| c.max_new_tokens_limit = 100).await;
    let ok = || request("x", vec![1, 2], 4, greedy());
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (GenerateRequest { prompt_ids: vec![], ..ok() }, "prompt_ids"),
        (GenerateRequest { prompt_ids: vec![1, 50257], ..ok() }, "prompt_ids"),
        (GenerateRequest { prompt_ids: vec![u32::MAX], ..ok() }, "prompt_ids"),
        (
            GenerateRequest {
                stopping: Some(StoppingCriteria { max_new_tokens: 0, ..Default::default() }),
                ..ok()
            },
            "stopping.max_new_tokens",
        ),
        (GenerateRequest { stopping: None, ..ok() }, "stopping.max_new_tokens"),
        (
            GenerateRequest {
                stopping: Some(StoppingCriteria { max_new_tokens: 101, ..Default::default() }),
                ..ok()
            },
            "stopping.max_new_tokens",
        ),
        (
            GenerateRequest {
                prompt_ids: vec![1; 1000],
                stopping: Some(StoppingCriteria { max_new_tokens: 30, ..Default::default() }),
                ..ok()
            },
            "n_ctx",
        ),
        (
            GenerateRequest {
                stopping: Some(StoppingCriteria {
                    max_new_tokens: 4,
                    stop_token_ids: vec![60000],
                    ..Default::default()
                }),
                ..ok()
            },
            "stopping.stop_token_ids",
        ),
        (
            GenerateRequest {
                sampling: Some(SamplingParams { temperature: Some(2.01), ..Default::default() }),
                ..ok()
            },
            "sampling.temperature",
        ),
        (
            GenerateRequest {
                sampling: Some(SamplingParams { temperature: Some(-1.0), ..Default::default() }),
                ..ok()
            },
            "sampling.temperature",
        ),
        (
            GenerateRequest {
                sampling: Some(SamplingParams { top_p: Some(1.5), ..Default::default() }),
                ..ok()
            },
            "sampling.top_p",
        ),
        (
            GenerateRequest {
                sampling: Some(SamplingParams { min_p: f32::NAN, ..Default::default() }),
                ..ok()
            },
            "sampling.min_p",
        ),
        (
            GenerateRequest {
                sampling: Some(SamplingParams {
                    repetition_penalty: Some(2.5),
                    ..Default::default()
                }),
                ..ok()
            },
            "sampling.repetition_penalty",
        ),
        (GenerateRequest { top_logprobs: 6, ..ok() }, "top_logprobs"),
        (GenerateRequest { request_id: "r".repeat(1000), ..ok() }, "request_id"),
    ];
    for (req, field) in cases {
        let err = client.generate(req).await.err().unwrap_or_else(|| panic!("{field}: accepted"));
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    // A message over the size limit.
    let huge = GenerateRequest { prompt_ids: vec![1; 2_000_000], ..ok() };
    assert!(client.generate(huge).await.is_err());
    let (tokens, _) = collect(&mut client, ok()).await.unwrap();
    assert_eq!(tokens.len(), 4, "still serving");
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_queue_refuses_with_resource_exhausted_while_admitted_streams_complete() {
    let (svc, mut client) = started(|c| {
        c.max_batch = 1;
        c.max_queue = 1;
    })
    .await;
    let mut ca = client.clone();
    let a = tokio::spawn(
        async move { collect(&mut ca, request("a", vec![1, 2], 200, greedy())).await },
    );
    wait_info(&mut client, "a running", |i| i.running == 1).await;
    let mut cb = client.clone();
    let b = tokio::spawn(async move { collect(&mut cb, request("b", vec![3], 5, greedy())).await });
    wait_info(&mut client, "b waiting", |i| i.waiting == 1).await;
    let err =
        client.generate(request("c", vec![4], 5, greedy())).await.expect_err("c was admitted");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(a.await.unwrap().unwrap().0.len(), 200);
    assert_eq!(b.await.unwrap().unwrap().0.len(), 5);
    assert_eq!(collect(&mut client, request("d", vec![4], 3, greedy())).await.unwrap().0.len(), 3);
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_running_streams_finish_and_refuses_new_ones() {
    let (svc, mut client) = started(|c| c.grace_secs = 30.0).await;
    let mut ca = client.clone();
    let a = tokio::spawn(
        async move { collect(&mut ca, request("a", vec![1, 2], 300, greedy())).await },
    );
    wait_info(&mut client, "a running", |i| i.running == 1).await;
    let stopping = tokio::spawn(svc.stop());
    // Draining: new work is refused.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match client.generate(request("late", vec![1], 2, greedy())).await {
            Err(e) if e.code() == Code::Unavailable => break,
            Err(e) => panic!("unexpected refusal {e:?}"),
            Ok(_) => assert!(Instant::now() < until, "never refused"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (tokens, fin) = a.await.unwrap().unwrap();
    assert_eq!(
        (tokens.len(), fin.reason),
        (300, FinishReason::Length as i32),
        "the running stream was cut"
    );
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn after_the_grace_period_running_streams_end_cancelled() {
    let (svc, mut client) = started(|c| c.grace_secs = 0.2).await;
    let mut stream = running_stream(&mut client, "long", vec![1, 2]).await;
    let stopping = tokio::spawn(svc.stop());
    let mut last = None;
    while let Some(Ok(msg)) = stream.next().await {
        last = msg.event;
    }
    let Some(Event::Finished(f)) = last else { panic!("no Finished: {last:?}") };
    assert_eq!(f.reason, FinishReason::Cancelled as i32);
    stopping.await.unwrap().unwrap();
}

#[tokio::test]
async fn health_is_serving_only_once_the_model_is_loaded() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let loading = llorch_e2e::start_engine_loading().await.unwrap();
    let mut health = HealthClient::new(loading.service.channel());
    let status = |s: &str| HealthCheckRequest { service: s.into() };
    let mut check = async |s: &str| loop {
        if let Ok(r) = health.check(status(s)).await {
            break r.into_inner().status;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(check(llorch_proto::ENGINE_SERVICE).await, ServingStatus::NotServing as i32);
    assert_eq!(check("").await, ServingStatus::Serving as i32, "the process is live while loading");
    let err = EngineClient::new(loading.service.channel())
        .generate(request("early", vec![1], 1, greedy()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);

    let svc = loading.load().await.unwrap();
    svc.wait_serving(llorch_proto::ENGINE_SERVICE).await.unwrap();
    svc.stop().await.unwrap();
}

#[derive(Debug, Clone, Copy)]
enum Where {
    Queue,
    Prefill,
    Decode,
}

#[derive(Debug, Clone, Copy)]
enum How {
    Drop,
    Abort,
    Deadline,
}

/// Every way a request can end early, wherever it is: its sequence (or queue slot) is freed
/// and the engine serves the next request.
#[tokio::test]
async fn drop_abort_and_deadline_free_the_request_in_the_queue_in_prefill_and_in_decode() {
    for place in [Where::Queue, Where::Prefill, Where::Decode] {
        for how in [How::Drop, How::Abort, How::Deadline] {
            // One slot; one-token prefill chunks make a 1000-token prompt a long prefill.
            let (svc, mut client) = started(|c| {
                c.max_batch = 1;
                c.prefill_chunk = 1;
            })
            .await;
            let mut blocker = None;
            if let Where::Queue = place {
                blocker = Some(running_stream(&mut client, "blocker", vec![1, 2]).await);
            }
            let prompt: Vec<u32> = match place {
                Where::Prefill => (0..1000).map(|i| (i * 31) % 50_000).collect(),
                Where::Queue | Where::Decode => vec![5, 6, 7],
            };
            let max_new = if let Where::Prefill = place { 20 } else { 1000 };
            let mut req = tonic::Request::new(request("victim", prompt, max_new, greedy()));
            if let How::Deadline = how {
                req.set_timeout(Duration::from_millis(300));
            }
            let mut stream = client.generate(req).await.unwrap().into_inner();
            let what = format!("{how:?} in {place:?}");
            match place {
                Where::Queue => wait_info(&mut client, &what, |i| i.waiting == 1).await,
                Where::Prefill => wait_info(&mut client, &what, |i| i.running == 1).await,
                Where::Decode => {
                    let first = stream.next().await.unwrap().unwrap();
                    assert!(matches!(first.event, Some(Event::Token(_))), "{what}");
                    info(&mut client).await
                }
            };
            let outcome = match how {
                How::Drop => {
                    drop(stream);
                    None
                }
                How::Abort => {
                    let n = client
                        .abort(AbortRequest { request_ids: vec!["victim".into()] })
                        .await
                        .unwrap()
                        .into_inner()
                        .aborted;
                    assert_eq!(n, 1, "{what}");
                    Some(last_event(&mut stream).await)
                }
                How::Deadline => Some(last_event(&mut stream).await),
            };
            match (how, outcome) {
                (How::Abort, Some(Ok(f))) => {
                    assert_eq!(f.reason, FinishReason::Cancelled as i32, "{what}")
                }
                (How::Deadline, Some(Ok(f))) => {
                    assert_eq!(f.reason, FinishReason::Deadline as i32, "{what}")
                }
                (How::Deadline, Some(Err(code))) => {
                    assert_eq!(code, Code::DeadlineExceeded, "{what}")
                }
                (How::Drop, None) => {}
                (_, other) => panic!("{what}: {other:?}"),
            }
            if let Some(Ok(f)) = outcome.as_ref().map(|o| o.as_ref().map(|f| f.generated_tokens)) {
                let bound = if let Where::Decode = place { 1000 } else { 0 };
                assert!(f <= bound, "{what}: {f} tokens");
            }
            let busy = u32::from(blocker.is_some());
            let i = wait_info(&mut client, &what, |i| {
                i.waiting == 0 && i.running == busy && i.kv_caches_in_use == busy
            })
            .await;
            let ended: u64 =
                ["CANCELLED", "DEADLINE"].iter().filter_map(|k| i.finished.get(*k)).sum();
            assert_eq!(ended, 1, "{what}: {:?}", i.finished);
            drop(blocker);
            wait_info(&mut client, &what, |i| i.running == 0 && i.kv_caches_in_use == 0).await;
            let (tokens, _) =
                collect(&mut client, request("next", vec![1], 3, greedy())).await.unwrap();
            assert_eq!(tokens.len(), 3, "{what}: still serving");
            svc.stop().await.unwrap();
        }
    }
}

/// Reads a stream to its end: `Ok(Finished)` or the status code that ended it.
async fn last_event(
    stream: &mut tonic::Streaming<llorch_proto::engine::v1::GenerateResponse>,
) -> Result<Finished, Code> {
    let mut last = None;
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(m) => last = m.event,
            Err(status) => return Err(status.code()),
        }
    }
    match last {
        Some(Event::Finished(f)) => Ok(f),
        other => panic!("stream ended without Finished: {other:?}"),
    }
}

/// The engine says which token is the last: exactly that token carries `finish_reason`, equal
/// to the `Finished.reason` that follows; a stream cut short (here by Abort) has none.
#[tokio::test]
async fn last_token_carries_the_finish_reason() {
    let (svc, mut client) = started(|_| {}).await;
    let reasons =
        |tokens: &[Token]| -> Vec<Option<i32>> { tokens.iter().map(|t| t.finish_reason).collect() };

    // The length limit.
    let (tokens, fin) =
        collect(&mut client, request("len", vec![1, 2, 3], 8, greedy())).await.unwrap();
    assert_eq!(fin.reason, FinishReason::Length as i32);
    let mut want = vec![None; 7];
    want.push(Some(fin.reason));
    assert_eq!(reasons(&tokens), want, "LENGTH");

    // A stop token: the greedy stream's fourth token, which ends it where it first appears.
    let stop_id = tokens[3].id;
    let first = tokens.iter().position(|t| t.id == stop_id).unwrap();
    let mut req = request("stop", vec![1, 2, 3], 8, greedy());
    req.stopping = Some(StoppingCriteria {
        max_new_tokens: 8,
        stop_token_ids: vec![stop_id],
        ignore_eos: true,
    });
    let (tokens, fin) = collect(&mut client, req).await.unwrap();
    assert_eq!(fin.reason, FinishReason::StopToken as i32);
    let mut want = vec![None; first];
    want.push(Some(fin.reason));
    assert_eq!(reasons(&tokens), want, "STOP_TOKEN");

    // Cancelled: no token ended the stream, so none says so.
    let mut stream = running_stream(&mut client, "cut", vec![4, 5, 6]).await;
    client.abort(AbortRequest { request_ids: vec!["cut".into()] }).await.unwrap();
    let mut fin = None;
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event {
            Some(Event::Token(t)) => assert_eq!(t.finish_reason, None, "token {}", t.index),
            Some(Event::Finished(f)) => fin = Some(f.reason),
            None => panic!("empty event"),
        }
    }
    assert_eq!(fin, Some(FinishReason::Cancelled as i32));
    svc.stop().await.unwrap();
}

/// A `GenerateRequest` over `--max-message-bytes` is refused by the transport (the handler
/// never sees it), and the engine serves on; one just under the limit is generated.
#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_and_the_engine_serves_on() {
    let (svc, mut client) = started(|c| c.max_message_bytes = 4096).await;
    // Ids under 128 are one byte each as varints: 5000 of them are over 4 KiB.
    let huge = request("huge", vec![1; 5000], 1, greedy());
    let err = collect(&mut client, huge).await.unwrap_err();
    assert!(matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted), "{err:?}");
    let small = request("small", vec![1; 100], 2, greedy());
    let (tokens, finished) = collect(&mut client, small).await.unwrap();
    assert_eq!((tokens.len(), finished.generated_tokens), (2, 2));
    let i = info(&mut client).await;
    assert_eq!((i.running, i.waiting, i.kv_caches_in_use), (0, 0, 0));
    svc.stop().await.unwrap();
}
