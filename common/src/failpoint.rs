//! Failpoints: named places in the request paths where a test makes the process panic, to prove
//! that a panic ends one request with an error (or, in the engine's scheduler thread, stops the
//! engine so that its supervisor restarts it) instead of hanging streams.
//!
//! Off unless `LLORCH_FAILPOINTS` is set when the process starts, e.g.
//! `LLORCH_FAILPOINTS=engine.generate=panic*1,gateway.job=panic`: a comma-separated list of
//! `name=panic` (every hit panics) or `name=panic*N` (the first `N` hits do). An unset variable
//! costs one atomic load per hit. The names are listed in docs/RELIABILITY.md.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable read at the first hit.
pub const ENV: &str = "LLORCH_FAILPOINTS";

/// Every failpoint there is (a name not here is refused, so a misspelling cannot pass
/// silently); `test.*` names are free for this module's own tests.
pub const NAMES: [&str; 8] = [
    "engine.generate",
    "engine.scheduler",
    "engine.scheduler_draining",
    "gateway.execute",
    "gateway.completions",
    "gateway.job",
    "tokenizer.encode",
    "tokenizer.decode_stream",
];

/// Whether any failpoint is configured (false: every hit returns at once).
static ANY: AtomicBool = AtomicBool::new(false);
/// What reading the environment gave.
static READ: OnceLock<Result<(), String>> = OnceLock::new();
/// Remaining panics per name (`None`: unlimited).
static POINTS: Mutex<Vec<(String, Option<u64>)>> = Mutex::new(Vec::new());

/// Reads [`ENV`] (once); every binary calls it at start, so that a misspelt set-up stops
/// the process with the reason instead of passing silently.
pub fn init() -> anyhow::Result<()> {
    READ.get_or_init(|| match std::env::var(ENV) {
        Ok(spec) => configure(&spec).map_err(|e| format!("{ENV}={spec:?}: {e}")),
        Err(_) => Ok(()),
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Panics here if the failpoint `name` is configured to and has panics left.
pub fn hit(name: &str) {
    if READ.get().is_none() {
        let _ = init();
    }
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    let fire = {
        let mut points = POINTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match points.iter_mut().find(|(n, _)| n == name) {
            Some((_, None)) => true,
            Some((_, Some(0))) | None => false,
            Some((_, Some(left))) => {
                *left -= 1;
                true
            }
        }
    };
    if fire {
        panic!("failpoint {name}");
    }
}

/// Adds the failpoints of `spec` (the [`ENV`] syntax), for tests that run the services in
/// their own process.
pub fn configure(spec: &str) -> Result<(), String> {
    let mut parsed = HashMap::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, action) =
            item.split_once('=').ok_or_else(|| format!("{item:?}: expected NAME=ACTION"))?;
        let count = match action.trim().strip_prefix("panic") {
            Some("") => None,
            Some(n) => Some(
                n.strip_prefix('*')
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| format!("{item:?}: expected panic or panic*N"))?,
            ),
            None => return Err(format!("{item:?}: the only action is panic (or panic*N)")),
        };
        let name = name.trim();
        if !NAMES.contains(&name) && !name.starts_with("test.") {
            return Err(format!("{item:?}: no failpoint is named {name:?} (there are {NAMES:?})"));
        }
        parsed.insert(name.to_owned(), count);
    }
    let mut points = POINTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for (name, count) in parsed {
        points.retain(|(n, _)| *n != name);
        points.push((name, count));
    }
    ANY.store(!points.is_empty(), Ordering::Relaxed);
    Ok(())
}

/// The text of a caught panic's payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic with a non-text payload")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_points_fire_that_many_times_and_others_never() {
        configure("test.counted=panic*2, test.always=panic").unwrap();
        let fires = |name: &str| std::panic::catch_unwind(|| hit(name)).is_err();
        assert!(fires("test.counted"));
        assert!(fires("test.counted"));
        assert!(!fires("test.counted"));
        assert!(fires("test.always") && fires("test.always"));
        assert!(!fires("test.unnamed"));
    }

    #[test]
    fn bad_specs_are_refused_with_the_item() {
        for bad in
            ["x", "test.x=crash", "test.x=panic*", "test.x=panic*two", "engine.genrate=panic"]
        {
            let err = configure(bad).unwrap_err();
            assert!(err.contains(bad.split('=').next().unwrap()), "{bad}: {err}");
        }
    }

    #[test]
    fn the_payload_text_is_found() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "boom 1");
    }
}
