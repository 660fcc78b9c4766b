//! Shared state of the gateway: config, upstream clients, metrics, admission and the registry
//! of running jobs (for `/cancel`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use llorch_common::auth::ApiKey;
use tokio::sync::{Notify, Semaphore};

use crate::config::GatewayConfig;
use crate::error::{ErrorKind, GatewayError};
use crate::metrics::Metrics;
use crate::upstream::Upstreams;

/// What the gateway needs to know about the model behind the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFacts {
    /// Model reference (the `--model` flag, else the engine's model name).
    pub model: String,
    /// Context length.
    pub n_ctx: u32,
    /// The engine's largest `max_new_tokens`.
    pub max_new_tokens_limit: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Bytes of weights the engine holds.
    pub weight_bytes: u64,
}

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The configuration.
    pub config: GatewayConfig,
    /// gRPC clients.
    pub upstreams: Upstreams,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// One permit per running `/execute` stream.
    pub in_flight: Arc<Semaphore>,
    /// The key every request but `--public-paths` must carry, when set.
    pub api_key: Option<ApiKey>,
    jobs: Mutex<HashMap<String, Arc<Notify>>>,
    draining: AtomicBool,
    facts: RwLock<Option<ModelFacts>>,
}

impl AppState {
    /// Fresh state; with `api_key`, requests must carry it.
    pub fn new(config: GatewayConfig, upstreams: Upstreams, api_key: Option<ApiKey>) -> Self {
        Self {
            api_key,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            upstreams,
            metrics: Metrics::default(),
            jobs: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            facts: RwLock::new(None),
        }
    }

    /// Registers a running job; `None` when the id is already running.
    pub fn register(self: &Arc<Self>, job_id: &str) -> Option<JobGuard> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.contains_key(job_id) {
            return None;
        }
        let notify = Arc::new(Notify::new());
        jobs.insert(job_id.to_owned(), Arc::clone(&notify));
        Some(JobGuard { state: Arc::clone(self), job_id: job_id.to_owned(), cancel: notify })
    }

    /// Signals the job to stop; false when no such job runs.
    pub fn cancel(&self, job_id: &str) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.get(job_id).map(|n| n.notify_one()).is_some()
    }

    /// Jobs running now.
    pub fn running_jobs(&self) -> usize {
        self.jobs.lock().map(|j| j.len()).unwrap_or(0)
    }

    /// From now on `/execute` answers 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether new jobs are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The model's name, when known without asking: the configured model reference, or the
    /// engine's name from the last health check or job.
    pub fn known_model(&self) -> Option<String> {
        let facts = self.facts.read().unwrap_or_else(|e| e.into_inner());
        facts.as_ref().map(|f| f.model.clone()).or_else(|| self.config.model.clone())
    }

    /// The model facts, asking the engine when they are not known yet.
    pub async fn facts(&self) -> Result<ModelFacts, GatewayError> {
        if let Some(f) = self.facts.read().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(f);
        }
        self.refresh_facts().await
    }

    /// Asks both upstreams (the health check); remembers the model facts.
    pub async fn refresh_facts(&self) -> Result<ModelFacts, GatewayError> {
        let (tok, eng) = self.upstreams.info().await?;
        if tok.vocab_size != eng.vocab_size {
            return Err(GatewayError::new(
                ErrorKind::Unavailable,
                format!(
                    "tokenizer vocabulary ({}) and engine vocabulary ({}) differ",
                    tok.vocab_size, eng.vocab_size
                ),
            ));
        }
        let facts = ModelFacts {
            model: self.config.model.clone().unwrap_or(eng.model),
            n_ctx: eng.n_ctx,
            max_new_tokens_limit: eng.max_new_tokens_limit,
            vocab_size: eng.vocab_size,
            weight_bytes: eng.weight_bytes,
        };
        *self.facts.write().unwrap_or_else(|e| e.into_inner()) = Some(facts.clone());
        Ok(facts)
    }
}

/// A running job's registration; removed from the registry when dropped.
#[derive(Debug)]
pub struct JobGuard {
    state: Arc<AppState>,
    job_id: String,
    /// Notified by `/cancel`.
    pub cancel: Arc<Notify>,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if let Ok(mut jobs) = self.state.jobs.lock() {
            jobs.remove(&self.job_id);
        }
    }
}
