//! The scheduler: one thread that owns the waiting queue, the running set and the KV caches,
//! fed by a channel (an actor, as TGI's queue). gRPC handlers only validate, submit and forward
//! events.
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
//! Decode steps use the batch-invariant kernels and shared prefill steps a row-invariant
//! `sgemm`, so a stream's tokens do not depend on which other streams share its steps.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tmpsc;

use crate::error::EngineError;
use crate::kv_cache::KvCache;
use crate::model::{Gpt2, LogitsFor, Scratch};
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
    /// A generated token.
    Token(TokenEvent),
    /// The last event of a successful stream.
    Finished(Finished),
    /// The engine failed on this request; the message is safe to show.
    Error(String),
}

/// A validated request on its way to the scheduler.
#[derive(Debug)]
pub struct Job {
    /// The request.
    pub req: ValidRequest,
    /// Where its events go; dropped by the client when it leaves.
    pub events: tmpsc::Sender<Event>,
    /// When it must be finished (from `grpc-timeout`).
    pub deadline: Option<Instant>,
    /// The request's span; the scheduler opens its phase spans (`queue`, `prefill`, `decode`)
    /// under it.
    pub span: tracing::Span,
}

enum Command {
    Submit(Job, Instant),
    Abort(Vec<String>, tokio::sync::oneshot::Sender<usize>),
    CancelAll,
    Stop,
}

/// Counters shared with the handlers (read by `Info`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Sequences prefilling or decoding.
    pub running: AtomicUsize,
    /// Jobs admitted and waiting for a slot.
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

/// The handlers' side of the scheduler. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    draining: Arc<AtomicBool>,
    config: SchedulerConfig,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Submit(..) => "Submit",
            Self::Abort(..) => "Abort",
            Self::CancelAll => "CancelAll",
            Self::Stop => "Stop",
        })
    }
}

impl SchedulerHandle {
    /// Queues a job, or refuses it: `QueueFull` when `max_queue` jobs wait, `Unavailable` while
    /// draining.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(EngineError::Unavailable("draining"));
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.config.max_queue {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull { limit: self.config.max_queue });
        }
        self.tx.send(Command::Submit(job, Instant::now())).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            EngineError::Unavailable("stopped")
        })
    }

    /// Cancels the named requests; returns how many were live.
    pub async fn abort(&self, ids: Vec<String>) -> Result<usize, EngineError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Command::Abort(ids, tx)).map_err(|_| EngineError::Unavailable("stopped"))?;
        rx.await.map_err(|_| EngineError::Unavailable("stopped"))
    }

    /// Refuses new jobs from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether new jobs are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
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

/// A job and its generation state while it waits or runs.
struct Entry {
    job: Job,
    admitted: Instant,
    started: Option<Instant>,
    first_token: Option<Instant>,
    seq: Option<Sequence>,
    /// The span of the phase the request is in; replaced at each phase change, closed at the
    /// end, so each phase's span lasts exactly as long as the phase.
    phase: tracing::Span,
}

impl Entry {
    fn id(&self) -> &str {
        &self.job.req.request_id
    }

    fn enter_phase(&mut self, phase: Phase) {
        let parent = &self.job.span;
        self.phase = match phase {
            Phase::Prefill => {
                tracing::info_span!(parent: parent, "prefill", prompt_tokens = self.job.req.prompt.len())
            }
            Phase::Decode => {
                tracing::info_span!(parent: parent, "decode", generated_tokens = tracing::field::Empty)
            }
        };
    }
}

