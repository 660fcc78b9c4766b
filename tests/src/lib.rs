//! Shared helpers for the end-to-end tests: start the real services in-process on
//! 127.0.0.1 port 0 (the same `run` functions the binaries call), wait until their gRPC health
//! says SERVING, and stop them.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The repository root (tests read only committed files below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The model folder that ships with the repo.
pub fn default_model() -> PathBuf {
    repo_root().join("models/default")
}

/// A service running in this process until [`Service::stop`] or drop.
pub struct Service {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Service {
    /// Binds 127.0.0.1:0 and spawns `run(listener, shutdown)`.
    pub async fn spawn<F, Fut>(run: F) -> anyhow::Result<Self>
    where
        F: FnOnce(
            tokio::net::TcpListener,
            std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
        ) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(run(listener, shutdown));
        Ok(Self { addr, stop: Some(stop), task })
    }

    /// `http://addr`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A lazily connecting channel to the service.
    pub fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).expect("valid url").connect_lazy()
    }

    /// Polls `grpc.health.v1` until `service` reports SERVING (or the task ends).
    pub async fn wait_serving(&self, service: &str) -> anyhow::Result<()> {
        let mut health = HealthClient::new(self.channel());
        for _ in 0..400 {
            if self.task.is_finished() {
                bail!("service task ended before it was serving");
            }
            let req = HealthCheckRequest { service: service.to_owned() };
            if let Ok(resp) = health.check(req).await
                && resp.into_inner().status == ServingStatus::Serving as i32
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("{service} not serving after 10 s")
    }

    /// Sends the shutdown signal and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .context("service did not stop within 30 s")??
    }

    /// Whether `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for `run` to return by itself (e.g. after a load error).
    pub async fn join(mut self) -> anyhow::Result<()> {
        self.stop.take();
        (&mut self.task).await?
    }
}

/// Starts the tokenizer service on the default model with `config` tweaks applied.
pub async fn start_tokenizer(
    tweak: impl FnOnce(&mut llorch_tokenizer::ServeConfig),
) -> anyhow::Result<Service> {
    let mut config = llorch_tokenizer::ServeConfig {
        model: default_model(),
        host: [127, 0, 0, 1].into(),
        port: 0,
        limits: llorch_tokenizer::Limits::default(),
        grace_secs: 5.0,
    };
    tweak(&mut config);
    Service::spawn(move |listener, shutdown| {
        llorch_tokenizer::server::run(config, listener, shutdown)
    })
    .await
}

/// Starts the engine service with `config` tweaks applied (default model, port 0).
pub async fn start_engine(
    tweak: impl FnOnce(&mut llorch_engine::server::ServeConfig),
) -> anyhow::Result<Service> {
    let mut config = llorch_engine::server::ServeConfig::new(default_model());
    config.threads = 2;
    tweak(&mut config);
    Service::spawn(move |listener, shutdown| llorch_engine::server::run(config, listener, shutdown))
        .await
}
