//! One generation job, whatever the wire format: [`start`] does everything before the first
//! byte (admission, tokenizing, the context check, opening the detokenizer and engine streams)
//! and spawns the job, which reports [`JobEvent`]s on a channel — `Started`, `Token`…, then
//! exactly one `End` or `Failed` — while it detokenizes each token through the tokenizer's
//! `DecodeStream` and matches stop strings on the text. The worker API frames the events as SSE
//! ([`crate::sse`]); another route can frame the same events its own way.
//!
//! Each job is one `text_completion <model>` span (OpenTelemetry GenAI conventions), the child
//! of the HTTP request's span, with a client span for each call it makes (`Encode`,
//! `DecodeStream`, `Generate`, and `Abort` when it stops the engine early).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use llorch_common::telemetry;
use llorch_proto::engine::v1 as epb;
use llorch_proto::tokenizer::v1 as tpb;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tonic::Streaming;
use tracing::Instrument;

use crate::detokenize::Detokenizer;
use crate::engines::EngineLease;
use crate::error::{ErrorKind, GatewayError};
use crate::metrics::Outcome;
use crate::state::{AppState, JobGuard};
use crate::stop::{Released, StopMatcher};
use crate::upstream::CallContext;
use crate::validate::{ModelLimits, Prompt, ValidExecute, ValidGenerate, ValidationErrors};

/// Events buffered per job before it waits for the client.
const EVENT_BUFFER: usize = 64;

/// What a running job reports, in this order: `Started`, `Token`…, then one `End` or
/// `Failed`. A job whose client left reports nothing more.
#[derive(Debug)]
pub enum JobEvent {
    /// The job is running.
    Started {
        /// The caller's job id.
        job_id: String,
        /// The model reference.
        model: String,
        /// When it started.
        at: OffsetDateTime,
        /// The prompt's token ids (as tokenized, or as given).
        prompt_ids: Vec<u32>,
    },
    /// One generated token.
    Token {
        /// 0-based index of the generated token.
        index: u32,
        /// The token id.
        id: u32,
        /// The text this token released: empty while a character is incomplete or text is held
        /// back for a possible stop string.
        text: String,
        /// Its logprob and the top alternatives, when the request asked for logprobs.
        logprobs: Option<TokenLogprobs>,
    },
    /// Generation finished.
    End(Summary),
    /// The job failed, was cancelled or ran out of time.
    Failed(GatewayError),
}

/// A generated token's log-probability under the raw model distribution, and the most likely
/// tokens at its step (most likely first; as many as the request asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token's logprob.
    pub logprob: f32,
    /// `(id, logprob)` of the most likely tokens.
    pub top: Vec<(u32, f32)>,
}

/// How a finished generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Why it stopped.
    pub reason: StopReason,
    /// The stop string that matched, when `reason` is [`StopReason::StopSequence`].
    pub stop_sequence: Option<String>,
    /// Token events sent.
    pub tokens_out: u32,
    /// Prompt tokens.
    pub tokens_in: u32,
    /// From the first token event to the last (decode only; 0 for a single token).
    pub decode_time: Duration,
    /// How long the engine kept the request waiting for a batch slot.
    pub queue_time: Duration,
    /// From the request's arrival at the gateway to the first token event.
    pub ttft: Duration,
}

/// Why generation stopped, serialised as the worker API's `stop_reason`. (The API also lists
/// `CANCELLED` and `ERROR`; such jobs end with an `error` event, never with `end`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StopReason {
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The model ended the text.
    Eos,
    /// A stop string matched.
    StopSequence,
}

impl StopReason {
    /// The worker API's name (`MAX_TOKENS`, `EOS`, `STOP_SEQUENCE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxTokens => "MAX_TOKENS",
            Self::Eos => "EOS",
            Self::StopSequence => "STOP_SEQUENCE",
        }
    }
}

/// Why a job was not started; nothing was streamed.
#[derive(Debug)]
pub enum Refusal {
    /// The request failed validation (here: the context check).
    Invalid(ValidationErrors),
    /// Admission or an upstream refused.
    Error(GatewayError),
}

