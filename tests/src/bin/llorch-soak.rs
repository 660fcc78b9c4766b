//! `llorch-soak`: runs `--streams` clients against the whole stack for `--duration-secs`, each
//! doing one randomly chosen thing after another: whole requests, client cancels and
//! disconnects, engine `Abort`s, short gRPC deadlines, decode streams and bad requests. It prints
//! one JSON line per phase (`before`, `warm`, `middle`, `end`, `after`) with each service's
//! resident memory, open file descriptors and threads, the engine's running, waiting and KV
//! caches in use and the gateway's in-flight gauge, then a `summary` line with what was done and
//! the verdict of the leak checks. `--check` makes a failed check the exit code. See
//! docs/RELIABILITY.md ("Soak") for what is checked and why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use llorch_common::child_log::ChildLog;
use llorch_e2e::SseReader;
use llorch_proto::engine::v1 as engine;
use llorch_proto::tokenizer::v1 as tokenizer;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// Soak test for a running llorch stack (or one it starts itself).
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Clients running at once.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// How long the load runs, in seconds.
    #[arg(long, default_value_t = 120)]
    duration_secs: u64,
    /// Seconds of load before the `warm` sample, the baseline of the memory check (default: a
    /// quarter of the run, at most 60).
    #[arg(long)]
    warmup_secs: Option<u64>,
    /// Seed of the clients' choices (each client draws from its own stream of it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Start the three services from the binaries beside this one, on free ports of
    /// 127.0.0.1, serving this model folder (its tokenizer files too, or `--tokenizer-dir`'s);
    /// they are stopped at the end. Without it, `--gateway`, `--engine` and `--tokenizer` name
    /// a running stack and `--pid` its processes.
    #[arg(long)]
    spawn_model: Option<PathBuf>,
    /// With `--spawn-model`: the tokenizer files' folder (default: the model folder).
    #[arg(long)]
    tokenizer_dir: Option<PathBuf>,
    /// With `--spawn-model`: where the services' JSON logs go (`<service>.log`; default: a
    /// temporary folder, named in the summary).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// The gateway's URL (a running stack).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    gateway: String,
    /// The engine's URL (a running stack).
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    engine: String,
    /// The tokenizer service's URL (a running stack).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    tokenizer: String,
    /// A running service's process, `gateway=PID`, `engine=PID` or `tokenizer=PID`
    /// (repeatable); its memory, descriptors and threads are read from `/proc`. A service not
    /// named is not measured (and not checked).
    #[arg(long = "pid", value_parser = parse_pid)]
    pids: Vec<(String, u32)>,
    /// The API key the services require, if any.
    #[arg(long, env = "LLORCH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most tokens a request asks for (each draws 1 to this).
    #[arg(long, default_value_t = 24)]
    max_new_tokens: u32,
    /// How much a service's resident memory may grow from `warm` to `end`, in percent.
    #[arg(long, default_value_t = 5.0)]
    rss_growth_pct: f64,
    /// Growth under this many KiB never fails (whatever the percentage): in a process of
    /// 12 MiB, a few hundred KiB come and go with allocator arenas and thread stacks.
    #[arg(long, default_value_t = 2048)]
    rss_growth_floor_kib: u64,
    /// Seconds the stack gets after the load to return to its `before` state (descriptors,
    /// in-flight gauge, running, waiting, KV caches in use).
    #[arg(long, default_value_t = 30)]
    settle_secs: u64,
    /// Exit 1 when a check fails (growth, a leftover, or an unexpected answer).
    #[arg(long)]
    check: bool,
}

fn parse_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected NAME=PID")?;
    if !SERVICES.contains(&name) {
        return Err(format!("unknown service {name:?}: one of {SERVICES:?}"));
    }
    Ok((name.to_owned(), pid.parse().map_err(|e| format!("bad pid {pid:?}: {e}"))?))
}

const SERVICES: [&str; 3] = ["gateway", "engine", "tokenizer"];

