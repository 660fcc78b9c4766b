//! The worker API's SSE wire format: a job's [`JobEvent`]s as [`SseEvent`] frames, each
//! carrying its type twice (`event: <type>` and a `"type"` field in the `data:` JSON, as old
//! readers use either), with keep-alive comments while idle.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ErrorBody, ErrorKind, GatewayError};
use crate::job::{JobEvent, StopReason};

/// Idle time before a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// One SSE frame's payload (WORKER_API.md §1, "SSE").
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SseEvent {
    /// First frame of every stream.
    Started {
        /// The caller's job id.
        job_id: String,
        /// The model reference.
        model: String,
        /// RFC 3339, UTC.
        started_at: String,
    },
    /// One generated token.
    Token {
        /// The text this token released (UTF-8 safe; may be empty).
        t: String,
        /// 0-based index of the generated token.
        i: u32,
    },
    /// Throughput, allowed between tokens (the gateway does not send it today).
    Metrics {
        /// Generated tokens per second.
        tokens_per_sec: f64,
        /// Always 0 on a CPU worker when present.
        #[serde(skip_serializing_if = "Option::is_none")]
        vram_bytes: Option<u64>,
    },
    /// Last frame of a finished generation.
    End {
        /// Token frames sent.
        tokens_out: u32,
        /// Prompt tokens.
        tokens_in: u32,
        /// From the first token frame to the last: decode only (0 for one token).
        decode_time_ms: u64,
        /// How long the engine kept the job waiting for a batch slot.
        queue_time_ms: u64,
        /// From the request's arrival to the first token frame (tokenizing, queueing, prefill).
        ttft_ms: u64,
        /// Why generation stopped.
        stop_reason: StopReason,
        /// The stop string, only when one matched.
        #[serde(skip_serializing_if = "Option::is_none")]
        stop_sequence_matched: Option<String>,
    },
    /// Last frame of a failed, cancelled or timed-out job.
    Error(ErrorBody),
}

impl SseEvent {
    /// The `event:` name, the same as the `"type"` field.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started { .. } => "started",
            Self::Token { .. } => "token",
            Self::Metrics { .. } => "metrics",
            Self::End { .. } => "end",
            Self::Error(_) => "error",
        }
    }

    /// The `data:` JSON. Written through `serde_json::Value`, whose map keeps keys sorted: the
    /// bytes stay those the worker has always sent (fields in alphabetical order, `type` last).
    pub fn data(&self) -> String {
        // Every field is a string, a number, a bool or an enum: serialising cannot fail.
        serde_json::to_value(self).map(|v| v.to_string()).unwrap_or_default()
    }

    /// The SSE frame.
    pub fn frame(&self) -> Event {
        Event::default().event(self.name()).data(self.data())
    }
}

impl From<JobEvent> for SseEvent {
    fn from(event: JobEvent) -> Self {
        match event {
            JobEvent::Started { job_id, model, at, prompt_ids: _ } => Self::Started {
                job_id,
                model,
                started_at: at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            },
            JobEvent::Token { index, text, .. } => Self::Token { t: text, i: index },
            JobEvent::End(s) => Self::End {
                tokens_out: s.tokens_out,
                tokens_in: s.tokens_in,
                decode_time_ms: s.decode_time.as_millis() as u64,
                queue_time_ms: s.queue_time.as_millis() as u64,
                ttft_ms: s.ttft.as_millis() as u64,
                stop_reason: s.reason,
                stop_sequence_matched: s.stop_sequence,
            },
            JobEvent::Failed(e) => Self::Error(e.body()),
        }
    }
}

