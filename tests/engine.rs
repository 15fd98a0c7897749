//! The engine thread and the schedule built from a pipeline file.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use starling::engine::observe::EngineTelemetry;
use starling::engine::pipeline::PipelineSpec;
use starling::engine::resources::{EngineLimits, EngineStatus, Policies, StageLog, TickReport};
use starling::engine::scheduler::TenantLimits;
use starling::engine::{EngineHandle, EngineParts, build_world};
use starling::kv::arena::KvArena;
use starling::kv::cache::KvCache;
use starling::protocol::{EngineCommand, FinishReason, GenerateRequest, PromptInput, StreamEvent};
use starling::sampler::{SamplerLimits, SamplingParams};
use starling::tokenizer::GgufTokenizer;
use starling::types::{RequestId, TenantId};

use crate::model::smollm2_shared;

pub fn limits() -> EngineLimits {
    EngineLimits {
        max_batch: 8,
        max_batch_tokens: 256,
        max_prompt_tokens: 2048,
        n_ctx: 8192,
        high_watermark: 64,
        high_watermark_tokens: 1 << 20,
        low_watermark: 48,
        max_sessions: 16,
        session_ttl: Duration::from_secs(600),
        stream_stall: Duration::from_secs(30),
        speculative: None,
    }
}

/// Engine parts around the real model with the given pipeline.
pub fn parts(pipeline: PipelineSpec) -> EngineParts {
    let model = smollm2_shared();
    let tokenizer = Arc::new(GgufTokenizer::from_gguf(&model.file().header).unwrap());
    let layout = model.kv_layout(16);
    EngineParts {
        kv: KvCache::new(KvArena::new(layout, 64 << 20).unwrap(), None),
        model,
        tokenizer,
        limits: limits(),
        tenants: TenantLimits::default(),
        pipeline,
        policies: Policies::default(),
        control_capacity: 64,
        max_queue_delay: Duration::ZERO,
        telemetry: EngineTelemetry::observed_by(&starling::telemetry::Observability::new().unwrap(), "test", false),
    }
}

/// A greedy request for `prompt` with `max_tokens`, and the receiver of its events.
pub fn request(prompt: &str, max_tokens: u32) -> (GenerateRequest, tokio::sync::mpsc::Receiver<StreamEvent>) {
    with_params(prompt, SamplingParams { temperature: Some(0.0), max_tokens: Some(max_tokens), ..Default::default() })
}

/// A request that runs until it is cancelled (1000 tokens, end-of-generation ignored).
pub fn long_request(prompt: &str) -> (GenerateRequest, tokio::sync::mpsc::Receiver<StreamEvent>) {
    let params = SamplingParams { max_tokens: Some(1000), ignore_eos: Some(true), ..Default::default() };
    with_params(prompt, params)
}

fn with_params(prompt: &str, params: SamplingParams) -> (GenerateRequest, tokio::sync::mpsc::Receiver<StreamEvent>) {
    let limits = SamplerLimits { vocab_size: 49152, max_stop_strings: 8, default_max_tokens: 16, max_tokens_cap: 4096 };
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let req = GenerateRequest {
        constraint: None,
        keep_special: false,
        id: RequestId::next(),
        client_id: None,
        tenant: TenantId::from("anonymous"),
        session: None,
        input: PromptInput::Text { text: prompt.into(), parse_special: true },
        sampling: params.validate(&limits).unwrap(),
        timeout: Duration::from_secs(60),
        received_at: Instant::now(),
        events: tx,
    };
    (req, rx)
}

/// Reads events until the final one; returns the token ids and the final event.
pub fn drain(rx: &mut tokio::sync::mpsc::Receiver<StreamEvent>) -> (Vec<u32>, StreamEvent) {
    let mut ids = Vec::new();
    loop {
        match rx.blocking_recv().expect("engine sent a final event") {
            StreamEvent::Token { id, .. } => ids.push(id),
            StreamEvent::Started { .. } => {}
            last => return (ids, last),
        }
    }
}

/// Reads events until the first token; any other outcome fails the test.
fn wait_for_token(rx: &mut tokio::sync::mpsc::Receiver<StreamEvent>) {
    loop {
        match rx.blocking_recv() {
            Some(StreamEvent::Token { .. }) => return,
            Some(StreamEvent::Started { .. }) => {}
            other => panic!("expected a token, got {other:?}"),
        }
    }
}

