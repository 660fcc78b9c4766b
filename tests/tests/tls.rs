//! TLS on all three services, with a certificate authority and certificates this test makes
//! (rcgen): the gateway serves HTTPS and calls both services over TLS (`https://` upstream URLs
//! checked against `--upstream-ca`); plain-text clients, clients that do not trust the
//! authority, a certificate for another name and a handshake that never comes are refused, and
//! the services serve on. The `health` probes speak TLS with `--ca-cert`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llorch_common::tls::{ClientCa, TlsArgs};
use llorch_e2e::{Service, SseReader, start_engine, start_tokenizer};
use llorch_proto::engine::v1 as pb;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority and a server certificate for `localhost` (only: a client that
/// connects to 127.0.0.1 must still check the name it was given) it signed,
/// as PEM files in a temporary folder; and a second key that belongs to no certificate.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "llorch test CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.pem());
        write("server.pem", leaf.pem());
        write("server.key", key.serialize_pem());
        write("other.key", KeyPair::generate().unwrap().serialize_pem());
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn server(&self) -> TlsArgs {
        TlsArgs { tls_cert: Some(self.path("server.pem")), tls_key: Some(self.path("server.key")) }
    }

    fn ca(&self) -> ClientCa {
        ClientCa::from_file(&self.path("ca.pem")).unwrap()
    }

    /// An HTTPS client that trusts only the test authority.
    fn https_client(&self) -> reqwest::Client {
        let root = reqwest::Certificate::from_pem(&std::fs::read(self.path("ca.pem")).unwrap());
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(root.unwrap())
            .build()
            .unwrap()
    }
}

