//! What this machine can do at best, for reading the engine's numbers: OpenBLAS `sgemm`
//! GFLOP/s (the ceiling of prefill) and streaming read bandwidth (the ceiling of decode, which
//! reads every weight once per step). Prints one JSON object.
//!
//! `cargo run --release -p llorch-engine --example machine_probe -- [threads] [--sgemm-only]`
//!
//! `--sgemm-only` skips the bandwidth test (meaningless in an unoptimised build); CI prints that
//! line before the tests so every log says what it ran on.

use std::time::Instant;

use ndarray::Array2;
use ndarray::linalg::general_mat_mul;

fn sgemm_gflops(m: usize, k: usize, n: usize) -> f64 {
    let a = Array2::<f32>::from_elem((m, k), 0.5);
    let b = Array2::<f32>::from_elem((k, n), 0.25);
    let mut c = Array2::<f32>::zeros((m, n));
    general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    }
    2.0 * (m * k * n) as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Sums a 512 MiB buffer with `threads` threads, best of three; GB/s.
fn read_gbps(buf: &[f32], threads: usize) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(buf.len().div_ceil(threads))
                .map(|part| {
                    s.spawn(move || {
                        let mut lanes = [0.0f32; 16];
                        for chunk in part.chunks_exact(16) {
                            for (l, v) in lanes.iter_mut().zip(chunk) {
                                *l += v;
                            }
                        }
                        lanes.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        best = best.max(std::mem::size_of_val(buf) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// The CPU's model name as the kernel reports it.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn main() {
    // Before anything computes: may re-execute this process once with a better OpenBLAS core.
    let core = llorch_engine::blas_core::ensure_best_core();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sgemm_only = args.iter().any(|a| a == "--sgemm-only");
    let threads: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(2);
    llorch_engine::threads::set_threads(threads);
    let mut report = serde_json::json!({
        "cpu_model": cpu_model(),
        "openblas_core": core.core,
        "openblas_core_reason": core.reason,
        "cpu": core.cpu,
        "threads": threads,
        "sgemm_gflops_256x768x2304": sgemm_gflops(256, 768, 2304),
        "sgemm_gflops_1024_cubed": sgemm_gflops(1024, 1024, 1024),
    });
    if !sgemm_only {
        let buf = vec![1.0f32; 128 << 20];
        report["read_gbps_1_thread"] = read_gbps(&buf, 1).into();
        report["read_gbps_threads"] = read_gbps(&buf, threads).into();
    }
    println!("{report}");
}
