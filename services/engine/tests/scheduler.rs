//! The scheduler without the network: exact step-level guarantees.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use llorch_engine::Gpt2;
use llorch_engine::request::{Stopping, ValidRequest};
use llorch_engine::sampling::SamplingParams;
use llorch_engine::scheduler::{self, Event, Job, SchedulerConfig, SchedulerHandle};

fn model() -> Arc<Gpt2> {
    Arc::new(
        Gpt2::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny"),
        )
        .unwrap(),
    )
}

fn spawn(max_batch: usize, max_queue: usize) -> (SchedulerHandle, std::thread::JoinHandle<()>) {
    scheduler::spawn(model(), SchedulerConfig { max_batch, max_queue, prefill_chunk: 256 }).unwrap()
}

fn job(id: &str, max_new: usize) -> (Job, tokio::sync::mpsc::Receiver<Event>) {
    let (events, rx) = tokio::sync::mpsc::channel(scheduler::event_capacity(max_new));
    let req = ValidRequest {
        request_id: id.into(),
        prompt: vec![15496, 13],
        sampling: SamplingParams::greedy(),
        stopping: Stopping {
            max_new_tokens: max_new,
            stop_token_ids: vec![],
            ignore_eos: true,
            eos_token_id: 50256,
        },
        logprobs: false,
        top_logprobs: 0,
    };
    (Job { req, events, deadline: None, span: tracing::Span::none() }, rx)
}

fn wait(handle: &SchedulerHandle, what: &str, pred: impl Fn(&SchedulerHandle) -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !pred(handle) {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn a_closed_channel_frees_its_sequence_within_one_decode_step() {
    let (handle, thread) = spawn(4, 4);
    let (a, mut rx_a) = job("a", 1000);
    let (b, mut rx_b) = job("b", 1000);
    handle.submit(a).unwrap();
    handle.submit(b).unwrap();
    assert!(matches!(rx_a.blocking_recv(), Some(Event::Token(_))));
    assert!(matches!(rx_b.blocking_recv(), Some(Event::Token(_))));
    wait(&handle, "two running", |h| h.stats().running.load(Ordering::SeqCst) == 2);

    let before = handle.stats().decode_steps.load(Ordering::SeqCst);
    drop(rx_b);
    wait(&handle, "b freed", |h| h.stats().running.load(Ordering::SeqCst) == 1);
    let after = handle.stats().decode_steps.load(Ordering::SeqCst);
    // The step in progress when the channel closed may finish; the next one reaps first.
    // (The running count is published after that next step, hence +2.)
    assert!(after <= before + 2, "freed after {} decode steps", after - before);
    assert_eq!(handle.stats().caches_in_use.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().finished().get("CANCELLED"), Some(&1));

    drop(rx_a);
    wait(&handle, "idle", |h| h.stats().running.load(Ordering::SeqCst) == 0);
    handle.stop();
    thread.join().unwrap();
}

#[test]
fn finished_streams_return_their_cache_and_end_with_finished() {
    let (handle, thread) = spawn(2, 8);
    let mut rxs = Vec::new();
    for i in 0..5 {
        let (j, rx) = job(&format!("j{i}"), 3 + i);
        handle.submit(j).unwrap();
        rxs.push(rx);
    }
    for (i, mut rx) in rxs.into_iter().enumerate() {
        let mut tokens = 0;
        loop {
            match rx.blocking_recv() {
                Some(Event::Token(_)) => tokens += 1,
                Some(Event::Finished(f)) => {
                    assert_eq!((f.generated_tokens, tokens), (3 + i, 3 + i));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(rx.blocking_recv().is_none(), "nothing after Finished");
    }
    wait(&handle, "idle", |h| h.stats().running.load(Ordering::SeqCst) == 0);
    assert_eq!(handle.stats().caches_in_use.load(Ordering::SeqCst), 0);
    handle.stop();
    thread.join().unwrap();
}

/// Prompts that arrive together give each stream bitwise what it gets alone, whether the
/// model may share prefill steps (this machine's load-time check) or not (forced off, as on a
/// machine whose `sgemm` rows are not batch-invariant): both branches run on every machine.
#[test]
fn prompts_arriving_together_equal_each_alone_with_or_without_shared_prefill() {
    let prompts: [&[u32]; 4] =
        [&[15496, 13], &[464, 2068, 7586, 21831, 18045], &[50, 60, 70], &[11, 12, 13, 14]];
    let request = |i: usize| ValidRequest {
        request_id: format!("p{i}"),
        prompt: prompts[i].to_vec(),
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: 50,
            seed: 100 + i as u64,
            ..SamplingParams::greedy()
        },
        stopping: Stopping {
            max_new_tokens: 6,
            stop_token_ids: vec![],
            ignore_eos: true,
            eos_token_id: 50256,
        },
        logprobs: true,
        top_logprobs: 0,
    };
    let natural = model();
    let forced_off = Arc::new(
        Gpt2::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny"),
        )
        .unwrap()
        .without_shared_prefill(),
    );
    for model in [natural, forced_off] {
        let alone: Vec<(Vec<u32>, Vec<f32>)> = (0..prompts.len())
            .map(|i| {
                let g = llorch_engine::generate(&model, request(i), 256, |_| {}).unwrap();
                (g.ids(), g.tokens.iter().map(|t| t.logprob).collect())
            })
            .collect();
        let config = SchedulerConfig { max_batch: 8, max_queue: 8, prefill_chunk: 256 };
        let (handle, thread) = scheduler::spawn(Arc::clone(&model), config).unwrap();
        let rxs: Vec<_> = (0..prompts.len())
            .map(|i| {
                let req = request(i);
                let capacity = scheduler::event_capacity(req.stopping.max_new_tokens);
                let (events, rx) = tokio::sync::mpsc::channel(capacity);
                let job = Job { req, events, deadline: None, span: tracing::Span::none() };
                handle.submit(job).unwrap();
                rx
            })
            .collect();
        for (i, mut rx) in rxs.into_iter().enumerate() {
            let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
            loop {
                match rx.blocking_recv() {
                    Some(Event::Token(t)) => {
                        ids.push(t.token.id);
                        logprobs.push(t.token.logprob);
                    }
                    Some(Event::Finished(_)) => break,
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(
                (ids, logprobs),
                alone[i],
                "prompt {i}, shared_prefill = {}",
                model.shared_prefill()
            );
        }
        handle.stop();
        thread.join().unwrap();
    }
}
