//! The llorch gRPC contracts.
//!
//! * [`tokenizer::v1`]: `llorch.tokenizer.v1.Tokenizer` (text ⇄ ids).
//! * [`engine::v1`]: `llorch.engine.v1.Engine` (ids ⇄ ids, streaming generation).
//!
//! [`FILE_DESCRIPTOR_SET`] carries both packages for gRPC server reflection.

/// `llorch.tokenizer.*`
pub mod tokenizer {
    /// `llorch.tokenizer.v1`: generated messages, client and server.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("llorch.tokenizer.v1");
    }
}

/// `llorch.engine.*`
pub mod engine {
    /// `llorch.engine.v1`: generated messages, client and server.
    pub mod v1 {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("llorch.engine.v1");
    }
}

/// Encoded `FileDescriptorSet` of every llorch proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("llorch_descriptor");

/// Full gRPC service name of the tokenizer (`llorch.tokenizer.v1.Tokenizer`), as used by
/// `grpc.health.v1` for readiness.
pub const TOKENIZER_SERVICE: &str = "llorch.tokenizer.v1.Tokenizer";

/// Full gRPC service name of the engine (`llorch.engine.v1.Engine`).
pub const ENGINE_SERVICE: &str = "llorch.engine.v1.Engine";
