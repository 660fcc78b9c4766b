//! Configuration of the tokenizer service: one struct, every field a `--flag` with an env
//! fallback.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How `llorch-tokenizer serve` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Model folder holding `tokenizer.json` (or `vocab.json` + `merges.txt`).
    #[arg(long, env = "LLORCH_MODEL", default_value = "models/default")]
    pub model: PathBuf,
    /// Address to bind.
    #[arg(long, env = "LLORCH_TOKENIZER_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one (the bound address is logged).
    #[arg(long, env = "LLORCH_TOKENIZER_PORT", default_value_t = 50051)]
    pub port: u16,
    #[command(flatten)]
    pub limits: Limits,
    /// Seconds that open streams get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "LLORCH_TOKENIZER_GRACE_SECS", default_value_t = 10.0)]
    pub grace_secs: f64,
    #[command(flatten)]
    pub auth: llorch_common::auth::ApiKeyArgs,
    #[command(flatten)]
    pub tls: llorch_common::tls::TlsArgs,
}

impl ServeConfig {
    /// The drain deadline.
    pub fn grace(&self) -> Duration {
        Duration::from_secs_f64(self.grace_secs.max(0.0))
    }
}

/// Longest text `Encode` accepts unless configured otherwise, in UTF-8 bytes (1 MiB).
pub const DEFAULT_MAX_TEXT_BYTES: usize = 1 << 20;
/// Most ids per `Decode` request or `DecodeStream` message unless configured otherwise.
pub const DEFAULT_MAX_IDS: usize = 1 << 18;
/// Largest gRPC message accepted unless configured otherwise (tonic's own default, 4 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 << 20;

/// Most calls at once unless configured otherwise: well under tokio's 512 blocking threads,
/// which run the work, and far over what a gateway sends (two per job, 32 jobs by default).
pub const DEFAULT_MAX_CONCURRENT_CALLS: usize = 256;

/// Request size limits. Anything over them is refused with `INVALID_ARGUMENT` (or, for whole
/// messages over `max_message_bytes`, by tonic with `OUT_OF_RANGE`) and the server keeps serving.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Limits {
    /// Longest text `Encode` accepts, in UTF-8 bytes.
    #[arg(long, env = "LLORCH_TOKENIZER_MAX_TEXT_BYTES", default_value_t = DEFAULT_MAX_TEXT_BYTES)]
    pub max_text_bytes: usize,
    /// Most ids one `Decode` request or one `DecodeStream` message may carry.
    #[arg(long, env = "LLORCH_TOKENIZER_MAX_IDS", default_value_t = DEFAULT_MAX_IDS)]
    pub max_ids: usize,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "LLORCH_TOKENIZER_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Most calls at once (an open `DecodeStream` counts until it ends); one more gets
    /// `RESOURCE_EXHAUSTED`, retriable.
    #[arg(long, env = "LLORCH_TOKENIZER_MAX_CONCURRENT_CALLS", default_value_t = DEFAULT_MAX_CONCURRENT_CALLS)]
    pub max_concurrent_calls: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
            max_ids: DEFAULT_MAX_IDS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_calls: DEFAULT_MAX_CONCURRENT_CALLS,
        }
    }
}
