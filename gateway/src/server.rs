//! The HTTP server: routes, `/health`, `/cancel`, `/metrics`, and [`run`]; the
//! OpenAI-compatible routes are [`crate::openai`]'s.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use llorch_common::telemetry;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::callback;
use crate::config::GatewayConfig;
use crate::error::{ErrorKind, GatewayError, json_rejection};
use crate::execute::execute;
use crate::openai::error::OpenAiError;
use crate::state::AppState;
use crate::upstream::Upstreams;

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/execute", post(execute))
        .route("/cancel", post(cancel))
        .route("/cancel/{job_id}", post(cancel_by_path))
        .route("/metrics", get(metrics))
        .layer(CatchPanicLayer::custom(|payload| panic_response(payload).into_response()))
        .merge(crate::openai::routes().layer(CatchPanicLayer::custom(|payload| {
            OpenAiError::from(panic_response(payload)).into_response()
        })))
        .layer(DefaultBodyLimit::max(limit))
        .layer(RequestBodyTimeoutLayer::new(state.config.body_read_timeout()))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&state), crate::auth::layer))
        .layer(axum::middleware::from_fn(crate::correlation::layer))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(http_span)
                .on_request(())
                .on_response(on_response)
                .on_body_chunk(())
                .on_eos(())
                .on_failure(()),
        )
        .with_state(state)
}

/// What a request whose handler panicked answers (500, in each route family's error shape),
/// logged with the panic's text; the server goes on serving.
fn panic_response(payload: Box<dyn std::any::Any + Send>) -> GatewayError {
    let message = llorch_common::failpoint::panic_message(payload.as_ref());
    tracing::error!(panic = message, "a request's handler panicked; it ends with 500");
    GatewayError::new(
        ErrorKind::Internal,
        "the gateway failed while handling this request (a bug: see its log)",
    )
}

/// The server span of one HTTP request, named `METHOD /route` after the OpenTelemetry HTTP
/// conventions, the child of the caller's W3C `traceparent` when it sent one. It lasts until the
/// response body ends (for `/execute`, the whole SSE stream). Every log line of the request
/// carries its fields. Probes (`GET /health`, `GET /metrics`) get none.
pub fn http_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let path = req.uri().path();
    let route = req.extensions().get::<MatchedPath>().map_or(path, MatchedPath::as_str);
    if req.method() == axum::http::Method::GET && matches!(route, "/health" | "/metrics") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{} {route}", req.method()),
        otel.kind = "server",
        method = %req.method(),
        path,
        correlation_id = tracing::field::Empty,
        job_id = tracing::field::Empty,
    );
    telemetry::extract(&span, req.headers());
    if telemetry::enabled() {
        telemetry::attribute(&span, "http.request.method", req.method().as_str().to_owned());
        telemetry::attribute(&span, "http.route", route.to_owned());
        telemetry::attribute(&span, "url.path", path.to_owned());
        telemetry::attribute(&span, "url.scheme", "http");
    }
    span
}

fn on_response<B>(resp: &axum::http::Response<B>, _latency: Duration, span: &tracing::Span) {
    let status = resp.status();
    telemetry::attribute(span, "http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        telemetry::error(span, status.to_string());
    }
}

/// `GET /health`: 200 healthy when both upstreams answer and the worker is not draining, else
/// 503 unhealthy (same shape plus a one-line `reason`; the worker API knows no third status,
/// and a draining worker must get no new work).
async fn health(State(app): State<Arc<AppState>>) -> Response {
    let checked = app
        .refresh_facts()
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "health check failed"));
    let reason = match &checked {
        _ if app.is_draining() => Some("draining".to_owned()),
        Err(e) => Some(e.to_string()),
        Ok(_) => None,
    };
    let facts = checked.ok();
    let engines = app.upstreams.engines.count();
    let (status, code) = if reason.is_none() {
        ("healthy", StatusCode::OK)
    } else {
        ("unhealthy", StatusCode::SERVICE_UNAVAILABLE)
    };
    let mut body = json!({
        "status": status,
        "vram_bytes": 0,
        "worker_id": app.config.worker_id,
        "capabilities": ["text-gen"],
        "protocol": "sse",
        "memory_architecture": "cpu",
        "running_jobs": app.running_jobs(),
        // Engine replicas serving, of those known (healthy while at least one serves).
        "engines_up": engines.up,
        "engines": engines.total,
    });
    if let Some(f) = facts {
        body["model"] = json!(f.model);
        body["memory_bytes"] = json!(f.weight_bytes);
        body["context_length"] = json!(f.n_ctx);
        body["vocab_size"] = json!(f.vocab_size);
    } else if let Some(model) = &app.config.model {
        body["model"] = json!(model);
    }
    if let Some(reason) = reason {
        // Why it is unhealthy, in one line (not in the worker API; pool managers ignore it).
        body["reason"] = json!(reason);
    }
    (code, axum::Json(body)).into_response()
}

