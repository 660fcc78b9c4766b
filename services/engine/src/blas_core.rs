//! Which OpenBLAS kernel set ("core") runs `sgemm`, and making it the best one this CPU runs.
//!
//! Debian's OpenBLAS (0.3.21) is built with `DYNAMIC_ARCH`: at load it reads CPUID and picks
//! one of its kernel sets (`Haswell`, `SkylakeX`, …). A CPU newer than the library (e.g. Intel
//! family 6 model 207) is not in its table, and it falls back to `Prescott`, its SSE3 kernels:
//! prefill (all `sgemm`) then runs at a fifth of the machine's speed. OpenBLAS takes
//! `OPENBLAS_CORETYPE` as an override, but only at library load, before `main`. So the engine
//! binaries call [`ensure_best_core`] first thing: when the core OpenBLAS chose is older than
//! what the CPU runs, the process re-executes itself once with `OPENBLAS_CORETYPE` set. A
//! user's own `OPENBLAS_CORETYPE` always wins, and a guard variable makes a second re-execution
//! impossible.
//!
//! The decision is the pure function [`choose`]; its table is tested row by row.

use std::ffi::{CStr, OsString};
use std::os::raw::c_char;
use std::sync::OnceLock;

use serde::Serialize;

unsafe extern "C" {
    fn openblas_get_corename() -> *const c_char;
    fn openblas_get_config() -> *const c_char;
}

/// Set (to the core OpenBLAS had chosen) on the one re-execution, so it never happens twice
/// and the new process can say what it replaced.
pub const REEXEC_GUARD: &str = "LLORCH_OPENBLAS_REEXEC_FROM";

/// The variable OpenBLAS reads at load to force a kernel set.
pub const CORETYPE: &str = "OPENBLAS_CORETYPE";

/// Instruction-set levels of OpenBLAS's x86-64 kernel sets, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum IsaLevel {
    /// SSE2/SSE3 kernels (`Prescott`, `Core2`, `Nehalem`, `Barcelona`, …).
    Sse,
    /// AVX without AVX2 (`Sandybridge`, `Bulldozer`, `Piledriver`, `Steamroller`).
    Avx,
    /// AVX2 + FMA (`Haswell`, `Zen`, `Excavator`).
    Avx2,
    /// AVX-512 F/BW/DQ/VL (`SkylakeX`, `Cooperlake`, `SapphireRapids`).
    Avx512,
}

impl IsaLevel {
    /// OpenBLAS's kernel set for this level that runs on every CPU of the level.
    fn best_core(self) -> Option<&'static str> {
        match self {
            Self::Avx512 => Some("SkylakeX"),
            Self::Avx2 => Some("Haswell"),
            Self::Avx => Some("Sandybridge"),
            Self::Sse => None,
        }
    }
}

/// The level a kernel set needs, by its `openblas_get_corename` name (any case); `None` for
/// names this table does not know (a newer OpenBLAS knows better than we do: keep its choice).
pub fn core_level(core: &str) -> Option<IsaLevel> {
    let name = core.to_ascii_lowercase();
    let level = match name.as_str() {
        "skylakex" | "cooperlake" | "sapphirerapids" => IsaLevel::Avx512,
        "haswell" | "zen" | "excavator" => IsaLevel::Avx2,
        "sandybridge" | "bulldozer" | "piledriver" | "steamroller" => IsaLevel::Avx,
        "katmai" | "coppermine" | "northwood" | "prescott" | "banias" | "atom" | "core2"
        | "penryn" | "dunnington" | "nehalem" | "athlon" | "opteron" | "opteron_sse3"
        | "barcelona" | "nano" | "bobcat" => IsaLevel::Sse,
        _ => return None,
    };
    Some(level)
}

/// What the CPU (and the OS, which must save the wide registers) supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CpuFeatures {
    /// AVX.
    pub avx: bool,
    /// AVX2 and FMA.
    pub avx2_fma: bool,
    /// AVX-512 F, BW, DQ and VL (what OpenBLAS's SkylakeX kernels use).
    pub avx512: bool,
}

impl CpuFeatures {
    /// Reads CPUID (through the standard library, which also checks OS support).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                avx: std::arch::is_x86_feature_detected!("avx"),
                avx2_fma: std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma"),
                avx512: std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self { avx: false, avx2_fma: false, avx512: false }
        }
    }

    /// The highest kernel level this CPU runs.
    pub fn level(self) -> IsaLevel {
        if self.avx512 && self.avx2_fma {
            IsaLevel::Avx512
        } else if self.avx2_fma {
            IsaLevel::Avx2
        } else if self.avx {
            IsaLevel::Avx
        } else {
            IsaLevel::Sse
        }
    }
}

