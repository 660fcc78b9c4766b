//! The HTTP listener: accepts connections and serves the router on each (HTTP/1.1, pipelining
//! included), with the limits a server on an open port needs against slow or
//! hostile clients:
//! * at most `--max-connections` open; one more gets a `503` and is closed at once;
//! * the request head (line and headers) must arrive within `--header-read-timeout-secs`
//!   (slow-loris) and be at most `--max-header-bytes` (`431` otherwise);
//! * the body must keep coming: a gap over `--body-read-timeout-secs` ends the request (the
//!   router's `RequestBodyTimeoutLayer`).
//!
//! With TLS (`--tls-cert`), the handshake must also finish within `--header-read-timeout-secs`,
//! and a connection over the limit is closed without an answer (a plain-text `503` would be
//! noise to a TLS client).
//!
//! Graceful: once `drain` fires it stops accepting, and open connections finish the requests
//! they have (streams included) before closing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::Request;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time a client has to send a request's head.
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
}

/// What a connection over the limit gets before it is closed (HTTP/1.1; the worker API's error
/// shape).
fn too_many_connections() -> Vec<u8> {
    let body = r#"{"code":"OVERLOADED","message":"too many connections to this worker; retry later","retriable":true}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` until `drain` resolves, then waits for the open connections'
/// requests to end. (The caller bounds that wait: see `llorch_common::shutdown`.) With `tls`,
/// every connection must speak TLS.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    drain: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    // HTTP/1.1 only: what the worker API's and OpenAI's clients speak. (Detecting HTTP/2 would
    // wait for its 24-byte preface with no timeout: a client sending "PRI" and nothing more
    // would hold its connection for ever.)
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let builder = Arc::new(builder);
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(drain);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: the listener stays; try again soon.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut drain => break,
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.max_connections, "connection refused: too many open");
            if tls.is_none() {
                tokio::spawn(refuse(stream));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let service = TowerToHyperService::new(Tracked {
            inner: app.clone(),
            activity: Arc::clone(&activity),
        });
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let idle = limits.header_read_timeout;
        let tls = tls.clone();
        tokio::spawn(async move {
            let conn = Conn { builder, watcher, service, activity, idle, peer };
            match tls {
                None => conn.serve(stream).await,
                Some(tls) => match tokio::time::timeout(idle, tls.accept(stream)).await {
                    Ok(Ok(stream)) => conn.serve(stream).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake not done in time; closed"),
                },
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// One accepted connection, ready to serve.
struct Conn {
    builder: Arc<Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    service: TowerToHyperService<Tracked>,
    activity: Arc<Activity>,
    idle: Duration,
    peer: std::net::SocketAddr,
}

impl Conn {
    /// Serves the connection's requests over `io` (TCP, or TLS over it) until it closes, or a
    /// whole `idle` period passes with no request started and none running.
    async fn serve<IO>(self, io: IO)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Self { builder, watcher, service, activity, idle, peer } = self;
        let conn =
            builder.serve_connection_with_upgrades(TokioIo::new(Lingering::new(io)), service);
        let conn = watcher.watch(conn.into_owned());
        tokio::pin!(conn);
        // hyper times out a request head only once its first byte has come: a connection
        // that sends nothing (before its first request or between two) is closed here when
        // a whole `idle` period passes with no request started and none running.
        let mut seen = 0;
        loop {
            tokio::select! {
                ended = &mut conn => {
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                () = tokio::time::sleep(idle) => {
                    let started = activity.started.load(Ordering::SeqCst);
                    if started == seen && activity.running.load(Ordering::SeqCst) == 0 {
                        tracing::debug!(%peer, "idle connection closed");
                        break;
                    }
                    seen = started;
                }
            }
        }
    }
}

/// What one connection is doing: requests started, and requests whose response (body
/// included, e.g. a whole SSE stream) has not ended.
#[derive(Debug, Default)]
struct Activity {
    started: AtomicU64,
    running: AtomicUsize,
}

/// Counts a request as running from its call until its response body is dropped.
struct Running(Arc<Activity>);

impl Running {
    fn new(activity: Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::SeqCst);
        activity.running.fetch_add(1, Ordering::SeqCst);
        Self(activity)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The router, counting each request in its connection's [`Activity`].
#[derive(Clone)]
struct Tracked {
    inner: Router,
    activity: Arc<Activity>,
}

impl tower::Service<Request<hyper::body::Incoming>> for Tracked {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<Request<hyper::body::Incoming>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let running = Running::new(Arc::clone(&self.activity));
        let read = Arc::new(AtomicBool::new(req.body().is_end_stream()));
        let req = req.map(|body| Body::new(WatchedBody { body, read: Arc::clone(&read) }));
        let call = self.inner.call(req);
        Box::pin(async move {
            let mut resp = call.await?;
            // A request body not read to its end (refused by its length, or before the handler
            // read it): hyper closes the connection after this response, since the next
            // request cannot be found in the rest. Say so, or a client reuses the connection
            // for its next request and loses it.
            if !read.load(Ordering::SeqCst) {
                resp.headers_mut().insert(
                    axum::http::header::CONNECTION,
                    axum::http::HeaderValue::from_static("close"),
                );
            }
            Ok(resp.map(|body| Body::new(GuardedBody { body, _running: running })))
        })
    }
}

/// A request body that records when it has been read to its end.
struct WatchedBody {
    body: hyper::body::Incoming,
    read: Arc<AtomicBool>,
}

impl HttpBody for WatchedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let frame = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, std::task::Poll::Ready(None)) || self.body.is_end_stream() {
            self.read.store(true, Ordering::SeqCst);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request counted as running until it is dropped.
struct GuardedBody {
    body: Body,
    _running: Running,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How long a closing connection reads and drops what the client still sends (see
/// [`Lingering`] and [`refuse`]).
const LINGER: Duration = Duration::from_secs(1);

/// A connection's transport whose shutdown lingers: after sending its FIN it reads and drops
/// what the client still sends, until the client closes too or [`LINGER`] passes. Closing a
/// socket with unread data resets the connection, and the reset can destroy an answer the
/// client has not read yet: a `413` over `--max-body-bytes` is answered before the body is
/// read, and a client still writing the body lost its `413` to a broken pipe (found by the
/// soak, about once in a hundred oversized requests). nginx's `lingering_close` does the same.
struct Lingering<IO> {
    io: IO,
    /// Set once the write side is shut: when to stop reading.
    until: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> Lingering<IO> {
    fn new(io: IO) -> Self {
        Self { io, until: None }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Lingering<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for Lingering<IO>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.until.is_none() {
            std::task::ready!(std::pin::Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.until = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut sink = [0u8; 8192];
        loop {
            if this.until.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready()) {
                return Poll::Ready(Ok(()));
            }
            let mut buf = tokio::io::ReadBuf::new(&mut sink);
            match std::pin::Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                // More of what the client sends: dropped.
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                // The client closed too, or the connection failed: nothing left to protect.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Answers `503` and closes. What the client sent is read and dropped for up to a second
/// after the answer: closing with unread data would reset the connection, and a reset can
/// destroy the answer before the client reads it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let answer = async {
        stream.write_all(&too_many_connections()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(LINGER, answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_well_formed_http_with_a_json_body() {
        let bytes = too_many_connections();
        let text = std::str::from_utf8(&bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
        assert_eq!(length, body.len());
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["code"], "OVERLOADED");
    }
}
