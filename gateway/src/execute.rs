//! `POST /execute`: refuse while draining, parse and validate the body, then start the job
//! ([`crate::job::start`]) and stream its events as SSE ([`crate::sse`]). Every refusal is
//! counted by outcome and answered in the worker API's shapes.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};

use crate::correlation::CorrelationId;
use crate::error::{ErrorKind, GatewayError, json_rejection};
use crate::job::{self, Refusal};
use crate::metrics::Outcome;
use crate::sse;
use crate::state::AppState;
use crate::upstream::CallContext;
use crate::validate::ExecuteRequest;

/// The `/execute` handler.
pub async fn execute(
    State(app): State<Arc<AppState>>,
    Extension(correlation): Extension<CorrelationId>,
    body: Result<axum::Json<ExecuteRequest>, JsonRejection>,
) -> Response {
    let received = Instant::now();
    llorch_common::failpoint::hit("gateway.execute");
    if app.is_draining() {
        let draining = GatewayError::new(ErrorKind::Unavailable, "the worker is shutting down");
        return refuse(&app, draining.into());
    }
    let request = match body {
        Ok(axum::Json(request)) => request,
        Err(rejection) => {
            app.metrics.outcome(Outcome::Invalid);
            return json_rejection(&rejection);
        }
    };
    let valid = match request.validate() {
        Ok(valid) => valid,
        Err(errors) => return refuse(&app, errors.into()),
    };
    tracing::Span::current().record("job_id", valid.job_id.as_str());
    let ctx = CallContext::new(correlation.0, app.config.request_timeout());
    match job::start(&app, valid, ctx, received).await {
        Ok(events) => sse::stream(events).into_response(),
        Err(refusal) => refuse(&app, refusal),
    }
}

/// Counts the refusal and answers it.
fn refuse(app: &AppState, refusal: Refusal) -> Response {
    app.metrics.outcome(refusal.outcome());
    refusal.into_response()
}

/// The worker API's refusals: the validation errors' `{"errors":[…]}`, or the error body.
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Self::Invalid(errors) => errors.into_response(),
            Self::Error(e) => e.into_response(),
        }
    }
}
