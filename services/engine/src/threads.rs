//! The engine's compute threads: one setting for OpenBLAS (prefill `sgemm`) and for the
//! engine's own pool (small-batch kernels, decode attention), so `--threads N` means N cores.

use std::sync::{Arc, RwLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

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
        .map(Arc::new)
        .ok();
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = pool;
}

/// The current pool (created with the core count on first use).
pub fn pool() -> Arc<ThreadPool> {
    if let Some(pool) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Arc::clone(pool);
    }
    set_threads(0);
    POOL.read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(Arc::clone)
        .expect("pool was just built")
}

/// Threads in the current pool.
pub fn current() -> usize {
    pool().current_num_threads()
}