/// Every kind of thing a client does, with its weight in the draw.
const ACTIONS: [(Action, u32); 13] = [
    (Action::Execute, 20),
    (Action::ExecuteCancel, 8),
    (Action::ExecuteDisconnect, 8),
    (Action::Completion, 8),
    (Action::CompletionStream, 8),
    (Action::CompletionDisconnect, 5),
    (Action::Generate, 10),
    (Action::GenerateAbort, 6),
    (Action::GenerateDrop, 6),
    (Action::GenerateDeadline, 6),
    (Action::DecodeStream, 5),
    (Action::BadHttp, 6),
    (Action::BadGrpc, 4),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    /// `/execute` read to its `end`.
    Execute,
    /// `/execute`, then `POST /cancel` after a few tokens.
    ExecuteCancel,
    /// `/execute`, dropped after a few events.
    ExecuteDisconnect,
    /// `/v1/completions`, not streamed.
    Completion,
    /// `/v1/completions`, streamed to `[DONE]`.
    CompletionStream,
    /// `/v1/completions`, streamed, dropped after a few chunks.
    CompletionDisconnect,
    /// `Engine/Generate` to its `Finished`.
    Generate,
    /// `Engine/Generate`, then `Engine/Abort` after a few tokens.
    GenerateAbort,
    /// `Engine/Generate`, the stream dropped after a few tokens.
    GenerateDrop,
    /// `Engine/Generate` with a deadline of 1 to 50 ms.
    GenerateDeadline,
    /// `Tokenizer/DecodeStream`, half of them dropped half-way.
    DecodeStream,
    /// A refused HTTP request (malformed, out of range, too long, unknown job).
    BadHttp,
    /// A refused gRPC call (ids past the vocabulary, an empty prompt, bad sampling).
    BadGrpc,
}

/// What one action came to.
enum Outcome {
    /// It did what it set out to do (a refusal, for the bad requests).
    Ok,
    /// The stack refused it for load (429, `RESOURCE_EXHAUSTED`): allowed.
    Busy,
    /// Anything else: a failed check.
    Unexpected(String),
}

/// A small deterministic generator (SplitMix64): each client's choices follow from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn action(&mut self) -> Action {
        let total: u32 = ACTIONS.iter().map(|(_, w)| w).sum();
        let mut pick = (self.next() % u64::from(total)) as u32;
        for (a, w) in ACTIONS {
            if pick < w {
                return a;
            }
            pick -= w;
        }
        unreachable!("the weights sum to total")
    }
}

const WORDS: [&str; 12] = [
    " the",
    " quick",
    " brown",
    " fox",
    " and",
    " in",
    " beginning",
    " God",
    " created",
    " heaven",
    " earth",
    ".",
];

/// Where the clients go, shared by all of them.
struct Target {
    gateway: String,
    engine: Channel,
    tokenizer: Channel,
    key: Option<String>,
    vocab_size: u32,
    /// The model name `/v1/completions` wants.
    model: String,
}

impl Target {
    fn grpc<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(key) = &self.key
            && let Ok(v) = format!("Bearer {key}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    fn post(&self, http: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        let req = http.post(format!("{}{path}", self.gateway));
        match &self.key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }
}

/// One client: draws actions until `stop`, counting what each came to.
async fn soak_client(
    target: Arc<Target>,
    seed: u64,
    max_new: u32,
    stop: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = Rng(seed);
    while Instant::now() < stop {
        // A fresh HTTP client (so connection) now and then, as real clients come and go. Its
        // idle connections expire before the gateway closes them (after
        // `--header-read-timeout-secs`, 10 s by default): reusing one the server is closing
        // at that moment fails the request, a race of HTTP keep-alive, not of the stack.
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(4))
            .build()
            .unwrap_or_default();
        for _ in 0..rng.range(1, 8) {
            let action = rng.action();
            // No action may take this long: the slowest runs a few dozen tokens.
            let outcome = match tokio::time::timeout(
                Duration::from_secs(60),
                run(action, &target, &http, &mut rng, max_new),
            )
            .await
            {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => Outcome::Unexpected(format!("{e:#}")),
                Err(_) => Outcome::Unexpected("no answer within 60 s".into()),
            };
            tally.lock().unwrap_or_else(|p| p.into_inner()).add(action, outcome);
            if Instant::now() >= stop {
                break;
            }
        }
    }
}

