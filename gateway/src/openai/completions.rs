//! `POST /v1/completions`: the OpenAI request becomes the same validated job as `/execute`'s
//! ([`job::start`]: admission, cancellation, limits, correlation id, metrics and spans are
//! that path's), and its [`JobEvent`]s are answered as one completion object, or as SSE chunks
//! `data: {…}` ending with `data: [DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use super::error::OpenAiError;
use super::logprobs::{Logprobs, TokenTexts};
use super::request::{CompletionRequest, ValidCompletion};
use crate::correlation::CorrelationId;
use crate::error::{ErrorKind, GatewayError};
use crate::job::{self, JobEvent, StopReason, Summary};
use crate::metrics::Outcome;
use crate::state::AppState;
use crate::upstream::CallContext;
use crate::validate::Prompt;

/// Idle time before a keep-alive comment in a stream.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// A refusal before the job started, with the outcome it is counted as.
struct Refused(Outcome, OpenAiError);

impl From<OpenAiError> for Refused {
    fn from(e: OpenAiError) -> Self {
        Self(Outcome::Invalid, e)
    }
}

impl From<GatewayError> for Refused {
    fn from(e: GatewayError) -> Self {
        Self(Outcome::of_error(e.kind), e.into())
    }
}

/// What every response of one completion shares.
#[derive(Debug, Clone)]
struct Head {
    id: String,
    created: i64,
    model: String,
}

impl Head {
    fn object(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": Value::Null,
            "choices": choices,
        })
    }
}

/// The `/v1/completions` handler.
pub async fn completions(
    State(app): State<Arc<AppState>>,
    Extension(correlation): Extension<CorrelationId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received = Instant::now();
    llorch_common::failpoint::hit("gateway.completions");
    match start(&app, correlation, body, received).await {
        Ok(resp) => resp,
        Err(Refused(outcome, e)) => {
            app.metrics.outcome(outcome);
            e.into_response()
        }
    }
}

async fn start(
    app: &Arc<AppState>,
    correlation: CorrelationId,
    body: Result<Bytes, BytesRejection>,
    received: Instant,
) -> Result<Response, Refused> {
    if app.is_draining() {
        Err(GatewayError::new(ErrorKind::Unavailable, "the worker is shutting down"))?;
    }
    let body = body.map_err(|r| OpenAiError::unreadable_body(r.status(), r.body_text()))?;
    let request = CompletionRequest::parse(&body)?;
    let facts = app.facts().await?;
    if let Some(model) = request.model.as_deref().filter(|&m| m != facts.model) {
        Err(OpenAiError::model_not_found(model, &facts.model))?;
    }
    if let Some(user) = &request.user {
        tracing::info!(user, "completion for user");
    }
    let valid = request.validate(facts.vocab_size)?;
    let ValidCompletion { job, echo, stream, include_usage } = valid;
    tracing::Span::current().record("job_id", job.job_id.as_str());
    let head = Head {
        id: job.job_id.clone(),
        created: time::OffsetDateTime::now_utc().unix_timestamp(),
        model: facts.model,
    };
    let echo_text = match (&job.prompt, echo) {
        (Prompt::Text(text), true) => Some(text.clone()),
        (_, _) => None,
    };
    let ctx = CallContext::new(correlation.0, app.config.request_timeout());
    let answer = Answer {
        head,
        echo,
        echo_text,
        include_usage,
        texts: TokenTexts::new(app.upstreams.tokenizer.clone(), ctx.clone()),
        logprobs: job.engine.logprobs.is_some(),
    };
    let events = job::start(app, job, ctx, received)
        .await
        .map_err(|refusal| Refused(refusal.outcome(), refusal.into()))?;
    if stream {
        Ok(answer.stream(events).into_response())
    } else {
        Ok(answer
            .collect(events)
            .await
            .map_or_else(IntoResponse::into_response, |v| axum::Json(v).into_response()))
    }
}

/// How to answer one running completion.
struct Answer {
    head: Head,
    echo: bool,
    /// The prompt text to echo (a token-id prompt is decoded instead).
    echo_text: Option<String>,
    include_usage: bool,
    texts: TokenTexts,
    logprobs: bool,
}

fn finish_reason(summary: &Summary) -> &'static str {
    match summary.reason {
        StopReason::MaxTokens => "length",
        StopReason::Eos | StopReason::StopSequence => "stop",
    }
}

fn usage(summary: &Summary) -> Value {
    json!({
        "prompt_tokens": summary.tokens_in,
        "completion_tokens": summary.tokens_out,
        "total_tokens": summary.tokens_in + summary.tokens_out,
    })
}

fn job_ended_early() -> OpenAiError {
    crate::sse::job_ended_early().into()
}

impl Answer {
    /// The echoed prompt: its text, and its tokens into `logprobs`.
    async fn echo(
        &mut self,
        prompt_ids: &[u32],
        logprobs: Option<&mut Logprobs>,
    ) -> Result<String, GatewayError> {
        let text = match self.echo_text.take() {
            Some(text) => text,
            None => self.texts.decode_all(prompt_ids).await?,
        };
        if let Some(out) = logprobs {
            self.texts.load(prompt_ids.iter().copied()).await?;
            self.texts.push_prompt(out, prompt_ids);
        }
        Ok(text)
    }

