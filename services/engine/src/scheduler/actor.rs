//! The scheduler thread: the [`Scheduler`] that owns every job, and the [`Entry`] state
//! machine each job goes through (waiting, prefilling, decoding).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use llorch_common::telemetry;
use tokio::sync::mpsc as tmpsc;

use super::plan::prefill_plan;
use super::{Command, Event, Finished, Job, QueuePermit, SchedulerConfig, Stats, Timings};
use crate::kv_cache::KvCache;
use crate::model::{Gpt2, LogitsFor, Scratch, SeqStep};
use crate::request::ValidRequest;
use crate::sequence::{FinishReason, Sequence, TokenEvent};

/// Runs the scheduler for `model` on the calling thread until `Stop` or every handle is gone.
pub(super) fn run(
    model: Arc<Gpt2>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Stats>,
    draining: llorch_common::shutdown::DrainSignal,
) {
    Scheduler {
        model,
        config,
        rx,
        stats,
        draining,
        entries: BTreeMap::new(),
        arrivals: 0,
        pool: Vec::new(),
        scratch: Scratch::default(),
    }
    .run();
}

/// A job from its arrival at the scheduler to its end.
struct Entry {
    /// Where its events go.
    events: tmpsc::Sender<Event>,
    /// When it must be finished.
    deadline: Option<Instant>,
    /// The request's span.
    span: tracing::Span,
    /// The span of the phase the job is in (`queue`, `prefill`, `decode`); replaced at each
    /// phase change and closed at the end, so each lasts exactly as long as its phase.
    phase: tracing::Span,
    /// When it was submitted.
    arrived: Instant,
    /// Forward steps its prompt took (recorded on the `prefill` span).
    prefill_chunks: u32,
    state: State,
}

/// Where a job is.
enum State {
    /// Waiting for a batch slot, holding its place in the queue.
    Waiting { req: ValidRequest, permit: QueuePermit },
    /// Admitted at `started`; its prompt is being prefilled.
    Prefilling { seq: Sequence, started: Instant },
    /// Generating since its first token came, at `first_token`.
    Decoding { seq: Sequence, started: Instant, first_token: Instant },
}

/// What a forward step gave one entry.
enum Outcome {
    /// Prompt tokens remain; no token yet.
    Prefilled,
    /// Its next token.
    Token(TokenEvent),
    /// The forward call failed.
    Failed,
}

/// What an entry became after a change.
enum Next {
    /// It goes on.
    Keep(Entry),
    /// It leaves the scheduler.
    Leave(Entry, End),
}

/// Why an entry leaves the scheduler.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Its stream ends with `Finished`.
    Finish(FinishReason),
    /// Its stream ends with an error.
    Fail(&'static str),
}

impl Entry {
    fn request(&self) -> &ValidRequest {
        match &self.state {
            State::Waiting { req, .. } => req,
            State::Prefilling { seq, .. } | State::Decoding { seq, .. } => seq.request(),
        }
    }

    fn id(&self) -> &str {
        &self.request().request_id
    }

    fn is_waiting(&self) -> bool {
        matches!(self.state, State::Waiting { .. })
    }

    fn sequence_mut(&mut self) -> Option<&mut Sequence> {
        match &mut self.state {
            State::Waiting { .. } => None,
            State::Prefilling { seq, .. } | State::Decoding { seq, .. } => Some(seq),
        }
    }

    /// Why it must end now, if it must: its client left, or its deadline passed.
    fn expired(&self, now: Instant) -> Option<FinishReason> {
        if self.events.is_closed() {
            Some(FinishReason::Cancelled)
        } else if self.deadline.is_some_and(|d| now >= d) {
            Some(FinishReason::Deadline)
        } else {
            None
        }
    }

    /// Admits a waiting entry: its request becomes a [`Sequence`] over `cache` and it starts
    /// prefill. Returns what it became and, when it started, the queue permit it no longer
    /// needs, for the caller to drop once the entry counts as running. (An entry already running
    /// is kept as it is.)
    fn admit(mut self, cache: KvCache) -> (Next, Option<QueuePermit>) {
        let State::Waiting { req, permit } = self.state else { return (Next::Keep(self), None) };
        match Sequence::new(req, cache) {
            Ok(seq) => {
                self.state = State::Prefilling { seq, started: Instant::now() };
                let prompt_tokens = self.request().prompt.len() as i64;
                self.phase = tracing::info_span!(
                    parent: &self.span,
                    "prefill",
                    prompt_tokens,
                    chunks = tracing::field::Empty
                );
                (Next::Keep(self), Some(permit))
            }
            Err((req, err)) => {
                self.state = State::Waiting { req, permit };
                tracing::error!(request_id = %self.id(), error = %err, "cannot start a sequence");
                (Next::Leave(self, End::Fail("the engine could not start this request")), None)
            }
        }
    }

