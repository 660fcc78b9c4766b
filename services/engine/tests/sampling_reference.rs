//! Every sampling step against Hugging Face `transformers` (`fixtures/reference/sampling/`,
//! written by `scripts/gen_sampling_reference.py`): the processed logits of each processor
//! on the tiny model's logits, bit for bit, and greedy continuations with each parameter set
//! `generate` can express (logit bias, repetition, presence/frequency, stop ids, ignore_eos).

mod common;

use std::collections::HashMap;

use common::root;
use llorch_engine::npy;
use llorch_engine::sampling::{History, Sampler, SamplingParams};
use llorch_engine::scheduler::{self, Event, Job, SchedulerConfig};
use llorch_engine::sequence::{DEFAULT_PREFILL_CHUNK, FinishReason};
use llorch_engine::{Gpt2, ModelConfig, generate, validate};
use llorch_proto::engine::v1 as pb;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Fixture {
    eos_token_id: u32,
    processors: Processors,
    greedy: Vec<Greedy>,
}

#[derive(Debug, Deserialize)]
struct Processors {
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    input: String,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    file: String,
    params: Params,
    finite: usize,
}

/// A case's parameters with the engine's names; absent = off.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    temperature: Option<f32>,
    top_k: Option<u32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<HashMap<String, f32>>,
}

#[derive(Debug, Deserialize)]
struct Greedy {
    name: String,
    prompt_ids: Vec<u32>,
    params: Params,
    max_new_tokens: u32,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    ids: Vec<u32>,
    finish: String,
    min_margin: f64,
}

fn tiny_config() -> ModelConfig {
    *Gpt2::load(&root().join("fixtures/models/tiny")).unwrap().config()
}

fn fixture() -> Fixture {
    let path = root().join("fixtures/reference/sampling/cases.json");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn vector(name: &str) -> Vec<f32> {
    let path = root().join("fixtures/reference/sampling").join(name);
    npy::read_f32(&path).unwrap().into_raw_vec_and_offset().0
}

fn logit_bias(p: &Params) -> HashMap<u32, f32> {
    let bias = p.logit_bias.clone().unwrap_or_default();
    bias.into_iter().map(|(id, b)| (id.parse().unwrap(), b)).collect()
}

/// The engine's validated parameters for `p`, through the same `validate` the server uses.
fn engine_params(p: &Params, cfg: &ModelConfig) -> SamplingParams {
    let request = pb::GenerateRequest {
        prompt_ids: vec![1],
        sampling: Some(pb::SamplingParams {
            temperature: Some(p.temperature.unwrap_or(1.0)),
            top_k: p.top_k.unwrap_or(0),
            top_p: p.top_p,
            min_p: p.min_p.unwrap_or(0.0),
            repetition_penalty: p.repetition_penalty,
            seed: Some(0),
            presence_penalty: p.presence_penalty.unwrap_or(0.0),
            frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
            logit_bias: logit_bias(p),
        }),
        stopping: Some(pb::StoppingCriteria { max_new_tokens: 1, ..Default::default() }),
        ..Default::default()
    };
    validate(request, cfg, 16).unwrap().sampling
}

/// What the pipeline makes of `logits` for `params`: every logit after steps 1–4, with −∞ for
/// the tokens steps 5–7 cut (HF's warpers' output).
fn engine_output(params: SamplingParams, logits: &[f32], history: History<'_>) -> Vec<f32> {
    let truncates = params.top_k > 0 || params.top_p < 1.0 || params.min_p > 0.0;
    let mut sampler = Sampler::new(params);
    let processed = sampler.process(logits, history).to_vec();
    if !truncates {
        return processed;
    }
    let mut out = vec![f32::NEG_INFINITY; processed.len()];
    for &(z, id) in sampler.truncate() {
        out[id as usize] = z;
    }
    out
}

/// The first index where `got` and `want` differ (−∞ equal to −∞, values compared exactly).
fn first_difference(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).enumerate().find(|(_, (g, w))| g != w).map(|(i, (g, w))| (i, *g, *w))
}

#[test]
fn every_processor_matches_hugging_face_bit_for_bit() {
    let f = fixture();
    let p = &f.processors;
    let logits = vector(&p.input);
    assert_eq!(logits.len(), 50257);
    let history = History { prompt: &p.prompt_ids, generated: &p.generated_ids };
    let cfg = tiny_config();
    assert!(p.cases.len() >= 11, "one case per processor and one for all of them");
    for case in &p.cases {
        let want = vector(&case.file);
        let got = engine_output(engine_params(&case.params, &cfg), &logits, history);
        if let Some((i, g, w)) = first_difference(&got, &want) {
            let n = got.iter().zip(&want).filter(|(g, w)| g != w).count();
            panic!("{}: {n} logits differ, the first at id {i}: got {g}, HF {w}", case.name);
        }
        assert_eq!(got.iter().filter(|v| v.is_finite()).count(), case.finite, "{}", case.name);
    }
}

#[test]
fn presence_and_frequency_over_the_prompt_too_would_not_match_openai() {
    // The reference counts generated tokens only; counting the prompt as well (a plausible
    // mistake) must fail the same comparison.
    let f = fixture();
    let p = &f.processors;
    let logits = vector(&p.input);
    let overlap = p.prompt_ids.iter().any(|id| !p.generated_ids.contains(id));
    assert!(overlap, "the fixture's prompt has ids the output lacks");
    let mut everything = p.prompt_ids.clone();
    everything.extend(&p.generated_ids);
    let wrong = History { prompt: &[], generated: &everything };
    let cfg = tiny_config();
    for name in ["frequency_penalty_0.6", "presence_penalty_1.1", "negative_penalties"] {
        let case = p.cases.iter().find(|c| c.name == name).unwrap();
        let got = engine_output(engine_params(&case.params, &cfg), &logits, wrong);
        assert!(first_difference(&got, &vector(&case.file)).is_some(), "{name}");
    }
}