/// The phases after `queue` that get their own span.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Prefill,
    Decode,
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
        draining: Arc::new(AtomicBool::new(false)),
        config,
    };
    let join = std::thread::Builder::new().name("llorch-scheduler".into()).spawn(move || {
        Scheduler {
            model,
            config,
            rx,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
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
    waiting: VecDeque<Entry>,
    running: Vec<Entry>,
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
        self.end_all(FinishReason::Cancelled);
        self.publish();
        tracing::info!("scheduler stopped");
    }

    /// Applies pending commands; blocks while idle. Returns false on Stop or when every handle
    /// is gone.
    fn take_commands(&mut self) -> bool {
        let idle = self.waiting.is_empty() && self.running.is_empty();
        let mut next = if idle {
            match self.rx.recv() {
                Ok(cmd) => Some(cmd),
                Err(_) => return false,
            }
        } else {
            self.rx.try_recv().ok()
        };
        while let Some(cmd) = next {
            match cmd {
                Command::Submit(job, at) => {
                    tracing::debug!(request_id = %job.req.request_id, "queued");
                    let phase = tracing::info_span!(parent: &job.span, "queue");
                    self.waiting.push_back(Entry {
                        job,
                        admitted: at,
                        started: None,
                        first_token: None,
                        seq: None,
                        phase,
                    });
                }
                Command::Abort(ids, reply) => {
                    let n = self.cancel_where(
                        |e| ids.iter().any(|id| id == e.id()),
                        FinishReason::Cancelled,
                    );
                    let _ = reply.send(n);
                }
                Command::CancelAll => {
                    self.end_all(FinishReason::Cancelled);
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
        self.cancel_where(|e| e.job.events.is_closed(), FinishReason::Cancelled);
        self.cancel_where(|e| e.job.deadline.is_some_and(|d| now >= d), FinishReason::Deadline);
    }

    /// Ends every job matching `pred` with `reason`; returns how many.
    fn cancel_where(&mut self, pred: impl Fn(&Entry) -> bool, reason: FinishReason) -> usize {
        let mut n = 0;
        let (keep, gone): (VecDeque<Entry>, VecDeque<Entry>) =
            self.waiting.drain(..).partition(|e| !pred(e));
        self.waiting = keep;
        for e in gone {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            self.finish(e, reason);
            n += 1;
        }
        let (keep, gone): (Vec<Entry>, Vec<Entry>) = self.running.drain(..).partition(|e| !pred(e));
        self.running = keep;
        for e in gone {
            self.finish(e, reason);
            n += 1;
        }
        n
    }

    fn end_all(&mut self, reason: FinishReason) {
        self.cancel_where(|_| true, reason);
    }

    /// Moves waiting jobs into the running set while there is room.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            let Some(mut e) = self.waiting.pop_front() else { break };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let cache =
                self.pool.pop().unwrap_or_else(|| self.model.new_cache(self.model.config().n_ctx));
            match Sequence::new(e.job.req.clone(), cache) {
                Ok(seq) => {
                    e.seq = Some(seq);
                    e.started = Some(Instant::now());
                    e.enter_phase(Phase::Prefill);
                    self.stats.caches_in_use.fetch_add(1, Ordering::SeqCst);
                    self.running.push(e);
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot start a sequence");
                    let _ = e
                        .job
                        .events
                        .try_send(Event::Error("the engine could not start this request".into()));
                }
            }
        }
    }

    /// Prefill chunks of prefilling sequences, grouped into forward calls by [`prefill_plan`].
    fn prefill_step(&mut self) {
        let prefilling = self.running.iter().enumerate().filter_map(|(i, e)| {
            e.seq.as_ref().filter(|s| s.is_prefilling()).map(|s| (i, s.prompt_remaining()))
        });
        let groups =
            prefill_plan(prefilling, self.config.prefill_chunk, self.model.shared_prefill());
        let mut ended: Vec<usize> = Vec::new();
        for group in groups {
            // Entries that ended in earlier groups shift the later indexes down.
            let now: Vec<usize> =
                group.iter().map(|&i| i - ended.iter().filter(|&&r| r < i).count()).collect();
            let done = self.step(&now, self.config.prefill_chunk);
            ended.extend(group.iter().zip(done).filter(|(_, d)| *d).map(|(&i, _)| i));
        }
    }

    /// One batched decode step over every sequence past its prompt.
    fn decode_step(&mut self) {
        let idx: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                self.running[i]
                    .seq
                    .as_ref()
                    .is_some_and(|s| !s.is_prefilling() && s.generated() > 0)
            })
            .collect();
        if !idx.is_empty() {
            self.step(&idx, 1);
            self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One forward call over the next input (at most `max_tokens` tokens) of running entries
    /// `idx` (ascending), then each gets its token, or the error. Says, for each, whether it
    /// ended and left the running set.
    fn step(&mut self, idx: &[usize], max_tokens: usize) -> Vec<bool> {
        let mut steps = Vec::with_capacity(idx.len());
        let mut next = idx.iter().peekable();
        for (i, e) in self.running.iter_mut().enumerate() {
            if next.next_if_eq(&&i).is_some()
                && let Some(seq) = e.seq.as_mut()
            {
                steps.push(seq.step(max_tokens));
            }
        }
        let result = self
            .model
            .forward(&mut steps, &mut self.scratch, LogitsFor::LastOfEach, None)
            .map(|l| l.to_owned());
        drop(steps);
        let mut ended = vec![false; idx.len()];
        // In reverse, so removals do not shift the indexes still to visit (entries are removed
        // in place, keeping the running set in arrival order).
        for (row, &i) in idx.iter().enumerate().rev() {
            let before = self.running.len();
            match &result {
                Ok(logits) => {
                    let event =
                        self.running[i].seq.as_mut().and_then(|s| s.accept(logits.row(row)));
                    if let Some(event) = event {
                        self.deliver(i, event);
                    }
                }
                Err(err) => self.fail(i, err),
            }
            ended[row] = self.running.len() < before;
        }
        ended
    }

    /// Sends a token to running entry `i`; ends it when the token is its last or the client
    /// is gone.
    fn deliver(&mut self, i: usize, event: TokenEvent) {
        let e = &mut self.running[i];
        if e.first_token.is_none() {
            e.first_token = Some(Instant::now());
            e.enter_phase(Phase::Decode);
        }
        let finish = event.finish;
        let sent = e.job.events.try_send(Event::Token(event)).is_ok();
        if let Some(reason) = finish {
            let e = self.running.remove(i);
            self.finish(e, reason);
        } else if !sent {
            let e = self.running.remove(i);
            self.finish(e, FinishReason::Cancelled);
        }
    }

    fn fail(&mut self, i: usize, err: &EngineError) {
        let e = self.running.remove(i);
        tracing::error!(request_id = %e.id(), error = %err, "forward pass failed");
        let _ = e.job.events.try_send(Event::Error("inference failed".into()));
        if let Some(seq) = e.seq {
            self.release(seq.into_cache());
        }
    }

    /// Sends `Finished` (when the client can still read) and frees the entry's cache.
    fn finish(&mut self, e: Entry, reason: FinishReason) {
        let now = Instant::now();
        let started = e.started.unwrap_or(now);
        let first = e.first_token.unwrap_or(now);
        let timings = Timings {
            queue: started.saturating_duration_since(e.admitted),
            prefill: first.saturating_duration_since(started),
            decode: now.saturating_duration_since(first),
        };
        let generated = e.seq.as_ref().map_or(0, Sequence::generated);
        e.phase.record("generated_tokens", generated);
        let finished = Finished {
            reason,
            prompt_tokens: e.job.req.prompt.len(),
            generated_tokens: generated,
            seed: e.job.req.sampling.seed,
            timings,
        };
        let _request = e.job.span.enter();
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
        let _ = e.job.events.try_send(Event::Finished(finished));
        if let Some(seq) = e.seq {
            self.release(seq.into_cache());
        }
    }

    fn release(&mut self, cache: KvCache) {
        self.stats.caches_in_use.fetch_sub(1, Ordering::SeqCst);
        if self.pool.len() < self.config.max_batch {
            self.pool.push(cache);
        }
    }

    fn publish(&self) {
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
    }
}

/// Which prefill chunks run this iteration, and how they are grouped into forward calls.
/// `prefilling` gives, oldest first, each prefilling entry's index and prompt tokens left.
///
/// Each prompt is cut into chunks of `chunk` tokens whatever else runs. The oldest chunk always
/// runs; younger ones join while their tokens fit in a budget of `chunk` tokens, so several
/// short prompts arriving together all get their first token before the next decode step,
/// while running streams never wait for more than one chunk's worth of prompt. With `shared`
/// ([`Gpt2::shared_prefill`]) the chunks of two or more tokens form one group (one `sgemm` per
/// weight matrix); single-token chunks, whose rows take the small-batch kernel, and every
/// chunk without `shared`, are groups of their own. Groups come in order of their oldest
/// entry; each lists its indexes ascending.
fn prefill_plan(
    prefilling: impl Iterator<Item = (usize, usize)>,
    chunk: usize,
    shared: bool,
) -> Vec<Vec<usize>> {
    let mut budget = chunk;
    let mut groups: Vec<Vec<usize>> = Vec::new();
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
