//! The llorch engine: GPT-2 (any size, Hugging Face safetensors) on ndarray + OpenBLAS.

// Links the system OpenBLAS that ndarray's `blas` feature calls into.
extern crate blas_src;

pub mod blas;
pub mod config;
pub mod error;
pub mod layers;
pub mod weights;

pub use config::{Gpt2Config, ModelConfig};
pub use error::{EngineError, ErrorKind};
pub mod kv_cache;
pub mod model;
pub mod npy;
pub mod request;
pub mod sampling;
pub mod sequence;
pub mod threads;

pub use kv_cache::KvCache;
pub use model::{Gpt2, LogitsFor, Scratch, SeqStep, Trace};
pub use request::{ValidRequest, validate};
pub use sequence::{FinishReason, Generation, Sequence, TokenEvent, generate};
