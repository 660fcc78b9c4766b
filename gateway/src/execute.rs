//! `POST /execute`: validate, tokenize, check the context, start the engine stream, and stream
//! `started`, `token`…, then `end` or `error` as SSE while the job task detokenizes through the
//! tokenizer's `DecodeStream` and matches stop strings on the text.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use llorch_proto::engine::v1 as epb;
use llorch_proto::tokenizer::v1 as tpb;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tracing::Instrument;

use crate::correlation::CorrelationId;
use crate::error::{ErrorKind, GatewayError};
use crate::state::{AppState, JobGuard};
use crate::stop::{Released, StopMatcher};
use crate::upstream::CallContext;
use crate::validate::{ExecuteRequest, ValidExecute, ValidationErrors, context_error};

/// SSE events buffered per stream before the job waits for the client.
const EVENT_BUFFER: usize = 64;

/// A JSON-body rejection with the worker's error shape, keeping axum's status (400 bad JSON,
/// 415 wrong content type, 422 missing or mistyped field, 413 too large).
pub fn json_rejection(rejection: &JsonRejection) -> Response {
    let body =
        json!({ "code": "INVALID_REQUEST", "message": rejection.body_text(), "retriable": false });
    (rejection.status(), axum::Json(body)).into_response()
}

/// The `/execute` handler.
pub async fn execute(
    State(app): State<Arc<AppState>>,
    Extension(correlation): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Result<axum::Json<ExecuteRequest>, JsonRejection>,
) -> Response {
    let received = Instant::now();
    if app.is_draining() {
        app.metrics.outcome("unavailable");
        return GatewayError::new(ErrorKind::Unavailable, "the worker is shutting down")
            .into_response();
    }
    let req = match body {
        Ok(axum::Json(req)) => req,
        Err(rejection) => {
            app.metrics.outcome("invalid");
            return json_rejection(&rejection);
        }
    };
    let valid = match req.validate() {
        Ok(v) => v,
        Err(errors) => {
            app.metrics.outcome("invalid");
            return errors.into_response();
        }
    };
    tracing::Span::current().record("job_id", valid.job_id.as_str());
    let ctx =
        CallContext { traceparent: traceparent(&headers), correlation_id: correlation.0.clone() };
    match start(&app, valid, ctx, received).await {
        Ok(sse) => sse.into_response(),
        Err(Refusal::Invalid(errors)) => {
            app.metrics.outcome("invalid");
            errors.into_response()
        }
        Err(Refusal::Error(err)) => {
            app.metrics.outcome(outcome_of(err.kind));
            err.into_response()
        }
        Err(Refusal::Conflict(job_id)) => {
            app.metrics.outcome("invalid");
            let body = json!({ "code": "INVALID_REQUEST", "message": format!("job {job_id} is already running"), "retriable": false });
            (StatusCode::CONFLICT, axum::Json(body)).into_response()
        }
    }
}

/// A well-formed W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`).
fn traceparent(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2))
    .then(|| v.to_owned())
}

fn outcome_of(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidRequest => "invalid",
        ErrorKind::Overloaded => "overloaded",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Internal | ErrorKind::UpstreamLost => "error",
    }
}

enum Refusal {
    Invalid(ValidationErrors),
    Error(GatewayError),
    Conflict(String),
}

impl From<GatewayError> for Refusal {
    fn from(e: GatewayError) -> Self {
        Self::Error(e)
    }
}