/// The `Generate` request of a greedy reference case.
fn greedy_request(g: &Greedy) -> pb::GenerateRequest {
    let p = &g.params;
    pb::GenerateRequest {
        request_id: g.name.clone(),
        prompt_ids: g.prompt_ids.clone(),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty.unwrap_or(0.0),
            frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
            logit_bias: logit_bias(p),
            ..Default::default()
        }),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: g.max_new_tokens,
            stop_token_ids: g.stop_token_ids.clone(),
            ignore_eos: g.ignore_eos,
        }),
        ..Default::default()
    }
}

#[test]
fn greedy_continuations_match_hugging_face_generate() {
    let f = fixture();
    let model = Gpt2::load(&root().join("fixtures/models/tiny")).unwrap();
    let names: Vec<&str> = f.greedy.iter().map(|g| g.name.as_str()).collect();
    for want in ["logit_bias", "presence_frequency", "stop_token_ids", "eos_bias_ignore_eos"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for g in &f.greedy {
        assert!(g.min_margin >= 1e-3, "{}: near-tie in the reference", g.name);
        let request = greedy_request(g);
        let valid = validate(request, model.config(), 2048).unwrap();
        assert_eq!(valid.stopping.eos_token_id, f.eos_token_id);
        let out = generate(&model, valid, DEFAULT_PREFILL_CHUNK, |_| {}).unwrap();
        assert_eq!(out.ids(), g.ids, "{}", g.name);
        assert_eq!(out.finish.as_str(), g.finish, "{}", g.name);
    }
}

#[test]
fn ignore_eos_streams_the_eos_token_and_goes_on() {
    let f = fixture();
    let by_name = |n: &str| f.greedy.iter().find(|g| g.name == n).unwrap();
    let (stops, goes_on) = (by_name("eos_bias_stops_at_eos"), by_name("eos_bias_ignore_eos"));
    let eos = f.eos_token_id;
    assert_eq!(stops.ids.last(), Some(&eos), "generation ends with the EOS token, sent");
    assert_eq!(stops.finish, FinishReason::Eos.as_str());
    let at = stops.ids.len() - 1;
    assert_eq!(goes_on.ids[at], eos);
    assert_eq!(goes_on.ids.len(), goes_on.max_new_tokens as usize);
    assert_eq!(goes_on.finish, FinishReason::Length.as_str());
    let stop = by_name("stop_token_ids");
    assert_eq!(stop.finish, FinishReason::StopToken.as_str());
    assert_eq!(stop.ids.last(), Some(&stop.stop_token_ids[0]), "the stop id is sent");
}

/// Runs every request in one scheduler batch; returns each stream's ids and finish reason.
fn batched(requests: Vec<pb::GenerateRequest>) -> Vec<(Vec<u32>, FinishReason)> {
    let model = std::sync::Arc::new(Gpt2::load(&root().join("fixtures/models/tiny")).unwrap());
    let cfg = *model.config();
    let config = SchedulerConfig { max_batch: requests.len(), max_queue: 64, prefill_chunk: 256 };
    let (handle, thread) = scheduler::spawn(model, config).unwrap();
    let mut rxs = Vec::new();
    for request in requests {
        let req = validate(request, &cfg, 2048).unwrap();
        let capacity = scheduler::event_capacity(req.stopping.max_new_tokens);
        let (events, rx) = tokio::sync::mpsc::channel(capacity);
        handle.submit(Job { req, events, deadline: None, span: tracing::Span::none() }).unwrap();
        rxs.push(rx);
    }
    let out = rxs
        .into_iter()
        .map(|mut rx| {
            let mut ids = Vec::new();
            loop {
                match rx.blocking_recv() {
                    Some(Event::Token(t)) => ids.push(t.token.id),
                    Some(Event::Finished(f)) => return (ids, f.reason),
                    other => panic!("{other:?}"),
                }
            }
        })
        .collect();
    handle.stop();
    thread.join().unwrap();
    out
}

#[test]
fn the_reference_continuations_hold_when_batched_together() {
    let f = fixture();
    let got = batched(f.greedy.iter().map(greedy_request).collect());
    for (g, (ids, finish)) in f.greedy.iter().zip(got) {
        assert_eq!(ids, g.ids, "{}", g.name);
        assert_eq!(finish.as_str(), g.finish, "{}", g.name);
    }
}

#[test]
fn sampling_with_every_parameter_is_the_same_alone_and_batched() {
    let f = fixture();
    let all = &f.processors.cases.iter().find(|c| c.name == "all").unwrap().params;
    let request = |seed: u64| {
        let mut r = greedy_request(&f.greedy[0]);
        r.request_id = format!("s{seed}");
        let s = r.sampling.as_mut().unwrap();
        s.temperature = all.temperature;
        s.top_k = all.top_k.unwrap_or(0);
        s.top_p = all.top_p;
        s.min_p = all.min_p.unwrap_or(0.0);
        s.repetition_penalty = all.repetition_penalty;
        s.presence_penalty = all.presence_penalty.unwrap_or(0.0);
        s.frequency_penalty = all.frequency_penalty.unwrap_or(0.0);
        s.logit_bias = logit_bias(all);
        s.seed = Some(seed);
        r
    };
    let seeds = [1u64, 2, 3, 4, 5];
    let together = batched(seeds.iter().map(|&s| request(s)).collect());
    for (&seed, got) in seeds.iter().zip(&together) {
        assert_eq!(&batched(vec![request(seed)])[0], got, "seed {seed}");
    }
    assert!(together.windows(2).any(|w| w[0] != w[1]), "the seeds do not reach the sampler");
}
