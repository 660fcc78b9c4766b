//! The API key: one key on all three services. The gateway refuses requests without it (401,
//! `WWW-Authenticate`, in each route family's error shape) except on its public paths, and
//! sends it on its own gRPC calls; the gRPC services refuse calls without it (UNAUTHENTICATED)
//! except health checks.

use llorch_common::auth::{ApiKeyArgs, KeyText};
use llorch_e2e::{SseReader, Stack};
use llorch_proto::engine::v1::InfoRequest;
use llorch_proto::engine::v1::engine_client::EngineClient;
use llorch_proto::tokenizer::v1::EncodeRequest;
use llorch_proto::tokenizer::v1::tokenizer_client::TokenizerClient;
use serde_json::{Value, json};
use tonic::Code;

const KEY: &str = "test-key-0123456789";

fn keyed() -> ApiKeyArgs {
    ApiKeyArgs { api_key: Some(KeyText(KEY.to_owned())), api_key_file: None }
}

async fn keyed_stack() -> Stack {
    Stack::start_with(|t| t.auth = keyed(), |e| e.auth = keyed(), |g| g.auth = keyed())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_gateway_requires_the_key_except_on_public_paths() {
    let stack = keyed_stack().await;
    let http = reqwest::Client::new();
    for path in ["/health", "/metrics"] {
        assert_eq!(http.get(stack.url(path)).send().await.unwrap().status(), 200, "{path}");
    }
    let execute = json!({"job_id": "j1", "prompt": "Hello.", "max_tokens": 3, "temperature": 0});
    for (auth, says) in [
        (None, "requires an API key"),
        (Some("Bearer wrong-key"), "not valid"),
        (Some(&*format!("Basic {KEY}")), "not valid"),
    ] {
        let mut req = http.post(stack.url("/execute")).json(&execute);
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"llorch\"");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "UNAUTHORIZED", "{body}");
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
        assert!(!body.to_string().contains(KEY), "the key is never echoed");
    }
    for path in ["/v1/completions", "/v1/models"] {
        let resp = http.post(stack.url(path)).json(&json!({})).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
        assert!(resp.headers().contains_key("www-authenticate"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    }
    // With the key, the whole path works: the gateway's own calls carry it to both services.
    let resp =
        http.post(stack.url("/execute")).bearer_auth(KEY).json(&execute).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = SseReader::new(resp).collect().await;
    assert_eq!(events.last().unwrap().event, "end", "{events:?}");
    let completion = json!({"model": "tiny", "prompt": "Hello.", "max_tokens": 3});
    let resp = http
        .post(stack.url("/v1/completions"))
        .bearer_auth(KEY)
        .json(&completion)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    stack.stop().await.unwrap();
}

#[tokio::test]
async fn the_grpc_services_require_the_key_except_for_health() {
    let stack = keyed_stack().await;
    // Health answered without it (Stack::start waited on it), every other call refused.
    let mut engine = EngineClient::new(stack.engine.channel());
    let err = engine.info(InfoRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut tokenizer = TokenizerClient::new(stack.tokenizer.channel());
    let encode = || EncodeRequest { text: "Hello.".into(), add_special_tokens: false };
    assert_eq!(tokenizer.encode(encode()).await.unwrap_err().code(), Code::Unauthenticated);
    let mut wrong = tonic::Request::new(encode());
    wrong.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(tokenizer.encode(wrong).await.unwrap_err().code(), Code::Unauthenticated);
    // Reflection too: it describes the API.
    let reflected = llorch_e2e::reflect_v1(stack.engine.channel(), "llorch.engine.v1.Engine").await;
    assert!(reflected.is_err(), "{reflected:?}");

    let mut right = tonic::Request::new(encode());
    right.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    assert_eq!(tokenizer.encode(right).await.unwrap().into_inner().ids, [15496, 13]);
    let mut info = tonic::Request::new(InfoRequest {});
    info.metadata_mut().insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    assert_eq!(engine.info(info).await.unwrap().into_inner().running, 0);
    // The refused calls changed nothing and the services serve on.
    let resp = reqwest::Client::new().get(stack.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    stack.stop().await.unwrap();
}
