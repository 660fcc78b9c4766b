//! `llorch-otlp-sink`: an OTLP/gRPC trace receiver that counts what it gets, for measuring the
//! cost of span export without a real collector. Prints one JSON line per interval with the
//! spans received during it, by service. A command that prints numbers, never a test.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use llorch_e2e::otlp::Collector;

/// OTLP/gRPC span counter.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: std::net::SocketAddr,
    /// Seconds between two report lines.
    #[arg(long, default_value_t = 10.0)]
    every: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let collector = Collector::serve(listener);
    eprintln!("llorch-otlp-sink listening on {}", args.listen);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(args.every.max(0.1)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let mut by_service = BTreeMap::<String, usize>::new();
        let total = {
            let mut spans = collector.spans.lock().unwrap_or_else(|e| e.into_inner());
            for g in spans.iter() {
                *by_service.entry(g.service.clone()).or_default() += 1;
            }
            // Keep the counts, not the spans: a long run must not grow.
            let n = spans.len();
            spans.clear();
            n
        };
        println!("{}", serde_json::json!({ "spans": total, "by_service": by_service }));
    }
}
