//! The gateway's gRPC clients to the tokenizer and the engine replicas ([`crate::engines`]).
//! Channels connect lazily and reconnect by themselves, so an upstream that restarts is used
//! again without restarting the gateway. Every call carries the trace context of the span it is made in
//! ([`TracePropagation`]) and the request's correlation id ([`CallContext`]).

use std::time::Duration;

use llorch_common::auth::ApiKey;
use llorch_common::telemetry::TracePropagation;
use llorch_common::tls::ClientCa;
use llorch_proto::engine::v1::InfoResponse as EngineInfo;
use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::tokenizer::v1::InfoRequest as TokenizerInfoRequest;
use llorch_proto::tokenizer::v1::InfoResponse as TokenizerInfo;
use llorch_proto::tokenizer::v1::tokenizer_client::TokenizerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::engines::Engines;
use crate::error::GatewayError;

/// How long a health probe of an upstream may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A channel whose calls carry the current trace context and the API key ([`Outbound`]).
pub type Traced = InterceptedService<Channel, Outbound>;

/// What every outgoing call carries: the current span's trace context, and the worker's API
/// key when one is configured (the services then require it).
#[derive(Debug, Clone, Default)]
pub struct Outbound {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Outbound {
    /// Calls carrying `key`, if any.
    pub fn new(key: Option<&ApiKey>) -> Self {
        let authorization = key.and_then(|k| {
            let mut v = MetadataValue::try_from(k.bearer().as_bytes()).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        Self { authorization }
    }
}

impl tonic::service::Interceptor for Outbound {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let mut req = TracePropagation.call(req)?;
        if let Some(v) = &self.authorization {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The tokenizer client type.
pub type Tokenizer = TokenizerClient<Traced>;

/// The engine client type.
pub type Engine = EngineClient<Traced>;

/// Clients of both upstreams. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// `llorch.tokenizer.v1.Tokenizer`.
    pub tokenizer: Tokenizer,
    /// `llorch.engine.v1.Engine`: every replica.
    pub engines: Engines,
}

/// Metadata carried from the HTTP request into every gRPC call of the job (the trace context
/// travels separately, from the span each call is made in).
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// The request's correlation id.
    pub correlation_id: String,
    /// When the request's time budget ends: every call made for it is bounded by it.
    pub deadline: Option<std::time::Instant>,
}

impl CallContext {
    /// The context of a request with `correlation_id` and time `budget` (from now).
    pub fn new(correlation_id: String, budget: Duration) -> Self {
        Self { correlation_id, deadline: Some(std::time::Instant::now() + budget) }
    }

    /// Wraps `msg` in a request carrying the context as metadata, and the time left as its
    /// timeout (tonic ends a unary call that runs past it; for a stream it bounds the wait for
    /// the response to start).
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(v) = self.correlation_id.parse() {
            req.metadata_mut().insert("x-correlation-id", v);
        }
        if let Some(deadline) = self.deadline {
            req.set_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
        }
        req
    }
}

/// What the gateway's calls to its upstreams need beyond their URLs.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// The API key every call carries.
    pub key: Option<ApiKey>,
    /// The authorities an `https://` upstream's certificate must chain to (`--upstream-ca`).
    pub ca: Option<ClientCa>,
}

/// The channel to `url`, connecting lazily and reconnecting by itself, whose calls carry the
/// trace context and the key. Every gRPC client of the gateway (the tokenizer, each engine
/// replica and its readiness probe) is built on one of these. An `https://` URL speaks TLS and
/// checks the server's certificate for `tls_host` (default: the URL's host; a replica resolved
/// to an address is checked for the name it was resolved from).
pub fn channel(url: &str, tls_host: Option<&str>, creds: &Credentials) -> anyhow::Result<Traced> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    if endpoint.uri().scheme_str() == Some("https") {
        let ca = creds.ca.as_ref().ok_or_else(|| {
            anyhow::anyhow!("an https:// upstream needs --upstream-ca (the authority that signed its certificate)")
        })?;
        endpoint = ca.apply(endpoint, tls_host)?;
    }
    Ok(InterceptedService::new(endpoint.connect_lazy(), Outbound::new(creds.key.as_ref())))
}

impl Upstreams {
    /// Clients for the tokenizer URL and the engine replicas' URLs; nothing connects until the
    /// first call or probe. Call [`Engines::start`] on `engines` to begin probing them.
    /// Every call carries the key, when given; `https://` URLs are checked against the CA.
    pub fn connect_lazy(
        tokenizer_url: &str,
        engine_urls: &[String],
        creds: &Credentials,
    ) -> anyhow::Result<Self> {
        let tokenizer = TokenizerClient::new(
            channel(tokenizer_url, None, creds)
                .map_err(|e| anyhow::anyhow!("--tokenizer-url {tokenizer_url:?}: {e}"))?,
        );
        let engines = Engines::new(engine_urls, creds)?;
        Ok(Self { tokenizer, engines })
    }

    /// The tokenizer's `Info` and a serving engine replica's, each within [`PROBE_TIMEOUT`].
    pub async fn info(&self) -> Result<(TokenizerInfo, EngineInfo), GatewayError> {
        let mut tok = self.tokenizer.clone();
        let probe =
            |what: &'static str| move |e: tonic::Status| GatewayError::from_status(what, &e);
        let mut treq = tonic::Request::new(TokenizerInfoRequest {});
        treq.set_timeout(PROBE_TIMEOUT);
        let engine = self.engines.info(PROBE_TIMEOUT);
        let (t, e) = tokio::join!(tok.info(treq), engine);
        Ok((t.map_err(probe("tokenizer"))?.into_inner(), e.map_err(probe("engine"))?))
    }
}
