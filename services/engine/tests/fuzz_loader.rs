//! Property-based fuzzing of the model loader (safetensors header and tensors, config.json):
//! any bytes, a valid file with its header damaged or cut short, a config with any value in any
//! field. Each must give an error or a model, never a panic or a huge allocation (the test runs
//! under an 8 GiB address-space cap, far below what a trusted header length or shape would ask).
//! See docs/RELIABILITY.md ("Fuzzing"); `PROPTEST_CASES` sets the number of cases.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llorch_engine::model::Gpt2;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Map, Value};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny")
}

fn weights() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(fixture().join("model.safetensors")).unwrap())
}

fn config() -> &'static Map<String, Value> {
    static CONFIG: OnceLock<Map<String, Value>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap()
    })
}

/// Loads a model folder holding `config` and `weights`; `Err` is the loader's message.
fn load(config: &[u8], weights: &[u8]) -> Result<Gpt2, String> {
    limit_address_space();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), weights).unwrap();
    Gpt2::load(dir.path()).map_err(|e| e.to_string())
}

/// Caps this process's address space (once), so that an allocation sized by a hostile header
/// fails the test (as an abort) instead of succeeding on a large machine.
fn limit_address_space() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let limit = set_address_space_limit(8 << 30);
        assert!(limit, "cannot set RLIMIT_AS");
    });
}

fn set_address_space_limit(bytes: u64) -> bool {
    // `prlimit` from util-linux sets the limit of this process (no libc crate needed).
    std::process::Command::new("prlimit")
        .args([&format!("--pid={}", std::process::id()), &format!("--as={bytes}")])
        .status()
        .is_ok_and(|s| s.success())
}

fn header_len() -> usize {
    u64::from_le_bytes(weights()[..8].try_into().unwrap()) as usize
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(96),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_bytes_as_weights_are_an_error(bytes in prop::collection::vec(any::<u8>(), 0..512), len in any::<u64>()) {
        let config = serde_json::to_vec(config()).unwrap();
        prop_assert!(load(&config, &bytes).is_err());
        // The same after a header length of any size.
        let mut framed = len.to_le_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        prop_assert!(load(&config, &framed).is_err());
    }

    #[test]
    fn a_damaged_or_cut_weights_file_is_an_error_or_a_model(
        edits in prop::collection::vec((0usize..1 << 16, any::<u8>()), 1..6),
        cut in prop::option::of(0usize..1 << 24),
    ) {
        let mut bytes = weights().to_vec();
        let header_end = 8 + header_len();
        for (at, byte) in edits {
            // Mostly inside the header (the length and the JSON), where the structure is.
            let at = at % header_end.max(1);
            bytes[at] = byte;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        let config = serde_json::to_vec(config()).unwrap();
        let _ = load(&config, &bytes);
    }

    #[test]
    fn any_value_in_any_config_field_is_an_error_or_a_model(
        field in prop::sample::select(config().keys().cloned().collect::<Vec<_>>()),
        value in prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-2i64..5000).prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
            Just(Value::Array(vec![])),
        ],
    ) {
        let mut config = config().clone();
        config.insert(field, value);
        let _ = load(&serde_json::to_vec(&config).unwrap(), weights());
    }

    #[test]
    fn any_bytes_as_config_are_an_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        prop_assert!(load(&bytes, weights()).is_err());
    }
}

/// `PROPTEST_CASES` when set (the long run in docs/RELIABILITY.md), else `default`: a
/// `cases` written in the config would override the variable.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
