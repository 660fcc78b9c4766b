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

use tower_http::catch_panic::CatchPanicLayer;
use tower_http::classify::GrpcFailureClass;
use tower_http::trace::TraceLayer;

use crate::auth::ApiKey;
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
/// `lifecycle` runs; with `key`, every call but health checks must carry it ([`GuardLayer`]).
///
/// `lifecycle` is the service's life: load, [`Health::ready`], wait for shutdown,
/// [`Health::draining`], finish its own work. When it returns, the server stops accepting
/// calls and those in flight get `grace` to finish; then every connection is closed. An error
/// from `lifecycle` (a load failure, the engine's scheduler thread panicking) is returned then,
/// and the binary exits non-zero.
pub async fn serve(
    listener: TcpListener,
    health: &Health,
    routes: Routes,
    access: Access,
    lifecycle: impl Future<Output = anyhow::Result<()>>,
    grace: Duration,
) -> anyhow::Result<()> {
    let drain = DrainSignal::new();
    let (reflection_v1, reflection_v1alpha) = reflection(health.service)?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &access.tls {
        builder = builder.tls_config(tls.tonic())?;
    }
    let key = access.key;
    let server = builder
        .layer(
            TraceLayer::new_for_grpc()
                .make_span_with(server_span)
                .on_request(())
                .on_response(())
                .on_body_chunk(())
                .on_eos(on_eos)
                .on_failure(on_failure),
        )
        // Inside the span, so that the call's span records the INTERNAL status.
        .layer(CatchPanicLayer::custom(panic_status))
        .layer(GuardLayer { key })
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
        let life = lifecycle.await;
        drain.start();
        anyhow::Ok(life)
    };
    let (life, ()) = tokio::try_join!(lifecycle, server)?;
    life
}

/// Who may call a server, and how they connect: the API key it requires ([`GuardLayer`]) and
/// its TLS identity, each optional.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Required on every call but health checks, when set.
    pub key: Option<ApiKey>,
    /// TLS only, when set.
    pub tls: Option<crate::tls::ServerTls>,
}

impl Access {
    /// Reads and checks the key and certificate flags.
    pub fn load(key: &crate::auth::ApiKeyArgs, tls: &crate::tls::TlsArgs) -> anyhow::Result<Self> {
        Ok(Self { key: key.load()?, tls: tls.load()? })
    }
}

/// What a call whose handler panicked answers: `INTERNAL` (trailers-only, as any gRPC error
/// before the first message), logged with the panic's text. The server goes on serving; the
/// connection and the other calls on it are untouched.
fn panic_status(payload: Box<dyn std::any::Any + Send>) -> http::Response<tonic::body::Body> {
    let message = crate::failpoint::panic_message(payload.as_ref());
    tracing::error!(panic = message, "a call's handler panicked; the call ends with INTERNAL");
    tonic::Status::internal("the server failed while handling this call (a bug: see its log)")
        .into_http()
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

/// The `grpc-timeout` header (`<1-8 digits><H|M|S|m|u|n>`), if present and well formed.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Refuses a call before its handler runs when it cannot be served: without the API key
/// (`UNAUTHENTICATED`; when a key is set, and except `grpc.health.v1.Health`, which probes and
/// load balancers call without one), or with no time left (`grpc-timeout` of 0:
/// `DEADLINE_EXCEEDED`).
#[derive(Debug, Clone, Default)]
pub struct GuardLayer {
    key: Option<ApiKey>,
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard { inner, key: self.key.clone() }
    }
}

/// The service of [`GuardLayer`].
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    key: Option<ApiKey>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Guard<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path();
        let refusal = if let Some(key) = &self.key
            && !method.starts_with("/grpc.health.v1.Health/")
            && !key.accepts(req.headers().get(http::header::AUTHORIZATION))
        {
            tracing::warn!(method, "call without a valid API key refused");
            Some(tonic::Status::unauthenticated(
                "this service requires `authorization: Bearer <key>` metadata with its API key",
            ))
        } else if grpc_timeout(req.headers()) == Some(Duration::ZERO) {
            Some(tonic::Status::deadline_exceeded(
                "grpc-timeout is 0: no time left to serve the call",
            ))
        } else {
            None
        };
        match refusal {
            None => Box::pin(self.inner.call(req)),
            Some(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Handler = tower::util::BoxCloneService<
        http::Request<()>,
        http::Response<tonic::body::Body>,
        std::convert::Infallible,
    >;

    /// The guard (with `key`) around a handler that always answers OK.
    fn guard(key: Option<&str>) -> Guard<Handler> {
        let ok = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        });
        let layer = GuardLayer { key: key.map(|k| ApiKey::parse(k).unwrap()) };
        tower::Layer::layer(&layer, Handler::new(ok))
    }

    /// The `grpc-status` a call to `path` with `headers` gets ("0" when it reached the handler).
    async fn status(key: Option<&str>, path: &str, headers: &[(&str, &str)]) -> String {
        let mut req = http::Request::builder().uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tower::ServiceExt::oneshot(guard(key), req.body(()).unwrap()).await.unwrap();
        resp.headers().get("grpc-status").map_or("0".into(), |v| v.to_str().unwrap().to_owned())
    }

    #[tokio::test]
    async fn calls_without_the_key_or_without_time_never_reach_the_handler() {
        let call = "/llorch.engine.v1.Engine/Generate";
        let health = "/grpc.health.v1.Health/Check";
        // 16 = UNAUTHENTICATED, 4 = DEADLINE_EXCEEDED.
        assert_eq!(status(Some("k3y"), call, &[]).await, "16");
        assert_eq!(status(Some("k3y"), call, &[("authorization", "Bearer nope")]).await, "16");
        assert_eq!(status(Some("k3y"), call, &[("authorization", "Bearer k3y")]).await, "0");
        assert_eq!(status(Some("k3y"), health, &[]).await, "0");
        assert_eq!(status(None, call, &[]).await, "0");
        for zero in ["0n", "0m", "0S", "00000000H"] {
            assert_eq!(status(None, call, &[("grpc-timeout", zero)]).await, "4", "{zero}");
        }
        assert_eq!(status(None, call, &[("grpc-timeout", "1n")]).await, "0");
        assert_eq!(status(None, call, &[("grpc-timeout", "bogus")]).await, "0");
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_bad_ones_are_ignored() {
        let parse = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(parse("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("4S"), Some(Duration::from_secs(4)));
        assert_eq!(parse("5m"), Some(Duration::from_millis(5)));
        assert_eq!(parse("6u"), Some(Duration::from_micros(6)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "1x", "123456789S", "-1S"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