fn prompt(rng: &mut Rng) -> String {
    (0..rng.range(1, 24)).map(|_| WORDS[rng.range(0, WORDS.len() as u64 - 1) as usize]).collect()
}

fn execute_body(rng: &mut Rng, max_new: u32) -> Value {
    let mut body = json!({
        "job_id": format!("soak-{}", uuid::Uuid::new_v4()),
        "prompt": prompt(rng),
        "max_tokens": rng.range(1, u64::from(max_new)),
        "temperature": if rng.range(0, 1) == 0 { 0.0 } else { 0.8 },
        "seed": rng.range(0, 1 << 20),
    });
    if rng.range(0, 3) == 0 {
        body["stop"] = json!([" the"]);
    }
    body
}

fn completion_body(target: &Target, rng: &mut Rng, max_new: u32, stream: bool) -> Value {
    json!({
        "model": target.model,
        "prompt": prompt(rng),
        "max_tokens": rng.range(1, u64::from(max_new)),
        "temperature": if rng.range(0, 1) == 0 { 0.0 } else { 0.8 },
        "stream": stream,
    })
}

fn generate_request(rng: &mut Rng, max_new: u32, id: &str) -> engine::GenerateRequest {
    engine::GenerateRequest {
        request_id: id.to_owned(),
        prompt_ids: (0..rng.range(1, 24)).map(|_| rng.range(0, 50_000) as u32).collect(),
        sampling: Some(engine::SamplingParams {
            temperature: Some(if rng.range(0, 1) == 0 { 0.0 } else { 0.8 }),
            seed: Some(rng.next()),
            ..Default::default()
        }),
        stopping: Some(engine::StoppingCriteria {
            max_new_tokens: rng.range(1, u64::from(max_new)) as u32,
            ignore_eos: true,
            ..Default::default()
        }),
        logprobs: rng.range(0, 3) == 0,
        top_logprobs: 0,
    }
}

/// Reads an `/execute` stream: `Some(last event)` after `end`/`error`, or after `leave_after`
/// events (then the stream is dropped: a disconnect).
async fn read_execute(mut sse: SseReader, leave_after: Option<u64>) -> anyhow::Result<String> {
    let mut seen = 0;
    while let Some(e) = sse.next().await {
        seen += 1;
        match e.event.as_str() {
            "end" | "error" => return Ok(e.event + " " + &e.data.to_string()),
            _ if leave_after == Some(seen) => return Ok("left".into()),
            _ => {}
        }
    }
    bail!("the stream ended without an end or error event")
}