#[test]
fn engine_thread_serves_a_request_and_shuts_down() {
    let engine = EngineHandle::spawn(parts(PipelineSpec::default_spec())).unwrap();
    let (req, mut rx) = request("The capital of France is", 5);
    engine.send(EngineCommand::Generate(Box::new(req))).unwrap();
    let (ids, last) = drain(&mut rx);
    // llama.cpp's greedy continuation (tests/fixtures/smollm2/greedy.jsonl), before its
    // first close race with f32 arithmetic.
    assert_eq!(ids, [7042, 30, 198, 198, 504]);
    match last {
        StreamEvent::Done { finish_reason, usage, .. } => {
            assert_eq!(finish_reason, FinishReason::Length);
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 5));
        }
        other => panic!("expected done, got {other:?}"),
    }
    let status = engine.status.clone();
    // Status is published after each tick; `done` went out during the fifth.
    assert!(status.ticks.load(Ordering::Relaxed) >= 4);
    let deadline = Instant::now() + Duration::from_secs(5);
    while status.kv_blocks_used.load(Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "blocks still held after the request finished");
        std::thread::sleep(Duration::from_millis(1));
    }
    engine.shutdown();
    assert!(status.stopped.load(Ordering::Relaxed));
}

#[test]
fn idle_engine_blocks_instead_of_spinning() {
    let engine = EngineHandle::spawn(parts(PipelineSpec::default_spec())).unwrap();
    let status: Arc<EngineStatus> = engine.status.clone();
    std::thread::sleep(Duration::from_millis(200));
    let before = status.ticks.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1200));
    let idle_ticks = status.ticks.load(Ordering::Relaxed) - before;
    // Idle, the loop wakes only to sweep session TTLs (every 500 ms): a busy loop would
    // tick thousands of times here.
    assert!(idle_ticks <= 4, "{idle_ticks} ticks while idle");
    engine.shutdown();
}

#[test]
fn shutdown_cancels_in_flight_requests_with_a_final_event() {
    let engine = EngineHandle::spawn(parts(PipelineSpec::default_spec())).unwrap();
    let (req, mut rx) = long_request("Once upon a time");
    engine.send(EngineCommand::Generate(Box::new(req))).unwrap();
    // Wait for generation to start, then stop the engine.
    wait_for_token(&mut rx);
    engine.shutdown();
    let (_, last) = drain(&mut rx);
    assert!(matches!(last, StreamEvent::Done { finish_reason: FinishReason::Cancelled, .. }), "{last:?}");
}

#[test]
fn a_no_op_tick_runs_every_stage_in_file_order() {
    let text = "name: custom\nstages: [{stage: admit}, {stage: evict}, {stage: tokenize}, {stage: input_policy}, \
                {stage: batch}, {stage: forward}, {stage: sample}, {stage: output_policy}, {stage: emit}]";
    let spec = PipelineSpec::parse(text, "custom").unwrap();
    let (mut world, mut schedule) = build_world(parts(spec), Arc::new(EngineStatus::default()));
    world.resource_mut::<StageLog>().enabled = true;
    schedule.run(&mut world);
    schedule.run(&mut world);
    let names: Vec<&str> = world.resource::<StageLog>().stages.iter().map(|s| s.name()).collect();
    let once = ["admit", "evict", "tokenize", "input_policy", "batch", "forward", "sample", "output_policy", "emit"];
    assert_eq!(names[..9], once);
    assert_eq!(names[9..], once);
    assert_eq!(world.resource::<TickReport>().forward_calls, 0, "an empty world runs no forward pass");
}

#[test]
fn a_dropped_receiver_cancels_and_frees_blocks() {
    let engine = EngineHandle::spawn(parts(PipelineSpec::default_spec())).unwrap();
    let (req, mut rx) = long_request("Tell me a long story about a dragon.");
    engine.send(EngineCommand::Generate(Box::new(req))).unwrap();
    wait_for_token(&mut rx);
    // The status is published after each tick: wait for the running sequence to show.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.status.kv_blocks_used.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the running sequence never held blocks");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(rx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.status.kv_blocks_used.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "blocks still held after the client left");
        std::thread::sleep(Duration::from_millis(5));
    }
    engine.shutdown();
}

mod policy {
    use super::*;
    use starling::engine::resources::{Inbox, TickClock};
    use starling::error::ErrorKind;
    use starling::sampler::PolicyRules;
    use starling::types::Timestamp;

    fn rules(phrases: &[&str]) -> Arc<PolicyRules> {
        Arc::new(PolicyRules::new(&phrases.iter().map(|p| p.to_string()).collect::<Vec<_>>(), &[]).unwrap())
    }

