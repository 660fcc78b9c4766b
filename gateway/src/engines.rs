//! The engine replicas behind the gateway: every `--engine-url` (and every address its DNS name
//! resolves to, re-resolved every [`RESOLVE_EVERY`]) is a replica; each is asked for its
//! readiness (`grpc.health.v1`) every [`PROBE_EVERY`]; a new stream goes to the serving replica
//! with the fewest streams in flight.
//!
//! The gateway counts the streams itself, from `Generate` until the stream ends (an
//! [`EngineLease`] is held by the job): a load balancer that counts requests only until their
//! response headers (tower's p2c) sees a minutes-long stream as finished at its first byte.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::engine::v1::{GenerateRequest, GenerateResponse, InfoRequest, InfoResponse};
use tonic::Streaming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::upstream::{Credentials, Engine, Traced, channel};

/// How often each replica's readiness is asked.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How long a readiness probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the engine URLs' host names are resolved again (replicas come and go).
pub const RESOLVE_EVERY: Duration = Duration::from_secs(2);

/// One engine replica: a client, its readiness and the streams the gateway runs on it.
#[derive(Debug)]
pub struct Replica {
    /// `http://<address>:<port>` (the URL as given when its host is an IP address).
    pub url: String,
    client: Engine,
    channel: Traced,
    in_flight: AtomicUsize,
    serving: AtomicBool,
}

impl Replica {
    /// Streams running on it now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether its last readiness probe said SERVING.
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// A client of this replica.
    pub fn client(&self) -> Engine {
        self.client.clone()
    }

    async fn probe(&self) {
        let mut health = HealthClient::new(self.channel.clone());
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: llorch_proto::ENGINE_SERVICE.into(),
        });
        req.set_timeout(PROBE_TIMEOUT);
        let serving = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, health.check(req)).await,
            Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving
        );
        if self.serving.swap(serving, Ordering::SeqCst) != serving {
            tracing::info!(engine = %self.url, serving, "engine replica readiness changed");
        }
    }
}

/// A stream's hold on its replica: counted in the replica's in-flight streams until dropped.
#[derive(Debug)]
pub struct EngineLease {
    replica: Arc<Replica>,
}

impl EngineLease {
    fn new(replica: Arc<Replica>) -> Self {
        replica.in_flight.fetch_add(1, Ordering::SeqCst);
        Self { replica }
    }

    /// A client of the leased replica (for `Abort`, which must reach the same one).
    pub fn client(&self) -> Engine {
        self.replica.client()
    }

    /// The replica's URL.
    pub fn url(&self) -> &str {
        &self.replica.url
    }
}

impl Drop for EngineLease {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An `--engine-url`, split for resolving.
#[derive(Debug, Clone)]
struct Source {
    url: String,
    scheme: String,
    host: String,
    port: u16,
    /// The host is an address: the URL is the one replica, never resolved.
    literal: bool,
}

impl Source {
    fn parse(url: &str, creds: &Credentials) -> anyhow::Result<Self> {
        let uri: tonic::transport::Uri =
            url.parse().map_err(|e| anyhow::anyhow!("--engine-url {url:?} is not a URL: {e}"))?;
        let scheme = uri.scheme_str().unwrap_or("http").to_owned();
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("--engine-url {url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
        let literal = host.parse::<IpAddr>().is_ok();
        // The channel is built here once so that a bad URL fails at start, naming the flag.
        channel(url, None, creds).map_err(|e| anyhow::anyhow!("--engine-url {url:?}: {e}"))?;
        Ok(Self { url: url.to_owned(), scheme, host, port, literal })
    }

    /// The replica URLs this source stands for now (itself when resolving fails: the replica
    /// then probes as down until the name resolves).
    async fn resolve(&self) -> Vec<String> {
        if self.literal {
            return vec![self.url.clone()];
        }
        match tokio::net::lookup_host((self.host.as_str(), self.port)).await {
            Ok(addrs) => {
                let mut urls: Vec<String> =
                    addrs.map(|a: SocketAddr| format!("{}://{a}", self.scheme)).collect();
                urls.sort();
                urls.dedup();
                if urls.is_empty() { vec![self.url.clone()] } else { urls }
            }
            Err(e) => {
                tracing::debug!(url = %self.url, error = %e, "cannot resolve the engine host");
                vec![self.url.clone()]
            }
        }
    }
}

#[derive(Debug)]
struct Pool {
    sources: Vec<Source>,
    /// What every call carries (and what TLS trusts).
    creds: Credentials,
    replicas: Mutex<Vec<Arc<Replica>>>,
    /// Rotates the choice among equally loaded replicas.
    turn: AtomicUsize,
}

/// The engine replicas. Cheap to clone; the background task that resolves and probes them
/// ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Engines {
    pool: Arc<Pool>,
}

/// What `/health` reports about the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaCount {
    /// Replicas whose last probe said SERVING.
    pub up: usize,
    /// Replicas known.
    pub total: usize,
}

