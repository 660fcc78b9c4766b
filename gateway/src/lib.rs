//! The llorch gateway: the llama-orch worker HTTP/SSE API (`/health`, `/execute`, `/cancel`,
//! `/metrics`) over the tokenizer and engine gRPC services, and OpenAI-compatible completions
//! beside it ([`openai`]).

pub mod auth;
pub mod callback;
pub mod config;
pub mod correlation;
pub mod detokenize;
pub mod engines;
pub mod error;
pub mod execute;
pub mod job;
pub mod listener;
pub mod metrics;
pub mod openai;
pub mod server;
pub mod sse;
pub mod state;
pub mod stop;
pub mod upstream;
pub mod validate;

pub use config::GatewayConfig;
pub use error::{ErrorKind, GatewayError};