/// Everything before the first byte of the stream; any failure here is an HTTP status.
async fn start(
    app: &Arc<AppState>,
    valid: ValidExecute,
    ctx: CallContext,
    received: Instant,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, Infallible>> + use<>>, Refusal> {
    let permit = Arc::clone(&app.in_flight).try_acquire_owned().map_err(|_| {
        GatewayError::new(
            ErrorKind::Overloaded,
            format!("{} jobs are running; retry later", app.config.max_in_flight),
        )
    })?;
    let guard =
        app.register(&valid.job_id).ok_or_else(|| Refusal::Conflict(valid.job_id.clone()))?;
    let deadline = received + app.config.request_timeout();

    let mut tokenizer = app.upstreams.tokenizer.clone();
    let encode = tpb::EncodeRequest { text: valid.prompt.clone(), add_special_tokens: false };
    let prompt_ids = tokenizer
        .encode(ctx.request(encode))
        .await
        .map_err(|e| GatewayError::from_status("tokenizer", &e))?
        .into_inner()
        .ids;
    let facts = app.facts().await?;
    if prompt_ids.len() + valid.max_tokens as usize > facts.n_ctx as usize {
        return Err(Refusal::Invalid(ValidationErrors {
            errors: vec![context_error(prompt_ids.len(), valid.max_tokens, facts.n_ctx)],
        }));
    }

    // The detokenizer stream first: if the tokenizer is down, nothing has started yet.
    let (decode_tx, decode_rx) = mpsc::channel(16);
    let decoded = tokenizer
        .decode_stream(ctx.request(ReceiverStream::new(decode_rx)))
        .await
        .map_err(|e| GatewayError::from_status("tokenizer", &e))?
        .into_inner();

    let prompt_tokens = prompt_ids.len();
    let generate = epb::GenerateRequest {
        request_id: valid.job_id.clone(),
        prompt_ids,
        sampling: Some(epb::SamplingParams {
            temperature: Some(valid.temperature),
            top_k: valid.top_k,
            top_p: Some(valid.top_p),
            min_p: valid.min_p,
            repetition_penalty: Some(valid.repetition_penalty),
            seed: Some(valid.seed),
        }),
        stopping: Some(epb::StoppingCriteria {
            max_new_tokens: valid.max_tokens,
            stop_token_ids: vec![],
            ignore_eos: false,
        }),
        logprobs: false,
        top_logprobs: 0,
    };
    let mut request = ctx.request(generate);
    request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    let mut engine = app.upstreams.engine.clone();
    let stream = engine
        .generate(request)
        .await
        .map_err(|e| GatewayError::from_status("engine", &e))?
        .into_inner();
    app.metrics.prompt_tokens.fetch_add(prompt_tokens as u64, std::sync::atomic::Ordering::Relaxed);

    let (events, rx) = mpsc::channel(EVENT_BUFFER);
    let job = Job {
        app: Arc::clone(app),
        stop: StopMatcher::new(valid.stop.clone()),
        valid,
        ctx,
        events,
        engine: Some(stream),
        decode_tx: Some(decode_tx),
        decoded,
        eos: facts.eos_token_id,
        model: facts.model,
        received,
        deadline,
        guard,
        _permit: permit,
    };
    tokio::spawn(job.run().in_current_span());
    Ok(Sse::new(ReceiverStream::new(rx).map(Ok))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}

/// One running job: reads the engine stream, detokenizes, matches stops, writes SSE events.
struct Job {
    app: Arc<AppState>,
    valid: ValidExecute,
    ctx: CallContext,
    events: mpsc::Sender<Event>,
    engine: Option<Streaming<epb::GenerateResponse>>,
    decode_tx: Option<mpsc::Sender<tpb::DecodeStreamRequest>>,
    decoded: Streaming<tpb::DecodeStreamResponse>,
    stop: StopMatcher,
    eos: u32,
    model: String,
    received: Instant,
    deadline: Instant,
    guard: JobGuard,
    _permit: OwnedSemaphorePermit,
}

/// How a job ended, for the last event and the metrics.
enum Ending {
    End { stop_reason: &'static str, matched: Option<String> },
    Error(GatewayError),
    ClientGone,
}

fn event(kind: &str, mut data: serde_json::Value) -> Event {
    data["type"] = json!(kind);
    Event::default().event(kind).data(data.to_string())
}

impl Job {
    async fn run(mut self) {
        let started_at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let started = event(
            "started",
            json!({ "job_id": self.valid.job_id, "model": self.model, "started_at": started_at }),
        );
        let begin = Instant::now();
        let mut tokens_out = 0u32;
        let ending = if self.events.send(started).await.is_err() {
            Ending::ClientGone
        } else {
            self.stream_tokens(&mut tokens_out).await
        };
        let decode_time_ms = begin.elapsed().as_millis() as u64;
        let outcome = match &ending {
            Ending::End { stop_reason: "STOP_SEQUENCE", .. } => "stop_sequence",
            Ending::End { .. } => "ok",
            Ending::Error(e) => outcome_of(e.kind),
            Ending::ClientGone => "client_gone",
        };
        if !matches!(ending, Ending::End { stop_reason: "MAX_TOKENS" | "EOS", .. }) {
            self.abort_engine().await;
        }
        let last = match ending {
            Ending::End { stop_reason, matched } => {
                let mut data = json!({ "tokens_out": tokens_out, "decode_time_ms": decode_time_ms, "stop_reason": stop_reason });
                if let Some(m) = matched {
                    data["stop_sequence_matched"] = json!(m);
                }
                Some(event("end", data))
            }
            Ending::Error(e) => Some(event(
                "error",
                json!({ "code": e.code(), "message": e.message, "retriable": e.retriable() }),
            )),
            Ending::ClientGone => None,
        };
        if let Some(last) = last {
            let _ = self.events.send(last).await;
        }
        self.app.metrics.outcome(outcome);
        tracing::info!(job_id = %self.valid.job_id, outcome, tokens_out, decode_time_ms, "job finished");
        drop(self.guard);
    }

    /// The token loop; returns how the stream should end.
    async fn stream_tokens(&mut self, tokens_out: &mut u32) -> Ending {
        let cancel = Arc::clone(&self.guard.cancel);
        let mut last_token: Option<Instant> = None;
        loop {
            let msg = tokio::select! {
                biased;
                () = cancel.notified() => return Ending::Error(GatewayError::new(ErrorKind::Cancelled, "the job was cancelled")),
                () = self.events.closed() => return Ending::ClientGone,
                () = tokio::time::sleep_until(self.deadline.into()) => {
                    return Ending::Error(GatewayError::new(ErrorKind::Timeout, "the job ran out of time"));
                }
                msg = next_message(self.engine.as_mut()) => msg,
            };
            let event = match msg {
                Some(Ok(epb::GenerateResponse { event: Some(e) })) => e,
                Some(Ok(epb::GenerateResponse { event: None })) => continue,
                Some(Err(status)) => return Ending::Error(mid_stream_error(&status)),
                None => {
                    return Ending::Error(GatewayError::new(
                        ErrorKind::Internal,
                        "the engine stream ended without finishing",
                    ));
                }
            };
            match event {
                epb::generate_response::Event::Token(t) => {
                    let is_last = t.id == self.eos || t.index + 1 >= self.valid.max_tokens;
                    let text = match self.detokenize(t.id, is_last).await {
                        Ok(text) => text,
                        Err(e) => return Ending::Error(e),
                    };
                    let (text, matched) = match self.stop.push(&text) {
                        Released::Text(mut t) => {
                            if is_last {
                                t.push_str(&self.stop.finish());
                            }
                            (t, None)
                        }
                        Released::Stop { text, matched } => (text, Some(matched)),
                    };
                    if self.events.send(event_token(&text, t.index)).await.is_err() {
                        return Ending::ClientGone;
                    }
                    *tokens_out += 1;
                    let now = Instant::now();
                    match last_token.replace(now) {
                        Some(prev) => self.app.metrics.inter_token.observe(now - prev),
                        None => self.app.metrics.ttft.observe(now - self.received),
                    }
                    self.app
                        .metrics
                        .generated_tokens
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(m) = matched {
                        return Ending::End { stop_reason: "STOP_SEQUENCE", matched: Some(m) };
                    }
                }
                epb::generate_response::Event::Finished(f) => {
                    return match epb::FinishReason::try_from(f.reason) {
                        Ok(epb::FinishReason::Length) => {
                            Ending::End { stop_reason: "MAX_TOKENS", matched: None }
                        }
                        Ok(epb::FinishReason::Eos | epb::FinishReason::StopToken) => {
                            Ending::End { stop_reason: "EOS", matched: None }
                        }
                        Ok(epb::FinishReason::Cancelled) => Ending::Error(GatewayError::new(
                            ErrorKind::Cancelled,
                            "the job was cancelled",
                        )),
                        Ok(epb::FinishReason::Deadline) => Ending::Error(GatewayError::new(
                            ErrorKind::Timeout,
                            "the job ran out of time",
                        )),
                        Ok(epb::FinishReason::Unspecified) | Err(_) => {
                            Ending::Error(GatewayError::new(
                                ErrorKind::Internal,
                                "the engine finished without a reason",
                            ))
                        }
                    };
                }
            }
        }
    }

    /// Sends one id through `DecodeStream` and returns the text it completed; for the last
    /// token, half-closes and adds the flushed remainder.
    async fn detokenize(&mut self, id: u32, is_last: bool) -> Result<String, GatewayError> {
        let fail = |what: &str| {
            GatewayError::new(ErrorKind::Internal, format!("detokenizer stream {what}"))
        };
        let Some(tx) = self.decode_tx.as_ref() else { return Err(fail("already closed")) };
        tx.send(tpb::DecodeStreamRequest { ids: vec![id], skip_special_tokens: true })
            .await
            .map_err(|_| fail("closed"))?;
        if is_last {
            self.decode_tx = None;
        }
        let mut text = String::new();
        loop {
            match self.decoded.message().await {
                Ok(Some(reply)) => text.push_str(&reply.text),
                Ok(None) if is_last => return Ok(text),
                Ok(None) => return Err(fail("ended early")),
                Err(status) => return Err(GatewayError::from_status("tokenizer", &status)),
            }
            if !is_last {
                return Ok(text);
            }
        }
    }

    /// Stops the engine's work for this job: drop the stream and `Abort` it by id.
    async fn abort_engine(&mut self) {
        let mut engine = self.app.upstreams.engine.clone();
        let mut req =
            self.ctx.request(epb::AbortRequest { request_ids: vec![self.valid.job_id.clone()] });
        req.set_timeout(Duration::from_secs(2));
        // Dropping our end of the stream already lets the engine reap the sequence; Abort also
        // reaches it when the stream's cancellation is slow to propagate.
        self.engine = None;
        self.decode_tx = None;
        if let Err(status) = engine.abort(req).await {
            tracing::debug!(%status, "abort after the stream ended");
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

fn event_token(text: &str, index: u32) -> Event {
    event("token", json!({ "t": text, "i": index }))
}

fn mid_stream_error(status: &tonic::Status) -> GatewayError {
    let e = GatewayError::from_status("engine", status);
    match e.kind {
        ErrorKind::Cancelled | ErrorKind::Timeout => e,
        ErrorKind::Unavailable | ErrorKind::UpstreamLost => {
            GatewayError::new(ErrorKind::UpstreamLost, "the engine went away during generation")
        }
        ErrorKind::InvalidRequest | ErrorKind::Overloaded | ErrorKind::Internal => {
            GatewayError::new(ErrorKind::Internal, "inference failed")
        }
    }
}
