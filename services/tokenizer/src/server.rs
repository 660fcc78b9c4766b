//! The `llorch.tokenizer.v1.Tokenizer` gRPC service and [`run`], which serves it (with health
//! and reflection) on a listener until shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures::{FutureExt, Stream, StreamExt};
use llorch_proto::tokenizer::v1 as pb;
use llorch_proto::tokenizer::v1::tokenizer_server::{Tokenizer, TokenizerServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use llorch_common::grpc::{self, Health};

use crate::bpe::BpeTokenizer;
use crate::config::{Limits, ServeConfig};
use crate::error::TokenizerError;
use crate::incremental::IncrementalDecoder;

/// Replies buffered per `DecodeStream` before the server waits for the client to read.
const STREAM_BUFFER: usize = 16;

/// The gRPC handlers. The tokenizer is set once loading finishes; until then every call is
/// `UNAVAILABLE`.
#[derive(Debug, Clone)]
pub struct TokenizerService {
    tokenizer: Arc<OnceLock<Arc<BpeTokenizer>>>,
    limits: Limits,
    /// One permit per call running (`--max-concurrent-calls`).
    calls: Arc<tokio::sync::Semaphore>,
}

impl TokenizerService {
    /// A service over an already loaded tokenizer.
    pub fn new(tokenizer: Arc<BpeTokenizer>, limits: Limits) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(tokenizer);
        Self { tokenizer: Arc::new(cell), ..Self::loading(limits) }
    }

    fn loading(limits: Limits) -> Self {
        let calls = Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_calls.max(1)));
        Self { tokenizer: Arc::new(OnceLock::new()), limits, calls }
    }

    /// A permit for one more call, or `RESOURCE_EXHAUSTED` when `--max-concurrent-calls` run.
    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        Arc::clone(&self.calls).try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the tokenizer is running its limit of {} calls (--max-concurrent-calls); retry",
                self.limits.max_concurrent_calls.max(1)
            ))
        })
    }

    fn tokenizer(&self) -> Result<Arc<BpeTokenizer>, Status> {
        self.tokenizer.get().cloned().ok_or_else(|| Status::unavailable("tokenizer is loading"))
    }

    fn check_id_count(&self, len: usize) -> Result<(), TokenizerError> {
        if len > self.limits.max_ids {
            return Err(TokenizerError::TooManyIds { len, limit: self.limits.max_ids });
        }
        Ok(())
    }
}

/// Runs CPU work off the async worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TokenizerError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(res) => res.map_err(Status::from),
        Err(err) => {
            tracing::error!(error = %err, "tokenizer task failed");
            Err(Status::internal("internal tokenizer error"))
        }
    }
}