fn http_busy(status: reqwest::StatusCode) -> bool {
    status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

async fn run(
    action: Action,
    t: &Target,
    http: &reqwest::Client,
    rng: &mut Rng,
    max_new: u32,
) -> anyhow::Result<Outcome> {
    Ok(match action {
        Action::Execute | Action::ExecuteCancel | Action::ExecuteDisconnect => {
            let body = execute_body(rng, max_new);
            let job = body["job_id"].as_str().unwrap_or_default().to_owned();
            let resp = t.post(http, "/execute").json(&body).send().await?;
            if http_busy(resp.status()) {
                return Ok(Outcome::Busy);
            }
            if !resp.status().is_success() {
                return Ok(unexpected_http(resp).await);
            }
            let sse = SseReader::new(resp);
            match action {
                Action::Execute => {
                    let last = read_execute(sse, None).await?;
                    if !last.starts_with("end ") {
                        return Ok(Outcome::Unexpected(format!("/execute ended with {last}")));
                    }
                }
                Action::ExecuteCancel => {
                    let after = rng.range(1, 4);
                    let reader = tokio::spawn(read_execute(sse, None));
                    tokio::time::sleep(Duration::from_millis(after * 5)).await;
                    let c = t.post(http, "/cancel").json(&json!({"job_id": job})).send().await?;
                    // 202 whether or not the job was still running.
                    if c.status() != reqwest::StatusCode::ACCEPTED {
                        return Ok(unexpected_http(c).await);
                    }
                    let last = reader.await??;
                    // A job cancelled before its end ends with an `error` event CANCELLED.
                    if !(last.starts_with("end ") || last.contains(r#""code":"CANCELLED""#)) {
                        return Ok(Outcome::Unexpected(format!(
                            "a cancelled job ended with {last}"
                        )));
                    }
                }
                _ => {
                    read_execute(sse, Some(rng.range(1, 4))).await?;
                }
            }
            Outcome::Ok
        }
        Action::Completion | Action::CompletionStream | Action::CompletionDisconnect => {
            let stream = action != Action::Completion;
            let body = completion_body(t, rng, max_new, stream);
            let resp = t.post(http, "/v1/completions").json(&body).send().await?;
            if http_busy(resp.status()) {
                return Ok(Outcome::Busy);
            }
            if !resp.status().is_success() {
                return Ok(unexpected_http(resp).await);
            }
            if !stream {
                let v: Value = resp.json().await?;
                if v["choices"][0]["text"].as_str().is_none() {
                    return Ok(Outcome::Unexpected(format!("not a completion: {v}")));
                }
                return Ok(Outcome::Ok);
            }
            let leave = (action == Action::CompletionDisconnect).then(|| rng.range(1, 4));
            let mut sse = SseReader::new(resp);
            let mut seen = 0;
            loop {
                let Some(e) = sse.next().await else {
                    return Ok(Outcome::Unexpected(
                        "a completion stream ended before [DONE]".into(),
                    ));
                };
                seen += 1;
                if e.data.as_str().is_some_and(|d| d.trim() == "[DONE]") || leave == Some(seen) {
                    break;
                }
                if e.data.get("error").is_some() {
                    return Ok(Outcome::Unexpected(format!(
                        "a completion stream failed: {}",
                        e.data
                    )));
                }
            }
            Outcome::Ok
        }
        Action::Generate | Action::GenerateAbort | Action::GenerateDrop => {
            let id = format!("soak-{}", uuid::Uuid::new_v4());
            let mut client = engine::engine_client::EngineClient::new(t.engine.clone());
            let stream = client.generate(t.grpc(generate_request(rng, max_new, &id))).await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(s) if s.code() == tonic::Code::ResourceExhausted => return Ok(Outcome::Busy),
                Err(s) => return Ok(Outcome::Unexpected(format!("Generate: {s:?}"))),
            };
            let leave = rng.range(1, 4);
            let mut tokens = 0;
            while let Some(msg) = stream.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(s) => return Ok(Outcome::Unexpected(format!("Generate stream: {s:?}"))),
                };
                match msg.event {
                    Some(engine::generate_response::Event::Finished(f)) => {
                        let cancelled = f.reason == engine::FinishReason::Cancelled as i32;
                        if cancelled && action != Action::GenerateAbort {
                            return Ok(Outcome::Unexpected(format!("finished {f:?}")));
                        }
                        return Ok(Outcome::Ok);
                    }
                    Some(engine::generate_response::Event::Token(_)) => tokens += 1,
                    None => {}
                }
                if tokens == leave {
                    match action {
                        Action::GenerateDrop => return Ok(Outcome::Ok),
                        Action::GenerateAbort => {
                            let abort = engine::AbortRequest { request_ids: vec![id.clone()] };
                            client.abort(t.grpc(abort)).await?;
                        }
                        _ => {}
                    }
                }
            }
            Outcome::Unexpected("a Generate stream ended without Finished".into())
        }
        Action::GenerateDeadline => {
            let mut client = engine::engine_client::EngineClient::new(t.engine.clone());
            let mut req = t.grpc(generate_request(rng, max_new, ""));
            req.set_timeout(Duration::from_millis(rng.range(1, 50)));
            let stream = match client.generate(req).await {
                Ok(s) => s.into_inner(),
                Err(s) => return Ok(deadline_status(&s)),
            };
            let finished = stream.fold(Ok(()), |r, m| async move { r.and(m.map(|_| ())) }).await;
            match finished {
                Ok(()) => Outcome::Ok,
                Err(s) => deadline_status(&s),
            }
        }
        Action::DecodeStream => {
            let mut client = tokenizer::tokenizer_client::TokenizerClient::new(t.tokenizer.clone());
            let chunks: Vec<tokenizer::DecodeStreamRequest> = (0..rng.range(1, 12))
                .map(|_| tokenizer::DecodeStreamRequest {
                    ids: (0..rng.range(0, 4)).map(|_| rng.range(0, 50_256) as u32).collect(),
                    skip_special_tokens: false,
                })
                .collect();
            let n = chunks.len();
            let leave = rng.range(0, 1) == 0;
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let mut answers = client
                .decode_stream(t.grpc(tokio_stream::wrappers::ReceiverStream::new(rx)))
                .await?
                .into_inner();
            for (i, c) in chunks.into_iter().enumerate() {
                tx.send(c).await?;
                answers.message().await?.context("the decode stream ended early")?;
                if leave && i == n / 2 {
                    return Ok(Outcome::Ok);
                }
            }
            drop(tx);
            // After the half-close: the flush, then the end.
            while answers.message().await?.is_some() {}
            Outcome::Ok
        }
        Action::BadHttp => {
            let (path, body, want): (&str, reqwest::Body, u16) = match rng.range(0, 5) {
                0 => ("/execute", "{\"job_id\": ".into(), 400),
                1 => {
                    let mut b = execute_body(rng, max_new);
                    b["temperature"] = json!(7.5);
                    ("/execute", b.to_string().into(), 400)
                }
                2 => {
                    let mut b = execute_body(rng, max_new);
                    b["prompt"] = json!("x".repeat(2 << 20));
                    ("/execute", b.to_string().into(), 413)
                }
                3 => {
                    let mut b = completion_body(t, rng, max_new, false);
                    b["model"] = json!("no-such-model");
                    ("/v1/completions", b.to_string().into(), 404)
                }
                // JSON of the wrong shape: 422, as axum's JSON rejection.
                4 => ("/execute", "[1, 2, 3]".into(), 422),
                _ => {
                    let mut b = completion_body(t, rng, max_new, true);
                    b["max_tokens"] = json!(-3);
                    ("/v1/completions", b.to_string().into(), 400)
                }
            };
            let resp = t
                .post(http, path)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = resp.status().as_u16();
            if status == want {
                Outcome::Ok
            } else {
                Outcome::Unexpected(format!(
                    "{path}: wanted {want}, got {status}: {}",
                    resp.text().await.unwrap_or_default()
                ))
            }
        }
        Action::BadGrpc => {
            let mut req = generate_request(rng, max_new, "");
            match rng.range(0, 2) {
                0 => req.prompt_ids.push(t.vocab_size + rng.range(0, 1000) as u32),
                1 => req.prompt_ids.clear(),
                _ => req.sampling.get_or_insert_default().top_p = Some(1.5),
            }
            let mut client = engine::engine_client::EngineClient::new(t.engine.clone());
            match client.generate(t.grpc(req)).await {
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    // The tokenizer refuses ids past its vocabulary too.
                    let mut tok =
                        tokenizer::tokenizer_client::TokenizerClient::new(t.tokenizer.clone());
                    let bad = tokenizer::DecodeRequest {
                        ids: vec![t.vocab_size + 7],
                        skip_special_tokens: false,
                    };
                    match tok.decode(t.grpc(bad)).await {
                        Err(s) if s.code() == tonic::Code::InvalidArgument => Outcome::Ok,
                        other => Outcome::Unexpected(format!("Decode of a bad id: {other:?}")),
                    }
                }
                Err(s) => Outcome::Unexpected(format!("a bad Generate got {s:?}")),
                Ok(_) => Outcome::Unexpected("a bad Generate was accepted".into()),
            }
        }
    })
}

