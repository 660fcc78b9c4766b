//! Hostile clients on raw sockets: slow-loris heads and bodies, oversized headers, more idle
//! connections than the limit, pipelined requests, garbage on the gRPC ports and a zero
//! `grpc-timeout`. Each gets a clear refusal (or its connection closed, where HTTP has nothing
//! to say), and the servers keep serving others at once.

use std::time::{Duration, Instant};

use llorch_e2e::Stack;
use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::engine::v1::{GenerateRequest, InfoRequest, StoppingCriteria};
use llorch_proto::tokenizer::v1::EncodeRequest;
use llorch_proto::tokenizer::v1::tokenizer_client::TokenizerClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A stack whose gateway has short read timeouts and a small connection limit.
async fn stack() -> Stack {
    stack_with_header_timeout(0.5).await
}

async fn stack_with_header_timeout(secs: f64) -> Stack {
    Stack::start(
        |_| {},
        |g| {
            g.header_read_timeout_secs = secs;
            g.body_read_timeout_secs = 0.5;
            g.max_connections = 16;
        },
    )
    .await
    .unwrap()
}

/// Everything the server sends until it closes (or 5 s pass: then the test fails).
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the server kept the connection open: {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// `/health` answers 200 quickly: the server serves others normally.
async fn assert_serving(stack: &Stack) {
    let started = Instant::now();
    let resp = reqwest::get(stack.url("/health")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2), "health took {:?}", started.elapsed());
}