/// Polls the gRPC health probe over TLS until it says SERVING (10 s).
async fn wait_serving_tls(url: &str, service: &str, ca: &ClientCa) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match llorch_common::probe::grpc_health(url, service, Duration::from_secs(2), Some(ca))
            .await
        {
            Ok(_) => return,
            Err(e) if Instant::now() > until => panic!("{service} not serving over TLS: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn engine_tls(url: &str, ca: &ClientCa, host: &str) -> tonic::transport::Endpoint {
    tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(ca.tonic(host))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
}

/// Runs `llorch-gateway health` with `args`: its exit code and its output. (On a blocking
/// thread: the gateway it asks runs on this test's runtime.)
async fn gateway_probe(args: &[&str]) -> (i32, String) {
    let mut command = std::process::Command::new(llorch_e2e::binary("llorch-gateway").unwrap());
    command.arg("health").args(args);
    let out = tokio::task::spawn_blocking(move || command.output()).await.unwrap().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn the_whole_worker_over_tls_and_what_it_refuses() {
    let pki = Pki::new();
    let ca = pki.ca();
    let tokenizer = start_tokenizer(|c| c.tls = pki.server()).await.unwrap();
    let engine = start_engine(|c| c.tls = pki.server()).await.unwrap();
    let tok_url = format!("https://localhost:{}", tokenizer.addr.port());
    let eng_url = format!("https://localhost:{}", engine.addr.port());
    wait_serving_tls(&tok_url, llorch_proto::TOKENIZER_SERVICE, &ca).await;
    wait_serving_tls(&eng_url, llorch_proto::ENGINE_SERVICE, &ca).await;

    // The gateway: HTTPS itself, both upstreams over TLS, checked against the test authority.
    let mut config = llorch_gateway::GatewayConfig::new(tok_url.clone(), eng_url.clone());
    config.tls = pki.server();
    config.upstream_ca = Some(pki.path("ca.pem"));
    config.header_read_timeout_secs = 0.5;
    let gateway =
        Service::spawn(move |l, s| llorch_gateway::server::run(config, l, s)).await.unwrap();
    let base = format!("https://localhost:{}", gateway.addr.port());
    let https = pki.https_client();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = https.get(format!("{base}/health")).send().await;
        if r.as_ref().is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < until, "the gateway's /health over TLS: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let execute = || async {
        let body = json!({"job_id": uuid::Uuid::new_v4().to_string(), "prompt": "In the beginning", "max_tokens": 8, "temperature": 0});
        let resp = https.post(format!("{base}/execute")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let events = SseReader::new(resp).collect().await;
        let tokens = events.iter().filter(|e| e.event == "token").count();
        let end = events.last().unwrap();
        assert_eq!(end.event, "end", "{events:?}");
        assert_eq!(tokens, 8, "{events:?}");
    };
    execute().await;

    // Plain HTTP to the HTTPS port: no answer, the connection is closed.
    let plain =
        reqwest::Client::new().get(format!("http://127.0.0.1:{}/health", gateway.addr.port()));
    assert!(plain.send().await.is_err(), "plain HTTP was answered on the TLS port");
    // A client that does not trust the authority refuses the gateway's certificate.
    let untrusting = reqwest::Client::builder().tls_built_in_root_certs(false).build().unwrap();
    let e = untrusting.get(format!("{base}/health")).send().await.unwrap_err();
    assert!(llorch_common::probe::chain(&e).to_lowercase().contains("certificate"), "{e:?}");
    // A connection that never starts its handshake is closed at the header timeout (0.5 s).
    let mut idle = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "not closed: {read:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "closed after {:?}", t0.elapsed());
    // Plain HTTP instead of a ClientHello: closed, with no HTTP answer.
    let mut junk = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    junk.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "not closed");
    assert!(!String::from_utf8_lossy(&answer).contains("HTTP/"), "{answer:?}");

    // gRPC: TLS with the authority works; plain text, or a certificate checked for another
    // name, does not.
    let channel = engine_tls(&eng_url, &ca, "localhost").connect().await.unwrap();
    let info = pb::engine_client::EngineClient::new(channel).info(pb::InfoRequest {}).await;
    assert!(info.is_ok(), "{info:?}");
    let plain = format!("http://127.0.0.1:{}", engine.addr.port());
    let channel = tonic::transport::Channel::from_shared(plain).unwrap().connect_lazy();
    let info = pb::engine_client::EngineClient::new(channel).info(pb::InfoRequest {}).await;
    assert!(info.is_err(), "plain gRPC was answered on the TLS port");
    let wrong = engine_tls(&eng_url, &ca, "other.example").connect().await;
    assert!(wrong.is_err(), "a certificate for localhost passed as other.example");

    // The probes: with the authority, healthy; over TLS without it, not.
    let gw_port = gateway.addr.port().to_string();
    let ca_path = pki.path("ca.pem");
    let ca_path = ca_path.to_str().unwrap();
    let (code, text) = gateway_probe(&["--port", &gw_port, "--ca-cert", ca_path]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("https://localhost:") && text.contains("HTTP 200"), "{text}");
    let (code, text) = gateway_probe(&["--url", &base]).await;
    assert_eq!(code, 1, "{text}");

    // After all of that, the worker serves as before.
    execute().await;
    gateway.stop().await.unwrap();
    engine.stop().await.unwrap();
    tokenizer.stop().await.unwrap();
}

#[tokio::test]
async fn bad_tls_configuration_stops_a_service_at_start_with_the_reason() {
    let pki = Pki::new();
    // A key that is not the certificate's.
    let mismatched =
        TlsArgs { tls_cert: Some(pki.path("server.pem")), tls_key: Some(pki.path("other.key")) };
    let e = start_engine(|c| c.tls = mismatched).await.unwrap().join().await.unwrap_err();
    assert!(format!("{e:#}").contains("does not fit the certificate"), "{e:#}");
    // A certificate file that holds no certificate.
    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let bad = TlsArgs { tls_cert: Some(garbage.clone()), tls_key: Some(pki.path("server.key")) };
    let e = start_tokenizer(|c| c.tls = bad).await.unwrap().join().await.unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("no certificate") && text.contains(garbage.to_str().unwrap()), "{text}");
    // An https:// upstream without --upstream-ca.
    let config = llorch_gateway::GatewayConfig::new(
        "https://localhost:1".into(),
        "http://127.0.0.1:2".into(),
    );
    let e = Service::spawn(move |l, s| llorch_gateway::server::run(config, l, s))
        .await
        .unwrap()
        .join()
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("--upstream-ca"), "{e:#}");
    // An --upstream-ca that is not a certificate authority's PEM.
    let e = ClientCa::from_file(Path::new(&garbage)).unwrap_err();
    assert!(format!("{e:#}").contains("no certificate"), "{e:#}");
}
