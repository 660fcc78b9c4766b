//! Shutdown signals and the drain deadline.

use std::future::Future;
use std::time::Duration;

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// Runs `serve` (a server whose graceful shutdown starts when `started` resolves) and gives it
/// `grace` after `started` to finish its in-flight work; after that the server future is dropped,
/// which closes every remaining connection. Returns what `serve` returned, or `Ok(())` when the
/// grace period ran out.
pub async fn drain_with_deadline<S, E>(
    serve: S,
    started: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), E>
where
    S: Future<Output = Result<(), E>>,
{
    tokio::pin!(serve);
    tokio::select! {
        res = &mut serve => return res,
        () = started => {}
    }
    match tokio::time::timeout(grace, serve).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs_f64(),
                "drain deadline passed; closing remaining streams"
            );
            Ok(())
        }
    }
}

/// A one-shot "drain has started" flag that many futures can wait on.
#[derive(Debug, Clone)]
pub struct DrainSignal {
    tx: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl DrainSignal {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self { tx: std::sync::Arc::new(tokio::sync::watch::channel(false).0) }
    }

    /// Fires the signal (idempotent).
    pub fn start(&self) {
        self.tx.send_replace(true);
    }

    /// Whether it has fired.
    pub fn is_started(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the signal has fired.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            let _ = rx.wait_for(|started| *started).await;
        }
    }
}

impl Default for DrainSignal {
    fn default() -> Self {
        Self::new()
    }
}
