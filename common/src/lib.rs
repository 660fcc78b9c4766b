//! What every llorch binary shares: logging and OpenTelemetry set-up ([`logging`],
//! [`telemetry`]), shutdown signals ([`shutdown`]), the API key ([`auth`]) and the gRPC health/reflection/tracing wiring
//! of the two services ([`grpc`]); and, for the tests that run those binaries, reading their JSON
//! logs back ([`child_log`]), and making them panic on purpose ([`failpoint`]).

pub mod auth;
pub mod child_log;
pub mod cli;
pub mod failpoint;
pub mod grpc;
pub mod logging;
pub mod probe;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
