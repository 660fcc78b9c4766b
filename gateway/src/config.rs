//! Configuration of the gateway: one struct, every field a `--flag` with an env fallback.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use llorch_common::auth::ApiKeyArgs;
use llorch_common::tls::TlsArgs;

// Each default once: clap shows it in `--help`, `GatewayConfig::new` starts from it.
const DEFAULT_WORKER_ID: &str = "llorch-worker-0";
const DEFAULT_HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const DEFAULT_PORT: u16 = 8080;
const DEFAULT_CALLBACK_URL: &str = "http://localhost:9999/ready";
const DEFAULT_TOKENIZER_URL: &str = "http://127.0.0.1:50051";
const DEFAULT_ENGINE_URL: &str = "http://127.0.0.1:50052";
const DEFAULT_MAX_IN_FLIGHT: usize = 32;
const DEFAULT_REQUEST_TIMEOUT_SECS: f64 = 300.0;
const DEFAULT_CALLBACK_ATTEMPTS: u32 = 5;
const DEFAULT_CALLBACK_BACKOFF_SECS: f64 = 0.5;
const DEFAULT_GRACE_SECS: f64 = 30.0;
const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
const DEFAULT_PUBLIC_PATHS: &str = "/health,/metrics";
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_HEADER_READ_TIMEOUT_SECS: f64 = 10.0;
const DEFAULT_BODY_READ_TIMEOUT_SECS: f64 = 30.0;
const DEFAULT_MAX_HEADER_BYTES: usize = 64 << 10;

/// How `llorch-gateway` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayConfig {
    /// This worker's id, reported to the pool manager.
    #[arg(long, env = "LLORCH_WORKER_ID", default_value = DEFAULT_WORKER_ID)]
    pub worker_id: String,
    /// Model reference reported to the pool manager and in `started` events (default: the
    /// engine's model name).
    #[arg(long, env = "LLORCH_MODEL_REF")]
    pub model: Option<String>,
    /// Address to bind.
    #[arg(long, env = "LLORCH_GATEWAY_HOST", default_value_t = DEFAULT_HOST)]
    pub host: IpAddr,
    /// Port to bind; 0 picks a free one (the bound address is logged).
    #[arg(long, env = "LLORCH_GATEWAY_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// URL for the ready callback (POSTed once listening). A URL containing `localhost:9999`
    /// means test mode: the call is skipped.
    #[arg(long, env = "LLORCH_CALLBACK_URL", default_value = DEFAULT_CALLBACK_URL, value_parser = http_url)]
    pub callback_url: String,
    /// URL this worker is reachable at, sent as `uri` in the callback (default, or empty:
    /// `http://<host>:<port>`).
    #[arg(long, env = "LLORCH_PUBLIC_URL", value_parser = optional_http_url)]
    pub public_url: Option<String>,
    /// Tokenizer service address.
    #[arg(long, env = "LLORCH_TOKENIZER_URL", default_value = DEFAULT_TOKENIZER_URL, value_parser = http_url)]
    pub tokenizer_url: String,
    /// Engine service address; repeat the flag (or separate by commas in the variable) for
    /// several replicas. A host name stands for every address it resolves to, re-resolved every
    /// few seconds (e.g. a compose service scaled to N).
    #[arg(
        long = "engine-url",
        env = "LLORCH_ENGINE_URL",
        value_delimiter = ',',
        default_value = DEFAULT_ENGINE_URL,
        value_parser = http_url
    )]
    pub engine_urls: Vec<String>,
    /// Most `/execute` streams at once; more get 429 with `Retry-After`.
    #[arg(long, env = "LLORCH_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Seconds a job may run in total (prompt and generation) before it ends with `TIMEOUT`.
    #[arg(long, env = "LLORCH_REQUEST_TIMEOUT_SECS", default_value_t = DEFAULT_REQUEST_TIMEOUT_SECS)]
    pub request_timeout: f64,
    /// Attempts of the ready callback before giving up (exit non-zero).
    #[arg(long, env = "LLORCH_CALLBACK_ATTEMPTS", default_value_t = DEFAULT_CALLBACK_ATTEMPTS)]
    pub callback_attempts: u32,
    /// Delay before the second callback attempt, in seconds; doubles each time.
    #[arg(long, env = "LLORCH_CALLBACK_BACKOFF_SECS", default_value_t = DEFAULT_CALLBACK_BACKOFF_SECS)]
    pub callback_backoff_secs: f64,
    /// Seconds running streams get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "LLORCH_GATEWAY_GRACE_SECS", default_value_t = DEFAULT_GRACE_SECS)]
    pub grace_secs: f64,
    /// Largest request body, in bytes.
    #[arg(long, env = "LLORCH_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Most client connections open at once; one more gets 503 and is closed.
    #[arg(long, env = "LLORCH_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's line and headers (slow clients are dropped).
    #[arg(
        long,
        env = "LLORCH_HEADER_READ_TIMEOUT_SECS",
        default_value_t = DEFAULT_HEADER_READ_TIMEOUT_SECS
    )]
    pub header_read_timeout_secs: f64,
    /// Seconds a request body may pause between two chunks before the request fails (400).
    #[arg(
        long,
        env = "LLORCH_BODY_READ_TIMEOUT_SECS",
        default_value_t = DEFAULT_BODY_READ_TIMEOUT_SECS
    )]
    pub body_read_timeout_secs: f64,
    /// Largest request line plus headers, in bytes; more gets 431.
    #[arg(long, env = "LLORCH_MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// The API key (also sent on every call to the tokenizer and the engines).
    #[command(flatten)]
    pub auth: ApiKeyArgs,
    /// Paths served without the API key, exact, comma-separated (empty: none).
    #[arg(
        long,
        env = "LLORCH_PUBLIC_PATHS",
        value_delimiter = ',',
        default_value = DEFAULT_PUBLIC_PATHS
    )]
    pub public_paths: Vec<String>,
    /// TLS on the gateway's own port (HTTPS; plain HTTP is then refused).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// PEM file of the certificate authorities that `https://` upstream URLs
    /// (`--tokenizer-url`, `--engine-url`) must chain to; needed for those URLs. An `https://`
    /// `--callback-url` is checked against them too.
    #[arg(long, env = "LLORCH_UPSTREAM_CA")]
    pub upstream_ca: Option<std::path::PathBuf>,
}

