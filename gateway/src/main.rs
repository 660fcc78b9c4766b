//! `llorch-gateway`: the llama-orch worker HTTP/SSE API in front of the tokenizer and engine.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use llorch_common::probe::{self, ProbeArgs};
use llorch_common::telemetry::{self, TelemetryArgs};
use llorch_gateway::GatewayConfig;

/// llama-orch worker HTTP/SSE API over the llorch services.
///
/// `llorch-gateway [FLAGS]` (no subcommand) is the same as `llorch-gateway serve [FLAGS]`.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: GatewayConfig,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the worker API (the default when no subcommand is given).
    Serve {
        #[command(flatten)]
        config: Box<GatewayConfig>,
    },
    /// Ask a running gateway's `GET /health`: exit 0 when healthy, 1 with the reason otherwise
    /// (container healthchecks; the image has no curl).
    Health {
        #[command(flatten)]
        probe: ProbeArgs,
        /// Port of the gateway on this host, used when `--url` is absent.
        #[arg(long, env = "LLORCH_GATEWAY_PORT", default_value_t = 8080)]
        port: u16,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Health { probe: args, port }) => {
            let url = args.url(port);
            let result = match args.ca() {
                Ok(ca) => http_health(&url, args.timeout(), ca.as_ref()).await,
                Err(e) => Err(e),
            };
            probe::exit_with(result)
        }
        Some(Command::Serve { config }) => *config,
        None => cli.config,
    };
    // Flushes queued spans when dropped, at the end of main.
    let _telemetry = telemetry::init(&cli.telemetry, "llorch-gateway")?;
    llorch_common::failpoint::init()?;
    let addr = SocketAddr::new(config.host, config.port);
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot bind {addr}"))?;
    llorch_gateway::server::run(config, listener, llorch_common::shutdown::signal()).await
}

/// `GET <url>/health`: `Ok` with the status line when it answers 200. With `ca`, an
/// `https://` URL is checked against it.
async fn http_health(
    url: &str,
    timeout: Duration,
    ca: Option<&llorch_common::tls::ClientCa>,
) -> Result<String, String> {
    let health = format!("{}/health", url.trim_end_matches('/'));
    let mut client = reqwest::Client::builder().timeout(timeout);
    if let Some(ca) = ca {
        let root = reqwest::Certificate::from_pem(ca.pem())
            .map_err(|e| format!("--ca-cert: {}", probe::chain(&e)))?;
        client = client.tls_built_in_root_certs(false).add_root_certificate(root);
    }
    let client = client.build().map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let resp = client
        .get(&health)
        .send()
        .await
        .map_err(|e| format!("cannot reach {health}: {}", probe::chain(&e)))?;
    let code = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let field = |k: &str| body.get(k).map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let line = format!(
        "{health}: HTTP {} status={} engines_up={} reason={}",
        code.as_u16(),
        field("status"),
        field("engines_up"),
        field("reason")
    );
    if code.is_success() { Ok(line) } else { Err(line) }
}