type DecodeStreamOut = Pin<Box<dyn Stream<Item = Result<pb::DecodeStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Tokenizer for TokenizerService {
    #[tracing::instrument(skip_all, fields(text_bytes = request.get_ref().text.len(), ids))]
    async fn encode(
        &self,
        request: Request<pb::EncodeRequest>,
    ) -> Result<Response<pb::EncodeResponse>, Status> {
        llorch_common::failpoint::hit("tokenizer.encode");
        let _permit = self.admit()?;
        let pb::EncodeRequest { text, add_special_tokens } = request.into_inner();
        if text.len() > self.limits.max_text_bytes {
            let err =
                TokenizerError::TextTooLong { len: text.len(), limit: self.limits.max_text_bytes };
            return Err(err.into());
        }
        let tok = self.tokenizer()?;
        let ids = blocking(move || tok.encode(&text, add_special_tokens)).await?;
        tracing::Span::current().record("ids", ids.len());
        Ok(Response::new(pb::EncodeResponse { ids }))
    }

    #[tracing::instrument(skip_all, fields(ids = request.get_ref().ids.len()))]
    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<pb::DecodeResponse>, Status> {
        let _permit = self.admit()?;
        let pb::DecodeRequest { ids, skip_special_tokens } = request.into_inner();
        self.check_id_count(ids.len())?;
        let tok = self.tokenizer()?;
        let text = blocking(move || tok.decode(&ids, skip_special_tokens)).await?;
        Ok(Response::new(pb::DecodeResponse { text }))
    }

    type DecodeStreamStream = DecodeStreamOut;

    #[tracing::instrument(skip_all)]
    async fn decode_stream(
        &self,
        request: Request<Streaming<pb::DecodeStreamRequest>>,
    ) -> Result<Response<Self::DecodeStreamStream>, Status> {
        let tok = self.tokenizer()?;
        // Held by the stream's task until the stream ends.
        let permit = self.admit()?;
        // The caller's deadline (`grpc-timeout`) bounds the whole stream, as for a unary call:
        // tonic's client only bounds the wait for the response to start.
        let deadline = grpc::grpc_timeout(request.metadata().as_ref())
            .map(|t| tokio::time::Instant::now() + t);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let service = self.clone();
        // How the task ends the stream when it cannot: a panic (INTERNAL, never as if it had
        // finished) or the deadline (DEADLINE_EXCEEDED; the task and its inbound are dropped).
        let ends = tx.clone();
        let task = std::panic::AssertUnwindSafe(decode_stream_task(service, tok, inbound, tx));
        tokio::spawn(
            async move {
                let _permit = permit;
                let run = task.catch_unwind();
                let outcome = match deadline {
                    Some(at) => tokio::time::timeout_at(at, run).await.ok(),
                    None => Some(run.await),
                };
                let status = match outcome {
                    Some(Ok(())) => return,
                    Some(Err(payload)) => {
                        let message = llorch_common::failpoint::panic_message(payload.as_ref());
                        tracing::error!(panic = message, "a decode stream's task panicked");
                        Status::internal("internal tokenizer error")
                    }
                    None => {
                        tracing::debug!("decode stream ended at its deadline");
                        Status::deadline_exceeded("the call's deadline (grpc-timeout) passed")
                    }
                };
                // Bounded: a client that stopped reading must not hold the task.
                let send = ends.send(Err(status));
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send).await;
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let tok = self.tokenizer()?;
        Ok(Response::new(pb::InfoResponse {
            vocab_size: tok.vocab_size(),
            eos_token_id: tok.eos_token_id(),
            model_max_length: tok.model_max_length(),
        }))
    }
}

/// Reads id messages, answers each with the text that became complete, flushes on half-close.
/// Ends on the first bad message (with its error), or quietly when the client goes away.
async fn decode_stream_task(
    service: TokenizerService,
    tok: Arc<BpeTokenizer>,
    mut inbound: Streaming<pb::DecodeStreamRequest>,
    tx: mpsc::Sender<Result<pb::DecodeStreamResponse, Status>>,
) {
    let mut decoder: Option<IncrementalDecoder> = None;
    let mut messages = 0u64;
    loop {
        let msg = match inbound.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(status)) => {
                tracing::debug!(%status, "decode stream ended by the client");
                return;
            }
            None => break,
        };
        messages += 1;
        llorch_common::failpoint::hit("tokenizer.decode_stream");
        let state =
            decoder.take().unwrap_or_else(|| IncrementalDecoder::new(msg.skip_special_tokens));
        if let Err(err) = service.check_id_count(msg.ids.len()) {
            let _ = tx.send(Err(err.into())).await;
            return;
        }
        let tok = Arc::clone(&tok);
        let step = blocking(move || {
            let mut state = state;
            let text = state.push(&tok, &msg.ids)?;
            Ok((state, text))
        })
        .await;
        match step {
            Ok((state, text)) => {
                decoder = Some(state);
                if tx.send(Ok(pb::DecodeStreamResponse { text })).await.is_err() {
                    return; // The client went away.
                }
            }
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
    // Half-close: release what is still held back, as one last reply.
    let Some(mut state) = decoder else { return };
    let flushed = blocking(move || state.flush(&tok)).await;
    let reply = flushed.map(|text| pb::DecodeStreamResponse { text });
    let _ = tx.send(reply).await;
    tracing::debug!(messages, "decode stream finished");
}

/// Serves the tokenizer on `listener` until `shutdown` resolves, then drains for
/// [`ServeConfig::grace`]. Health is NOT_SERVING until the tokenizer has loaded; a load error
/// stops the server and is returned.
pub async fn run(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let access = grpc::Access::load(&config.auth, &config.tls)?;
    let tls = access.tls.is_some();
    let addr = listener.local_addr()?;
    let health = Health::new(llorch_proto::TOKENIZER_SERVICE).await;
    let service = TokenizerService::loading(config.limits);
    let max_message = config.limits.max_message_bytes;
    let tokenizer_server = TokenizerServer::new(service.clone())
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    tracing::info!(%addr, tls, model = %config.model.display(), "tokenizer service listening");

    let lifecycle = async {
        let started = Instant::now();
        let model = config.model.clone();
        let tok = tokio::task::spawn_blocking(move || BpeTokenizer::from_dir(&model)).await??;
        tracing::info!(
            vocab_size = tok.vocab_size(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "tokenizer loaded"
        );
        let _ = service.tokenizer.set(Arc::new(tok));
        health.ready().await;
        shutdown.await;
        health.draining().await;
        anyhow::Ok(())
    };
    grpc::serve(
        listener,
        &health,
        Routes::new(tokenizer_server),
        access,
        lifecycle,
        config.grace(),
    )
    .await?;
    tracing::info!("tokenizer service stopped");
    Ok(())
}
