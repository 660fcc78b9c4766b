//! The llorch engine: GPT-2 (any size, Hugging Face safetensors) on ndarray + OpenBLAS, with a
//! per-sequence KV cache, sampling and a batch-invariant decode path.
//!
//! * [`Gpt2`] loads a model folder ([`weights`], [`config`]) and runs [`Gpt2::forward`] over
//!   a step of prefill chunks or of decode tokens ([`layers`] holds the ops).
//! * [`validate`] turns a `GenerateRequest` into a [`ValidRequest`]; a [`Sequence`] generates
//!   for it with its own [`KvCache`] and [`sampling::Sampler`]; [`generate`] runs one alone.
//! * [`bench`](mod@bench), [`dump`], [`perplexity`](mod@perplexity) and [`random`] back the
//!   `llorch-engine` subcommands;
//!   [`reference`](mod@reference) reads and writes the checkpoint folders that the dump and
//!   the tests share.

// Links the system OpenBLAS that ndarray's `blas` feature calls into.
extern crate blas_src;

pub mod bench;
pub mod blas;
pub mod blas_core;
pub mod config;
pub mod dump;
pub mod error;
pub mod kv_cache;
pub mod layers;
pub mod matrix;
pub mod model;
pub mod npy;
pub mod perplexity;
pub mod random;
pub mod reference;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod sequence;
pub mod server;
pub mod threads;
pub mod weights;

pub use config::{Gpt2Config, ModelConfig};
pub use error::{EngineError, ErrorKind};
pub use kv_cache::KvCache;
pub use model::{Gpt2, LogitsFor, Scratch, SeqStep, Trace};
pub use request::{ValidRequest, validate};
pub use sequence::{FinishReason, Generation, Sequence, TokenEvent, generate};
