//! Property-based fuzzing of the incremental UTF-8 decoder with any id sequence (the corpus
//! tests cover real text; these cover what a client or a random model can send: lone
//! continuation bytes, truncated characters, special tokens, ids past the vocabulary), cut into
//! any chunks. See docs/RELIABILITY.md ("Fuzzing"); `PROPTEST_CASES` sets the number of cases.

use std::path::Path;
use std::sync::OnceLock;

use llorch_tokenizer::{BpeTokenizer, IncrementalDecoder};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn tokenizer() -> &'static BpeTokenizer {
    static TOKENIZER: OnceLock<BpeTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
        BpeTokenizer::from_dir(&dir).unwrap()
    })
}

/// Ids that make hard byte sequences: GPT-2's first 256 ids are its single bytes (so random
/// ones give broken UTF-8), plus any id of the vocabulary, `<|endoftext|>`, and ids past it.
fn any_id() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..256,
        3 => 0u32..50_257,
        1 => Just(50_256u32),
        1 => 50_257u32..=u32::MAX,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(512),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_ids_in_any_chunks_stream_to_the_full_decode(
        ids in prop::collection::vec(any_id(), 0..48),
        chunks in prop::collection::vec(0usize..5, 1..48),
        skip_special in any::<bool>(),
    ) {
        let tok = tokenizer();
        let mut decoder = IncrementalDecoder::new(skip_special);
        let mut streamed = String::new();
        let mut accepted = Vec::new();
        let mut rest = ids.as_slice();
        for &n in chunks.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            if n == 0 {
                // An empty message releases nothing and changes nothing.
                prop_assert_eq!(decoder.push(tok, &[]).unwrap(), "");
            }
            let (chunk, tail) = rest.split_at(n.clamp(1, rest.len()));
            rest = tail;
            let out_of_range = chunk.iter().any(|&id| id >= tok.vocab_size());
            match decoder.push(tok, chunk) {
                Ok(delta) => {
                    prop_assert!(!out_of_range, "ids past the vocabulary accepted: {chunk:?}");
                    // A delta never ends in half a character held back as U+FFFD...
                    streamed.push_str(&delta);
                    accepted.extend_from_slice(chunk);
                }
                // ... and a refused chunk leaves the decoder as it was.
                Err(_) => prop_assert!(out_of_range, "in-range ids refused: {chunk:?}"),
            }
        }
        streamed.push_str(&decoder.flush(tok).unwrap());
        let full = tok.decode(&accepted, skip_special).unwrap();
        prop_assert_eq!(streamed, full);
    }
}

/// `PROPTEST_CASES` when set (the long run in docs/RELIABILITY.md), else `default`: a
/// `cases` written in the config would override the variable.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
