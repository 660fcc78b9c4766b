//! The engine's compute threads: one setting for OpenBLAS (prefill `sgemm`), for the engine's
//! own pool (rayon: prefill attention, conversions) and for its team (the decode products and
//! a lone sequence's attention), so `--threads N` means N cores.
//!
//! Why a team beside the pool: a decode step of gpt2-small is ~50 products of 0.1–0.2 ms, each
//! split over the threads. With rayon, a worker that ran out of work between two products went
//! to sleep on a futex and had to be woken for the next (`perf stat`: ~100 context switches per
//! token; `perf record`: ~14 % of a Q8_0 decode in the kernel's wake-up and switch paths). The
//! team's helpers spin between products, as llama.cpp's threads do, and park only after
//! [`SPIN`] without work, so an idle server does not hold its cores.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// How long a helper spins without work before it parks.
const SPIN: Duration = Duration::from_micros(500);

struct Threads {
    pool: Arc<ThreadPool>,
    team: Arc<Team>,
}

static THREADS: RwLock<Option<Threads>> = RwLock::new(None);

/// Uses `threads` threads for every following matrix product (0: the number of cores).
pub fn set_threads(threads: usize) {
    let n = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    crate::blas::set_threads(n);
    let pool = ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("llorch-compute-{i}"))
        .build()
        .map(Arc::new);
    let mut slot = THREADS.write().unwrap_or_else(|e| e.into_inner());
    match pool {
        Ok(pool) => *slot = Some(Threads { pool, team: Team::new(n) }),
        Err(e) => tracing::warn!(error = %e, threads = n, "could not start the compute pool"),
    }
}

fn with<R>(f: impl Fn(&Threads) -> R) -> R {
    if let Some(t) = THREADS.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return f(t);
    }
    set_threads(0);
    f(THREADS.read().unwrap_or_else(|e| e.into_inner()).as_ref().expect("threads were just set"))
}

/// The current pool (created with the core count on first use).
pub fn pool() -> Arc<ThreadPool> {
    with(|t| Arc::clone(&t.pool))
}

/// The current team (created with the pool).
pub fn team() -> Arc<Team> {
    with(|t| Arc::clone(&t.team))
}

/// Threads in the current pool.
pub fn current() -> usize {
    pool().current_num_threads()
}

/// A job: part `i` of a fork, for `i` in `0..size`.
type Job = *const (dyn Fn(usize) + Sync);

/// The caller plus `size - 1` helper threads that run the parts of one fork at a time
/// ([`Team::fork`]).
pub struct Team {
    size: usize,
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

struct Shared {
    /// Bumped (SeqCst) to publish a job; helpers wait for it to change.
    generation: AtomicU64,
    /// The job of the current generation; written only by the fork holding `busy`, before it
    /// bumps `generation`, and read by helpers after they see the bump.
    job: UnsafeCell<Option<Job>>,
    /// Helper parts finished in this generation.
    done: AtomicUsize,
    /// A helper part panicked in this generation.
    panicked: AtomicBool,
    /// Held by the fork running (others run their parts inline).
    busy: AtomicBool,
    /// Helper `i` is parked, or about to park (checked after each bump).
    parked: Vec<AtomicBool>,
    shutdown: AtomicBool,
}

// SAFETY: `job` is written only by the holder of `busy` while no helper reads it (every helper
// finished the previous generation: the fork waited for `done`), and read by helpers only
// after the `generation` bump that follows the write (SeqCst on both sides); the job it points
// to is `Sync` and outlives the generation (the fork returns only after every helper is done).
unsafe impl Sync for Shared {}
// SAFETY: as for `Sync`; the raw job pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("size", &self.size).finish()
    }
}

