//! The scheduler: one thread that owns every job (waiting, prefilling, decoding) and the KV
//! caches, fed by a channel (an actor, as TGI's queue). gRPC handlers only validate, submit and
//! forward events.
//!
//! Each iteration:
//! 1. takes commands (new jobs, aborts, drain) — blocking only when there is nothing to do;
//! 2. ends every job whose client went away (its event channel is closed), whose deadline
//!    passed, or that was aborted, wherever it is; its cache goes back to the pool;
//! 3. admits waiting jobs while fewer than `max_batch` run;
//! 4. runs prefill chunks of prefilling sequences within a budget of one chunk's tokens (a
//!    prompt is always cut the same way, whatever the other requests; chunks of several
//!    sequences share a forward call only where `sgemm` rows are batch-invariant);
//! 5. runs one batched decode step for every sequence past its prompt, samples each with its
//!    own RNG and sends each its event.
//!
//! A step is two halves, as TGI's backend: [`Scheduler::step`] runs the forward call and
//! samples, giving each of its entries an [`Outcome`]; [`Scheduler::apply`] then sends each
//! token, moves each entry on ([`Entry::advance`]) and ends those that finished.
//!
//! Decode steps use the batch-invariant kernels and shared prefill steps a row-invariant
//! `sgemm`, so a stream's tokens do not depend on which other streams share its steps.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use llorch_common::shutdown::DrainSignal;
use tokio::sync::mpsc as tmpsc;

use crate::error::EngineError;
use crate::kv_cache::KvCache;
use crate::model::{Gpt2, LogitsFor, Scratch, SeqStep};
use crate::request::ValidRequest;
use crate::sequence::{FinishReason, Sequence, TokenEvent};

/// Scheduler limits.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in one decode step (at most [`crate::layers::gemm::SMALL_M`]).
    pub max_batch: usize,
    /// Most jobs waiting for a batch slot before new ones are refused.
    pub max_queue: usize,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
}

/// Where the time of one request went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Admission to the start of prefill.
    pub queue: Duration,
    /// Start of prefill to the first token.
    pub prefill: Duration,
    /// First token to the last.
    pub decode: Duration,
}

/// The end of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens sent.
    pub generated_tokens: usize,
    /// The RNG seed used.
    pub seed: u64,
    /// Where the time went.
    pub timings: Timings,
}

/// What a job's stream receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token; its `finish` is set when it is the last.
    Token(TokenEvent),
    /// The last event of a successful stream.
    Finished(Finished),
    /// The engine failed on this request; the message is safe to show.
    Error(String),
}

/// The capacity a job's event channel needs for a request of `max_new_tokens`: every event its
/// stream can get (up to `max_new_tokens` tokens, then one `Finished` or `Error`) and one spare.
/// The scheduler only ever `try_send`s, so that a slow client never stalls the batch; with room
/// for every event a send fails only when the client has gone, never because it reads slowly.
pub fn event_capacity(max_new_tokens: usize) -> usize {
    max_new_tokens + 2
}

/// A validated request on its way to the scheduler.
#[derive(Debug)]
pub struct Job {
    /// The request.
    pub req: ValidRequest,
    /// Where its events go; dropped by the client when it leaves. Make it with room for
    /// [`event_capacity`] events.
    pub events: tmpsc::Sender<Event>,
    /// When it must be finished (from `grpc-timeout`).
    pub deadline: Option<Instant>,
    /// The request's span; the scheduler opens its phase spans (`queue`, `prefill`, `decode`)
    /// under it.
    pub span: tracing::Span,
}

enum Command {
    Submit { job: Job, permit: QueuePermit, at: Instant },
    Abort(Vec<String>, tokio::sync::oneshot::Sender<usize>),
    CancelAll,
    Stop,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Submit { .. } => "Submit",
            Self::Abort(..) => "Abort",
            Self::CancelAll => "CancelAll",
            Self::Stop => "Stop",
        })
    }
}