impl Engines {
    /// The replicas of `urls`. Nothing connects until the first probe; call [`Engines::start`]
    /// (inside a runtime) to begin resolving and probing.
    /// Every call to them carries the key, when given; `https://` URLs speak TLS.
    pub fn new(urls: &[String], creds: &Credentials) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "--engine-url: at least one engine is needed");
        let sources =
            urls.iter().map(|u| Source::parse(u, creds)).collect::<anyhow::Result<Vec<_>>>()?;
        let replicas = sources
            .iter()
            .map(|s| new_replica(&s.url, &s.host, creds))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let creds = creds.clone();
        let pool =
            Pool { sources, creds, replicas: Mutex::new(replicas), turn: AtomicUsize::new(0) };
        Ok(Self { pool: Arc::new(pool) })
    }

    /// Resolves and probes once now (so the first `/health` knows), then keeps doing it in
    /// the background while any clone of `self` lives.
    pub async fn start(&self) {
        refresh(&self.pool, true).await;
        let weak = Arc::downgrade(&self.pool);
        tokio::spawn(maintain(weak));
    }

    /// Every replica now.
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.pool.replicas.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many replicas serve, of how many.
    pub fn count(&self) -> ReplicaCount {
        let replicas = self.replicas();
        ReplicaCount {
            up: replicas.iter().filter(|r| r.is_serving()).count(),
            total: replicas.len(),
        }
    }

    /// Serving replicas, fewest streams in flight first (ties in turn).
    fn candidates(&self) -> Vec<Arc<Replica>> {
        let mut replicas: Vec<_> = self.replicas().into_iter().filter(|r| r.is_serving()).collect();
        if replicas.is_empty() {
            return replicas;
        }
        let turn = self.pool.turn.fetch_add(1, Ordering::Relaxed) % replicas.len();
        replicas.rotate_left(turn);
        replicas.sort_by_key(|r| r.in_flight());
        replicas
    }

    /// `Info` of a serving replica (the least loaded that answers within `timeout`); a replica
    /// that does not answer is marked down.
    pub async fn info(&self, timeout: Duration) -> Result<InfoResponse, tonic::Status> {
        let mut last = None;
        for replica in self.candidates() {
            let mut req = tonic::Request::new(InfoRequest {});
            req.set_timeout(timeout);
            match replica.client().info(req).await {
                Ok(info) => return Ok(info.into_inner()),
                Err(status) => {
                    replica.serving.store(false, Ordering::SeqCst);
                    last = Some(status);
                }
            }
        }
        Err(last.unwrap_or_else(|| self.none_serving()))
    }

    fn none_serving(&self) -> tonic::Status {
        let n = self.count();
        tonic::Status::unavailable(format!(
            "no engine replica is serving ({} of {} up)",
            n.up, n.total
        ))
    }

    /// Opens a `Generate` stream on the serving replica with the fewest streams; a replica that
    /// refuses with UNAVAILABLE (gone, loading, draining) is marked down and the next one is
    /// tried. `request` builds the request (once per attempt).
    pub async fn generate(
        &self,
        request: impl Fn() -> tonic::Request<GenerateRequest>,
    ) -> Result<(EngineLease, Streaming<GenerateResponse>), tonic::Status> {
        let mut last = None;
        for replica in self.candidates() {
            let lease = EngineLease::new(replica);
            match lease.client().generate(request()).await {
                Ok(stream) => return Ok((lease, stream.into_inner())),
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    tracing::info!(engine = %lease.url(), %status, "engine replica unavailable; trying the next");
                    lease.replica.serving.store(false, Ordering::SeqCst);
                    last = Some(status);
                }
                Err(status) => return Err(status),
            }
        }
        Err(last.unwrap_or_else(|| self.none_serving()))
    }
}

