//! The llorch tokenizer service: GPT-2 byte-level BPE (Hugging Face `tokenizers`) as a library
//! ([`BpeTokenizer`], [`IncrementalDecoder`]) and as the `llorch.tokenizer.v1.Tokenizer` gRPC
//! service ([`server::run`]).

pub mod bench;
pub mod bpe;
pub mod config;
pub mod error;
pub mod incremental;
pub mod server;

pub use bpe::BpeTokenizer;
pub use config::{Limits, ServeConfig};
pub use error::{ErrorKind, TokenizerError};
pub use incremental::IncrementalDecoder;