impl Refusal {
    /// One line saying why, for the job's span.
    pub fn describe(&self) -> String {
        match self {
            Self::Invalid(errors) => {
                let messages: Vec<&str> =
                    errors.errors.iter().map(|e| e.message.as_str()).collect();
                format!("invalid request: {}", messages.join("; "))
            }
            Self::Error(e) => e.message.clone(),
        }
    }

    /// The metrics outcome.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Invalid(_) => Outcome::Invalid,
            Self::Error(e) => Outcome::of_error(e.kind),
        }
    }
}

impl From<GatewayError> for Refusal {
    fn from(e: GatewayError) -> Self {
        Self::Error(e)
    }
}

impl From<ValidationErrors> for Refusal {
    fn from(e: ValidationErrors) -> Self {
        Self::Invalid(e)
    }
}

/// Starts the job `request`, received at `received`: admits it, tokenizes the prompt, checks the
/// context, opens the detokenizer and engine streams and spawns the job. Returns its events;
/// the job ends early (aborting the engine's work) when the receiver is dropped.
pub async fn start(
    app: &Arc<AppState>,
    request: ValidExecute,
    ctx: CallContext,
    received: Instant,
) -> Result<mpsc::Receiver<JobEvent>, Refusal> {
    // The GenAI span name is `text_completion <model>`; a name cannot change once the span has
    // children, so it uses the model as known now (only the very first job after start, before
    // any health check, may not know it yet).
    let name = match app.known_model() {
        Some(model) => format!("text_completion {model}"),
        None => "text_completion".to_owned(),
    };
    let span = tracing::info_span!("text_completion", otel.name = name, job_id = %request.job_id);
    request_attributes(&span, &request);
    // Every upstream call before the stream starts shares the job's time budget: a stalled
    // tokenizer or engine (e.g. SIGSTOPped) gives TIMEOUT, never a request that hangs.
    let deadline = received + app.config.request_timeout();
    let opened = tokio::time::timeout_at(
        deadline.into(),
        open(app, request, ctx, received, span.clone()).instrument(span.clone()),
    )
    .await
    .unwrap_or_else(|_| Err(timed_out().into()));
    match opened {
        Ok((job, events)) => {
            // A panic ends the job's events without a last one, which the streams report as
            // an error; the in-flight permit is released as the job unwinds.
            let run = std::panic::AssertUnwindSafe(job.run()).catch_unwind();
            tokio::spawn(
                async move {
                    if let Err(payload) = run.await {
                        let message = llorch_common::failpoint::panic_message(payload.as_ref());
                        tracing::error!(panic = message, "a job's task panicked");
                    }
                }
                .instrument(span),
            );
            Ok(events)
        }
        Err(refusal) => {
            telemetry::error(&span, refusal.describe());
            Err(refusal)
        }
    }
}

/// The GenAI request attributes of a job's span.
fn request_attributes(span: &tracing::Span, request: &ValidExecute) {
    if !telemetry::enabled() {
        return;
    }
    telemetry::attribute(span, "gen_ai.operation.name", "text_completion");
    telemetry::attribute(span, "gen_ai.provider.name", "llorch");
    telemetry::attribute(span, "gen_ai.request.max_tokens", i64::from(request.max_tokens));
    telemetry::attribute(span, "gen_ai.request.temperature", f64::from(request.temperature));
    telemetry::attribute(span, "gen_ai.request.top_p", f64::from(request.top_p));
    telemetry::attribute(span, "gen_ai.request.top_k", i64::from(request.top_k));
    // Seeds are u64; OpenTelemetry integers are i64: the bits are kept.
    telemetry::attribute(span, "gen_ai.request.seed", request.seed as i64);
}