/// The SSE response body over a job's events; dropping it (the client left) ends the job.
pub fn stream(
    events: mpsc::Receiver<JobEvent>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
    let mut ended = false;
    let frames = ReceiverStream::new(events).map(Some).chain(futures::stream::once(async { None }));
    let frames = frames.filter_map(move |event| {
        let frame = match event {
            Some(event) => {
                ended |= matches!(event, JobEvent::End(_) | JobEvent::Failed(_));
                Some(SseEvent::from(event).frame())
            }
            None if ended => None,
            // The job's task ended without a last event (it panicked): say so, never end the
            // stream as if it had finished.
            None => Some(SseEvent::Error(job_ended_early().body()).frame()),
        };
        futures::future::ready(frame.map(Ok))
    });
    Sse::new(frames).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

/// The error of a job whose events ended without `End` or `Failed`.
pub fn job_ended_early() -> GatewayError {
    GatewayError::new(ErrorKind::Internal, "the job ended without a result")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, GatewayError};
    use crate::job::Summary;
    use axum::response::IntoResponse;

    fn started() -> JobEvent {
        // 2024-05-06T07:08:09.5Z
        let at =
            time::OffsetDateTime::from_unix_timestamp_nanos(1_714_979_289_500_000_000).unwrap();
        JobEvent::Started { job_id: "job-1".into(), model: "gpt2".into(), at, prompt_ids: vec![1] }
    }

    fn end(stop_sequence: Option<&str>) -> JobEvent {
        JobEvent::End(Summary {
            reason: if stop_sequence.is_some() {
                StopReason::StopSequence
            } else {
                StopReason::MaxTokens
            },
            stop_sequence: stop_sequence.map(str::to_owned),
            tokens_out: 2,
            tokens_in: 5,
            decode_time: Duration::from_micros(7_900),
            queue_time: Duration::from_micros(1_200),
            ttft: Duration::from_micros(31_700),
        })
    }

    /// The exact bytes the gateway sent before the events were types.
    #[test]
    fn every_event_serialises_to_the_frames_the_worker_always_sent() {
        let cases = [
            (
                started(),
                "started",
                r#"{"job_id":"job-1","model":"gpt2","started_at":"2024-05-06T07:08:09.5Z","type":"started"}"#,
            ),
            (
                JobEvent::Token { index: 3, id: 7, text: "é \"x\"\n".into(), logprobs: None },
                "token",
                r#"{"i":3,"t":"é \"x\"\n","type":"token"}"#,
            ),
            (
                end(None),
                "end",
                r#"{"decode_time_ms":7,"queue_time_ms":1,"stop_reason":"MAX_TOKENS","tokens_in":5,"tokens_out":2,"ttft_ms":31,"type":"end"}"#,
            ),
            (
                end(Some("\n\n")),
                "end",
                r#"{"decode_time_ms":7,"queue_time_ms":1,"stop_reason":"STOP_SEQUENCE","stop_sequence_matched":"\n\n","tokens_in":5,"tokens_out":2,"ttft_ms":31,"type":"end"}"#,
            ),
            (
                JobEvent::Failed(GatewayError::new(ErrorKind::UpstreamLost, "gone")),
                "error",
                r#"{"code":"INFERENCE_FAILED","message":"gone","retriable":true,"type":"error"}"#,
            ),
        ];
        for (job_event, name, data) in cases {
            let event = SseEvent::from(job_event);
            assert_eq!((event.name(), event.data().as_str()), (name, data));
        }
        let eos = SseEvent::End {
            tokens_out: 1,
            tokens_in: 1,
            decode_time_ms: 0,
            queue_time_ms: 0,
            ttft_ms: 4,
            stop_reason: StopReason::Eos,
            stop_sequence_matched: None,
        };
        assert_eq!(
            eos.data(),
            r#"{"decode_time_ms":0,"queue_time_ms":0,"stop_reason":"EOS","tokens_in":1,"tokens_out":1,"ttft_ms":4,"type":"end"}"#
        );
    }

    #[test]
    fn the_metrics_event_has_its_documented_fields() {
        let event = SseEvent::Metrics { tokens_per_sec: 12.5, vram_bytes: Some(0) };
        assert_eq!(event.name(), "metrics");
        assert_eq!(event.data(), r#"{"tokens_per_sec":12.5,"type":"metrics","vram_bytes":0}"#);
        let event = SseEvent::Metrics { tokens_per_sec: 1.0, vram_bytes: None };
        assert_eq!(event.data(), r#"{"tokens_per_sec":1.0,"type":"metrics"}"#);
    }

    #[tokio::test]
    async fn the_stream_frames_each_event_with_its_name_and_data() {
        let (tx, rx) = mpsc::channel(4);
        let hi = JobEvent::Token { index: 0, id: 17250, text: "Hi".into(), logprobs: None };
        tx.send(hi).await.unwrap();
        tx.send(end(None)).await.unwrap();
        drop(tx);
        let body = stream(rx).into_response().into_body();
        let bytes = axum::body::to_bytes(body, 1 << 16).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            "event: token\ndata: {\"i\":0,\"t\":\"Hi\",\"type\":\"token\"}\n\n\
             event: end\ndata: {\"decode_time_ms\":7,\"queue_time_ms\":1,\"stop_reason\":\"MAX_TOKENS\",\"tokens_in\":5,\"tokens_out\":2,\"ttft_ms\":31,\"type\":\"end\"}\n\n"
        );
    }
}