    /// Takes a step's outcome: sends the token (the first moves the entry from prefill to
    /// decode), and says whether the entry goes on.
    fn advance(mut self, outcome: Outcome) -> Next {
        if matches!(self.state, State::Prefilling { .. }) {
            self.prefill_chunks += 1;
        }
        let mut token = match outcome {
            Outcome::Prefilled => return Next::Keep(self),
            Outcome::Failed => return Next::Leave(self, End::Fail("inference failed")),
            Outcome::Token(token) => token,
        };
        self.state = match self.state {
            State::Prefilling { seq, started } => {
                token.queued = Some(started.saturating_duration_since(self.arrived));
                self.phase.record("chunks", i64::from(self.prefill_chunks));
                self.phase = tracing::info_span!(
                    parent: &self.span,
                    "decode",
                    generated_tokens = tracing::field::Empty,
                    steps = tracing::field::Empty
                );
                State::Decoding { seq, started, first_token: Instant::now() }
            }
            state => state,
        };
        let finish = token.finish;
        let sent = self.events.try_send(Event::Token(token)).is_ok();
        match finish {
            Some(reason) => Next::Leave(self, End::Finish(reason)),
            None if !sent => Next::Leave(self, End::Finish(FinishReason::Cancelled)),
            None => Next::Keep(self),
        }
    }

    /// Where its time went, if it ended at `now`.
    fn timings(&self, now: Instant) -> Timings {
        let (started, first_token) = match &self.state {
            State::Waiting { .. } => (now, now),
            State::Prefilling { started, .. } => (*started, now),
            State::Decoding { started, first_token, .. } => (*started, *first_token),
        };
        Timings {
            queue: started.saturating_duration_since(self.arrived),
            prefill: first_token.saturating_duration_since(started),
            decode: now.saturating_duration_since(first_token),
        }
    }

    fn generated(&self) -> usize {
        match &self.state {
            State::Waiting { .. } => 0,
            State::Prefilling { seq, .. } | State::Decoding { seq, .. } => seq.generated(),
        }
    }
}

struct Scheduler {
    model: Arc<Gpt2>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Stats>,
    /// Set once the server drains (only the `engine.scheduler_draining` failpoint reads it).
    draining: llorch_common::shutdown::DrainSignal,
    /// Every live job, by arrival number: iterating gives arrival order, so admission is first
    /// come first served and batches keep their rows in order. (Not by request id: those are
    /// the callers', and nothing makes them unique.)
    entries: BTreeMap<u64, Entry>,
    /// Jobs received so far (the next arrival number).
    arrivals: u64,
    pool: Vec<KvCache>,
    scratch: Scratch,
}

impl Scheduler {
    fn run(mut self) {
        tracing::info!(
            max_batch = self.config.max_batch,
            max_queue = self.config.max_queue,
            "scheduler started"
        );
        loop {
            if !self.take_commands() {
                break;
            }
            self.reap();
            if !self.entries.is_empty() {
                llorch_common::failpoint::hit("engine.scheduler");
                if self.draining.is_started() {
                    llorch_common::failpoint::hit("engine.scheduler_draining");
                }
            }
            self.admit();
            self.prefill_step();
            self.decode_step();
            self.publish();
        }
        self.end_where(|_| Some(FinishReason::Cancelled));
        self.publish();
        tracing::info!("scheduler stopped");
    }

    /// Applies pending commands; blocks while idle. Returns false on Stop or when every handle
    /// is gone.
    fn take_commands(&mut self) -> bool {
        let mut next = if self.entries.is_empty() {
            match self.rx.recv() {
                Ok(cmd) => Some(cmd),
                Err(_) => return false,
            }
        } else {
            self.rx.try_recv().ok()
        };
        while let Some(cmd) = next {
            match cmd {
                Command::Submit { job, permit, at } => {
                    let Job { req, events, deadline, span } = *job;
                    tracing::debug!(request_id = %req.request_id, "queued");
                    let phase = tracing::info_span!(parent: &span, "queue");
                    let state = State::Waiting { req, permit };
                    let entry = Entry {
                        events,
                        deadline,
                        span,
                        phase,
                        arrived: at,
                        prefill_chunks: 0,
                        state,
                    };
                    self.entries.insert(self.arrivals, entry);
                    self.arrivals += 1;
                }
                Command::Abort(ids, reply) => {
                    let n = self.end_where(|e| {
                        ids.iter().any(|id| id == e.id()).then_some(FinishReason::Cancelled)
                    });
                    let _ = reply.send(n);
                }
                Command::CancelAll => {
                    self.end_where(|_| Some(FinishReason::Cancelled));
                }
                Command::Stop => return false,
            }
            next = self.rx.try_recv().ok();
        }
        true
    }

