//! The tokenizer service over a real socket: every RPC, health, reflection, and bad input.

use futures::StreamExt;
use llorch_e2e::{Service, start_tokenizer};
use llorch_proto::tokenizer::v1::tokenizer_client::TokenizerClient;
use llorch_proto::tokenizer::v1::{DecodeRequest, DecodeStreamRequest, EncodeRequest, InfoRequest};
use tonic::Code;
use tonic::transport::Channel;

async fn started(
    tweak: impl FnOnce(&mut llorch_tokenizer::ServeConfig),
) -> (Service, TokenizerClient<Channel>) {
    let svc = start_tokenizer(tweak).await.unwrap();
    svc.wait_serving(llorch_proto::TOKENIZER_SERVICE).await.unwrap();
    let client = TokenizerClient::new(svc.channel());
    (svc, client)
}

async fn encode(
    client: &mut TokenizerClient<Channel>,
    text: &str,
) -> Result<Vec<u32>, tonic::Status> {
    let req = EncodeRequest { text: text.to_owned(), add_special_tokens: false };
    Ok(client.encode(req).await?.into_inner().ids)
}

/// Runs a DecodeStream with one message per chunk and returns the replies.
async fn decode_stream(
    client: &mut TokenizerClient<Channel>,
    chunks: Vec<Vec<u32>>,
) -> Result<Vec<String>, tonic::Status> {
    let reqs =
        chunks.into_iter().map(|ids| DecodeStreamRequest { ids, skip_special_tokens: false });
    let mut replies = client.decode_stream(futures::stream::iter(reqs)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(reply) = replies.next().await {
        out.push(reply?.text);
    }
    Ok(out)
}

#[tokio::test]
async fn encode_decode_and_info_over_a_real_socket() {
    let (svc, mut client) = started(|_| {}).await;
    assert_eq!(encode(&mut client, "Hello, world!").await.unwrap(), [15496, 11, 995, 0]);
    let text = client
        .decode(DecodeRequest { ids: vec![15496, 11, 995, 0, 50256], skip_special_tokens: true })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(text, "Hello, world!");
    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    // model_max_length is n_positions of the folder's config.json: the demo model's 512.
    assert_eq!((info.vocab_size, info.eos_token_id, info.model_max_length), (50257, 50256, 512));
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn decode_stream_answers_each_message_and_flushes_on_half_close() {
    let (svc, mut client) = started(|_| {}).await;
    let text = "naïve café → 日本語 👩‍👩‍👧 done";
    let ids = encode(&mut client, text).await.unwrap();
    let chunks: Vec<Vec<u32>> = ids.iter().map(|&id| vec![id]).collect();
    let n = chunks.len();
    let replies = decode_stream(&mut client, chunks).await.unwrap();
    assert_eq!(replies.len(), n + 1, "one reply per message plus the flush");
    assert_eq!(replies.concat(), text);
    assert!(replies.iter().all(|r| !r.contains('\u{FFFD}')));
    // Chunked differently, same text.
    let chunks: Vec<Vec<u32>> = ids.chunks(3).map(<[u32]>::to_vec).collect();
    assert_eq!(decode_stream(&mut client, chunks).await.unwrap().concat(), text);
    svc.stop().await.unwrap();
}

/// Reflection on the tokenizer's port lists what that port answers — the tokenizer and health,
/// not the engine — in both protocol versions, and describes the tokenizer for `grpcurl`.
#[tokio::test]
async fn reflection_lists_only_this_ports_services_in_v1_and_v1alpha() {
    let (svc, _client) = started(|_| {}).await;
    svc.wait_serving("").await.unwrap();
    llorch_e2e::assert_reflection_lists_only(svc.channel(), llorch_proto::TOKENIZER_SERVICE).await;
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let (svc, mut client) = started(|c| {
        c.limits.max_text_bytes = 1000;
        c.limits.max_ids = 100;
        c.limits.max_message_bytes = 64 * 1024;
    })
    .await;

    // An id outside the vocabulary, named.
    let err = client
        .decode(DecodeRequest { ids: vec![15496, 50257, 7], skip_special_tokens: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("token id 50257 at position 1"), "{}", err.message());
    assert_eq!(encode(&mut client, "still here").await.unwrap().len(), 2);

    // u32::MAX is just another bad id.
    let err = client
        .decode(DecodeRequest { ids: vec![u32::MAX], skip_special_tokens: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Text over the limit.
    let err = encode(&mut client, &"a".repeat(1001)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit is 1000 bytes"), "{}", err.message());

    // Too many ids, in Decode and in one DecodeStream message.
    let err = client
        .decode(DecodeRequest { ids: vec![11; 101], skip_special_tokens: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit is 100 ids"), "{}", err.message());
    let err = decode_stream(&mut client, vec![vec![11], vec![11; 101]]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A bad id in the middle of a stream ends it with the error.
    let err = decode_stream(&mut client, vec![vec![15496], vec![99_999]]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("99999"), "{}", err.message());

    // A message over the gRPC size limit is refused by the transport.
    let err = encode(&mut client, &"b".repeat(100 * 1024)).await.unwrap_err();
    assert!(matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted), "{err:?}");

    // Hostile but valid: control characters, lone special token, empty input.
    assert_eq!(encode(&mut client, "").await.unwrap(), Vec::<u32>::new());
    assert_eq!(encode(&mut client, "<|endoftext|>").await.unwrap(), [50256]);
    assert!(!encode(&mut client, "\u{0}\u{1b}[2J\u{7f}").await.unwrap().is_empty());
    assert_eq!(decode_stream(&mut client, vec![vec![]]).await.unwrap().concat(), "");

    assert_eq!(encode(&mut client, "Hello, world!").await.unwrap(), [15496, 11, 995, 0]);
    svc.stop().await.unwrap();
}

#[tokio::test]
async fn a_missing_model_folder_stops_the_server_with_an_error() {
    let svc = start_tokenizer(|c| c.model = "/nonexistent/model".into()).await.unwrap();
    let err = svc.join().await.unwrap_err();
    assert!(err.to_string().contains("no tokenizer in /nonexistent/model"), "{err}");
}

#[tokio::test]
async fn shutdown_sets_not_serving_and_returns() {
    let (svc, mut client) = started(|_| {}).await;
    assert!(encode(&mut client, "x").await.is_ok());
    svc.stop().await.unwrap();
    assert!(encode(&mut client, "x").await.is_err(), "the stopped server still answers");
}

/// An open `DecodeStream` fed by hand: the sender (drop it to half-close) and the replies.
async fn open_stream(
    client: &mut TokenizerClient<Channel>,
    timeout: Option<std::time::Duration>,
) -> (
    tokio::sync::mpsc::Sender<DecodeStreamRequest>,
    tonic::Streaming<llorch_proto::tokenizer::v1::DecodeStreamResponse>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let replies = client.decode_stream(req).await.unwrap().into_inner();
    (tx, replies)
}

fn chunk(ids: &[u32]) -> DecodeStreamRequest {
    DecodeStreamRequest { ids: ids.to_vec(), skip_special_tokens: false }
}

/// Stops the service and checks that it returned well within its 5 s grace: no stream task
/// was left holding the drain.
async fn stop_promptly(svc: Service) {
    let t0 = std::time::Instant::now();
    svc.stop().await.unwrap();
    assert!(t0.elapsed() < std::time::Duration::from_secs(3), "stop took {:?}", t0.elapsed());
}

#[tokio::test]
async fn a_decode_stream_the_client_drops_is_freed_and_the_server_serves_on() {
    let (svc, mut client) = started(|_| {}).await;
    let (tx, mut replies) = open_stream(&mut client, None).await;
    tx.send(chunk(&[15496, 11])).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().text, "Hello,");
    // The client goes away mid-stream, without half-closing.
    drop(replies);
    drop(tx);
    assert_eq!(encode(&mut client, "Hello").await.unwrap(), [15496]);
    stop_promptly(svc).await;
}

#[tokio::test]
async fn a_decode_stream_past_its_deadline_ends_with_deadline_exceeded() {
    let (svc, mut client) = started(|_| {}).await;
    let t0 = std::time::Instant::now();
    let (tx, mut replies) =
        open_stream(&mut client, Some(std::time::Duration::from_millis(300))).await;
    tx.send(chunk(&[15496])).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().text, "Hello");
    // Nothing more is sent and the stream is never half-closed: the deadline ends it.
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), replies.message()).await;
    let status = end.expect("the stream outlived its deadline by seconds").unwrap_err();
    assert!(matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled), "{status:?}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(2), "ended after {:?}", t0.elapsed());
    drop(tx);
    assert_eq!(encode(&mut client, "Hello").await.unwrap(), [15496]);
    stop_promptly(svc).await;
}

#[tokio::test]
async fn shutdown_lets_an_open_decode_stream_finish_and_refuses_new_calls() {
    let (svc, mut client) = started(|_| {}).await;
    let (tx, mut replies) = open_stream(&mut client, None).await;
    tx.send(chunk(&[15496])).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().text, "Hello");
    let url = svc.url();
    let stopping = tokio::spawn(svc.stop());
    // New calls, on a new connection, are refused once the drain began.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let fresh = Channel::from_shared(url.clone()).unwrap().connect_lazy();
        if encode(&mut TokenizerClient::new(fresh), "Hi").await.is_err() {
            break;
        }
        assert!(std::time::Instant::now() < until, "still taking new calls while draining");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The open stream is still answered, flushes on half-close and ends cleanly.
    tx.send(chunk(&[11, 995])).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().text, ", world");
    drop(tx);
    while let Some(reply) = replies.message().await.unwrap() {
        assert_eq!(reply.text, "", "the flush of a clean stream is empty");
    }
    stopping.await.unwrap().unwrap();
}

/// Over `--max-concurrent-calls` (open decode streams count until they end), `Encode`,
/// `Decode` and `DecodeStream` get `RESOURCE_EXHAUSTED` at once; the streams already open are
/// answered, and once one ends the next call is served.
#[tokio::test]
async fn calls_over_the_limit_get_resource_exhausted_and_the_running_ones_go_on() {
    let (svc, mut client) = started(|c| c.limits.max_concurrent_calls = 2).await;
    let (tx1, mut replies1) = open_stream(&mut client, None).await;
    let (tx2, mut replies2) = open_stream(&mut client, None).await;
    tx1.send(chunk(&[15496])).await.unwrap();
    assert_eq!(replies1.message().await.unwrap().unwrap().text, "Hello");
    let err = encode(&mut client, "Hi").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-concurrent-calls"), "{err:?}");
    let req = DecodeRequest { ids: vec![15496], skip_special_tokens: false };
    assert_eq!(client.decode(req).await.unwrap_err().code(), Code::ResourceExhausted);
    let third = client.decode_stream(futures::stream::iter(vec![chunk(&[11])])).await;
    assert_eq!(third.unwrap_err().code(), Code::ResourceExhausted);
    // The open ones go on; one ends, and a call fits again.
    tx2.send(chunk(&[995])).await.unwrap();
    assert_eq!(replies2.message().await.unwrap().unwrap().text, " world");
    drop(tx1);
    while replies1.message().await.unwrap().is_some() {}
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while encode(&mut client, "Hi").await.is_err() {
        assert!(std::time::Instant::now() < until, "no permit came back");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(tx2);
    stop_promptly(svc).await;
}