/// What to do about the kernel set OpenBLAS chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreChoice {
    /// The user set `OPENBLAS_CORETYPE`: never overridden.
    User(String),
    /// OpenBLAS's choice is the best it has for this CPU, or a name we do not know.
    Keep,
    /// OpenBLAS chose an older kernel set than the CPU runs: re-run with this one.
    Upgrade(&'static str),
}

/// The decision table: `user` is `OPENBLAS_CORETYPE` as the user set it (not by us).
pub fn choose(cpu: CpuFeatures, openblas_core: &str, user: Option<&str>) -> CoreChoice {
    if let Some(user) = user.filter(|u| !u.is_empty()) {
        return CoreChoice::User(user.to_owned());
    }
    let Some(have) = core_level(openblas_core) else {
        return CoreChoice::Keep;
    };
    let can = cpu.level();
    match can.best_core() {
        Some(best) if have < can => CoreChoice::Upgrade(best),
        _ => CoreChoice::Keep,
    }
}

/// The kernel set in use and why, for logs, `Info`, `bench` and `machine_probe`.
#[derive(Debug, Clone, Serialize)]
pub struct CoreReport {
    /// `openblas_get_corename()` now (e.g. `SkylakeX`).
    pub core: String,
    /// Why it is this one, in a sentence.
    pub reason: String,
    /// `openblas_get_config()` (version and build options).
    pub config: String,
    /// The CPU's features as detected.
    pub cpu: CpuFeatures,
}

static REPORT: OnceLock<CoreReport> = OnceLock::new();

/// The name of the kernel set OpenBLAS uses in this process.
pub fn corename() -> String {
    // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated string (never freed).
    unsafe { c_string(openblas_get_corename()) }
}

fn config_string() -> String {
    // SAFETY: as for `openblas_get_corename`, a static NUL-terminated string.
    unsafe { c_string(openblas_get_config()) }
}

/// # Safety
/// `p` is null or points to a NUL-terminated string that lives for the whole call.
unsafe fn c_string(p: *const c_char) -> String {
    if p.is_null() {
        return "unknown".to_owned();
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().trim().to_owned()
}

/// Makes OpenBLAS run the best kernel set it has for this CPU, re-executing this process once
/// if that is needed; call it first in `main`, before any matrix product and before other
/// threads start. Returns the report (also kept for [`report`]). Logs nothing: the caller logs
/// the report once its logger is up ([`log_report`]).
pub fn ensure_best_core() -> &'static CoreReport {
    REPORT.get_or_init(|| inspect(true))
}

/// What this process runs and why; with `may_reexec`, a better kernel set is put in place by
/// re-executing (which returns only if that failed).
fn inspect(may_reexec: bool) -> CoreReport {
    let cpu = CpuFeatures::detect();
    let core = corename();
    let user = std::env::var(CORETYPE).ok();
    let reason = if let Ok(from) = std::env::var(REEXEC_GUARD) {
        format!(
            "OpenBLAS chose {from}, older than this CPU runs ({:?}); re-ran with {CORETYPE}={}",
            cpu.level(),
            user.as_deref().unwrap_or("?")
        )
    } else {
        match choose(cpu, &core, user.as_deref()) {
            CoreChoice::User(u) => format!("{CORETYPE}={u} set by the user"),
            CoreChoice::Keep => format!("OpenBLAS's own choice for this CPU ({:?})", cpu.level()),
            CoreChoice::Upgrade(best) if may_reexec => {
                reexec(&core, best);
                format!(
                    "OpenBLAS chose {core}, older than this CPU runs; re-running with \
                     {CORETYPE}={best} failed, kept {core}"
                )
            }
            CoreChoice::Upgrade(best) => format!(
                "OpenBLAS's own choice; {best} would suit this CPU better, but this process \
                 does not re-execute (only the engine binaries do)"
            ),
        }
    };
    CoreReport { core, reason, config: config_string(), cpu }
}

/// Replaces this process with itself, same arguments, `OPENBLAS_CORETYPE=best` and the guard
/// set. Returns only if `exec` failed.
fn reexec(from: &str, best: &str) {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let arg0: OsString = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let err = std::process::Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env(CORETYPE, best)
        .env(REEXEC_GUARD, from)
        .exec();
    eprintln!("llorch: could not re-execute {} with {CORETYPE}={best}: {err}", exe.display());
}