#[tokio::test]
async fn clients_that_never_finish_their_headers_are_dropped() {
    let stack = stack().await;
    // Half a head; three bytes of one; nothing at all.
    let heads: [&[u8]; 3] =
        [b"POST /execute HTTP/1.1\r\nhost: x\r\ncontent-type: appl", b"PRI", b""];
    let started = Instant::now();
    let mut slow = Vec::new();
    for head in heads {
        let mut conn = TcpStream::connect(stack.gateway.addr).await.unwrap();
        conn.write_all(head).await.unwrap();
        slow.push(conn);
    }
    assert_serving(&stack).await;
    for conn in &mut slow {
        read_to_close(conn).await;
    }
    assert!(started.elapsed() < Duration::from_secs(3), "dropped after {:?}", started.elapsed());
    assert_serving(&stack).await;
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_body_that_stops_coming_ends_its_request() {
    let stack = stack().await;
    let mut slow = TcpStream::connect(stack.gateway.addr).await.unwrap();
    slow.write_all(
        b"POST /execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"job_id\": \"slow\",",
    )
    .await
    .unwrap();
    assert_serving(&stack).await;
    let answer = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("timeout"), "{answer}");
    assert_serving(&stack).await;
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn headers_over_64_kib_get_431() {
    let stack = stack().await;
    let mut big = TcpStream::connect(stack.gateway.addr).await.unwrap();
    let filler = "a".repeat(70 << 10);
    let req = format!("GET /health HTTP/1.1\r\nhost: x\r\nx-filler: {filler}\r\n\r\n");
    // The server may answer and close before it has read everything: ignore the write error.
    let _ = big.write_all(req.as_bytes()).await;
    let answer = read_to_close(&mut big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    assert_serving(&stack).await;
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_the_rest_are_served() {
    // Idle connections must outlive the test's steps here.
    let stack = stack_with_header_timeout(10.0).await;
    // Idle connections up to the limit (16) hold their places...
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(TcpStream::connect(stack.gateway.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so the next ones are refused at once with a body that says why.
    for _ in 0..4 {
        let mut extra = TcpStream::connect(stack.gateway.addr).await.unwrap();
        let answer = read_to_close(&mut extra).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("OVERLOADED") && answer.contains("retry-after: 1"), "{answer}");
    }
    // Once they close, new clients get in.
    drop(idle);
    let until = Instant::now() + Duration::from_secs(5);
    while reqwest::get(stack.url("/health")).await.map(|r| r.status()).ok()
        != Some(reqwest::StatusCode::OK)
    {
        assert!(Instant::now() < until, "no room 5 s after the idle connections closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let stack = stack().await;
    let mut conn = TcpStream::connect(stack.gateway.addr).await.unwrap();
    let req = "GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
    let last = "GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    conn.write_all(format!("{req}{req}{last}").as_bytes()).await.unwrap();
    let answer = read_to_close(&mut conn).await;
    let statuses: Vec<&str> =
        answer.match_indices("HTTP/1.1 ").map(|(i, _)| &answer[i + 9..i + 12]).collect();
    assert_eq!(statuses, ["200", "200", "404"], "{answer}");
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn garbage_on_the_grpc_ports_is_dropped_and_both_services_serve_on() {
    let stack = stack().await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for addr in [stack.engine.addr, stack.tokenizer.addr] {
        // Not HTTP at all; an HTTP/2 preface then frames that make no sense (a DATA frame on
        // stream 0, an oversized length, random bytes).
        let mut framed = preface.to_vec();
        framed.extend_from_slice(&[0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00]);
        framed.extend_from_slice(b"junk");
        framed.extend_from_slice(&[0xff, 0xff, 0xff, 0x07, 0x00, 0x00, 0x00, 0x00, 0x01]);
        framed.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
        for bytes in [b"\x16\x03\x01 not HTTP at all\r\n\r\n".to_vec(), framed] {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let _ = conn.write_all(&bytes).await;
            read_to_close(&mut conn).await;
        }
    }
    let info = EngineClient::new(stack.engine.channel()).info(InfoRequest {}).await.unwrap();
    assert_eq!(info.into_inner().running, 0);
    let encode = EncodeRequest { text: "Hello.".into(), add_special_tokens: false };
    let ids = TokenizerClient::new(stack.tokenizer.channel()).encode(encode).await.unwrap();
    assert_eq!(ids.into_inner().ids, [15496, 13]);
    assert_serving(&stack).await;
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn a_zero_grpc_timeout_is_refused_and_the_services_serve_on() {
    let stack = stack().await;
    let mut engine = EngineClient::new(stack.engine.channel());
    let mut req = tonic::Request::new(GenerateRequest {
        request_id: "no-time".into(),
        prompt_ids: vec![15496],
        sampling: None,
        stopping: Some(StoppingCriteria { max_new_tokens: 4, ..Default::default() }),
        logprobs: false,
        top_logprobs: 0,
    });
    req.set_timeout(Duration::ZERO);
    let outcome = match engine.generate(req).await {
        Err(status) => Err(status),
        Ok(stream) => {
            let mut stream = stream.into_inner();
            let mut last = Ok(None);
            while let Some(msg) = stream.message().await.transpose() {
                last = msg.map(|m| m.event);
                if last.is_err() {
                    break;
                }
            }
            last.map(|_| ())
        }
    };
    // The server refuses it (DEADLINE_EXCEEDED, `grpc::Guard`'s unit test shows it without a
    // client in the way); tonic's client may give up first on its own 0 s timer (CANCELLED).
    let no_time = [tonic::Code::DeadlineExceeded, tonic::Code::Cancelled];
    let status = outcome.expect_err("a call with no time left must not run");
    assert!(no_time.contains(&status.code()), "{status:?}");
    let mut tokenizer = TokenizerClient::new(stack.tokenizer.channel());
    let encode = || EncodeRequest { text: "Hi".into(), add_special_tokens: false };
    let mut req = tonic::Request::new(encode());
    req.set_timeout(Duration::ZERO);
    let status = tokenizer.encode(req).await.unwrap_err();
    assert!(no_time.contains(&status.code()), "{status:?}");
    assert_eq!(tokenizer.encode(encode()).await.unwrap().into_inner().ids, [17250]);
    stack.settled().await.unwrap();
    stack.stop().await.unwrap();
}

/// Found by the soak: a client still writing a body over `--max-body-bytes` when its `413`
/// came lost the answer to a broken pipe, since closing a socket with unread data resets the
/// connection. The gateway now reads and drops what the client still sends for up to a second
/// after its answer (a lingering close), so the whole body is written and the `413` read.
#[tokio::test]
async fn a_client_still_sending_an_oversized_body_gets_its_413() {
    let stack = stack().await;
    for _ in 0..3 {
        let mut conn = TcpStream::connect(stack.gateway.addr).await.unwrap();
        let body = format!("{{\"job_id\":\"j\",\"prompt\":\"{}\"}}", "x".repeat(8 << 20));
        let head = format!(
            "POST /execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let written = conn.write_all(body.as_bytes()).await;
        assert!(written.is_ok(), "the body could not be written: {written:?}");
        let answer = read_to_close(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.to_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
    }
    assert_serving(&stack).await;
    stack.stop().await.unwrap();
}

/// Found by the soak: a request answered before its body was read to the end (a `413` over
/// `--max-body-bytes`; here a `400` when the body stops coming) leaves the rest of the body on
/// the connection, so the gateway closes it after the answer; without `connection: close` on
/// that answer a client reused the connection for its next request and lost it ("connection
/// closed before message completed").
#[tokio::test]
async fn an_answer_before_the_body_was_read_closes_the_connection_and_says_so() {
    let stack = stack().await;
    let mut conn = TcpStream::connect(stack.gateway.addr).await.unwrap();
    let head = "POST /execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                content-length: 2000000\r\n\r\n{\"job_id\":\"j\",\"prompt\":\"";
    conn.write_all(head.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.to_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
    // A whole body read (even one refused) keeps the connection: two answers on one.
    let mut conn = TcpStream::connect(stack.gateway.addr).await.unwrap();
    let bad = "POST /execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
               content-length: 2\r\n\r\n{}";
    let last = "GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    conn.write_all(format!("{bad}{last}").as_bytes()).await.unwrap();
    let answer = read_to_close(&mut conn).await;
    let statuses: Vec<&str> =
        answer.match_indices("HTTP/1.1 ").map(|(i, _)| &answer[i + 9..i + 12]).collect();
    assert_eq!(statuses, ["422", "200"], "{answer}");
    assert_serving(&stack).await;
    stack.stop().await.unwrap();
}