    /// Runs `prompt` through the guarded pipeline tick by tick; returns its events and the
    /// number of forward passes.
    fn run_guarded(prompt: &str, policies: Policies) -> (Vec<StreamEvent>, u64) {
        let spec = PipelineSpec::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/guarded.yaml"))
            .unwrap();
        let mut p = parts(spec);
        p.policies = policies;
        let (mut world, mut schedule) = build_world(p, Arc::new(EngineStatus::default()));
        let (req, mut rx) = request(prompt, 8);
        world.resource_mut::<Inbox>().0.push_back(EngineCommand::Generate(Box::new(req)));
        let mut events = Vec::new();
        for tick in 1..=40 {
            *world.resource_mut::<TickClock>() = TickClock { now: Timestamp(tick * 1000), tick, live: None };
            schedule.run(&mut world);
            while let Ok(e) = rx.try_recv() {
                events.push(e);
            }
            if matches!(events.last(), Some(StreamEvent::Done { .. } | StreamEvent::Error(_))) {
                break;
            }
        }
        (events, world.resource::<TickReport>().forward_calls)
    }

    #[test]
    fn a_refused_prompt_never_reaches_forward() {
        let policies = Policies { input: vec![(None, rules(&["forbidden topic"]))], output: vec![] };
        let (events, forwards) = run_guarded("Tell me about the FORBIDDEN topic, please.", policies);
        match events.last() {
            Some(StreamEvent::Error(e)) => {
                assert_eq!(e.kind, ErrorKind::ContentPolicy);
                assert_eq!(e.status(), 400);
            }
            other => panic!("expected a content_policy error, got {other:?}"),
        }
        assert_eq!(forwards, 0, "the refused prompt ran a forward pass");
    }

    #[test]
    fn an_output_rule_ends_the_stream_without_streaming_the_match() {
        let policies = Policies { input: vec![], output: vec![(None, rules(&["Paris"]))] };
        let (events, forwards) = run_guarded("The capital of France is", policies);
        assert!(forwards >= 1);
        let streamed: String = events
            .iter()
            .map(|e| match e {
                StreamEvent::Token { text, .. } => text.clone(),
                StreamEvent::Done { text, .. } => text.clone(),
                _ => String::new(),
            })
            .collect();
        assert!(!streamed.to_lowercase().contains("paris"), "the matched text was streamed: {streamed:?}");
        assert!(
            matches!(events.last(), Some(StreamEvent::Done { finish_reason: FinishReason::ContentFilter, .. })),
            "{:?}",
            events.last()
        );

        // Without the rule the same greedy request does produce the text.
        let (events, _) = run_guarded("The capital of France is", Policies::default());
        let text: String = events
            .iter()
            .filter_map(|e| if let StreamEvent::Token { text, .. } = e { Some(text.as_str()) } else { None })
            .collect();
        assert!(text.contains("Paris"), "{text:?}");
    }
}

#[test]
fn the_pipeline_names_the_default_sampler_order() {
    use starling::engine::load::default_sampler_order;
    use starling::sampler::SamplerStep;
    let default = PipelineSpec::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/default.yaml"));
    assert_eq!(default_sampler_order(&default.unwrap()).unwrap(), SamplerStep::DEFAULT_ORDER.to_vec());
    let pipeline = |samplers: &str| {
        let text = format!(
            "stages: [{{stage: admit}}, {{stage: tokenize}}, {{stage: batch}}, {{stage: forward}}, \
             {{stage: sample, params: {{samplers: [{samplers}]}}}}, {{stage: emit}}, {{stage: evict}}]"
        );
        PipelineSpec::parse(&text, "p").unwrap()
    };
    assert_eq!(
        default_sampler_order(&pipeline("top_k, temperature")).unwrap(),
        vec![SamplerStep::TopK, SamplerStep::Temperature]
    );
    let err = default_sampler_order(&pipeline("top_q")).unwrap_err().to_string();
    assert!(err.contains("samplers") && err.contains("top_q"), "{err}");
}

/// The real model, except that a batch holding `FAIL` fails, and that `n_vocab` panics while
/// `armed` (a panic outside the model's forward call, where only a restart can recover).
struct Faulty {
    inner: Arc<starling::model::transformer::Transformer>,
    armed: std::sync::atomic::AtomicBool,
}

const FAIL: u32 = 4242;

impl starling::model::runtime::ModelRuntime for Faulty {
    fn n_vocab(&self) -> usize {
        assert!(!self.armed.load(Ordering::Relaxed), "injected panic");
        self.inner.desc.n_vocab
    }

    fn n_ctx(&self) -> usize {
        self.inner.desc.n_ctx_train
    }

