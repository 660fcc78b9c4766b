//! Incremental detokenization: a stream of ids in, UTF-8-safe text deltas out.
//!
//! GPT-2 tokens are byte sequences; a character of several bytes may be split over tokens.
//! The decoder keeps a window of ids starting at a character boundary, decodes the whole window
//! each step, and releases the part of the text that can no longer change: everything before a
//! trailing run of U+FFFD (an incomplete character decodes to U+FFFD until its last byte
//! arrives). The window is reset whenever its text ends cleanly, so each step costs the length of
//! the window, usually one or two tokens.
//!
//! Invariant (tested over the tokenizer corpus): the concatenation of every delta and the final
//! [`IncrementalDecoder::flush`] equals [`BpeTokenizer::decode`] of all ids.

use crate::bpe::BpeTokenizer;
use crate::error::TokenizerError;

const REPLACEMENT: char = char::REPLACEMENT_CHARACTER;

/// Per-stream state of incremental decoding. Holds no reference to the tokenizer so it can be
/// moved across threads between steps.
///
/// Ids pushed one at a time, as an engine streams them: no delta ever holds half a character,
/// and the deltas plus [`Self::flush`] are exactly the full decode.
///
/// ```
/// use llorch_tokenizer::{BpeTokenizer, IncrementalDecoder};
///
/// let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
/// let tok = BpeTokenizer::from_dir(&dir)?;
/// let text = "Café 👋🏽 done";
/// let ids = tok.encode(text, false)?;
/// assert!(ids.len() > text.chars().count() / 2); // the emoji spans several tokens
///
/// let mut decoder = IncrementalDecoder::new(false);
/// let mut out = String::new();
/// for id in &ids {
///     let delta = decoder.push(&tok, &[*id])?;
///     assert!(!delta.contains('\u{FFFD}'), "half a character in {delta:?}");
///     out.push_str(&delta);
/// }
/// out.push_str(&decoder.flush(&tok)?);
/// assert_eq!(out, text);
/// # Ok::<(), llorch_tokenizer::TokenizerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    /// Ids since the last clean boundary.
    window: Vec<u32>,
    /// Bytes of `decode(window)` already released.
    released: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// A decoder for one sequence.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { window: Vec::new(), released: 0, skip_special_tokens }
    }

    /// Adds `ids` and returns the text that became complete (possibly empty). Ids are checked
    /// against the vocabulary first; on error the state is unchanged.
    pub fn push(&mut self, tok: &BpeTokenizer, ids: &[u32]) -> Result<String, TokenizerError> {
        tok.check_ids(ids)?;
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.window.extend_from_slice(ids);
        let text = tok.decode_unchecked(&self.window, self.skip_special_tokens)?;
        let stable = text.trim_end_matches(REPLACEMENT);
        let delta = stable.get(self.released..).unwrap_or_default().to_owned();
        if stable.len() == text.len() {
            // Clean end: the next id starts a new character, so the window can start over.
            self.window.clear();
            self.released = 0;
        } else {
            self.released = self.released.max(stable.len());
        }
        Ok(delta)
    }

    /// Releases everything still held back (an incomplete character at the very end becomes
    /// U+FFFD, exactly as in a full decode) and resets the decoder.
    pub fn flush(&mut self, tok: &BpeTokenizer) -> Result<String, TokenizerError> {
        let text = tok.decode_unchecked(&self.window, self.skip_special_tokens)?;
        let delta = text.get(self.released..).unwrap_or_default().to_owned();
        self.window.clear();
        self.released = 0;
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn tok() -> BpeTokenizer {
        BpeTokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default"))
            .unwrap()
    }

    #[test]
    fn a_character_split_over_tokens_comes_out_whole_once() {
        let tok = tok();
        let [a, b] = [tok.encode("a", false).unwrap()[0], tok.encode("b", false).unwrap()[0]];
        // "€" is E2 82 AC: feed it one single-byte token at a time.
        let euro: Vec<u32> = "€".bytes().map(|byte| byte_token_id(&tok, byte)).collect();
        let mut dec = IncrementalDecoder::new(false);
        assert_eq!(dec.push(&tok, &[a]).unwrap(), "a");
        assert_eq!(dec.push(&tok, &euro[..1]).unwrap(), "");
        assert_eq!(dec.push(&tok, &euro[1..2]).unwrap(), "");
        assert_eq!(dec.push(&tok, &euro[2..]).unwrap(), "€");
        assert_eq!(dec.push(&tok, &[b]).unwrap(), "b");
        assert_eq!(dec.flush(&tok).unwrap(), "");
    }

    #[test]
    fn complete_text_before_a_split_character_is_released_at_once() {
        let tok = tok();
        let mut ids = tok.encode("Hello", false).unwrap();
        ids.push(byte_token_id(&tok, 0xE2));
        let mut dec = IncrementalDecoder::new(false);
        assert_eq!(dec.push(&tok, &ids).unwrap(), "Hello");
        let rest: Vec<u32> = [0x82, 0xAC].map(|byte| byte_token_id(&tok, byte)).to_vec();
        assert_eq!(dec.push(&tok, &rest).unwrap(), "€");
    }

    #[test]
    fn flush_releases_an_incomplete_tail_as_a_replacement() {
        let tok = tok();
        let mut dec = IncrementalDecoder::new(false);
        assert_eq!(dec.push(&tok, &[byte_token_id(&tok, 0xE2)]).unwrap(), "");
        assert_eq!(dec.flush(&tok).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn bad_ids_leave_the_state_unchanged() {
        let tok = tok();
        let mut dec = IncrementalDecoder::new(false);
        assert_eq!(dec.push(&tok, &[15496]).unwrap(), "Hello");
        assert!(dec.push(&tok, &[13, 70000]).is_err());
        assert_eq!(dec.push(&tok, &[13]).unwrap(), ".");
    }

    /// Id of the token that is exactly one byte, through GPT-2's byte-to-unicode table:
    /// printable bytes stand for themselves, the other 68 map to U+0100.. in byte order.
    fn byte_token_id(tok: &BpeTokenizer, byte: u8) -> u32 {
        let printable = |b: u8| matches!(b, 33..=126 | 161..=172 | 174..=255);
        let ch = if printable(byte) {
            char::from(byte)
        } else {
            let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
            char::from_u32(256 + rank).unwrap()
        };
        tok.token_to_id(&ch.to_string()).unwrap()
    }
}
