//! Prometheus metrics of the gateway, kept with atomics and written in the text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorKind;

/// Histogram bucket bounds in seconds.
const BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A fixed-bucket histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, c) in BUCKETS.iter().zip(&self.counts) {
            if s <= *bound {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", c.load(Ordering::Relaxed));
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ =
            writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// How one generation request (`/execute` or `/v1/completions`) ended: the `outcome` label of
/// `llorch_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Generation ended by `max_tokens` or end of text.
    Ok,
    /// Generation ended by a stop string.
    StopSequence,
    /// Refused as invalid (validation, malformed body, context overflow, duplicate job id).
    Invalid,
    /// Refused: too many jobs running.
    Overloaded,
    /// Refused: draining or an upstream down.
    Unavailable,
    /// The job ran out of time.
    Timeout,
    /// The job was cancelled.
    Cancelled,
    /// The job failed.
    Error,
    /// The client disconnected before the end.
    ClientGone,
}

impl Outcome {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::StopSequence => "stop_sequence",
            Self::Invalid => "invalid",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
            Self::ClientGone => "client_gone",
        }
    }

    /// The outcome of a request that ended with an error of `kind`.
    pub fn of_error(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::InvalidRequest | ErrorKind::Conflict | ErrorKind::Unauthorized => {
                Self::Invalid
            }
            ErrorKind::Overloaded => Self::Overloaded,
            ErrorKind::Unavailable => Self::Unavailable,
            ErrorKind::Timeout => Self::Timeout,
            ErrorKind::Cancelled => Self::Cancelled,
            ErrorKind::Internal | ErrorKind::UpstreamLost => Self::Error,
        }
    }
}

/// Every metric the gateway exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Keyed by label, so the exposition lists outcomes in label order.
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    /// Time from the request to the first token event.
    pub ttft: Histogram,
    /// Time between consecutive token events of a stream.
    pub inter_token: Histogram,
    /// Token events sent.
    pub generated_tokens: AtomicU64,
    /// Prompt tokens of accepted requests.
    pub prompt_tokens: AtomicU64,
}

impl Metrics {
    /// Counts one finished request by outcome.
    pub fn outcome(&self, outcome: Outcome) {
        if let Ok(mut m) = self.outcomes.lock() {
            *m.entry(outcome.label()).or_default() += 1;
        }
    }

    /// The text exposition; `gauges` are the live values (in-flight, engine queue, …).
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP llorch_requests_total Generation requests (/execute and /v1/completions) by outcome.\n# TYPE llorch_requests_total counter"
        );
        for (k, v) in self.outcomes.lock().map(|m| m.clone()).unwrap_or_default() {
            let _ = writeln!(out, "llorch_requests_total{{outcome=\"{k}\"}} {v}");
        }
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        for (name, help, value) in [
            (
                "llorch_generated_tokens_total",
                "Tokens streamed to clients.",
                &self.generated_tokens,
            ),
            (
                "llorch_prompt_tokens_total",
                "Prompt tokens of accepted requests.",
                &self.prompt_tokens,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        self.ttft.write(
            &mut out,
            "llorch_time_to_first_token_seconds",
            "Time from request to first token.",
        );
        self.inter_token.write(
            &mut out,
            "llorch_inter_token_latency_seconds",
            "Time between tokens of a stream.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(Duration::from_millis(3));
        m.ttft.observe(Duration::from_millis(300));
        m.outcome(Outcome::Ok);
        let text = m.render(&[("llorch_in_flight_requests", "Streams open.", 2.0)]);
        assert!(
            text.contains("llorch_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("llorch_time_to_first_token_seconds_bucket{le=\"0.5\"} 2"));
        assert!(text.contains("llorch_time_to_first_token_seconds_count 2"));
        assert!(text.contains("llorch_requests_total{outcome=\"ok\"} 1"));
        assert!(text.contains("llorch_in_flight_requests 2"));
    }
}
