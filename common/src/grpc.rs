//! gRPC wiring both services share: `grpc.health.v1` and server reflection.

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The health service of one llorch service. `""` reports liveness (SERVING while the process
/// runs), the service's full name reports readiness (NOT_SERVING while loading and draining).
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl Health {
    /// A reporter for `service` (e.g. [`llorch_proto::TOKENIZER_SERVICE`]) that starts NOT_SERVING,
    /// and the `grpc.health.v1.Health` server to add to the router.
    pub async fn new(
        service: &'static str,
    ) -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, server) = tonic_health::server::health_reporter();
        reporter.set_service_status(service, ServingStatus::NotServing).await;
        (Self { reporter, service }, server)
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

/// Server reflection (v1) over every llorch proto.
pub fn reflection() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llorch_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| anyhow::anyhow!("cannot build the reflection service: {e}"))
}
