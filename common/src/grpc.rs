//! gRPC wiring both services share: `grpc.health.v1`, server reflection, a server span per call
//! ([`server_span`]), and [`serve`], which runs a service next to them and stops it gracefully.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use tower_http::classify::GrpcFailureClass;
use tower_http::trace::TraceLayer;

use crate::shutdown::{DrainSignal, drain_with_deadline};
use crate::telemetry;

/// The health service of one llorch service. `""` reports liveness (SERVING while the process
/// runs), the service's full name reports readiness (NOT_SERVING while loading and draining).
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl Health {
    /// A reporter for `service` (e.g. [`llorch_proto::TOKENIZER_SERVICE`]) that starts
    /// NOT_SERVING.
    pub async fn new(service: &'static str) -> Self {
        let reporter = HealthReporter::new();
        reporter.set_service_status(service, ServingStatus::NotServing).await;
        Self { reporter, service }
    }

    /// The `grpc.health.v1.Health` server answering from this reporter.
    fn server(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }

    /// The service is loaded and takes work.
    pub async fn ready(&self) {
        self.reporter.set_service_status(self.service, ServingStatus::Serving).await;
        tracing::info!(service = self.service, "ready");
    }

    /// The service refuses new work (draining): both liveness and readiness say NOT_SERVING, so
    /// load balancers stop sending.
    pub async fn draining(&self) {
        self.reporter.set_service_status(self.service, ServingStatus::NotServing).await;
        self.reporter.set_service_status("", ServingStatus::NotServing).await;
    }
}

/// The health service's full name, listed by reflection next to each llorch service.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Server reflection for the server of `service`: it lists `service` and
/// [`HEALTH_SERVICE`] only (so `grpcurl list` on a port shows what that port answers) and
/// describes every llorch and health type.
fn reflection_builder(service: &'static str) -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llorch_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service)
        .with_service_name(HEALTH_SERVICE)
}

/// Server reflection as `grpc.reflection.v1` and as `grpc.reflection.v1alpha` (which Python's
/// `grpcio-reflection` and many `grpcurl` builds speak only), both from [`reflection_builder`].
pub fn reflection(
    service: &'static str,
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let err = |e| anyhow::anyhow!("cannot build the reflection service: {e}");
    Ok((
        reflection_builder(service).build_v1().map_err(err)?,
        reflection_builder(service).build_v1alpha().map_err(err)?,
    ))
}

/// Serves `routes` (one llorch service) next to `health` and reflection on `listener`, while
/// `lifecycle` runs.
///
/// `lifecycle` is the service's life: load, [`Health::ready`], wait for shutdown,
/// [`Health::draining`], finish its own work. When it returns `Ok`, the server stops accepting
/// calls and those in flight get `grace` to finish; then every connection is closed. An error
/// from `lifecycle` (a load failure) stops the server at once and is returned.
pub async fn serve(
    listener: TcpListener,
    health: &Health,
    routes: Routes,
    lifecycle: impl Future<Output = anyhow::Result<()>>,
    grace: Duration,
) -> anyhow::Result<()> {
    let drain = DrainSignal::new();
    let (reflection_v1, reflection_v1alpha) = reflection(health.service)?;
    let server = tonic::transport::Server::builder()
        .layer(
            TraceLayer::new_for_grpc()
                .make_span_with(server_span)
                .on_request(())
                .on_response(())
                .on_body_chunk(())
                .on_eos(on_eos)
                .on_failure(on_failure),
        )
        .add_routes(routes)
        .add_service(health.server())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), drain.started());
    let server = async {
        drain_with_deadline(server, drain.started(), grace).await?;
        anyhow::Ok(())
    };
    let lifecycle = async {
        lifecycle.await?;
        drain.start();
        anyhow::Ok(())
    };
    tokio::try_join!(lifecycle, server)?;
    Ok(())
}

/// The server span of one call: named `package.Service/Method` after the OpenTelemetry RPC
/// conventions, the child of the caller's trace context (W3C `traceparent` in the metadata),
/// carrying the caller's `x-correlation-id` and a `request_id` the handler may record. It lasts
/// until the response stream ends. Health checks, reflection and `Info` (what the gateway's
/// `/health` asks, every few seconds under a supervisor) get none.
pub fn server_span<B>(req: &http::Request<B>) -> tracing::Span {
    let method = req.uri().path().trim_start_matches('/');
    if method.starts_with("grpc.health.")
        || method.starts_with("grpc.reflection.")
        || method.ends_with("/Info")
    {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = %method,
        otel.kind = "server",
        correlation_id = tracing::field::Empty,
        request_id = tracing::field::Empty,
    );
    if let Some(id) = req.headers().get("x-correlation-id").and_then(|v| v.to_str().ok()) {
        span.record("correlation_id", id);
    }
    telemetry::extract(&span, req.headers());
    telemetry::rpc_attributes(&span, method);
    span
}

fn on_eos(trailers: Option<&http::HeaderMap>, _stream: Duration, span: &tracing::Span) {
    let code = trailers
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    if let Some(code) = code {
        let message = trailers
            .and_then(|t| t.get("grpc-message"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        telemetry::grpc_status(span, code, message);
    }
}

fn on_failure(class: GrpcFailureClass, _latency: Duration, span: &tracing::Span) {
    match class {
        GrpcFailureClass::Code(code) => telemetry::grpc_status(span, code.get(), ""),
        GrpcFailureClass::Error(message) => telemetry::error(span, message),
    }
}
