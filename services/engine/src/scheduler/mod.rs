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
//! The thread (`actor`) keeps every job in one map keyed by arrival, each in a state (waiting,
//! prefilling, decoding). A step is two halves, as in TGI's backend: the forward call and
//! sampling give each of its entries an outcome; then each entry takes its outcome (its token
//! is sent, it moves on or ends). Which prefill chunks run together is `plan`'s pure function.
//!
//! Decode steps use the batch-invariant kernels and shared prefill steps a row-invariant
//! `sgemm`, so a stream's tokens do not depend on which other streams share its steps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use llorch_common::shutdown::DrainSignal;
use tokio::sync::mpsc as tmpsc;

use crate::error::EngineError;
use crate::model::Gpt2;
use crate::request::ValidRequest;
use crate::sequence::{FinishReason, TokenEvent};

mod actor;
mod plan;

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
    Submit { job: Box<Job>, permit: QueuePermit, at: Instant },
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
    /// Jobs admitted and waiting for a slot (the queue permits out).
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
    /// Fired when the scheduler thread panicked.
    failed: DrainSignal,
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
            .send(Command::Submit { job: Box::new(job), permit, at: Instant::now() })
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

    /// Resolves if the scheduler thread panics: every job it held has had an error event, and
    /// no new job will run.
    pub fn failed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.failed.started()
    }

    /// Whether the scheduler thread has panicked.
    pub fn has_failed(&self) -> bool {
        self.failed.is_started()
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

/// Starts the scheduler thread for `model`.
pub fn spawn(
    model: Arc<Gpt2>,
    config: SchedulerConfig,
) -> std::io::Result<(SchedulerHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let stats = Arc::new(Stats::default());
    let handle = SchedulerHandle {
        tx,
        stats: Arc::clone(&stats),
        draining: DrainSignal::new(),
        failed: DrainSignal::new(),
        config,
    };
    let failed = handle.failed.clone();
    let draining = handle.draining.clone();
    let join = std::thread::Builder::new().name("llorch-scheduler".into()).spawn(move || {
        let run = std::panic::AssertUnwindSafe(|| actor::run(model, config, rx, stats, draining));
        if let Err(payload) = std::panic::catch_unwind(run) {
            let message = llorch_common::failpoint::panic_message(payload.as_ref());
            tracing::error!(panic = message, "the scheduler thread panicked");
            failed.start();
        }
    })?;
    Ok((handle, join))
}