/// A short deadline may end the call any of these ways; anything else is a failure.
fn deadline_status(s: &tonic::Status) -> Outcome {
    match s.code() {
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Outcome::Ok,
        tonic::Code::ResourceExhausted => Outcome::Busy,
        _ => Outcome::Unexpected(format!("a Generate with a deadline got {s:?}")),
    }
}

async fn unexpected_http(resp: reqwest::Response) -> Outcome {
    let status = resp.status();
    Outcome::Unexpected(format!("HTTP {status}: {}", resp.text().await.unwrap_or_default()))
}

/// Counts per action, and the first few unexpected answers.
#[derive(Default)]
struct Tally {
    counts: BTreeMap<String, [u64; 3]>,
    unexpected: Vec<String>,
}

impl Tally {
    fn add(&mut self, action: Action, outcome: Outcome) {
        let c = self.counts.entry(format!("{action:?}")).or_default();
        match outcome {
            Outcome::Ok => c[0] += 1,
            Outcome::Busy => c[1] += 1,
            Outcome::Unexpected(why) => {
                c[2] += 1;
                if self.unexpected.len() < 20 {
                    self.unexpected.push(format!("{action:?}: {why}"));
                }
            }
        }
    }

    fn json(&self) -> Value {
        let actions: serde_json::Map<String, Value> = self
            .counts
            .iter()
            .map(|(k, [ok, busy, bad])| {
                (k.clone(), json!({"ok": ok, "busy": busy, "unexpected": bad}))
            })
            .collect();
        json!({"actions": actions, "unexpected": self.unexpected})
    }