    fn kv_layout(&self, block_tokens: usize) -> starling::kv::arena::KvLayout {
        self.inner.kv_layout(block_tokens)
    }

    fn forward(
        &self,
        batch: &[starling::model::transformer::SeqChunk],
        kv: &mut KvArena,
        logits: &mut Vec<f32>,
    ) -> Result<(), starling::model::transformer::ModelError> {
        if batch.iter().any(|c| c.tokens.contains(&FAIL)) {
            let message = "injected failure".to_owned();
            return Err(starling::model::transformer::ModelError::Tensor { name: "test".into(), message });
        }
        self.inner.forward(batch, kv, logits)
    }
}

fn faulty_engine() -> (EngineHandle, Arc<Faulty>) {
    let faulty = Arc::new(Faulty { inner: smollm2_shared(), armed: false.into() });
    let mut p = parts(PipelineSpec::default_spec());
    p.model = faulty.clone();
    (EngineHandle::spawn(p).unwrap(), faulty)
}

fn ids_request(ids: Vec<u32>, max_tokens: u32) -> (GenerateRequest, tokio::sync::mpsc::Receiver<StreamEvent>) {
    let (mut req, rx) = request("", max_tokens);
    req.input = PromptInput::Tokens(ids);
    (req, rx)
}

/// A forward pass that fails on one sequence of a batch fails only that request: the
/// others, run again alone, finish with exactly the tokens they get alone.
#[test]
fn a_failed_forward_fails_only_the_request_it_is_pinned_on() {
    let prompts: Vec<Vec<u32>> =
        vec![vec![504, 3458, 282, 4649, 314], vec![10, 20, 30, 40], vec![7, FAIL, 9], vec![500, 501]];
    let (engine, _) = faulty_engine();
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .filter(|p| !p.contains(&FAIL))
        .map(|p| {
            let (req, mut rx) = ids_request(p.clone(), 6);
            engine.send(EngineCommand::Generate(Box::new(req))).unwrap();
            drain(&mut rx).0
        })
        .collect();
    let mut streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (req, rx) = ids_request(p.clone(), 6);
            engine.send(EngineCommand::Generate(Box::new(req))).unwrap();
            rx
        })
        .collect();
    let results: Vec<(Vec<u32>, StreamEvent)> = streams.iter_mut().map(drain).collect();
    let mut good = alone.iter();
    for (p, (ids, last)) in prompts.iter().zip(&results) {
        if p.contains(&FAIL) {
            assert!(matches!(last, StreamEvent::Error(e) if e.message.contains("injected failure")), "{last:?}");
        } else {
            assert!(matches!(last, StreamEvent::Done { .. }), "{last:?}");
            assert_eq!(ids, good.next().unwrap(), "a batch-mate of the failure changed its output");
        }
    }
    assert_eq!(engine.status.restarts.load(Ordering::Relaxed), 0);
    engine.shutdown();
}

/// A panic that escapes a stage ends the requests in flight with an error, and the engine
/// thread restarts on an emptied KV cache and serves the next request as before.
#[test]
fn an_engine_that_panics_restarts_and_serves_again() {
    let (engine, faulty) = faulty_engine();
    let (req, mut before) = request("The capital of France is", 5);
    engine.send(EngineCommand::Generate(Box::new(req))).unwrap();
    let want = drain(&mut before).0;
    let (req, mut running) = long_request("Once upon a time");
    engine.send(EngineCommand::Generate(Box::new(req))).unwrap();
    wait_for_token(&mut running);
    faulty.armed.store(true, Ordering::Relaxed);
    let (poison, mut poisoned) = ids_request(vec![FAIL], 3);
    engine.send(EngineCommand::Generate(Box::new(poison))).unwrap();
    let restarted = |e: &StreamEvent| matches!(e, StreamEvent::Error(e) if e.code == Some("engine_restarted"));
    assert!(restarted(&drain(&mut running).1), "the running request ends with an error");
    assert!(restarted(&drain(&mut poisoned).1));
    faulty.armed.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.status.restarting.load(Ordering::Relaxed) || engine.status.restarts.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the engine did not restart");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (req, mut after) = request("The capital of France is", 5);
    engine.send(EngineCommand::Generate(Box::new(req))).unwrap();
    let (ids, last) = drain(&mut after);
    assert!(matches!(last, StreamEvent::Done { .. }), "{last:?}");
    assert_eq!(ids, want, "the restarted engine gives the same tokens");
    assert!(!engine.status.stopped.load(Ordering::Relaxed));
    assert_eq!(engine.status.restarts.load(Ordering::Relaxed), 1);
    engine.shutdown();
}
