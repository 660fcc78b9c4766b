//! Encode throughput measurement (a command that prints numbers, never a timed test).

use std::time::Instant;

use serde::Serialize;

use crate::bpe::BpeTokenizer;
use crate::error::TokenizerError;

/// What `llorch-tokenizer bench` prints.
#[derive(Debug, Serialize)]
pub struct EncodeReport {
    /// Bytes encoded in total.
    pub bytes: usize,
    /// Tokens produced in total.
    pub tokens: usize,
    /// Wall time measured.
    pub seconds: f64,
    /// Throughput in MB/s (10^6 bytes), one thread.
    pub mb_per_s: f64,
    /// Tokens per second, one thread.
    pub tokens_per_s: f64,
    /// Size of each encode call.
    pub chunk_bytes: usize,
}

/// Encodes `text` in pieces of about `chunk_bytes` (cut on character boundaries), repeating
/// until at least `min_seconds` have passed, on the calling thread.
pub fn encode_throughput(
    tok: &BpeTokenizer,
    text: &str,
    chunk_bytes: usize,
    min_seconds: f64,
) -> Result<EncodeReport, TokenizerError> {
    let chunks = split_on_char_boundaries(text, chunk_bytes.max(1));
    // Warm up caches (the BPE word cache, the allocator).
    for chunk in &chunks {
        tok.encode(chunk, false)?;
    }
    let (mut bytes, mut tokens) = (0, 0);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < min_seconds {
        for chunk in &chunks {
            tokens += tok.encode(chunk, false)?.len();
            bytes += chunk.len();
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(EncodeReport {
        bytes,
        tokens,
        seconds,
        mb_per_s: bytes as f64 / seconds / 1e6,
        tokens_per_s: tokens as f64 / seconds,
        chunk_bytes,
    })
}

fn split_on_char_boundaries(text: &str, size: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = size.min(rest.len());
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunks_cover_the_text_and_never_split_a_character() {
        let text = "aé日👩‍👩‍👧".repeat(10);
        let chunks = super::split_on_char_boundaries(&text, 3);
        assert_eq!(chunks.concat(), text);
        assert!(chunks.iter().all(|c| !c.is_empty()));
    }
}
