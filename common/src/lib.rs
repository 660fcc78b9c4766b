//! What every llorch binary shares: logging set-up ([`logging`]), shutdown signals
//! ([`shutdown`]) and the gRPC health/reflection wiring of the two services ([`grpc`]).

pub mod grpc;
pub mod logging;
pub mod shutdown;