#[derive(Debug, Deserialize)]
struct CancelRequest {
    job_id: String,
}

/// `POST /cancel`: 202 whether or not the job runs (idempotent).
async fn cancel(
    State(app): State<Arc<AppState>>,
    body: Result<axum::Json<CancelRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(c)) => cancel_job(&app, c.job_id),
        Err(rejection) => json_rejection(&rejection),
    }
}

/// `POST /cancel/{job_id}` (no body): the same as `POST /cancel`, in the form the upstream
/// worker's test harness sends.
async fn cancel_by_path(
    State(app): State<Arc<AppState>>,
    job_id: Result<axum::extract::Path<String>, PathRejection>,
) -> Response {
    match job_id {
        Ok(axum::extract::Path(job_id)) => cancel_job(&app, job_id),
        Err(rejection) => {
            GatewayError::new(ErrorKind::InvalidRequest, rejection.body_text()).into_response()
        }
    }
}

fn cancel_job(app: &AppState, job_id: String) -> Response {
    let found = app.cancel(&job_id);
    tracing::info!(job_id, found, "cancel requested");
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "job_id": job_id, "status": "cancelling", "running": found })),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text.
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let in_flight = (app.config.max_in_flight - app.in_flight.available_permits()) as f64;
    // Summed over the serving replicas; NaN when none answers.
    let infos = futures::future::join_all(
        app.upstreams.engines.replicas().into_iter().filter(|r| r.is_serving()).map(
            |r| async move {
                let mut req = tonic::Request::new(llorch_proto::engine::v1::InfoRequest {});
                req.set_timeout(Duration::from_secs(1));
                r.client().info(req).await.ok().map(|i| i.into_inner())
            },
        ),
    )
    .await;
    let answered: Vec<_> = infos.into_iter().flatten().collect();
    let (waiting, running) = if answered.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        answered
            .iter()
            .fold((0.0, 0.0), |(w, r), i| (w + f64::from(i.waiting), r + f64::from(i.running)))
    };
    let text = app.metrics.render(&[
        ("llorch_in_flight_requests", "Generation jobs open in the gateway.", in_flight),
        ("llorch_queue_depth", "Requests waiting in the engine for a batch slot.", waiting),
        ("llorch_engine_running", "Sequences the engine is prefilling or decoding.", running),
    ]);
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Serves the worker API on `listener` until `shutdown` resolves, then refuses new jobs and
/// gives running streams [`GatewayConfig::grace_secs`] to finish. Once listening it sends the
/// ready callback; if that fails after its retries, `run` returns the error.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let creds = config.credentials()?;
    let tls = config.tls.load()?;
    let upstreams = Upstreams::connect_lazy(&config.tokenizer_url, &config.engine_urls, &creds)?;
    upstreams.engines.start().await;
    let state = Arc::new(AppState::new(config.clone(), upstreams, creds.key));
    let app = router(Arc::clone(&state));
    let drain = llorch_common::shutdown::DrainSignal::new();
    let tls = tls.map(|t| t.rustls_config(&[b"http/1.1"])).transpose()?;
    let server =
        crate::listener::serve(listener, app, config.listener_limits(), tls, drain.started());
    tracing::info!(%addr, tls = config.tls.tls_cert.is_some(), tokenizer = %config.tokenizer_url, engines = ?config.engine_urls, "gateway listening");

    // Empty counts as unset (a compose file passes `LLORCH_PUBLIC_URL=` when none is given).
    let uri = config.public_url.clone().filter(|u| !u.is_empty()).unwrap_or_else(|| {
        let scheme = if config.tls.tls_cert.is_some() { "https" } else { "http" };
        format!("{scheme}://{addr}")
    });
    let ready = callback::announce(&config, &uri, &state);
    let lifecycle = async {
        ready.await?;
        shutdown.await;
        state.start_draining();
        let grace = Duration::from_secs_f64(config.grace_secs.max(0.0));
        tracing::info!(grace_secs = config.grace_secs, jobs = state.running_jobs(), "draining");
        let until = tokio::time::Instant::now() + grace;
        while state.running_jobs() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drain.start();
        anyhow::Ok(())
    };
    let server = async {
        llorch_common::shutdown::drain_with_deadline(
            server,
            drain.started(),
            Duration::from_secs(5),
        )
        .await?;
        anyhow::Ok(())
    };
    tokio::try_join!(lifecycle, server)?;
    tracing::info!("gateway stopped");
    Ok(())
}