/// The report of this process: [`ensure_best_core`]'s, or, where that was not called (a test
/// binary), the same decision without the re-execution.
pub fn report() -> &'static CoreReport {
    REPORT.get_or_init(|| inspect(false))
}

/// Logs the report once, at INFO.
pub fn log_report(report: &CoreReport) {
    tracing::info!(
        openblas_core = %report.core,
        reason = %report.reason,
        openblas_config = %report.config,
        "OpenBLAS kernel set"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSE: CpuFeatures = CpuFeatures { avx: false, avx2_fma: false, avx512: false };
    const AVX: CpuFeatures = CpuFeatures { avx: true, avx2_fma: false, avx512: false };
    const AVX2: CpuFeatures = CpuFeatures { avx: true, avx2_fma: true, avx512: false };
    const AVX512: CpuFeatures = CpuFeatures { avx: true, avx2_fma: true, avx512: true };

    #[test]
    fn a_user_setting_always_wins() {
        assert_eq!(choose(AVX512, "Prescott", Some("Haswell")), CoreChoice::User("Haswell".into()));
        assert_eq!(choose(SSE, "Prescott", Some("SkylakeX")), CoreChoice::User("SkylakeX".into()));
    }

    #[test]
    fn an_empty_user_setting_counts_as_none() {
        assert_eq!(choose(AVX512, "Prescott", Some("")), CoreChoice::Upgrade("SkylakeX"));
    }

    #[test]
    fn an_avx512_cpu_on_an_sse_kernel_gets_skylakex() {
        // Intel family 6 model 207 with Debian's OpenBLAS 0.3.21.
        assert_eq!(choose(AVX512, "Prescott", None), CoreChoice::Upgrade("SkylakeX"));
    }

    #[test]
    fn an_avx512_cpu_on_an_avx2_kernel_gets_skylakex() {
        // e.g. AMD Zen 4, which 0.3.21 reports as Zen.
        assert_eq!(choose(AVX512, "Zen", None), CoreChoice::Upgrade("SkylakeX"));
        assert_eq!(choose(AVX512, "Haswell", None), CoreChoice::Upgrade("SkylakeX"));
    }

    #[test]
    fn an_avx2_cpu_on_an_older_kernel_gets_haswell() {
        assert_eq!(choose(AVX2, "Prescott", None), CoreChoice::Upgrade("Haswell"));
        assert_eq!(choose(AVX2, "Sandybridge", None), CoreChoice::Upgrade("Haswell"));
        assert_eq!(choose(AVX2, "NEHALEM", None), CoreChoice::Upgrade("Haswell"));
    }

    #[test]
    fn an_avx_cpu_on_an_sse_kernel_gets_sandybridge() {
        assert_eq!(choose(AVX, "Core2", None), CoreChoice::Upgrade("Sandybridge"));
    }

    #[test]
    fn a_kernel_as_new_as_the_cpu_is_kept() {
        assert_eq!(choose(AVX512, "SkylakeX", None), CoreChoice::Keep);
        assert_eq!(choose(AVX512, "SapphireRapids", None), CoreChoice::Keep);
        assert_eq!(choose(AVX512, "Cooperlake", None), CoreChoice::Keep);
        assert_eq!(choose(AVX2, "Haswell", None), CoreChoice::Keep);
        assert_eq!(choose(AVX2, "Zen", None), CoreChoice::Keep);
        assert_eq!(choose(SSE, "Prescott", None), CoreChoice::Keep);
    }

    #[test]
    fn a_kernel_newer_than_the_cpu_is_kept() {
        // Never downgrade: OpenBLAS read CPUID itself.
        assert_eq!(choose(AVX2, "SkylakeX", None), CoreChoice::Keep);
    }

    #[test]
    fn an_unknown_kernel_name_is_kept() {
        assert_eq!(choose(AVX512, "Zen5", None), CoreChoice::Keep);
        assert_eq!(choose(AVX512, "unknown", None), CoreChoice::Keep);
    }

    #[test]
    fn avx512_without_avx2_is_not_treated_as_avx512() {
        let odd = CpuFeatures { avx: true, avx2_fma: false, avx512: true };
        assert_eq!(odd.level(), IsaLevel::Avx);
    }

    #[test]
    fn this_process_reports_a_core_name() {
        assert!(!corename().is_empty());
        assert!(!report().config.is_empty());
    }
}