    /// Ends jobs whose client left (silently: nobody reads) or whose deadline passed.
    fn reap(&mut self) {
        let now = Instant::now();
        self.end_where(|e| e.expired(now));
    }

    /// Ends every job, wherever it is, for which `why` gives a reason; returns how many.
    fn end_where(&mut self, why: impl Fn(&Entry) -> Option<FinishReason>) -> usize {
        let ending: Vec<(u64, FinishReason)> =
            self.entries.iter().filter_map(|(&k, e)| why(e).map(|r| (k, r))).collect();
        for &(key, reason) in &ending {
            if let Some(e) = self.entries.remove(&key) {
                self.end(e, End::Finish(reason));
            }
        }
        ending.len()
    }

    /// Sequences prefilling or decoding.
    fn running(&self) -> usize {
        self.entries.values().filter(|e| !e.is_waiting()).count()
    }

    /// Starts waiting jobs, oldest first, while fewer than `max_batch` run.
    fn admit(&mut self) {
        let room = self.config.max_batch.saturating_sub(self.running());
        let admitted: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.is_waiting())
            .map(|(&k, _)| k)
            .take(room)
            .collect();
        for key in admitted {
            let Some(entry) = self.entries.remove(&key) else { continue };
            let cache =
                self.pool.pop().unwrap_or_else(|| self.model.new_cache(self.model.config().n_ctx));
            let (next, permit) = entry.admit(cache);
            // A permit back means it started, with the cache.
            if permit.is_some() {
                self.stats.caches_in_use.fetch_add(1, Ordering::SeqCst);
            }
            self.keep_or_end(key, next);
            // Counted as running before it stops counting as waiting, so `wait_idle` never sees
            // it as neither.
            self.publish();
            drop(permit);
        }
    }

    /// Prefill chunks of prefilling sequences, grouped into forward calls by [`prefill_plan`].
    fn prefill_step(&mut self) {
        let prefilling = self.entries.iter().filter_map(|(&k, e)| match &e.state {
            State::Prefilling { seq, .. } => Some((k, seq.prompt_remaining())),
            _ => None,
        });
        let groups =
            prefill_plan(prefilling, self.config.prefill_chunk, self.model.shared_prefill());
        for group in groups {
            let outcomes = self.step(&group, self.config.prefill_chunk);
            self.apply(outcomes);
        }
    }

    /// One batched decode step over every sequence past its prompt.
    fn decode_step(&mut self) {
        let decoding: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Decoding { .. }))
            .map(|(&k, _)| k)
            .collect();
        if !decoding.is_empty() {
            let outcomes = self.step(&decoding, 1);
            self.apply(outcomes);
            self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One forward call over the next input (at most `max_tokens` tokens) of the running
    /// entries `keys` (ascending); each samples from its row of the logits, in place. Says what
    /// each got.
    fn step(&mut self, keys: &[u64], max_tokens: usize) -> Vec<(u64, Outcome)> {
        let mut seqs: Vec<(u64, &mut Sequence)> = self
            .entries
            .iter_mut()
            .filter(|(k, _)| keys.binary_search(k).is_ok())
            .filter_map(|(&k, e)| e.sequence_mut().map(|seq| (k, seq)))
            .collect();
        let mut steps: Vec<SeqStep<'_>> =
            seqs.iter_mut().map(|(_, seq)| seq.step(max_tokens)).collect();
        let logits = self.model.forward(&mut steps, &mut self.scratch, LogitsFor::LastOfEach, None);
        drop(steps);
        match logits {
            Ok(logits) => seqs
                .into_iter()
                .zip(logits.rows())
                .map(|((k, seq), row)| {
                    (k, seq.accept(row).map_or(Outcome::Prefilled, Outcome::Token))
                })
                .collect(),
            Err(err) => {
                tracing::error!(error = %err, sequences = seqs.len(), "forward pass failed");
                seqs.into_iter().map(|(k, _)| (k, Outcome::Failed)).collect()
            }
        }
    }

    /// Applies a step's outcomes: each entry takes its own ([`Entry::advance`]), and those that
    /// ended leave.
    fn apply(&mut self, outcomes: Vec<(u64, Outcome)>) {
        for (key, outcome) in outcomes {
            if let Some(entry) = self.entries.remove(&key) {
                self.keep_or_end(key, entry.advance(outcome));
            }
        }
    }

    /// Puts entry `key` back, or ends it.
    fn keep_or_end(&mut self, key: u64, next: Next) {
        match next {
            Next::Keep(entry) => {
                self.entries.insert(key, entry);
            }
            Next::Leave(entry, end) => self.end(entry, end),
        }
    }

    /// Ends `e`: its stream gets `Finished` (when the client can still read) or the error, and
    /// its cache goes back to the pool.
    fn end(&mut self, e: Entry, end: End) {
        match end {
            End::Finish(reason) => {
                let finished = self.finished(&e, reason);
                let _ = e.events.try_send(Event::Finished(finished));
            }
            End::Fail(message) => {
                tracing::error!(request_id = %e.id(), message, "request failed");
                telemetry::error(&e.span, message);
                let _ = e.events.try_send(Event::Error(message.into()));
            }
        }
        match e.state {
            // Its queue permit is given back here.
            State::Waiting { .. } => {}
            State::Prefilling { seq, .. } | State::Decoding { seq, .. } => {
                self.stats.caches_in_use.fetch_sub(1, Ordering::SeqCst);
                if self.pool.len() < self.config.max_batch {
                    self.pool.push(seq.into_cache());
                }
            }
        }
    }

    /// `e`'s `Finished` event, logged and counted.
    fn finished(&self, e: &Entry, reason: FinishReason) -> Finished {
        let timings = e.timings(Instant::now());
        let generated = e.generated();
        e.phase.record("generated_tokens", generated as i64);
        if matches!(e.state, State::Decoding { .. }) {
            // The first token came from prefill; each further one from one decode step.
            e.phase.record("steps", generated.saturating_sub(1) as i64);
        } else {
            e.phase.record("chunks", i64::from(e.prefill_chunks));
        }
        finish_attributes(&e.span, reason, generated, &timings);
        let req = e.request();
        let finished = Finished {
            reason,
            prompt_tokens: req.prompt.len(),
            generated_tokens: generated,
            seed: req.sampling.seed,
            timings,
        };
        let _request = e.span.enter();
        tracing::info!(
            request_id = %e.id(),
            reason = reason.as_str(),
            prompt_tokens = finished.prompt_tokens,
            generated_tokens = generated,
            queue_ms = timings.queue.as_secs_f64() * 1e3,
            prefill_ms = timings.prefill.as_secs_f64() * 1e3,
            decode_ms = timings.decode.as_secs_f64() * 1e3,
            "request finished"
        );
        self.stats.count_finish(reason);
        finished
    }

    fn publish(&self) {
        self.stats.running.store(self.running(), Ordering::SeqCst);
    }
}