/// The replica at `url`, whose certificate (over TLS) must name `host`.
fn new_replica(url: &str, host: &str, creds: &Credentials) -> anyhow::Result<Arc<Replica>> {
    let channel = channel(url, Some(host), creds)?;
    let client = EngineClient::new(channel.clone()).max_decoding_message_size(16 << 20);
    Ok(Arc::new(Replica {
        url: url.to_owned(),
        client,
        channel,
        in_flight: AtomicUsize::new(0),
        serving: AtomicBool::new(false),
    }))
}

/// Resolves (when `resolve`) and probes every replica once.
async fn refresh(pool: &Pool, resolve: bool) {
    if resolve {
        let mut urls = Vec::new();
        let mut hosts = HashMap::new();
        for source in &pool.sources {
            for url in source.resolve().await {
                hosts.insert(url.clone(), source.host.clone());
                urls.push(url);
            }
        }
        let wanted: HashSet<&String> = urls.iter().collect();
        let mut replicas = pool.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let before = replicas.len();
        // A replica that left keeps its running streams (they hold its client) but gets no
        // new ones.
        replicas.retain(|r| wanted.contains(&r.url));
        let known: HashSet<String> = replicas.iter().map(|r| r.url.clone()).collect();
        for url in urls.iter().filter(|u| !known.contains(*u)) {
            match new_replica(url, &hosts[url], &pool.creds) {
                Ok(r) => replicas.push(r),
                Err(e) => tracing::warn!(url, error = %e, "cannot make a client for the replica"),
            }
        }
        replicas.sort_by(|a, b| a.url.cmp(&b.url));
        if replicas.len() != before || known.len() != before {
            let urls: Vec<&str> = replicas.iter().map(|r| r.url.as_str()).collect();
            tracing::info!(?urls, "engine replicas");
        }
    }
    let replicas = pool.replicas.lock().unwrap_or_else(|e| e.into_inner()).clone();
    futures::future::join_all(replicas.iter().map(|r| r.probe())).await;
}

async fn maintain(pool: Weak<Pool>) {
    let mut last_resolve = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        let resolve = last_resolve.elapsed() >= RESOLVE_EVERY;
        if resolve {
            last_resolve = tokio::time::Instant::now();
        }
        refresh(&pool, resolve).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_url_names_the_flag_and_the_value() {
        let err = Engines::new(&["not a url".to_owned()], &Credentials::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--engine-url") && err.contains("not a url"), "{err}");
        let err = Engines::new(&[], &Credentials::default()).unwrap_err().to_string();
        assert!(err.contains("--engine-url"), "{err}");
    }

    #[tokio::test]
    async fn ip_urls_are_their_own_replica_and_names_resolve_to_each_address() {
        let engines = Engines::new(
            &["http://127.0.0.1:1".to_owned(), "http://localhost:2".to_owned()],
            &Credentials::default(),
        )
        .unwrap();
        refresh(&engines.pool, true).await;
        let urls: Vec<String> = engines.replicas().iter().map(|r| r.url.clone()).collect();
        assert!(urls.contains(&"http://127.0.0.1:1".to_owned()), "{urls:?}");
        assert!(urls.contains(&"http://127.0.0.1:2".to_owned()), "localhost resolved: {urls:?}");
        assert!(!urls.iter().any(|u| u.contains("localhost")), "{urls:?}");
        // Nothing listens: nothing serves, and a stream is refused with the count.
        assert_eq!(engines.count().up, 0);
        let err = engines.generate(|| tonic::Request::new(GenerateRequest::default())).await;
        let status = err.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("0 of"), "{status:?}");
    }

    #[tokio::test]
    async fn a_lease_counts_until_dropped() {
        let replica =
            new_replica("http://127.0.0.1:1", "127.0.0.1", &Credentials::default()).unwrap();
        let a = EngineLease::new(Arc::clone(&replica));
        let b = EngineLease::new(Arc::clone(&replica));
        assert_eq!(replica.in_flight(), 2);
        drop(a);
        assert_eq!(replica.in_flight(), 1);
        drop(b);
        assert_eq!(replica.in_flight(), 0);
    }
}
