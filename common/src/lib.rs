//! What every llorch binary shares: logging set-up ([`logging`]), shutdown signals
//! ([`shutdown`]) and the gRPC health/reflection wiring of the two services ([`grpc`]); and,
//! for the tests that run those binaries, reading their JSON logs back ([`child_log`]).

pub mod child_log;
pub mod grpc;
pub mod logging;
pub mod shutdown;
