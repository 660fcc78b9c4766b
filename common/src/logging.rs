//! Log flags shared by every binary: `tracing` to stderr, filtered by `RUST_LOG` (default
//! `info`), as text or JSON lines. [`crate::telemetry::init`] installs the subscriber.

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging flags every binary takes (global: accepted before or after a subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, global = true, env = "LLORCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
