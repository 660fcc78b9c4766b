//! The ready callback: once listening, tell the pool manager where this worker is.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde_json::json;

use crate::config::GatewayConfig;
use crate::state::AppState;

/// URLs containing this skip the callback (the llama-orch test mode).
pub const TEST_MODE_MARKER: &str = "localhost:9999";

/// The callback body: the fields of WORKER_API.md "Start-up" (`uri`, `worker_type`, …) and, in
/// the same body, the ones the upstream pool manager's receiver (`rbee-hive`,
/// `POST /v1/workers/ready`) requires: `url` (the same value as `uri`), `backend` and `device`.
/// Each receiver ignores the other's fields, so one body serves both.
pub fn body(
    config: &GatewayConfig,
    uri: &str,
    model_ref: &str,
    memory_bytes: u64,
) -> serde_json::Value {
    json!({
        "worker_id": config.worker_id,
        "vram_bytes": 0,
        "uri": uri,
        "url": uri,
        "model_ref": model_ref,
        "memory_bytes": memory_bytes,
        "memory_architecture": "cpu",
        "worker_type": "cpu",
        "capabilities": ["text-gen"],
        "backend": "cpu",
        "device": 0,
    })
}

/// POSTs the callback with exponential back-off; skipped in test mode. Fails after
/// `--callback-attempts` tries.
pub async fn announce(
    config: &GatewayConfig,
    uri: &str,
    state: &Arc<AppState>,
) -> anyhow::Result<()> {
    if config.callback_url.contains(TEST_MODE_MARKER) {
        tracing::info!(url = %config.callback_url, "test mode: ready callback skipped");
        return Ok(());
    }
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(5));
    // An https:// pool manager is checked against the same authorities as the upstreams.
    if let Some(path) = &config.upstream_ca {
        let ca = llorch_common::tls::ClientCa::from_file(path)?;
        client = client.add_root_certificate(reqwest::Certificate::from_pem(ca.pem())?);
    }
    let client = client.build()?;
    let mut delay = Duration::from_secs_f64(config.callback_backoff_secs.max(0.0));
    let attempts = config.callback_attempts.max(1);
    let mut last_error = String::new();
    for attempt in 1..=attempts {
        // The model facts need the engine; until it answers, report the configured reference.
        let (model_ref, memory_bytes) = match state.facts().await {
            Ok(f) => (f.model, f.weight_bytes),
            Err(_) => (config.model.clone().unwrap_or_default(), 0),
        };
        let payload = body(config, uri, &model_ref, memory_bytes);
        match client.post(&config.callback_url).json(&payload).send().await {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(url = %config.callback_url, attempt, "ready callback accepted");
                return Ok(());
            }
            Ok(resp) => last_error = format!("HTTP {}", resp.status()),
            Err(e) => last_error = e.to_string(),
        }
        tracing::warn!(url = %config.callback_url, attempt, attempts, error = %last_error, "ready callback failed");
        if attempt < attempts {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    bail!(
        "the ready callback to {} failed after {attempts} attempts (last error: {last_error})",
        config.callback_url
    )
}