/// Everything before the job runs: see [`start`].
async fn open(
    app: &Arc<AppState>,
    request: ValidExecute,
    ctx: CallContext,
    received: Instant,
    span: tracing::Span,
) -> Result<(Job, mpsc::Receiver<JobEvent>), Refusal> {
    let permit = Arc::clone(&app.in_flight).try_acquire_owned().map_err(|_| {
        GatewayError::new(
            ErrorKind::Overloaded,
            format!("{} jobs are running; retry later", app.config.max_in_flight),
        )
    })?;
    let guard = app.register(&request.job_id).ok_or_else(|| {
        GatewayError::new(ErrorKind::Conflict, format!("job {} is already running", request.job_id))
    })?;
    let deadline = received + app.config.request_timeout();

    let mut tokenizer = app.upstreams.tokenizer.clone();
    let prompt_ids = match &request.prompt {
        Prompt::Text(text) => encode(&mut tokenizer, &ctx, text.clone()).await?,
        Prompt::Ids(ids) => ids.clone(),
    };
    let facts = app.facts().await?;
    let id_errors = request.prompt.id_errors(facts.vocab_size);
    if !id_errors.is_empty() {
        return Err(ValidationErrors { errors: id_errors }.into());
    }
    telemetry::attribute(&span, "gen_ai.request.model", facts.model.clone());
    telemetry::attribute(&span, "gen_ai.usage.input_tokens", prompt_ids.len() as i64);
    let limits = ModelLimits { n_ctx: facts.n_ctx, max_new_tokens: facts.max_new_tokens_limit };
    let ValidGenerate { request, prompt_ids } = request.check_context(prompt_ids, limits)?;

    // The detokenizer stream first: if the tokenizer is down, nothing has started yet.
    let detokenizer = Detokenizer::open(&mut tokenizer, &ctx).await?;
    let prompt_tokens = u32::try_from(prompt_ids.len()).unwrap_or(u32::MAX);
    let generate = || {
        let mut r = ctx.request(engine_request(&request, prompt_ids.clone()));
        r.set_timeout(deadline.saturating_duration_since(Instant::now()));
        r
    };
    let (generate_span, called) = telemetry::client_call(
        "llorch.engine.v1.Engine/Generate",
        app.upstreams.engines.generate(generate),
    )
    .await;
    // tonic ends a call whose grpc-timeout passed with its own CANCELLED: that is TIMEOUT here.
    let (lease, stream) = called.map_err(|e| {
        if Instant::now() >= deadline {
            timed_out()
        } else {
            GatewayError::from_status("engine", &e)
        }
    })?;
    app.metrics.prompt_tokens.fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);

    let (events, rx) = mpsc::channel(EVENT_BUFFER);
    let job = Job {
        app: Arc::clone(app),
        stop: StopMatcher::new(request.stop.clone()),
        request,
        ctx,
        events,
        engine: Some(stream),
        generate_span,
        lease,
        detokenizer,
        model: facts.model,
        received,
        deadline,
        prompt_ids,
        prompt_tokens,
        tokens_out: 0,
        first_token: None,
        last_token: None,
        queue_time: Duration::ZERO,
        span,
        guard,
        _permit: permit,
    };
    Ok((job, rx))
}

/// The tokenizer's `Encode` of a text prompt.
async fn encode(
    tokenizer: &mut crate::upstream::Tokenizer,
    ctx: &CallContext,
    text: String,
) -> Result<Vec<u32>, GatewayError> {
    let encode = tpb::EncodeRequest { text, add_special_tokens: false };
    let (span, called) = telemetry::client_call(
        "llorch.tokenizer.v1.Tokenizer/Encode",
        tokenizer.encode(ctx.request(encode)),
    )
    .await;
    let ids = called.map_err(|e| GatewayError::from_status("tokenizer", &e))?.into_inner().ids;
    telemetry::grpc_status(&span, 0, "");
    Ok(ids)
}

