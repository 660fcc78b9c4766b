//! `llorch-gateway`: the llama-orch worker HTTP/SSE API in front of the tokenizer and engine.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use llorch_common::telemetry::{self, TelemetryArgs};
use llorch_gateway::GatewayConfig;

/// llama-orch worker HTTP/SSE API over the llorch services.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(flatten)]
    config: GatewayConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Flushes queued spans when dropped, at the end of main.
    let _telemetry = telemetry::init(&cli.telemetry, "llorch-gateway")?;
    let addr = SocketAddr::new(cli.config.host, cli.config.port);
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot bind {addr}"))?;
    llorch_gateway::server::run(cli.config, listener, llorch_common::shutdown::signal()).await
}