    /// Adds one token's logprobs (its text starting at character `offset`).
    async fn token_logprobs(
        &mut self,
        out: &mut Logprobs,
        id: u32,
        lp: &job::TokenLogprobs,
        offset: usize,
    ) -> Result<(), GatewayError> {
        self.texts.load(std::iter::once(id).chain(lp.top.iter().map(|&(id, _)| id))).await?;
        self.texts.push_generated(out, id, lp, offset);
        Ok(())
    }

    /// Reads the whole job into one completion object.
    async fn collect(mut self, mut events: mpsc::Receiver<JobEvent>) -> Result<Value, OpenAiError> {
        let mut text = String::new();
        let mut logprobs = self.logprobs.then(Logprobs::default);
        while let Some(event) = events.recv().await {
            match event {
                JobEvent::Started { prompt_ids, .. } => {
                    if self.echo {
                        text = self.echo(&prompt_ids, logprobs.as_mut()).await?;
                    }
                }
                JobEvent::Token { id, text: delta, logprobs: lp, .. } => {
                    if let (Some(out), Some(lp)) = (logprobs.as_mut(), lp) {
                        self.token_logprobs(out, id, &lp, text.chars().count()).await?;
                    }
                    text.push_str(&delta);
                }
                JobEvent::End(summary) => {
                    let choice = json!({
                        "index": 0,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason(&summary),
                    });
                    let mut object = self.head.object(json!([choice]));
                    object["usage"] = usage(&summary);
                    return Ok(object);
                }
                JobEvent::Failed(e) => return Err(e.into()),
            }
        }
        Err(job_ended_early())
    }

    /// One chunk of the stream.
    fn chunk(&self, text: &str, logprobs: Option<Logprobs>, finish: Option<&str>) -> Event {
        let choice =
            json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish});
        let mut object = self.head.object(json!([choice]));
        if self.include_usage {
            object["usage"] = Value::Null;
        }
        Event::default().data(object.to_string())
    }

    /// The job as SSE chunks: one per token that released text (or has logprobs), a last one
    /// with `finish_reason`, then the usage chunk when asked for, then `[DONE]`. An error after
    /// the start is a `data: {"error":{…}}` chunk before `[DONE]`. The client leaving drops
    /// the job's events, which ends the job.
    fn stream(
        self,
        events: mpsc::Receiver<JobEvent>,
    ) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>> + use<>> {
        let (tx, rx) = mpsc::channel(16);
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let end = self.send_chunks(events, &tx).await;
                if let Err(Some(e)) = end {
                    let _ = tx.send(Event::default().data(e.body().to_string())).await;
                }
                let _ = tx.send(Event::default().data("[DONE]")).await;
            }
            .instrument(span),
        );
        Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
    }

    /// Sends the chunks; `Err(None)` when the client left, `Err(Some(e))` when the job failed.
    async fn send_chunks(
        mut self,
        mut events: mpsc::Receiver<JobEvent>,
        tx: &mpsc::Sender<Event>,
    ) -> Result<(), Option<OpenAiError>> {
        let gone = |_| None;
        let failed = |e: GatewayError| Some(OpenAiError::from(e));
        // Characters sent so far: where the next token's text starts.
        let mut offset = 0;
        while let Some(event) = events.recv().await {
            match event {
                JobEvent::Started { prompt_ids, .. } => {
                    if self.echo {
                        let mut lp = self.logprobs.then(Logprobs::default);
                        let text = self.echo(&prompt_ids, lp.as_mut()).await.map_err(failed)?;
                        offset += text.chars().count();
                        tx.send(self.chunk(&text, lp, None)).await.map_err(gone)?;
                    }
                }
                JobEvent::Token { id, text, logprobs, .. } => {
                    let lp = match logprobs {
                        Some(lp) if self.logprobs => {
                            let mut out = Logprobs::default();
                            self.token_logprobs(&mut out, id, &lp, offset).await.map_err(failed)?;
                            Some(out)
                        }
                        _ => None,
                    };
                    if text.is_empty() && lp.is_none() {
                        continue;
                    }
                    offset += text.chars().count();
                    tx.send(self.chunk(&text, lp, None)).await.map_err(gone)?;
                }
                JobEvent::End(summary) => {
                    let last = self.chunk("", None, Some(finish_reason(&summary)));
                    tx.send(last).await.map_err(gone)?;
                    if self.include_usage {
                        let mut object = self.head.object(json!([]));
                        object["usage"] = usage(&summary);
                        tx.send(Event::default().data(object.to_string())).await.map_err(gone)?;
                    }
                    return Ok(());
                }
                JobEvent::Failed(e) => return Err(failed(e)),
            }
        }
        Err(Some(job_ended_early()))
    }
}
