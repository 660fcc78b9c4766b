//! The few OpenBLAS controls the engine needs beyond what ndarray calls.

use std::os::raw::c_int;

unsafe extern "C" {
    fn openblas_set_num_threads(num_threads: c_int);
    fn openblas_get_num_threads() -> c_int;
}

/// Sets how many threads OpenBLAS uses for every following BLAS call in this process, so
/// benchmarks are comparable and the engine does not oversubscribe the machine. `0` keeps
/// OpenBLAS's own choice (`OPENBLAS_NUM_THREADS` or the core count).
pub fn set_threads(threads: usize) {
    if threads > 0 {
        let n = c_int::try_from(threads).unwrap_or(c_int::MAX);
        // SAFETY: a plain setter in OpenBLAS with no pointer arguments.
        unsafe { openblas_set_num_threads(n) };
    }
}

/// The number of threads OpenBLAS currently uses.
pub fn threads() -> usize {
    // SAFETY: a plain getter in OpenBLAS.
    let n = unsafe { openblas_get_num_threads() };
    usize::try_from(n).unwrap_or(1)
}
