//! Differential tests against Hugging Face `tokenizers` over the committed corpus
//! (`fixtures/tokenizer/corpus.json`, written by `scripts/gen_tokenizer_corpus.py`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llorch_tokenizer::{BpeTokenizer, IncrementalDecoder};
use proptest::prelude::*;
use serde::Deserialize;

#[derive(Deserialize)]
struct Corpus {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn corpus() -> Vec<Case> {
    let text = std::fs::read_to_string(root().join("fixtures/tokenizer/corpus.json")).unwrap();
    serde_json::from_str::<Corpus>(&text).unwrap().cases
}

fn tokenizer() -> &'static BpeTokenizer {
    static TOKENIZER: OnceLock<BpeTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| BpeTokenizer::from_dir(&root().join("models/default")).unwrap())
}

#[test]
fn the_corpus_is_large_and_varied() {
    let cases = corpus();
    assert!(cases.len() >= 200, "only {} cases", cases.len());
    assert!(cases.iter().any(|c| c.text.contains("<|endoftext|>")));
    assert!(cases.iter().any(|c| c.text.contains("\r\n")));
    assert!(cases.iter().any(|c| c.text.contains('\u{200d}')), "no emoji joiners");
    assert!(cases.iter().any(|c| c.text.len() > 2000), "no long input");
}

#[test]
fn encode_equals_hugging_face_on_every_corpus_string() {
    let tok = tokenizer();
    let mut failures = Vec::new();
    for case in corpus() {
        let ids = tok.encode(&case.text, false).unwrap();
        if ids != case.ids {
            let first = ids.iter().zip(&case.ids).position(|(a, b)| a != b);
            failures.push(format!("{}: first difference at {:?}", case.name, first));
        }
    }
    assert!(failures.is_empty(), "{} mismatches: {failures:#?}", failures.len());
}

#[test]
fn decode_round_trips_every_corpus_string() {
    let tok = tokenizer();
    for case in corpus() {
        let text = tok.decode(&case.ids, false).unwrap();
        assert_eq!(text, case.decoded, "{}", case.name);
        assert_eq!(text, case.text, "{}", case.name);
    }
}

/// Feeds `ids` in the given chunk sizes and returns the deltas plus the final flush.
fn stream(tok: &BpeTokenizer, ids: &[u32], chunks: impl IntoIterator<Item = usize>) -> Vec<String> {
    let mut dec = IncrementalDecoder::new(false);
    let mut deltas = Vec::new();
    let mut rest = ids;
    let mut chunks = chunks.into_iter();
    while !rest.is_empty() {
        let n = chunks.next().unwrap_or(1).clamp(1, rest.len());
        deltas.push(dec.push(tok, &rest[..n]).unwrap());
        rest = &rest[n..];
    }
    deltas.push(dec.flush(tok).unwrap());
    deltas
}

#[test]
fn one_id_at_a_time_the_deltas_concatenate_to_the_full_decode() {
    let tok = tokenizer();
    for case in corpus() {
        let deltas = stream(tok, &case.ids, std::iter::repeat(1));
        assert_eq!(deltas.concat(), case.decoded, "{}", case.name);
        if !case.text.contains('\u{FFFD}') {
            for d in &deltas {
                assert!(!d.contains('\u{FFFD}'), "{}: broken character in delta {d:?}", case.name);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_chunking_gives_the_same_text(chunks in prop::collection::vec(1usize..6, 1..64), pick in 0usize..1000) {
        let tok = tokenizer();
        let cases = corpus();
        let case = &cases[pick % cases.len()];
        let deltas = stream(tok, &case.ids, chunks.iter().copied().cycle());
        prop_assert_eq!(deltas.concat(), case.decoded.clone());
        if !case.text.contains('\u{FFFD}') {
            let broken = deltas.iter().any(|d| d.contains(char::REPLACEMENT_CHARACTER));
            prop_assert!(!broken, "a delta holds a broken character");
        }
    }
}