    fn unexpected_total(&self) -> u64 {
        self.counts.values().map(|c| c[2]).sum()
    }
}

/// A process's resident memory, descriptors and threads, from `/proc`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct ProcStat {
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

fn proc_stat(pid: u32) -> anyhow::Result<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status (is the process running?)"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        Ok(line.trim().trim_end_matches(" kB").trim().parse()?)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(ProcStat { rss_kib: field("VmRSS:")?, fds, threads: field("Threads:")? })
}

/// What the stack says of its own load.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
struct Gauges {
    gateway_in_flight: f64,
    engine_running: u32,
    engine_waiting: u32,
    engine_kv_caches_in_use: u32,
}

impl Gauges {
    const IDLE: Self = Self {
        gateway_in_flight: 0.0,
        engine_running: 0,
        engine_waiting: 0,
        engine_kv_caches_in_use: 0,
    };
}

async fn gauges(t: &Target) -> anyhow::Result<Gauges> {
    let mut client = engine::engine_client::EngineClient::new(t.engine.clone());
    let info = client.info(t.grpc(engine::InfoRequest {})).await?.into_inner();
    let in_flight = llorch_e2e::gateway_in_flight(&t.gateway).await?;
    Ok(Gauges {
        gateway_in_flight: in_flight,
        engine_running: info.running,
        engine_waiting: info.waiting,
        engine_kv_caches_in_use: info.kv_caches_in_use,
    })
}

/// One reading of everything.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    t_s: f64,
    procs: BTreeMap<String, ProcStat>,
    gauges: Gauges,
}

async fn sample(t: &Target, pids: &BTreeMap<String, u32>, t0: Instant) -> anyhow::Result<Sample> {
    let procs = pids
        .iter()
        .map(|(name, pid)| Ok((name.clone(), proc_stat(*pid)?)))
        .collect::<anyhow::Result<_>>()?;
    Ok(Sample { t_s: t0.elapsed().as_secs_f64(), procs, gauges: gauges(t).await? })
}