/// Counters shared with the handlers (read by `Info`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences prefilling or decoding.
    pub running: AtomicUsize,
    /// Jobs admitted and waiting for a slot (the [`QueuePermit`]s out).
    pub waiting: AtomicUsize,
    /// KV caches held by live sequences.
    pub caches_in_use: AtomicUsize,
    /// Decode steps run.
    pub decode_steps: AtomicU64,
    finished: Mutex<HashMap<&'static str, u64>>,
}

impl Stats {
    /// Streams finished since start, by reason name.
    pub fn finished(&self) -> HashMap<&'static str, u64> {
        self.finished.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn count_finish(&self, reason: FinishReason) {
        if let Ok(mut m) = self.finished.lock() {
            *m.entry(reason.as_str()).or_default() += 1;
        }
    }
}

/// A place in the queue: taken by [`SchedulerHandle::submit`], carried by the job while it
/// waits, and given back when dropped — at admission, when the job ends while waiting, or when
/// it never reaches the scheduler. [`Stats::waiting`] counts the permits out, so it is right
/// however a job leaves the queue.
#[derive(Debug)]
struct QueuePermit {
    stats: Arc<Stats>,
}

impl QueuePermit {
    /// A permit, unless `limit` are out.
    fn take(stats: &Arc<Stats>, limit: usize) -> Option<Self> {
        stats
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1))
            .ok()?;
        Some(Self { stats: Arc::clone(stats) })
    }
}

