//! The gateway's gRPC clients to the tokenizer and engine services. Channels connect lazily and
//! reconnect by themselves, so an upstream that restarts is used again without restarting the
//! gateway.

use std::time::Duration;

use axum::http::HeaderMap;
use llorch_proto::engine::v1::InfoRequest as EngineInfoRequest;
use llorch_proto::engine::v1::InfoResponse as EngineInfo;
use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::tokenizer::v1::InfoRequest as TokenizerInfoRequest;
use llorch_proto::tokenizer::v1::InfoResponse as TokenizerInfo;
use llorch_proto::tokenizer::v1::tokenizer_client::TokenizerClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::GatewayError;

/// How long a health probe of an upstream may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Clients of both upstreams. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// `llorch.tokenizer.v1.Tokenizer`.
    pub tokenizer: TokenizerClient<Channel>,
    /// `llorch.engine.v1.Engine`.
    pub engine: EngineClient<Channel>,
}

/// Headers carried from the HTTP request into every gRPC call of the job.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// W3C `traceparent`, when the caller sent a well-formed one.
    pub traceparent: Option<String>,
    /// The request's correlation id.
    pub correlation_id: String,
}

impl CallContext {
    /// The context of an HTTP request with `headers` and `correlation_id`; a `traceparent`
    /// that is not well-formed W3C (`00-<32 hex>-<16 hex>-<2 hex>`) is dropped.
    pub fn new(headers: &HeaderMap, correlation_id: String) -> Self {
        Self { traceparent: traceparent(headers), correlation_id }
    }

    /// Wraps `msg` in a request carrying the context as metadata.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        let meta = req.metadata_mut();
        if let Some(tp) = self.traceparent.as_deref().and_then(|v| v.parse().ok()) {
            meta.insert("traceparent", tp);
        }
        if let Ok(v) = self.correlation_id.parse() {
            meta.insert("x-correlation-id", v);
        }
        req
    }
}

/// A well-formed W3C `traceparent` header.
fn traceparent(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2))
    .then(|| v.to_owned())
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
        let tokenizer = TokenizerClient::new(endpoint(tokenizer_url)?.connect_lazy());
        let engine = EngineClient::new(endpoint(engine_url)?.connect_lazy())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn traceparent_of(value: &str) -> Option<String> {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", value.parse().unwrap());
        CallContext::new(&headers, String::new()).traceparent
    }

    #[test]
    fn only_a_well_formed_traceparent_is_carried() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent_of(&format!(" {good} ")).as_deref(), Some(good));
        for bad in [
            "",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(traceparent_of(bad), None, "{bad}");
        }
        assert_eq!(CallContext::new(&HeaderMap::new(), String::new()).traceparent, None);
    }
}
