//! `llorch-tokenizer`: serve the tokenizer over gRPC, or encode/decode once from the shell.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use llorch_common::probe::{self, ProbeArgs};
use llorch_common::telemetry::{self, TelemetryArgs};
use llorch_tokenizer::{BpeTokenizer, ServeConfig, server};

/// GPT-2 byte-level BPE tokenizer service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    telemetry: TelemetryArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve `llorch.tokenizer.v1.Tokenizer` (plus health and reflection) over gRPC.
    Serve(ServeConfig),
    /// Ask a running tokenizer service whether it serves (`grpc.health.v1`): exit 0 when
    /// SERVING, 1 with the reason otherwise (container healthchecks).
    Health {
        #[command(flatten)]
        probe: ProbeArgs,
        /// Port of the service on this host, used when `--url` is absent.
        #[arg(long, env = "LLORCH_TOKENIZER_PORT", default_value_t = 50051)]
        port: u16,
    },
    /// Print the ids of TEXT as `{"ids":[...]}`.
    Encode {
        /// Model folder with the tokenizer files.
        #[arg(long, env = "LLORCH_MODEL", default_value = "models/default")]
        model: PathBuf,
        /// The text to tokenize.
        text: String,
    },
    /// Print the text of comma-separated IDS as `{"text":"..."}`.
    Decode {
        /// Model folder with the tokenizer files.
        #[arg(long, env = "LLORCH_MODEL", default_value = "models/default")]
        model: PathBuf,
        /// Token ids, comma-separated (e.g. `15496,11,995,0`).
        #[arg(value_delimiter = ',')]
        ids: Vec<u32>,
    },
    /// Measure encode throughput on one thread and print JSON.
    Bench {
        /// Model folder with the tokenizer files.
        #[arg(long, env = "LLORCH_MODEL", default_value = "models/default")]
        model: PathBuf,
        /// UTF-8 text file to encode (default: a built-in mix of prose, code and Unicode).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Encode the input in pieces of about this many bytes (as a server sees prompts).
        #[arg(long, default_value_t = 4096)]
        chunk_bytes: usize,
        /// Minimum measuring time in seconds.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Health { probe: args, port } = &cli.command {
        let url = args.url(*port);
        let service = llorch_proto::TOKENIZER_SERVICE;
        let result = match args.ca() {
            Ok(ca) => probe::grpc_health(&url, service, args.timeout(), ca.as_ref()).await,
            Err(e) => Err(e),
        };
        probe::exit_with(result);
    }
    // Flushes queued spans when dropped, at the end of main.
    let _telemetry = telemetry::init(&cli.telemetry, "llorch-tokenizer")?;
    llorch_common::failpoint::init()?;
    match cli.command {
        Command::Health { .. } => unreachable!("answered above"),
        Command::Serve(config) => {
            llorch_common::cli::check_model_dir(&config.model, "LLORCH_MODEL")?;
            let addr = SocketAddr::new(config.host, config.port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind {addr}"))?;
            server::run(config, listener, llorch_common::shutdown::signal()).await
        }
        Command::Encode { model, text } => {
            llorch_common::cli::check_model_dir(&model, "LLORCH_MODEL")?;
            let tok = BpeTokenizer::from_dir(&model)?;
            let ids = tok.encode(&text, false)?;
            println!("{}", serde_json::json!({ "ids": ids }));
            Ok(())
        }
        Command::Bench { model, file, chunk_bytes, seconds } => {
            llorch_common::cli::check_model_dir(&model, "LLORCH_MODEL")?;
            let tok = BpeTokenizer::from_dir(&model)?;
            let text = match file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
                None => BENCH_TEXT.repeat(64),
            };
            let report =
                llorch_tokenizer::bench::encode_throughput(&tok, &text, chunk_bytes, seconds)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Decode { model, ids } => {
            llorch_common::cli::check_model_dir(&model, "LLORCH_MODEL")?;
            let tok = BpeTokenizer::from_dir(&model)?;
            let text = tok.decode(&ids, false)?;
            println!("{}", serde_json::json!({ "text": text }));
            Ok(())
        }
    }
}

/// Default benchmark input: English prose, code, numbers and several scripts.
const BENCH_TEXT: &str = "The quick brown fox jumps over the lazy dog. It wasn't the first time \
the dog had been jumped over, and it wouldn't be the last; in 2024 alone, 1,234,567 foxes did it. \
fn main() { let x: Vec<u32> = (0..10).map(|i| i * 2).collect(); println!(\"{x:?}\"); }\n\
Les élèves ont étudié la théorie. Москва — столица России. 東京は日本の首都です。 \
مرحبا بالعالم. שלום עולם. नमस्ते दुनिया। 👩‍👩‍👧‍👦 🏳️‍🌈 café naïve résumé\n";
