//! The tokenizer's `DecodeStream` for one job: token ids in, the text they complete out, so
//! a character split over tokens is released whole, with the token that completes it. The call's
//! client span lasts as long as the stream.

use llorch_common::telemetry;
use llorch_proto::tokenizer::v1 as tpb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::error::{ErrorKind, GatewayError};
use crate::upstream::{CallContext, Tokenizer};

/// The RPC's full name.
const METHOD: &str = "llorch.tokenizer.v1.Tokenizer/DecodeStream";

/// One job's `DecodeStream`.
pub struct Detokenizer {
    /// `None` once half-closed.
    ids: Option<mpsc::Sender<tpb::DecodeStreamRequest>>,
    text: Streaming<tpb::DecodeStreamResponse>,
    /// The call's client span, closed when the job lets go of the stream.
    span: tracing::Span,
}

impl Detokenizer {
    /// Opens the stream.
    pub async fn open(tokenizer: &mut Tokenizer, ctx: &CallContext) -> Result<Self, GatewayError> {
        let (ids, rx) = mpsc::channel(16);
        let (span, called) = telemetry::client_call(
            METHOD,
            tokenizer.decode_stream(ctx.request(ReceiverStream::new(rx))),
        )
        .await;
        let text = called.map_err(|e| GatewayError::from_status("tokenizer", &e))?.into_inner();
        Ok(Self { ids: Some(ids), text, span })
    }

    /// Sends one id and returns the text it completed; for the last token, half-closes and
    /// adds the flushed remainder.
    pub async fn push(&mut self, id: u32, is_last: bool) -> Result<String, GatewayError> {
        let fail = |what: &str| {
            GatewayError::new(ErrorKind::Internal, format!("detokenizer stream {what}"))
        };
        let Some(tx) = self.ids.as_ref() else { return Err(fail("already closed")) };
        tx.send(tpb::DecodeStreamRequest { ids: vec![id], skip_special_tokens: true })
            .await
            .map_err(|_| fail("closed"))?;
        if is_last {
            self.close();
        }
        let mut text = String::new();
        loop {
            match self.text.message().await {
                Ok(Some(reply)) => text.push_str(&reply.text),
                Ok(None) if is_last => {
                    telemetry::grpc_status(&self.span, 0, "");
                    return Ok(text);
                }
                Ok(None) => return Err(fail("ended early")),
                Err(status) => {
                    telemetry::grpc_status(&self.span, status.code() as i32, status.message());
                    return Err(GatewayError::from_status("tokenizer", &status));
                }
            }
            if !is_last {
                return Ok(text);
            }
        }
    }

    /// Half-closes the stream: the tokenizer flushes what it holds and ends.
    pub fn close(&mut self) {
        self.ids = None;
    }
}
