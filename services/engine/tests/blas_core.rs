//! The engine binary runs OpenBLAS's best kernel set for the CPU it is on, says which in its
//! output, and never overrides a user's `OPENBLAS_CORETYPE`. Run through `bench` on the tiny
//! default model (a second of work), as a child process, since the choice is made at start-up.

use std::process::Command;

use llorch_engine::blas_core::{self, CoreChoice, CpuFeatures};

fn bench(coretype: Option<&str>) -> (serde_json::Value, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llorch-engine"));
    cmd.args([
        "bench",
        "--model",
        "fixtures/models/tiny",
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "2",
        "--runs",
        "1",
        "--threads",
        "1",
    ])
    .current_dir(&root)
    .env_remove(blas_core::CORETYPE)
    .env_remove(blas_core::REEXEC_GUARD);
    if let Some(c) = coretype {
        cmd.env(blas_core::CORETYPE, c);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "bench failed: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

#[test]
fn the_engine_runs_the_best_openblas_kernel_set_for_this_cpu() {
    let (report, stderr) = bench(None);
    let core = report["openblas_core"].as_str().unwrap();
    // Whatever OpenBLAS picked at load, the process that computed runs a kernel set that is at
    // least as new as the CPU allows (or one whose name we do not know).
    assert_eq!(
        blas_core::choose(CpuFeatures::detect(), core, None),
        CoreChoice::Keep,
        "core {core}, reason {:?}",
        report["openblas_core_reason"]
    );
    assert_eq!(
        // The choice's own log line (other lines may mention the kernel set in their text).
        stderr.matches("llorch_engine::blas_core: OpenBLAS kernel set").count(),
        1,
        "the choice is logged exactly once:\n{stderr}"
    );
}

#[test]
fn a_users_openblas_coretype_is_never_overridden() {
    // Prescott (SSE3) runs on every x86-64 CPU, and is older than any CPU this project targets:
    // exactly the choice the engine would otherwise replace.
    let (report, _) = bench(Some("Prescott"));
    assert!(report["openblas_core"].as_str().unwrap().eq_ignore_ascii_case("prescott"), "{report}");
    assert!(
        report["openblas_core_reason"].as_str().unwrap().contains("set by the user"),
        "{report}"
    );
}