/// The three services as children of this process.
struct Spawned {
    children: Vec<(String, std::process::Child)>,
    log_dir: PathBuf,
    temp: Option<tempfile::TempDir>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Spawned {
    fn pid(&self, name: &str) -> Option<u32> {
        self.children.iter().find(|(n, _)| n == name).map(|(_, c)| c.id())
    }

    /// Starts `bin` with `args`, waits for its `listening` line and returns the address.
    fn start(&mut self, name: &str, args: &[&str], listening: &str) -> anyhow::Result<String> {
        let dir = std::env::current_exe()?.parent().context("no folder")?.to_path_buf();
        let bin = dir.join(format!("llorch-{name}"));
        anyhow::ensure!(bin.is_file(), "{} not found: build the workspace first", bin.display());
        let mut child = std::process::Command::new(&bin)
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = ChildLog::forward(&mut child)?;
        self.children.push((name.to_owned(), child));
        let fields = log.wait_for(listening, Duration::from_secs(60)).with_context(|| {
            format!(
                "the {name} did not start (it logged {:?}; run `{} {}` to see why)",
                log.seen(),
                bin.display(),
                args.join(" ")
            )
        })?;
        let addr = fields["addr"].as_str().context("no address logged")?.to_owned();
        log.copy_to(std::fs::File::create(self.log_dir.join(format!("{name}.log")))?);
        Ok(format!("http://{addr}"))
    }
}

fn spawn_stack(args: &Args, model: &Path) -> anyhow::Result<(Spawned, String, String, String)> {
    let (log_dir, temp) = match &args.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("llorch-soak-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let mut s = Spawned { children: Vec::new(), log_dir, temp };
    let model = model.to_str().context("the model path is not UTF-8")?;
    let tok_dir = match &args.tokenizer_dir {
        Some(d) => d.to_str().context("the tokenizer path is not UTF-8")?.to_owned(),
        None => model.to_owned(),
    };
    let mut key = Vec::new();
    if let Some(k) = &args.api_key {
        key = vec!["--api-key", k.as_str()];
    }
    let json = ["--log-format", "json"];
    let mut a = json.to_vec();
    a.extend(["serve", "--port", "0", "--model", &tok_dir]);
    a.extend(&key);
    let tokenizer = s.start("tokenizer", &a, "tokenizer service listening")?;
    let mut a = json.to_vec();
    a.extend(["serve", "--port", "0", "--model", model]);
    a.extend(&key);
    let engine = s.start("engine", &a, "engine service listening")?;
    let mut a = json.to_vec();
    a.extend(["--port", "0", "--tokenizer-url", &tokenizer, "--engine-url", &engine]);
    a.extend(["--callback-url", "http://localhost:9999/test-mode"]);
    a.extend(&key);
    let gateway = s.start("gateway", &a, "gateway listening")?;
    Ok((s, gateway, engine, tokenizer))
}

/// Polls the gateway's `/health` until 200 (the upstreams are ready).
async fn wait_ready(gateway: &str) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::get(format!("{gateway}/health")).await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("{gateway}/health did not answer 200 within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (spawned, gateway, engine_url, tokenizer_url) = match &args.spawn_model {
        Some(model) => {
            let (s, g, e, t) = spawn_stack(&args, model)?;
            (Some(s), g, e, t)
        }
        None => (None, args.gateway.clone(), args.engine.clone(), args.tokenizer.clone()),
    };
    let mut pids: BTreeMap<String, u32> = args.pids.iter().cloned().collect();
    if let Some(s) = &spawned {
        for name in SERVICES {
            pids.insert(name.to_owned(), s.pid(name).context("a service did not start")?);
        }
    }
    wait_ready(&gateway).await?;
    let engine_channel = Channel::from_shared(engine_url.clone())?.connect().await?;
    let tokenizer_channel = Channel::from_shared(tokenizer_url.clone())?.connect().await?;
    let mut target = Target {
        gateway: gateway.clone(),
        engine: engine_channel,
        tokenizer: tokenizer_channel,
        key: args.api_key.clone(),
        vocab_size: 0,
        model: String::new(),
    };
    let mut client = engine::engine_client::EngineClient::new(target.engine.clone());
    target.vocab_size =
        client.info(target.grpc(engine::InfoRequest {})).await?.into_inner().vocab_size;
    let models: Value = reqwest::Client::new()
        .get(format!("{gateway}/v1/models"))
        .bearer_auth(args.api_key.clone().unwrap_or_default())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    target.model = models["data"][0]["id"].as_str().context("no model in /v1/models")?.to_owned();
    let target = Arc::new(target);

    let t0 = Instant::now();
    let print = |phase: &str, s: &Sample| {
        let mut line = serde_json::to_value(s).unwrap_or_default();
        line["phase"] = json!(phase);
        println!("{line}");
    };
    let before = sample(&target, &pids, t0).await?;
    print("before", &before);
    anyhow::ensure!(
        before.gauges == Gauges::IDLE,
        "the stack is not idle before the load: {:?}",
        before.gauges
    );

    // The load, with a reading every second.
    let duration = Duration::from_secs(args.duration_secs);
    let warmup = Duration::from_secs(args.warmup_secs.unwrap_or((args.duration_secs / 4).min(60)));
    anyhow::ensure!(warmup < duration, "--warmup-secs must be shorter than --duration-secs");
    let stop = Instant::now() + duration;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..args.streams)
        .map(|i| {
            let seed = args.seed.wrapping_mul(1000).wrapping_add(i as u64);
            tokio::spawn(soak_client(
                Arc::clone(&target),
                seed,
                args.max_new_tokens,
                stop,
                Arc::clone(&tally),
            ))
        })
        .collect();
    let mut readings: Vec<Sample> = Vec::new();
    let load_start = Instant::now();
    let (mut warm, mut middle) = (None, false);
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = sample(&target, &pids, t0).await?;
        let elapsed = load_start.elapsed();
        if warm.is_none() && elapsed >= warmup {
            print("warm", &s);
            warm = Some(readings.len());
        }
        if !middle && elapsed >= duration / 2 {
            print("middle", &s);
            middle = true;
        }
        readings.push(s);
    }
    if let Some(last) = readings.last() {
        print("end", last);
    }
    for c in clients {
        c.await?;
    }

    // Back to idle: everything the load opened must close again.
    let until = Instant::now() + Duration::from_secs(args.settle_secs);
    let after = loop {
        let s = sample(&target, &pids, t0).await?;
        let fds_back =
            s.procs.iter().all(|(n, p)| before.procs.get(n).is_none_or(|b| p.fds <= b.fds));
        if (s.gauges == Gauges::IDLE && fds_back) || Instant::now() >= until {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    print("after", &after);

    let mut failures = Vec::new();
    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    if tally.unexpected_total() > 0 {
        failures.push(format!("{} unexpected answers", tally.unexpected_total()));
    }
    if after.gauges != Gauges::IDLE {
        failures.push(format!("not idle after {} s: {:?}", args.settle_secs, after.gauges));
    }
    // Memory: the highest reading of the 10 s up to `warm` against the highest of the last 10 s
    // (single readings swing with the requests running at that moment).
    let mut growth = BTreeMap::new();
    if let Some(w) = warm {
        let window = |range: &[Sample], name: &str| {
            range.iter().filter_map(|s| s.procs.get(name)).map(|p| p.rss_kib).max().unwrap_or(0)
        };
        let warm_window = &readings[w.saturating_sub(9)..=w];
        let end_window = &readings[readings.len().saturating_sub(10)..];
        for name in pids.keys() {
            let (a, b) = (window(warm_window, name), window(end_window, name));
            let pct = if a == 0 { 0.0 } else { (b as f64 / a as f64 - 1.0) * 100.0 };
            growth.insert(
                name.clone(),
                json!({"warm_rss_kib": a, "end_rss_kib": b, "growth_pct": pct}),
            );
            if pct > args.rss_growth_pct && b.saturating_sub(a) > args.rss_growth_floor_kib {
                failures
                    .push(format!("{name}'s RSS grew {pct:.1} % from warm to end ({a} → {b} KiB)"));
            }
        }
    }
    for (name, b) in &before.procs {
        if let Some(a) = after.procs.get(name)
            && a.fds > b.fds
        {
            failures.push(format!("{name} holds {} descriptors after, {} before", a.fds, b.fds));
        }
    }
    let summary = json!({
        "phase": "summary",
        "streams": args.streams,
        "duration_secs": args.duration_secs,
        "warmup_secs": warmup.as_secs(),
        "seed": args.seed,
        "done": tally.json(),
        "rss": growth,
        "log_dir": spawned.as_ref().map(|s| s.log_dir.display().to_string()),
        "failures": failures,
        "pass": failures.is_empty(),
    });
    println!("{summary}");
    if let Some(mut s) = spawned
        && !failures.is_empty()
        && let Some(temp) = s.temp.take()
    {
        // Keep the logs of a failed run.
        eprintln!("soak: the services' logs are kept in {}", temp.keep().display());
    }
    if args.check && !failures.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