/// The engine's `Generate` request for `request` with the tokenized prompt.
fn engine_request(request: &ValidExecute, prompt_ids: Vec<u32>) -> epb::GenerateRequest {
    let engine = &request.engine;
    epb::GenerateRequest {
        request_id: request.job_id.clone(),
        prompt_ids,
        sampling: Some(epb::SamplingParams {
            temperature: Some(request.temperature),
            top_k: request.top_k,
            top_p: Some(request.top_p),
            min_p: request.min_p,
            repetition_penalty: Some(request.repetition_penalty),
            seed: Some(request.seed),
            presence_penalty: engine.presence_penalty,
            frequency_penalty: engine.frequency_penalty,
            logit_bias: engine.logit_bias.iter().map(|(&id, &bias)| (id, bias)).collect(),
        }),
        stopping: Some(epb::StoppingCriteria {
            max_new_tokens: request.max_tokens,
            stop_token_ids: engine.stop_token_ids.clone(),
            ignore_eos: engine.ignore_eos,
        }),
        logprobs: engine.logprobs.is_some(),
        top_logprobs: engine.logprobs.unwrap_or(0),
    }
}

/// One running job.
struct Job {
    app: Arc<AppState>,
    request: ValidExecute,
    ctx: CallContext,
    events: mpsc::Sender<JobEvent>,
    /// `None` once the job let go of it (abort).
    engine: Option<Streaming<epb::GenerateResponse>>,
    /// The `Generate` call's client span; lasts as long as the job.
    generate_span: tracing::Span,
    /// The engine replica running it (counted there until the job ends).
    lease: EngineLease,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    model: String,
    received: Instant,
    deadline: Instant,
    /// The prompt's ids, for the `Started` event (then empty).
    prompt_ids: Vec<u32>,
    /// Prompt tokens.
    prompt_tokens: u32,
    /// Token events sent so far.
    tokens_out: u32,
    /// When the first and the latest token events were sent.
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// The engine's queue time, from the first token.
    queue_time: Duration,
    /// The job's `text_completion` span.
    span: tracing::Span,
    /// Registered for `/cancel` until the job ends.
    guard: JobGuard,
    _permit: OwnedSemaphorePermit,
}

/// How the token loop ended.
enum Ending {
    /// Generation finished; the stop string when one matched.
    Finished { reason: StopReason, matched: Option<String> },
    /// The job failed, was cancelled or ran out of time.
    Failed(GatewayError),
    /// The client left; nobody to tell.
    ClientGone,
}

impl From<GatewayError> for Ending {
    fn from(e: GatewayError) -> Self {
        Self::Failed(e)
    }
}

impl Ending {
    fn outcome(&self) -> Outcome {
        match self {
            Self::Finished { reason: StopReason::StopSequence, .. } => Outcome::StopSequence,
            Self::Finished { reason: StopReason::MaxTokens | StopReason::Eos, .. } => Outcome::Ok,
            Self::Failed(e) => Outcome::of_error(e.kind),
            Self::ClientGone => Outcome::ClientGone,
        }
    }

    /// Whether the engine ended the sequence itself; otherwise it may still be generating.
    fn engine_finished(&self) -> bool {
        match self {
            Self::Finished { reason: StopReason::MaxTokens | StopReason::Eos, .. } => true,
            Self::Finished { reason: StopReason::StopSequence, .. }
            | Self::Failed(_)
            | Self::ClientGone => false,
        }
    }
}

impl Job {
    async fn run(mut self) {
        llorch_common::failpoint::hit("gateway.job");
        let started = JobEvent::Started {
            job_id: self.request.job_id.clone(),
            model: self.model.clone(),
            at: OffsetDateTime::now_utc(),
            prompt_ids: std::mem::take(&mut self.prompt_ids),
        };
        let ending = if self.events.send(started).await.is_err() {
            Ending::ClientGone
        } else {
            self.stream_tokens().await
        };
        let decode_time = match (self.first_token, self.last_token) {
            (Some(first), Some(last)) => last - first,
            _ => Duration::ZERO,
        };
        let outcome = ending.outcome();
        if !ending.engine_finished() {
            self.abort_engine().await;
        }
        self.end_attributes(&ending);
        let last = match ending {
            Ending::Finished { reason, matched } => Some(JobEvent::End(Summary {
                reason,
                stop_sequence: matched,
                tokens_out: self.tokens_out,
                tokens_in: self.prompt_tokens,
                decode_time,
                queue_time: self.queue_time,
                ttft: self.first_token.map_or(Duration::ZERO, |t| t - self.received),
            })),
            Ending::Failed(e) => Some(JobEvent::Failed(e)),
            Ending::ClientGone => None,
        };
        if let Some(last) = last {
            // Bounded: a client that stopped reading must not keep the job (and its slot).
            let _ = tokio::time::timeout(LAST_EVENT_WAIT, self.events.send(last)).await;
        }
        // Counted before the channel closes: a client that read the whole stream sees it.
        self.app.metrics.outcome(outcome);
        tracing::info!(
            job_id = %self.request.job_id,
            outcome = outcome.label(),
            tokens_out = self.tokens_out,
            decode_time_ms = decode_time.as_millis() as u64,
            "job finished"
        );
        drop(self.guard);
    }