impl Team {
    fn new(size: usize) -> Arc<Self> {
        let size = size.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            parked: (1..size).map(|_| AtomicBool::new(false)).collect(),
            shutdown: AtomicBool::new(false),
        });
        let mut helpers = Vec::with_capacity(size - 1);
        for i in 1..size {
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("llorch-team-{i}"))
                .spawn(move || helper(&shared, i));
            match spawned {
                Ok(h) => helpers.push(h),
                Err(e) => {
                    // Fewer helpers: forks run the missing parts inline.
                    tracing::warn!(error = %e, "could not start a compute team thread");
                    break;
                }
            }
        }
        Arc::new(Self { size, shared, helpers })
    }

    /// Parts per fork: the thread count.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `f(i)` for every `i` in `0..self.size()`: part 0 on the calling thread, part `i`
    /// on helper `i`, and returns when all are done. A fork made while another runs (another
    /// thread's, or one nested in a part) runs its parts one after the other on the caller.
    /// A panic in a part is raised again here, after every part has ended.
    pub fn fork(&self, f: &(dyn Fn(usize) + Sync)) {
        let s = &self.shared;
        let helpers = self.helpers.len();
        if helpers == 0
            || s.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err()
        {
            (0..self.size).for_each(f);
            return;
        }
        // SAFETY: only this function, holding `busy`, writes `job`, and every helper finished
        // reading the previous one (the previous fork waited for `done`). The lifetime is
        // erased for the slot; the pointer is used only until every helper reports done below.
        unsafe {
            let job: &(dyn Fn(usize) + Sync) = f;
            *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job));
        }
        s.done.store(0, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        for (i, parked) in s.parked.iter().enumerate().take(helpers) {
            if parked.load(Ordering::SeqCst) {
                self.helpers[i].thread().unpark();
            }
        }
        // Parts no helper exists for (a helper failed to start) run here.
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(0);
            (helpers + 1..self.size).for_each(f);
        }));
        while s.done.load(Ordering::Acquire) < helpers {
            std::hint::spin_loop();
        }
        let helper_panicked = s.panicked.swap(false, Ordering::Relaxed);
        s.busy.store(false, Ordering::Release);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        assert!(!helper_panicked, "a compute team thread panicked in its part");
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        for h in &self.helpers {
            h.thread().unpark();
        }
    }
}

/// Helper `i`: waits for each generation (spinning, then parked), runs part `i`, reports done.
fn helper(s: &Shared, i: usize) {
    // The generation the team was made with: a fork may be published before this thread first
    // runs, and must not be taken for the starting point.
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        while s.generation.load(Ordering::SeqCst) == seen {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let parked = &s.parked[i - 1];
                parked.store(true, Ordering::SeqCst);
                if s.generation.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                parked.store(false, Ordering::SeqCst);
            }
        }
        seen = s.generation.load(Ordering::SeqCst);
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: the fork wrote `job` before the bump seen above and keeps the job alive until
        // this helper reports done (see `Shared`).
        let job = unsafe { (*s.job.get()).expect("a job is published before its generation") };
        // SAFETY: as above: the pointee lives until `done` is incremented below.
        let f = unsafe { &*job };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_fork_and_nested_forks_run_inline() {
        let team = Team::new(3);
        for _ in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            team.fork(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                let inner = AtomicUsize::new(0);
                team.fork(&|_| {
                    inner.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(inner.load(Ordering::Relaxed), 3);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_fork_made_before_the_helpers_first_run_is_not_missed() {
        for _ in 0..200 {
            let team = Team::new(2);
            let ran = AtomicUsize::new(0);
            team.fork(&|_| {
                ran.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(ran.load(Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn parked_helpers_wake_for_the_next_fork() {
        let team = Team::new(2);
        let sum = AtomicUsize::new(0);
        team.fork(&|i| {
            sum.fetch_add(i + 1, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN * 4);
        team.fork(&|i| {
            sum.fetch_add(i + 1, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_panicking_part_is_raised_in_the_caller_and_the_team_keeps_working() {
        let team = Team::new(2);
        for bad in [0, 1] {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                team.fork(&|i| assert_ne!(i, bad, "part {bad} fails"));
            }));
            assert!(r.is_err(), "part {bad}'s panic reaches the caller");
            let ran = AtomicUsize::new(0);
            team.fork(&|_| {
                ran.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(ran.load(Ordering::Relaxed), 2);
        }
    }
}