/// A panic on this thread unwinds through here: every job still held gets an error event
/// (so that no stream waits for a token that will not come) before its channel closes, and
/// [`super::spawn`]'s guard then reports the scheduler failed.
impl Drop for Scheduler {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for e in self.entries.values() {
            telemetry::error(&e.span, "the engine's scheduler failed");
            let _ = e.events.try_send(Event::Error(
                "the engine failed (its scheduler thread panicked) and is restarting".into(),
            ));
        }
    }
}

/// The end of a `Generate` span: usage, finish reason and latencies after the OpenTelemetry
/// GenAI conventions; a cancelled or timed-out stream marks the span failed.
fn finish_attributes(span: &tracing::Span, reason: FinishReason, generated: usize, t: &Timings) {
    if !telemetry::enabled() {
        return;
    }
    telemetry::attribute(span, "gen_ai.usage.output_tokens", generated as i64);
    let reasons = vec![opentelemetry::StringValue::from(reason.as_str().to_ascii_lowercase())];
    let reasons = opentelemetry::Value::Array(opentelemetry::Array::String(reasons));
    telemetry::attribute(span, "gen_ai.response.finish_reasons", reasons);
    if generated > 0 {
        // From admission to the first token, and per token after it, in seconds (the units of
        // the GenAI server metrics of the same names).
        let ttft = t.queue + t.prefill;
        telemetry::attribute(span, "gen_ai.server.time_to_first_token", ttft.as_secs_f64());
        if generated > 1 {
            let tpot = t.decode.as_secs_f64() / (generated - 1) as f64;
            telemetry::attribute(span, "gen_ai.server.time_per_output_token", tpot);
        }
    }
    if matches!(reason, FinishReason::Cancelled | FinishReason::Deadline) {
        telemetry::error(span, reason.as_str());
    }
}