    /// The span's usage, finish reason and status.
    fn end_attributes(&self, ending: &Ending) {
        let span = &self.span;
        telemetry::attribute(span, "gen_ai.usage.output_tokens", i64::from(self.tokens_out));
        if let Some(first) = self.first_token {
            let ttft = (first - self.received).as_secs_f64();
            telemetry::attribute(span, "gen_ai.server.time_to_first_token", ttft);
        }
        match ending {
            Ending::Finished { reason, .. } => {
                let name = opentelemetry::StringValue::from(reason.as_str());
                let reasons = opentelemetry::Array::String(vec![name]);
                let reasons = opentelemetry::Value::Array(reasons);
                telemetry::attribute(span, "gen_ai.response.finish_reasons", reasons);
            }
            Ending::Failed(e) => {
                telemetry::attribute(span, "error.type", e.code());
                telemetry::error(span, e.message.clone());
            }
            Ending::ClientGone => telemetry::error(span, "the client went away"),
        }
    }

    /// The token loop; returns how the stream should end.
    async fn stream_tokens(&mut self) -> Ending {
        let cancel = Arc::clone(&self.guard.cancel);
        loop {
            let msg = tokio::select! {
                biased;
                () = cancel.notified() => return Ending::Failed(cancelled()),
                () = self.events.closed() => return Ending::ClientGone,
                () = tokio::time::sleep_until(self.deadline.into()) => return Ending::Failed(timed_out()),
                msg = next_message(self.engine.as_mut()) => msg,
            };
            let event = match msg {
                Some(Ok(epb::GenerateResponse { event: Some(e) })) => e,
                Some(Ok(epb::GenerateResponse { event: None })) => continue,
                Some(Err(status)) => {
                    let code = status.code() as i32;
                    telemetry::grpc_status(&self.generate_span, code, status.message());
                    return Ending::Failed(mid_stream_error(&status));
                }
                None => {
                    return Ending::Failed(GatewayError::new(
                        ErrorKind::Internal,
                        "the engine stream ended without finishing",
                    ));
                }
            };
            match event {
                epb::generate_response::Event::Token(t) => {
                    match tokio::time::timeout_at(self.deadline.into(), self.token(&t))
                        .await
                        .unwrap_or_else(|_| Err(Ending::Failed(timed_out())))
                    {
                        Ok(None) => {}
                        Ok(Some(matched)) => {
                            let reason = StopReason::StopSequence;
                            return Ending::Finished { reason, matched: Some(matched) };
                        }
                        Err(ending) => return ending,
                    }
                }
                epb::generate_response::Event::Finished(f) => {
                    telemetry::grpc_status(&self.generate_span, 0, "");
                    return match stop_reason(&f) {
                        Ok(reason) => Ending::Finished { reason, matched: None },
                        Err(e) => Ending::Failed(e),
                    };
                }
            }
        }
    }

