//! OpenAI's `logprobs` object of a completion choice: `tokens` (each token's own text),
//! `token_logprobs`, `top_logprobs` (token text → logprob of the most likely tokens at each
//! step) and `text_offset` (where each token's text starts in the choice's `text`, in
//! characters). A token's own text is its single-id `Decode` from the tokenizer service (a
//! byte that is part of a multi-byte character decodes to U+FFFD), cached per request.

use std::collections::HashMap;

use futures::future::try_join_all;
use llorch_proto::tokenizer::v1 as tpb;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::GatewayError;
use crate::job::TokenLogprobs;
use crate::upstream::{CallContext, Tokenizer};

/// The `logprobs` object (also each streamed chunk's part of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Logprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's logprob; `null` for echoed prompt tokens (the engine scores only
    /// generated ones).
    pub token_logprobs: Vec<Option<f32>>,
    /// Per token, its most likely alternatives by text; `null` for echoed prompt tokens.
    pub top_logprobs: Vec<Option<Map<String, Value>>>,
    /// Where each token's text starts in the choice's text, in characters.
    pub text_offset: Vec<usize>,
}

/// Single-token texts, asked of the tokenizer once per id.
pub struct TokenTexts {
    tokenizer: Tokenizer,
    ctx: CallContext,
    cache: HashMap<u32, String>,
}

impl TokenTexts {
    /// An empty cache over `tokenizer`.
    pub fn new(tokenizer: Tokenizer, ctx: CallContext) -> Self {
        Self { tokenizer, ctx, cache: HashMap::new() }
    }

    /// Makes sure every id of `ids` has its text, asking for the missing ones concurrently.
    pub async fn load(&mut self, ids: impl IntoIterator<Item = u32>) -> Result<(), GatewayError> {
        let mut missing: Vec<u32> =
            ids.into_iter().filter(|id| !self.cache.contains_key(id)).collect();
        missing.sort_unstable();
        missing.dedup();
        let calls = missing.iter().map(|&id| {
            let mut tokenizer = self.tokenizer.clone();
            let req =
                self.ctx.request(tpb::DecodeRequest { ids: vec![id], skip_special_tokens: false });
            async move {
                tokenizer
                    .decode(req)
                    .await
                    .map(|r| (id, r.into_inner().text))
                    .map_err(|e| GatewayError::from_status("tokenizer", &e))
            }
        });
        self.cache.extend(try_join_all(calls).await?);
        Ok(())
    }

    /// The text of `ids` together (special tokens kept), as `echo` shows a token-id prompt.
    pub async fn decode_all(&self, ids: &[u32]) -> Result<String, GatewayError> {
        let mut tokenizer = self.tokenizer.clone();
        let req = tpb::DecodeRequest { ids: ids.to_vec(), skip_special_tokens: false };
        tokenizer
            .decode(self.ctx.request(req))
            .await
            .map(|r| r.into_inner().text)
            .map_err(|e| GatewayError::from_status("tokenizer", &e))
    }

    /// The text of `id` (loaded before).
    pub fn text(&self, id: u32) -> String {
        self.cache.get(&id).cloned().unwrap_or_default()
    }

    /// Adds a generated token, whose text starts at character `offset` of the choice's text,
    /// to `out`.
    pub fn push_generated(&self, out: &mut Logprobs, id: u32, lp: &TokenLogprobs, offset: usize) {
        out.tokens.push(self.text(id));
        out.token_logprobs.push(Some(lp.logprob));
        let top: Map<String, Value> =
            lp.top.iter().map(|&(id, logprob)| (self.text(id), Value::from(logprob))).collect();
        out.top_logprobs.push(Some(top));
        out.text_offset.push(offset);
    }

    /// Adds echoed prompt tokens, the first starting at character 0.
    pub fn push_prompt(&self, out: &mut Logprobs, ids: &[u32]) {
        let mut offset = 0;
        for &id in ids {
            let text = self.text(id);
            out.text_offset.push(offset);
            offset += text.chars().count();
            out.tokens.push(text);
            out.token_logprobs.push(None);
            out.top_logprobs.push(None);
        }
    }
}
