//! Configuration of the gateway: one struct, every field a `--flag` with an env fallback.

use std::net::IpAddr;
use std::time::Duration;

/// How `llorch-gateway` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayConfig {
    /// This worker's id, reported to the pool manager.
    #[arg(long, env = "LLORCH_WORKER_ID", default_value = "llorch-worker-0")]
    pub worker_id: String,
    /// Model reference reported to the pool manager and in `started` events (default: the
    /// engine's model name).
    #[arg(long, env = "LLORCH_MODEL_REF")]
    pub model: Option<String>,
    /// Address to bind.
    #[arg(long, env = "LLORCH_GATEWAY_HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one (the bound address is logged).
    #[arg(long, env = "LLORCH_GATEWAY_PORT", default_value_t = 8080)]
    pub port: u16,
    /// URL for the ready callback (POSTed once listening). A URL containing `localhost:9999`
    /// means test mode: the call is skipped.
    #[arg(long, env = "LLORCH_CALLBACK_URL", default_value = "http://localhost:9999/ready")]
    pub callback_url: String,
    /// URL this worker is reachable at, sent as `uri` in the callback (default:
    /// `http://<host>:<port>`).
    #[arg(long, env = "LLORCH_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Tokenizer service address.
    #[arg(long, env = "LLORCH_TOKENIZER_URL", default_value = "http://127.0.0.1:50051")]
    pub tokenizer_url: String,
    /// Engine service address.
    #[arg(long, env = "LLORCH_ENGINE_URL", default_value = "http://127.0.0.1:50052")]
    pub engine_url: String,
    /// Most `/execute` streams at once; more get 429 with `Retry-After`.
    #[arg(long, env = "LLORCH_MAX_IN_FLIGHT", default_value_t = 32)]
    pub max_in_flight: usize,
    /// Seconds a job may run in total (prompt and generation) before it ends with `TIMEOUT`.
    #[arg(long, env = "LLORCH_REQUEST_TIMEOUT_SECS", default_value_t = 300.0)]
    pub request_timeout: f64,
    /// Attempts of the ready callback before giving up (exit non-zero).
    #[arg(long, env = "LLORCH_CALLBACK_ATTEMPTS", default_value_t = 5)]
    pub callback_attempts: u32,
    /// Delay before the second callback attempt, in seconds; doubles each time.
    #[arg(long, env = "LLORCH_CALLBACK_BACKOFF_SECS", default_value_t = 0.5)]
    pub callback_backoff_secs: f64,
    /// Seconds running streams get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "LLORCH_GATEWAY_GRACE_SECS", default_value_t = 30.0)]
    pub grace_secs: f64,
    /// Largest request body, in bytes.
    #[arg(long, env = "LLORCH_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
}

impl GatewayConfig {
    /// Defaults, for tests.
    pub fn new(tokenizer_url: String, engine_url: String) -> Self {
        Self {
            worker_id: "llorch-worker-0".into(),
            model: None,
            host: [127, 0, 0, 1].into(),
            port: 0,
            callback_url: "http://localhost:9999/ready".into(),
            public_url: None,
            tokenizer_url,
            engine_url,
            max_in_flight: 32,
            request_timeout: 300.0,
            callback_attempts: 5,
            callback_backoff_secs: 0.5,
            grace_secs: 30.0,
            max_body_bytes: 1 << 20,
        }
    }

    /// The total time budget of one job.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout.max(0.001))
    }
}