    /// Detokenizes one token, matches stop strings on its text and reports it; returns the
    /// stop string when one matched.
    async fn token(&mut self, t: &epb::Token) -> Result<Option<String>, Ending> {
        if let Some(us) = t.queue_us {
            self.queue_time = Duration::from_micros(us);
        }
        // The engine marks the token that ends generation (EOS, a stop id or the length
        // limit); it flushes the detokenizer and any text held back for a stop string.
        let is_last = t.finish_reason.is_some();
        let text = self.detokenizer.push(t.id, is_last).await?;
        let (text, matched) = match self.stop.push(&text) {
            Released::Text(mut text) => {
                if is_last {
                    text.push_str(&self.stop.finish());
                }
                (text, None)
            }
            Released::Stop { text, matched } => (text, Some(matched)),
        };
        let logprobs = self.request.engine.logprobs.map(|_| TokenLogprobs {
            logprob: t.logprob,
            top: t.top_logprobs.iter().map(|top| (top.id, top.logprob)).collect(),
        });
        let event = JobEvent::Token { index: t.index, id: t.id, text, logprobs };
        self.events.send(event).await.map_err(|_| Ending::ClientGone)?;
        self.tokens_out += 1;
        let now = Instant::now();
        match self.last_token.replace(now) {
            Some(prev) => self.app.metrics.inter_token.observe(now - prev),
            None => {
                self.first_token = Some(now);
                self.app.metrics.ttft.observe(now - self.received);
            }
        }
        self.app.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        Ok(matched)
    }

    /// Stops the engine's work for this job: drop the stream and `Abort` it by id.
    async fn abort_engine(&mut self) {
        let mut engine = self.lease.client();
        let mut req =
            self.ctx.request(epb::AbortRequest { request_ids: vec![self.request.job_id.clone()] });
        req.set_timeout(Duration::from_secs(2));
        // Dropping our end of the stream already lets the engine reap the sequence; Abort also
        // reaches it when the stream's cancellation is slow to propagate.
        self.engine = None;
        self.detokenizer.close();
        match telemetry::client_call("llorch.engine.v1.Engine/Abort", engine.abort(req)).await {
            (span, Ok(_)) => telemetry::grpc_status(&span, 0, ""),
            (_, Err(status)) => tracing::debug!(%status, "abort after the stream ended"),
        }
    }
}

async fn next_message(
    stream: Option<&mut Streaming<epb::GenerateResponse>>,
) -> Option<Result<epb::GenerateResponse, tonic::Status>> {
    match stream {
        Some(s) => s.next().await,
        None => None,
    }
}

fn cancelled() -> GatewayError {
    GatewayError::new(ErrorKind::Cancelled, "the job was cancelled")
}

/// How long a job waits for room for its last event in the client's stream.
const LAST_EVENT_WAIT: Duration = Duration::from_secs(10);

fn timed_out() -> GatewayError {
    GatewayError::new(ErrorKind::Timeout, "the job ran out of time")
}

/// The stop reason of the engine's `Finished`; a cancelled, timed out or reasonless finish
/// is an error.
fn stop_reason(finished: &epb::Finished) -> Result<StopReason, GatewayError> {
    match epb::FinishReason::try_from(finished.reason) {
        Ok(epb::FinishReason::Length) => Ok(StopReason::MaxTokens),
        Ok(epb::FinishReason::Eos | epb::FinishReason::StopToken) => Ok(StopReason::Eos),
        Ok(epb::FinishReason::Cancelled) => Err(cancelled()),
        Ok(epb::FinishReason::Deadline) => Err(timed_out()),
        Ok(epb::FinishReason::Unspecified) | Err(_) => {
            Err(GatewayError::new(ErrorKind::Internal, "the engine finished without a reason"))
        }
    }
}

/// An error status in the middle of the engine stream.
fn mid_stream_error(status: &tonic::Status) -> GatewayError {
    let e = GatewayError::from_status("engine", status);
    match e.kind {
        ErrorKind::Cancelled | ErrorKind::Timeout => e,
        ErrorKind::Unavailable | ErrorKind::UpstreamLost => {
            GatewayError::new(ErrorKind::UpstreamLost, "the engine went away during generation")
        }
        ErrorKind::InvalidRequest
        | ErrorKind::Conflict
        | ErrorKind::Unauthorized
        | ErrorKind::Overloaded
        | ErrorKind::Internal => GatewayError::new(ErrorKind::Internal, "inference failed"),
    }
}