impl Drop for QueuePermit {
    fn drop(&mut self) {
        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The handlers' side of the scheduler. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    draining: DrainSignal,
    config: SchedulerConfig,
}

impl SchedulerHandle {
    /// Queues a job, or refuses it: `QueueFull` when `max_queue` jobs wait, `Unavailable` while
    /// draining.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        if self.draining.is_started() {
            return Err(EngineError::Unavailable("draining"));
        }
        let permit = QueuePermit::take(&self.stats, self.config.max_queue)
            .ok_or(EngineError::QueueFull { limit: self.config.max_queue })?;
        // A refused send drops the command, and with it the permit.
        self.tx
            .send(Command::Submit { job, permit, at: Instant::now() })
            .map_err(|_| EngineError::Unavailable("stopped"))
    }

    /// Cancels the named requests; returns how many were live.
    pub async fn abort(&self, ids: Vec<String>) -> Result<usize, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Command::Abort(ids, tx)).map_err(|_| EngineError::Unavailable("stopped"))?;
        rx.await.map_err(|_| EngineError::Unavailable("stopped"))
    }

    /// Refuses new jobs from now on.
    pub fn start_draining(&self) {
        self.draining.start();
    }

    /// Whether new jobs are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.is_started()
    }

    /// Ends every live job with `CANCELLED`.
    pub fn cancel_all(&self) {
        let _ = self.tx.send(Command::CancelAll);
    }

    /// Waits until no job is waiting or running, or `timeout` passes; true when idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if self.stats.running.load(Ordering::SeqCst) == 0
                && self.stats.waiting.load(Ordering::SeqCst) == 0
            {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the scheduler thread (after its current step).
    pub fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
    }

    /// Live counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The limits it runs with.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }
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
                let prompt_tokens = self.request().prompt.len();
                self.phase = tracing::info_span!(parent: &self.span, "prefill", prompt_tokens);
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
        let token = match outcome {
            Outcome::Prefilled => return Next::Keep(self),
            Outcome::Failed => return Next::Leave(self, End::Fail("inference failed")),
            Outcome::Token(token) => token,
        };
        self.state = match self.state {
            State::Prefilling { seq, started } => {
                self.phase = tracing::info_span!(
                    parent: &self.span,
                    "decode",
                    generated_tokens = tracing::field::Empty
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

/// Starts the scheduler thread for `model`.
pub fn spawn(
    model: Arc<Gpt2>,
    config: SchedulerConfig,
) -> std::io::Result<(SchedulerHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(Stats::default());
    let handle =
        SchedulerHandle { tx, stats: Arc::clone(&stats), draining: DrainSignal::new(), config };
    let join = std::thread::Builder::new().name("llorch-scheduler".into()).spawn(move || {
        Scheduler {
            model,
            config,
            rx,
            stats,
            entries: BTreeMap::new(),
            arrivals: 0,
            pool: Vec::new(),
            scratch: Scratch::default(),
        }
        .run();
    })?;
    Ok((handle, join))
}

struct Scheduler {
    model: Arc<Gpt2>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    stats: Arc<Stats>,
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
                    let Job { req, events, deadline, span } = job;
                    tracing::debug!(request_id = %req.request_id, "queued");
                    let phase = tracing::info_span!(parent: &span, "queue");
                    let state = State::Waiting { req, permit };
                    let entry = Entry { events, deadline, span, phase, arrived: at, state };
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
        e.phase.record("generated_tokens", generated);
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

/// Which prefill chunks run this iteration, and how they are grouped into forward calls.
/// `prefilling` gives, oldest first, each prefilling entry's key and prompt tokens left.
///
/// Each prompt is cut into chunks of `chunk` tokens whatever else runs. The oldest chunk always
/// runs; younger ones join while their tokens fit in a budget of `chunk` tokens, so several
/// short prompts arriving together all get their first token before the next decode step,
/// while running streams never wait for more than one chunk's worth of prompt. With `shared`
/// ([`Gpt2::shared_prefill`]) the chunks of two or more tokens form one group (one `sgemm` per
/// weight matrix); single-token chunks, whose rows take the small-batch kernel, and every
/// chunk without `shared`, are groups of their own. Groups come in order of their oldest
/// entry; each lists its keys in the order given.
fn prefill_plan<K>(
    prefilling: impl Iterator<Item = (K, usize)>,
    chunk: usize,
    shared: bool,
) -> Vec<Vec<K>> {
    let mut budget = chunk;
    let mut groups: Vec<Vec<K>> = Vec::new();
    let mut together: Option<usize> = None;
    for (i, remaining) in prefilling {
        let tokens = remaining.min(chunk);
        if !groups.is_empty() && tokens > budget {
            break;
        }
        budget = budget.saturating_sub(tokens);
        let shareable = shared && tokens >= 2;
        match together {
            Some(g) if shareable => groups[g].push(i),
            _ => {
                if shareable {
                    together = Some(groups.len());
                }
                groups.push(vec![i]);
            }
        }
        if budget == 0 {
            break;
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::prefill_plan;

    fn plan(prefilling: &[(usize, usize)], shared: bool) -> Vec<Vec<usize>> {
        prefill_plan(prefilling.iter().copied(), 256, shared)
    }

    #[test]
    fn short_prompts_share_one_call_within_the_budget() {
        let eight: Vec<(usize, usize)> = (0..8).map(|i| (i, 32)).collect();
        assert_eq!(plan(&eight, true), vec![(0..8).collect::<Vec<_>>()]);
        let nine: Vec<(usize, usize)> = (0..9).map(|i| (i, 32)).collect();
        assert_eq!(plan(&nine, true), vec![(0..8).collect::<Vec<_>>()], "the ninth waits");
    }

    #[test]
    fn without_sharing_each_chunk_is_its_own_call() {
        assert_eq!(plan(&[(0, 32), (2, 32), (5, 10)], false), vec![vec![0], vec![2], vec![5]]);
    }

    #[test]
    fn single_token_chunks_run_alone() {
        assert_eq!(
            plan(&[(0, 1), (1, 40), (3, 1), (4, 5)], true),
            vec![vec![0], vec![1, 4], vec![3]]
        );
    }

    #[test]
    fn the_oldest_chunk_always_runs_and_long_prompts_are_cut() {
        assert_eq!(
            plan(&[(3, 1000), (4, 2)], true),
            vec![vec![3]],
            "a full chunk fills the budget"
        );
        assert_eq!(plan(&[(0, 300), (1, 10)], true), vec![vec![0]]);
        assert_eq!(
            plan(&[(0, 250), (1, 10), (2, 6)], true),
            vec![vec![0]],
            "the first chunk that does not fit ends the plan, so no prompt overtakes an older one"
        );
    }
}