/// An `http://` or `https://` URL with a host; clap prints the flag and the value with the
/// error (`invalid value 'not a url' for '--engine-url <ENGINE_URLS>': ...`).
fn http_url(value: &str) -> Result<String, String> {
    let uri: axum::http::Uri = value.parse().map_err(|e| format!("not a URL ({e})"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(value.to_owned()),
        _ => Err("expected http://HOST[:PORT] or https://HOST[:PORT]".to_owned()),
    }
}

/// [`http_url`], or empty (meaning: not set).
fn optional_http_url(value: &str) -> Result<String, String> {
    if value.is_empty() { Ok(String::new()) } else { http_url(value) }
}

impl GatewayConfig {
    /// The defaults of every flag, for tests, with the two upstreams' URLs.
    pub fn new(tokenizer_url: String, engine_url: String) -> Self {
        Self {
            worker_id: DEFAULT_WORKER_ID.into(),
            model: None,
            host: DEFAULT_HOST,
            // Any free port: callers of `new` bind their own listener and pass it to `run`.
            port: 0,
            callback_url: DEFAULT_CALLBACK_URL.into(),
            public_url: None,
            tokenizer_url,
            engine_urls: vec![engine_url],
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT_SECS,
            callback_attempts: DEFAULT_CALLBACK_ATTEMPTS,
            callback_backoff_secs: DEFAULT_CALLBACK_BACKOFF_SECS,
            grace_secs: DEFAULT_GRACE_SECS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout_secs: DEFAULT_HEADER_READ_TIMEOUT_SECS,
            body_read_timeout_secs: DEFAULT_BODY_READ_TIMEOUT_SECS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            auth: ApiKeyArgs::default(),
            public_paths: DEFAULT_PUBLIC_PATHS.split(',').map(str::to_owned).collect(),
            tls: TlsArgs::default(),
            upstream_ca: None,
        }
    }

    /// The key and CA for calls to the upstreams (files read and checked).
    pub fn credentials(&self) -> anyhow::Result<crate::upstream::Credentials> {
        let ca =
            self.upstream_ca.as_deref().map(llorch_common::tls::ClientCa::from_file).transpose()?;
        Ok(crate::upstream::Credentials { key: self.auth.load()?, ca })
    }

    /// The listener's limits.
    pub fn listener_limits(&self) -> crate::listener::Limits {
        crate::listener::Limits {
            max_connections: self.max_connections.max(1),
            header_read_timeout: secs(self.header_read_timeout_secs),
            max_header_bytes: self.max_header_bytes,
        }
    }

    /// The longest pause within a request body.
    pub fn body_read_timeout(&self) -> Duration {
        secs(self.body_read_timeout_secs)
    }

    /// The total time budget of one job.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout.max(0.001))
    }
}

/// `v` seconds, at least 1 ms (a bad value must not mean "no time" or "forever").
fn secs(v: f64) -> Duration {
    Duration::try_from_secs_f64(v).unwrap_or(Duration::ZERO).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use clap::{Args, FromArgMatches};

    use super::*;

    #[test]
    fn new_is_the_command_line_defaults() {
        // The environment is ignored: the defaults alone, whatever the test runner exports.
        let command = GatewayConfig::augment_args(clap::Command::new("llorch-gateway"))
            .mut_args(|arg| arg.env(None));
        let parsed =
            GatewayConfig::from_arg_matches(&command.get_matches_from(["llorch-gateway"])).unwrap();
        let mut new = GatewayConfig::new(DEFAULT_TOKENIZER_URL.into(), DEFAULT_ENGINE_URL.into());
        new.port = DEFAULT_PORT;
        assert_eq!(format!("{parsed:?}"), format!("{new:?}"));
    }

    fn parse(args: &[&str]) -> Result<GatewayConfig, String> {
        let command = GatewayConfig::augment_args(clap::Command::new("llorch-gateway"))
            .mut_args(|arg| arg.env(None));
        let matches = command
            .try_get_matches_from(std::iter::once("llorch-gateway").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        GatewayConfig::from_arg_matches(&matches).map_err(|e| e.to_string())
    }

    #[test]
    fn url_errors_name_the_flag_and_the_value() {
        for (flag, bad) in [
            ("--engine-url", "not a url"),
            ("--engine-url", "engine:50052"),
            ("--tokenizer-url", "ftp://tokenizer"),
            ("--callback-url", "http://"),
            ("--public-url", "nowhere"),
        ] {
            let err = parse(&[flag, bad]).unwrap_err();
            assert!(err.contains(flag) && err.contains(&format!("'{bad}'")), "{flag} {bad}: {err}");
        }
    }

    #[test]
    fn engine_urls_repeat_and_split_on_commas() {
        let c = parse(&["--engine-url", "http://a:1,http://b:2", "--engine-url", "http://c:3"])
            .unwrap();
        assert_eq!(c.engine_urls, ["http://a:1", "http://b:2", "http://c:3"]);
        assert_eq!(parse(&["--public-url", ""]).unwrap().public_url.as_deref(), Some(""));
    }
}
