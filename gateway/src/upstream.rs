//! The gateway's gRPC clients to the tokenizer and engine services. Channels connect lazily and
//! reconnect by themselves, so an upstream that restarts is used again without restarting the
//! gateway. Every call carries the trace context of the span it is made in
//! ([`TracePropagation`]) and the request's correlation id ([`CallContext`]).

use std::time::Duration;

use llorch_common::telemetry::TracePropagation;
use llorch_proto::engine::v1::InfoRequest as EngineInfoRequest;
use llorch_proto::engine::v1::InfoResponse as EngineInfo;
use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::tokenizer::v1::InfoRequest as TokenizerInfoRequest;
use llorch_proto::tokenizer::v1::InfoResponse as TokenizerInfo;
use llorch_proto::tokenizer::v1::tokenizer_client::TokenizerClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::GatewayError;

/// How long a health probe of an upstream may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A channel whose calls carry the current trace context.
pub type Traced = InterceptedService<Channel, TracePropagation>;

/// The tokenizer client type.
pub type Tokenizer = TokenizerClient<Traced>;

/// The engine client type.
pub type Engine = EngineClient<Traced>;

/// Clients of both upstreams. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// `llorch.tokenizer.v1.Tokenizer`.
    pub tokenizer: Tokenizer,
    /// `llorch.engine.v1.Engine`.
    pub engine: Engine,
}

/// Metadata carried from the HTTP request into every gRPC call of the job (the trace context
/// travels separately, from the span each call is made in).
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The request's correlation id.
    pub correlation_id: String,
}

impl CallContext {
    /// The context of a request with `correlation_id`.
    pub fn new(correlation_id: String) -> Self {
        Self { correlation_id }
    }

    /// Wraps `msg` in a request carrying the context as metadata.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(v) = self.correlation_id.parse() {
            req.metadata_mut().insert("x-correlation-id", v);
        }
        req
    }
}

fn endpoint(url: &str) -> Result<Endpoint, anyhow::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30)))
}

impl Upstreams {
    /// Clients for the two URLs; nothing connects until the first call.
    pub fn connect_lazy(tokenizer_url: &str, engine_url: &str) -> anyhow::Result<Self> {
        let tokenizer = TokenizerClient::with_interceptor(
            endpoint(tokenizer_url)?.connect_lazy(),
            TracePropagation,
        );
        let engine =
            EngineClient::with_interceptor(endpoint(engine_url)?.connect_lazy(), TracePropagation)
                .max_decoding_message_size(16 << 20);
        Ok(Self { tokenizer, engine })
    }

    /// Both services' `Info`, each within [`PROBE_TIMEOUT`].
    pub async fn info(&self) -> Result<(TokenizerInfo, EngineInfo), GatewayError> {
        let mut tok = self.tokenizer.clone();
        let mut eng = self.engine.clone();
        let probe =
            |what: &'static str| move |e: tonic::Status| GatewayError::from_status(what, &e);
        let mut treq = tonic::Request::new(TokenizerInfoRequest {});
        treq.set_timeout(PROBE_TIMEOUT);
        let mut ereq = tonic::Request::new(EngineInfoRequest {});
        ereq.set_timeout(PROBE_TIMEOUT);
        let (t, e) = tokio::join!(tok.info(treq), eng.info(ereq));
        Ok((t.map_err(probe("tokenizer"))?.into_inner(), e.map_err(probe("engine"))?.into_inner()))
    }
}
