//! The scheduler in the tick, with the real model and ticks run by hand (`TickClock`
//! injected): batching correctness, fairness, backpressure, cancellation, deadlines.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bevy_ecs::prelude::*;
use starling::engine::components::{Phase, Request};
use starling::engine::observe::EngineTelemetry;
use starling::engine::pipeline::PipelineSpec;
use starling::engine::resources::{EngineLimits, EngineStatus, Kv, Policies, TickClock};
use starling::engine::scheduler::{SchedulerStats, TenantLimits, TenantShare};
use starling::engine::{EngineParts, build_world};
use starling::grammar::{Grammar, GrammarLimits, Grammars};
use starling::kv::arena::KvArena;
use starling::kv::cache::KvCache;
use starling::model::transformer::Transformer;
use starling::protocol::{Constraint, EngineCommand, FinishReason, GenerateRequest, PromptInput, StreamEvent};
use starling::sampler::{SamplerLimits, SamplingConfig, SamplingParams};
use starling::tokenizer::GgufTokenizer;
use starling::types::{RequestId, TenantId, Timestamp};
use tokio::sync::{mpsc, oneshot};

pub(crate) fn model() -> Arc<Transformer> {
    static MODEL: OnceLock<Arc<Transformer>> = OnceLock::new();
    MODEL.get_or_init(|| Arc::new(Transformer::load(&super::model::model_path(), 2).expect("model loads"))).clone()
}

pub(crate) fn tokenizer() -> Arc<GgufTokenizer> {
    static TOK: OnceLock<Arc<GgufTokenizer>> = OnceLock::new();
    TOK.get_or_init(|| Arc::new(GgufTokenizer::from_gguf(&model().file().header).expect("tokenizer builds"))).clone()
}

pub(crate) fn limits(max_batch: usize, max_batch_tokens: usize) -> EngineLimits {
    EngineLimits {
        max_batch,
        max_batch_tokens,
        max_prompt_tokens: 4096,
        n_ctx: model().desc.n_ctx_train,
        high_watermark: 1000,
        low_watermark: 900,
        high_watermark_tokens: 1 << 20,
        max_sessions: 16,
        session_ttl: Duration::from_secs(600),
        stream_stall: Duration::from_secs(30),
        speculative: None,
    }
}

fn sampling(max_tokens: u32, temperature: f32, seed: u64) -> SamplingConfig {
    let params = SamplingParams {
        temperature: Some(temperature),
        max_tokens: Some(max_tokens),
        ignore_eos: Some(true),
        seed: Some(seed),
        ..Default::default()
    };
    let limits = SamplerLimits { vocab_size: 49152, max_stop_strings: 8, default_max_tokens: 16, max_tokens_cap: 4096 };
    params.validate(&limits).expect("valid sampling")
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 200 + (i * 37 + salt * 101) % 20000).collect()
}

/// A world with the real model whose ticks the test runs one by one.
pub(crate) struct Harness {
    pub(crate) world: World,
    schedule: Schedule,
    tick: u64,
    now_ms: u64,
    obs: starling::telemetry::Observability,
}

impl Harness {
    pub(crate) fn new(limits: EngineLimits, tenants: TenantLimits, kv_bytes: u64) -> Harness {
        let m = model();
        let kv = KvCache::new(KvArena::new(m.kv_layout(16), kv_bytes).expect("kv arena"), None);
        let obs = starling::telemetry::Observability::new().unwrap();
        let parts = EngineParts {
            model: m,
            tokenizer: tokenizer(),
            kv,
            limits,
            tenants,
            pipeline: PipelineSpec::default_spec(),
            policies: Policies::default(),
            control_capacity: 64,
            max_queue_delay: Duration::ZERO,
            telemetry: EngineTelemetry::observed_by(&obs, "test", false),
        };
        let (world, schedule) = build_world(parts, Arc::new(EngineStatus::default()));
        Harness { world, schedule, tick: 0, now_ms: 0, obs }
    }

    pub(crate) fn submit(&mut self, tenant: &str, ids: Vec<u32>, sampling: SamplingConfig, capacity: usize) -> Stream {
        self.submit_with_timeout(tenant, ids, sampling, capacity, Duration::from_secs(600))
    }

    fn submit_with_timeout(
        &mut self,
        tenant: &str,
        ids: Vec<u32>,
        sampling: SamplingConfig,
        capacity: usize,
        timeout: Duration,
    ) -> Stream {
        self.send(tenant, None, ids, sampling, capacity, timeout)
    }

    pub(crate) fn submit_in_session(
        &mut self,
        tenant: &str,
        session: &str,
        ids: Vec<u32>,
        sampling: SamplingConfig,
    ) -> Stream {
        self.send(tenant, Some(session), ids, sampling, 256, Duration::from_secs(600))
    }

    /// A request whose output follows `schema` (compiled as the gateway compiles it).
    fn submit_constrained(&mut self, ids: Vec<u32>, sampling: SamplingConfig, schema: &serde_json::Value) -> Stream {
        static GRAMMARS: OnceLock<Grammars> = OnceLock::new();
        let grammars = GRAMMARS.get_or_init(|| Grammars::new(tokenizer(), GrammarLimits::default()));
        let compiled = grammars.compile(&Grammar::JsonSchema(schema.clone())).expect("the schema compiles");
        let (mut req, stream) = request("a", None, ids, sampling, 256, Duration::from_secs(600));
        req.constraint = Some(Constraint(Box::new(compiled.constraint)));
        self.world.resource_mut::<starling::engine::resources::Inbox>().0.push_back(EngineCommand::Generate(req));
        stream
    }

    fn send(
        &mut self,
        tenant: &str,
        session: Option<&str>,
        ids: Vec<u32>,
        sampling: SamplingConfig,
        capacity: usize,
        timeout: Duration,
    ) -> Stream {
        let (req, stream) = request(tenant, session, ids, sampling, capacity, timeout);
        self.world.resource_mut::<starling::engine::resources::Inbox>().0.push_back(EngineCommand::Generate(req));
        stream
    }

    /// Queues a cancel of `tenant`'s request named `name`; the reply comes in the next tick.
    pub(crate) fn cancel(
        &mut self,
        tenant: &str,
        name: &str,
    ) -> oneshot::Receiver<Result<(), starling::error::ApiError>> {
        let (reply, rx) = oneshot::channel();
        let cmd = EngineCommand::Cancel { tenant: TenantId::from(tenant), request_id: name.to_owned(), reply };
        self.world.resource_mut::<starling::engine::resources::Inbox>().0.push_back(cmd);
        rx
    }

    pub(crate) fn run_tick(&mut self) {
        self.tick += 1;
        self.now_ms += 1;
        *self.world.resource_mut::<TickClock>() =
            TickClock { now: Timestamp(self.now_ms * 1000), tick: self.tick, live: None };
        self.schedule.run(&mut self.world);
        starling::engine::observe::after_tick(&mut self.world, Instant::now());
    }

    /// The value of a metric series of this engine (model label `test`).
    pub(crate) fn metric(&self, name: &str) -> f64 {
        let text = self.obs.metrics.render();
        let prefix = format!("{name}{{model=\"test\"}} ");
        let line = text.lines().find_map(|l| l.strip_prefix(&prefix));
        line.unwrap_or_else(|| panic!("no series {prefix}")).trim().parse().unwrap()
    }

    pub(crate) fn kv_used(&self) -> usize {
        self.world.resource::<Kv>().0.n_referenced()
    }

    fn count(&mut self, f: impl Fn(&Phase) -> bool) -> usize {
        self.world.query::<&Phase>().iter(&self.world).filter(|p| f(p)).count()
    }

    pub(crate) fn live_requests(&mut self) -> usize {
        self.world.query::<&Request>().iter(&self.world).count()
    }

    pub(crate) fn stats(&self) -> SchedulerStats {
        self.world.resource::<SchedulerStats>().clone()
    }
}

/// A request of `tenant` for `ids`, and the client's end of its stream.
fn request(
    tenant: &str,
    session: Option<&str>,
    ids: Vec<u32>,
    sampling: SamplingConfig,
    capacity: usize,
    timeout: Duration,
) -> (Box<GenerateRequest>, Stream) {
    let (tx, rx) = mpsc::channel(capacity);
    let id = RequestId::next();
    let req = GenerateRequest {
        constraint: None,
        keep_special: false,
        id,
        client_id: None,
        tenant: TenantId::from(tenant),
        session: session.map(starling::types::SessionId::from),
        input: PromptInput::Tokens(ids),
        sampling,
        timeout,
        received_at: Instant::now(),
        events: tx,
    };
    (Box::new(req), Stream { rx, events: vec![], name: id.to_string() })
}

/// A client's end of one request: events received so far.
pub(crate) struct Stream {
    rx: mpsc::Receiver<StreamEvent>,
    pub(crate) events: Vec<StreamEvent>,
    /// The name a cancel takes (`req-N` for requests sent without a client id).
    pub(crate) name: String,
}

impl Stream {
    pub(crate) fn drain(&mut self) {
        while let Ok(e) = self.rx.try_recv() {
            self.events.push(e);
        }
    }

    pub(crate) fn tokens(&self) -> Vec<u32> {
        self.events
            .iter()
            .filter_map(|e| if let StreamEvent::Token { id, .. } = e { Some(*id) } else { None })
            .collect()
    }

    pub(crate) fn finish(&self) -> Option<FinishReason> {
        self.events
            .iter()
            .find_map(|e| if let StreamEvent::Done { finish_reason, .. } = e { Some(*finish_reason) } else { None })
    }

    pub(crate) fn error(&self) -> Option<&starling::error::ApiError> {
        self.events.iter().find_map(|e| if let StreamEvent::Error(err) = e { Some(err) } else { None })
    }
}

pub(crate) const KV_BYTES: u64 = 256 << 20;

fn run_alone(ids: Vec<u32>, sampling: SamplingConfig) -> Vec<u32> {
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), KV_BYTES);
    let mut s = h.submit("a", ids, sampling, 256);
    for _ in 0..200 {
        h.run_tick();
        s.drain();
        if s.finish().is_some() {
            break;
        }
    }
    assert_eq!(s.finish(), Some(FinishReason::Length), "{:?}", s.error());
    s.tokens()
}

#[test]
fn concurrent_requests_get_exactly_the_tokens_they_get_alone() {
    let cases: Vec<(Vec<u32>, SamplingConfig)> = vec![
        (prompt(3, 1), sampling(10, 0.0, 1)),
        (prompt(17, 2), sampling(10, 0.9, 7)),
        (prompt(70, 3), sampling(10, 0.0, 1)),
        (prompt(150, 4), sampling(10, 0.7, 11)),
    ];
    let alone: Vec<Vec<u32>> = cases.iter().map(|(p, s)| run_alone(p.clone(), s.clone())).collect();
    // Together: the budget (64) forces chunked prefill; two requests join mid-run.
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), KV_BYTES);
    let mut streams: Vec<Stream> = vec![];
    let mut max_batch_seen = 0;
    for tick in 0..200 {
        if tick == 0 || tick == 3 {
            for (p, s) in cases.iter().skip(streams.len()).take(2) {
                streams.push(h.submit("a", p.clone(), s.clone(), 256));
            }
        }
        h.run_tick();
        max_batch_seen = max_batch_seen.max(h.world.resource::<starling::engine::resources::BatchPlan>().items.len());
        streams.iter_mut().for_each(Stream::drain);
        if streams.len() == 4 && streams.iter().all(|s| s.finish().is_some()) {
            break;
        }
    }
    assert!(max_batch_seen >= 3, "requests ran concurrently (largest batch {max_batch_seen})");
    for (i, (s, want)) in streams.iter().zip(&alone).enumerate() {
        assert_eq!(&s.tokens(), want, "request {i} differs under load");
    }
    assert_eq!(h.kv_used(), 0, "every block returned");
}

#[test]
fn tenants_with_weights_1_to_3_get_tokens_in_that_ratio() {
    let tenants = TenantLimits::default()
        .with("light", TenantShare { weight: 1, max_concurrent: 64, max_queued: 1000, max_sessions: 64 })
        .with("heavy", TenantShare { weight: 3, max_concurrent: 64, max_queued: 1000, max_sessions: 64 });
    let mut h = Harness::new(limits(4, 64), tenants, KV_BYTES);
    // The weight-1 tenant floods first: arrival order alone would give it every slot.
    let mut streams: Vec<(&str, Stream)> = vec![];
    for tenant in ["light", "heavy"] {
        for i in 0..60 {
            streams.push((tenant, h.submit(tenant, prompt(4, i), sampling(4, 0.0, 1), 64)));
        }
    }
    for _ in 0..60 {
        h.run_tick();
        streams.iter_mut().for_each(|(_, s)| s.drain());
    }
    let mut got: HashMap<&str, usize> = HashMap::new();
    for (tenant, s) in &streams {
        *got.entry(tenant).or_default() += s.tokens().len();
    }
    let (light, heavy) = (got["light"], got["heavy"]);
    let ratio = heavy as f64 / light as f64;
    eprintln!("tokens over 60 ticks: light {light}, heavy {heavy}, ratio {ratio:.3}");
    assert!(light > 20 && heavy < 60 * 4, "both tenants saturated the run ({light}, {heavy})");
    assert!((ratio - 3.0).abs() <= 0.3, "ratio {ratio:.3} not within 10% of 3");
}

/// Bound: a short request's first token is emitted in the tick it is admitted, whatever
/// the long prompts of another tenant (prefill budget is split by weight each tick).
#[test]
fn long_prompts_of_one_tenant_do_not_delay_another_tenants_first_token() {
    let mut h = Harness::new(limits(8, 256), TenantLimits::default(), KV_BYTES);
    let mut bulk: Vec<Stream> = (0..2).map(|i| h.submit("bulk", prompt(2000, i), sampling(4, 0.0, 1), 64)).collect();
    h.run_tick();
    let mut short = h.submit("short", prompt(8, 9), sampling(4, 0.0, 1), 64);
    h.run_tick();
    short.drain();
    bulk.iter_mut().for_each(Stream::drain);
    assert_eq!(short.tokens().len(), 1, "first token in the admission tick: {:?}", short.events);
    assert!(bulk.iter().all(|s| s.tokens().is_empty()), "the 2000-token prompts are still prefilling");
    let plan = h.world.resource::<starling::engine::resources::BatchPlan>();
    assert_eq!(plan.total_tokens(), 256, "the rest of the budget still went to the long prompts");
}

#[test]
fn a_flood_gets_429_at_the_high_watermark_and_admission_reopens_at_the_low_one() {
    let mut lim = limits(1, 64);
    (lim.high_watermark, lim.low_watermark) = (4, 2);
    let mut h = Harness::new(lim, TenantLimits::default(), KV_BYTES);
    let mut accepted: Vec<Stream> = vec![];
    let mut rejected = 0;
    let mut reopened_at_depth = None;
    let mut closed = false;
    for tick in 0..80 {
        let depth_before = h.count(|p| *p == Phase::Queued);
        let burst = if tick == 0 { 10 } else { 1 };
        let mut new: Vec<Stream> = (0..burst).map(|i| h.submit("a", prompt(5, i), sampling(2, 0.0, 1), 16)).collect();
        h.run_tick();
        assert!(h.stats().queue_depth <= 4, "the queue passed the watermark");
        for mut s in new.drain(..) {
            s.drain();
            match s.error() {
                Some(e) => {
                    assert_eq!((e.status(), e.code, e.retry_after), (429, Some("queue_full"), Some(1)));
                    rejected += 1;
                    closed = true;
                }
                None => {
                    if closed && reopened_at_depth.is_none() {
                        reopened_at_depth = Some(depth_before);
                    }
                    accepted.push(s);
                }
            }
        }
        accepted.iter_mut().for_each(Stream::drain);
    }
    assert!(rejected >= 6, "the burst past the watermark was refused ({rejected})");
    assert!(reopened_at_depth.is_some_and(|d| d <= 2), "reopened at depth {reopened_at_depth:?}, not at the low mark");
    for _ in 0..40 {
        h.run_tick();
        accepted.iter_mut().for_each(Stream::drain);
    }
    assert!(accepted.iter().all(|s| s.finish() == Some(FinishReason::Length)), "every accepted request completed");
    assert_eq!(h.stats().rejections(starling::engine::scheduler::Rejection::QueueFull), rejected as u64);
    assert_eq!(h.stats().admitted, accepted.len() as u64);
}

#[test]
fn a_dropped_stream_frees_its_kv_blocks_within_one_tick() {
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), KV_BYTES);
    let mut s = h.submit("a", prompt(40, 1), sampling(100, 0.0, 1), 256);
    let mut other = h.submit("b", prompt(10, 2), sampling(100, 0.0, 1), 256);
    for _ in 0..3 {
        h.run_tick();
    }
    s.drain();
    assert!(!s.tokens().is_empty(), "decoding before the drop");
    let used_both = h.kv_used();
    drop(s);
    h.run_tick();
    assert_only_the_ended_request_left(&mut h, used_both, &mut other);
}

/// After one of two requests ended (a 40-token prompt and a few generated tokens): its 3
/// blocks of 16 are free, and the other request is still live and generating.
fn assert_only_the_ended_request_left(h: &mut Harness, used_both: usize, other: &mut Stream) {
    assert_eq!(used_both - h.kv_used(), 3, "40 prompt + a few generated positions = 3 blocks of 16 freed");
    assert_eq!(h.live_requests(), 1);
    other.drain();
    assert!(other.finish().is_none(), "the other request keeps going");
}

#[test]
fn a_request_past_its_deadline_ends_with_deadline_and_keeps_what_it_got() {
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), KV_BYTES);
    let mut s = h.submit_with_timeout("a", prompt(8, 1), sampling(100, 0.0, 1), 256, Duration::from_secs(5));
    for _ in 0..3 {
        h.run_tick();
    }
    h.now_ms += 10_000;
    h.run_tick();
    h.run_tick();
    s.drain();
    assert_eq!(s.finish(), Some(FinishReason::Deadline));
    let n = s.tokens().len();
    assert!(n >= 3, "tokens before the deadline were delivered ({n})");
    let usage = s.events.iter().find_map(|e| if let StreamEvent::Done { usage, .. } = e { Some(*usage) } else { None });
    assert_eq!(usage.map(|u| u.completion_tokens), Some(n));
    assert_eq!(h.kv_used(), 0);
}

#[test]
fn a_slow_reader_pauses_only_its_own_sequence() {
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), KV_BYTES);
    let mut slow = h.submit("a", prompt(8, 1), sampling(8, 0.0, 1), 2);
    let mut fast = h.submit("a", prompt(8, 2), sampling(8, 0.0, 1), 64);
    for _ in 0..12 {
        h.run_tick();
        fast.drain();
    }
    assert_eq!(fast.finish(), Some(FinishReason::Length), "the fast reader finished");
    assert!(h.stats().paused > 0, "the slow sequence was paused");
    assert_eq!(h.live_requests(), 1, "the slow one waits");
    for _ in 0..40 {
        slow.drain();
        h.run_tick();
    }
    slow.drain();
    assert_eq!(slow.finish(), Some(FinishReason::Length));
    assert_eq!(slow.tokens(), run_alone(prompt(8, 1), sampling(8, 0.0, 1)), "pausing does not change tokens");
}

#[test]
fn a_tenant_runs_at_most_max_concurrent_and_a_prompt_waits_for_kv_room() {
    let tenants = TenantLimits::default()
        .with("a", TenantShare { weight: 1, max_concurrent: 1, max_queued: 10, max_sessions: 64 });
    let block_bytes = model().kv_layout(16).block_bytes() as u64;
    // 6 blocks of 16: a 70-token prompt needs 5, so two cannot run at once.
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), block_bytes * 6);
    let mut big: Vec<Stream> = (0..2).map(|i| h.submit("b", prompt(70, i), sampling(8, 0.0, 1), 64)).collect();
    let mut max_running_b = 0;
    for _ in 0..60 {
        h.run_tick();
        max_running_b = max_running_b.max(h.count(|p| matches!(p, Phase::Prefill | Phase::Decode)));
        big.iter_mut().for_each(Stream::drain);
    }
    assert_eq!(max_running_b, 1, "the second prompt waited for KV room");
    assert!(big.iter().all(|s| s.finish() == Some(FinishReason::Length)), "both completed");

    let mut h = Harness::new(limits(8, 64), tenants, KV_BYTES);
    let mut reqs: Vec<Stream> = (0..3).map(|i| h.submit("a", prompt(5, i), sampling(3, 0.0, 1), 64)).collect();
    let mut max_running = 0;
    for _ in 0..30 {
        h.run_tick();
        max_running = max_running.max(h.count(|p| matches!(p, Phase::Prefill | Phase::Decode)));
        reqs.iter_mut().for_each(Stream::drain);
    }
    assert_eq!(max_running, 1);
    assert!(reqs.iter().all(|s| s.finish() == Some(FinishReason::Length)));
}

#[test]
fn a_tenant_past_max_queued_gets_429_with_its_reason() {
    let tenants = TenantLimits::default()
        .with("a", TenantShare { weight: 1, max_concurrent: 1, max_queued: 2, max_sessions: 64 });
    let mut h = Harness::new(limits(8, 64), tenants, KV_BYTES);
    let mut a: Vec<Stream> = (0..4).map(|i| h.submit("a", prompt(5, i), sampling(2, 0.0, 1), 64)).collect();
    let mut b = h.submit("b", prompt(5, 9), sampling(2, 0.0, 1), 64);
    h.run_tick();
    a.iter_mut().for_each(Stream::drain);
    b.drain();
    let codes: Vec<Option<&str>> = a.iter().map(|s| s.error().and_then(|e| e.code)).collect();
    assert_eq!(codes, [None, None, Some("tenant_queue_full"), Some("tenant_queue_full")]);
    assert!(b.error().is_none(), "another tenant is unaffected");
    assert_eq!(h.stats().rejected.get("tenant_queue_full"), Some(&2));
}

fn reply_code(
    mut rx: oneshot::Receiver<Result<(), starling::error::ApiError>>,
) -> Result<(), (u16, Option<&'static str>)> {
    rx.try_recv().expect("the engine replied within the tick").map_err(|e| (e.status(), e.code))
}

#[test]
fn an_explicit_cancel_ends_the_request_and_frees_its_blocks_within_one_tick() {
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), KV_BYTES);
    let mut s = h.submit("a", prompt(40, 1), sampling(100, 0.0, 1), 256);
    let mut other = h.submit("b", prompt(10, 2), sampling(100, 0.0, 1), 256);
    // A cancel that arrives in the same inbox batch as its request still finds it.
    let mut early = h.submit("a", prompt(5, 3), sampling(100, 0.0, 1), 256);
    let early_reply = h.cancel("a", &early.name);
    h.run_tick();
    assert_eq!(reply_code(early_reply), Ok(()));
    early.drain();
    assert_eq!((early.finish(), early.tokens().len()), (Some(FinishReason::Cancelled), 0));
    for _ in 0..2 {
        h.run_tick();
    }
    let (unknown, foreign) = (h.cancel("a", "no-such-request"), h.cancel("b", &s.name));
    h.run_tick();
    let not_found = Err((404, Some("request_not_found")));
    assert_eq!(reply_code(unknown), not_found, "an unknown id is not found");
    assert_eq!(reply_code(foreign), not_found, "another tenant's request is not found");
    s.drain();
    assert!(s.finish().is_none() && s.tokens().len() >= 3, "still decoding: {:?}", s.events);
    let used_both = h.kv_used();
    let reply = h.cancel("a", &s.name);
    h.run_tick();
    assert_eq!(reply_code(reply), Ok(()));
    s.drain();
    assert_eq!(s.finish(), Some(FinishReason::Cancelled));
    assert_only_the_ended_request_left(&mut h, used_both, &mut other);
}

#[test]
fn a_cancelled_request_whose_reader_is_behind_frees_its_blocks_at_once() {
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), KV_BYTES);
    // Room for two events: the stream pauses after `started` and one token.
    let mut s = h.submit("a", prompt(20, 1), sampling(100, 0.0, 1), 2);
    for _ in 0..4 {
        h.run_tick();
    }
    assert!(h.kv_used() > 0 && h.stats().paused > 0, "paused on its full channel");
    let reply = h.cancel("a", &s.name);
    h.run_tick();
    assert_eq!(reply_code(reply), Ok(()));
    assert_eq!(h.kv_used(), 0, "blocks freed while the final event still waits");
    for _ in 0..4 {
        s.drain();
        h.run_tick();
    }
    s.drain();
    assert_eq!(s.finish(), Some(FinishReason::Cancelled), "the reader still gets the final event");
    assert_eq!(h.live_requests(), 0);
}

mod http {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use serde_json::json;

    use crate::support::{TestServer, open, post_json_as};

    #[test]
    fn post_v1_cancel_ends_a_stream_by_its_request_id_for_its_tenant_only() {
        let mut s = TestServer::start(|c| {
            c.auth.api_keys = starling::config::parse_api_keys("key-a:alpha,key-b:beta").unwrap();
            for t in ["alpha", "beta"] {
                c.tenants.push(starling::config::TenantConfig::with_defaults(t.into()));
            }
        });
        let body = json!({"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": true, "stream": true});
        let headers =
            [("Content-Type", "application/json"), ("Authorization", "Bearer key-a"), ("x-request-id", "story-1")];
        let conn = open(s.addr, "POST", "/v1/generate", &headers, body.to_string().as_bytes());
        assert_eq!((conn.status, conn.header("x-request-id")), (200, Some("story-1")));
        let mut sse = conn.sse();
        let first = sse.next_event().expect("a first event");
        assert_eq!(first.event.as_deref(), Some("token"));

        let cancel = json!({"request_id": "story-1"});
        let r = post_json_as(s.addr, "key-b", "/v1/cancel", &cancel);
        assert_eq!((r.status, r.json()["error"]["code"].as_str()), (404, Some("request_not_found")));
        let r = post_json_as(s.addr, "key-a", "/v1/cancel", &json!({"request_id": "story-2"}));
        assert_eq!(r.status, 404, "an unknown id");
        let r = post_json_as(s.addr, "key-a", "/v1/cancel", &json!({"request_id": 7}));
        assert_eq!(r.status, 400, "a malformed body");

        let status = s.state.models.snapshot().ready[0].engine.status.clone();
        let r = post_json_as(s.addr, "key-a", "/v1/cancel", &cancel);
        let ticks_at_reply = status.ticks.load(Ordering::Relaxed);
        assert_eq!((r.status, r.json()["cancelled"].as_str()), (200, Some("story-1")));
        let deadline = Instant::now() + Duration::from_secs(10);
        while status.kv_blocks_used.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "blocks still held after the cancel");
            std::thread::sleep(Duration::from_millis(1));
        }
        let ticks = status.ticks.load(Ordering::Relaxed);
        assert!(ticks <= ticks_at_reply + 1, "freed in the cancel's tick ({ticks_at_reply} -> {ticks})");
        let rest = sse.rest();
        let done = rest.iter().find(|e| e.event.as_deref() == Some("done")).expect("a done event");
        assert_eq!(done.json()["finish_reason"], "cancelled");
        let n_tokens = rest.iter().filter(|e| e.event.as_deref() == Some("token")).count() + 1;
        assert!(n_tokens < 400, "the generation stopped early ({n_tokens} tokens)");

        // An OpenAI-shaped stream is cancelled the same way, by its x-request-id.
        let body = json!({"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": true, "stream": true});
        let headers =
            [("Content-Type", "application/json"), ("Authorization", "Bearer key-a"), ("x-request-id", "oai-1")];
        let mut sse = open(s.addr, "POST", "/v1/completions", &headers, body.to_string().as_bytes()).sse();
        assert!(sse.next_event().is_some_and(|e| !e.data.is_empty()), "a first chunk");
        assert_eq!(post_json_as(s.addr, "key-a", "/v1/cancel", &json!({"request_id": "oai-1"})).status, 200);
        let rest = sse.rest();
        assert_eq!(rest.last().map(|e| e.data.as_str()), Some("[DONE]"));
        let chunks = rest.iter().filter(|e| !e.comment && e.data != "[DONE]").map(|e| e.json());
        let finish = chunks.filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned)).next_back();
        assert_eq!(finish.as_deref(), Some("cancelled"));
        s.begin_shutdown();
        assert!(s.wait_stopped(Duration::from_secs(30)));
    }
}

#[test]
fn kv_starved_decodes_preempt_the_newest_and_every_request_completes_with_its_own_tokens() {
    let block_bytes = model().kv_layout(16).block_bytes() as u64;
    // Each request needs 20 + 40 = 60 positions (4 blocks of 16) and fits alone in 6 blocks;
    // three running together need 12, so decode steps run out of blocks.
    // One request samples with a seed: a restart keeps its RNG state, so its tokens hold too.
    let cases: Vec<(Vec<u32>, SamplingConfig)> = vec![
        (prompt(20, 10), sampling(40, 0.0, 1)),
        (prompt(20, 11), sampling(40, 0.0, 1)),
        (prompt(20, 12), sampling(40, 0.8, 5)),
    ];
    let alone: Vec<Vec<u32>> = cases.iter().map(|(p, s)| run_alone(p.clone(), s.clone())).collect();
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), block_bytes * 6);
    let mut streams: Vec<Stream> = cases.iter().map(|(p, s)| h.submit("a", p.clone(), s.clone(), 256)).collect();
    let mut max_used = 0;
    for _ in 0..400 {
        h.run_tick();
        max_used = max_used.max(h.kv_used());
        streams.iter_mut().for_each(Stream::drain);
        if streams.iter().all(|s| s.finish().is_some()) {
            break;
        }
    }
    for (i, (s, want)) in streams.iter().zip(&alone).enumerate() {
        assert_eq!(s.finish(), Some(FinishReason::Length), "request {i}: {:?}", s.error());
        assert_eq!(&s.tokens(), want, "request {i} differs after preemption");
        let usage =
            s.events.iter().find_map(|e| if let StreamEvent::Done { usage, .. } = e { Some(*usage) } else { None });
        assert_eq!(usage.map(|u| (u.prompt_tokens, u.completion_tokens)), Some((20, 40)), "request {i} usage");
    }
    let preempted = h.stats().preempted;
    eprintln!("preemptions: {preempted}");
    assert!(preempted > 0, "the cap forced preemption");
    assert_eq!(h.metric("starling_preemptions_total"), preempted as f64);
    assert!(max_used <= 6, "the cap held ({max_used} blocks)");
    assert_eq!(h.kv_used(), 0, "every block returned");
}

#[test]
fn a_waiting_request_gives_back_the_session_blocks_it_holds_before_a_decode_is_stopped() {
    let block_bytes = model().kv_layout(16).block_bytes() as u64;
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), block_bytes * 6);
    // Turn 1 of a session parks 47 positions (3 blocks).
    let turn1 = prompt(40, 1);
    let mut t1 = h.submit_in_session("a", "chat", turn1.clone(), sampling(8, 0.0, 1));
    for _ in 0..12 {
        h.run_tick();
    }
    t1.drain();
    assert_eq!(t1.finish(), Some(FinishReason::Length));
    // A request of another tenant starts (2 blocks), then turn 2 (88 tokens, 6 blocks) takes
    // the session's 3 blocks but cannot start: it waits holding them.
    let r_prompt = prompt(20, 2);
    let mut r = h.submit("b", r_prompt.clone(), sampling(40, 0.0, 1), 256);
    h.run_tick();
    let turn2: Vec<u32> = turn1.iter().chain(&t1.tokens()).copied().chain(prompt(40, 3)).collect();
    let mut t2 = h.submit_in_session("a", "chat", turn2, sampling(8, 0.0, 1));
    h.run_tick();
    assert_eq!(h.count(|p| *p == Phase::Queued), 1, "turn 2 waits for room");
    for _ in 0..200 {
        h.run_tick();
        r.drain();
        t2.drain();
        if r.finish().is_some() && t2.finish().is_some() {
            break;
        }
    }
    assert_eq!(r.finish(), Some(FinishReason::Length), "the running request was not stopped: {:?}", r.error());
    assert_eq!(r.tokens(), run_alone(r_prompt, sampling(40, 0.0, 1)));
    assert_eq!(t2.finish(), Some(FinishReason::Length), "{:?}", t2.error());
    assert_eq!(h.stats().preempted, 0, "only a waiting request gave blocks back");
}

#[test]
fn a_decode_holding_every_block_left_ends_with_a_kv_cache_full_error() {
    let block_bytes = model().kv_layout(16).block_bytes() as u64;
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), block_bytes * 6);
    // Four blocks pinned outside the engine: the request fits the cap (4 blocks) but not the rest.
    let mut pinned = starling::kv::arena::BlockTable::default();
    h.world.resource_mut::<Kv>().0.prepare(&mut pinned, "elsewhere", 64).unwrap();
    let mut s = h.submit("a", prompt(20, 1), sampling(40, 0.0, 1), 256);
    for _ in 0..40 {
        h.run_tick();
        s.drain();
        if s.error().is_some() {
            break;
        }
    }
    let error = s.error().expect("the request ends with an error");
    assert_eq!((error.status(), error.code), (503, Some("kv_cache_full")));
    // Two blocks hold 32 positions: the prompt and 12 generated tokens, from which a 13th
    // was sampled; what was generated stays delivered.
    assert_eq!(s.tokens().len(), 13, "tokens up to the two-block limit were delivered");
    h.run_tick();
    assert_eq!(h.kv_used(), 4, "its blocks were freed; only the pinned ones remain");
    assert_eq!(h.live_requests(), 0);
}

#[test]
fn a_preempted_sequence_restarts_before_an_older_request_still_waiting() {
    let block_bytes = model().kv_layout(16).block_bytes() as u64;
    let mut h = Harness::new(limits(8, 128), TenantLimits::default(), block_bytes * 6);
    // A runs (2 blocks); D (70-token prompt, 5 blocks) must wait; B, admitted after D, fits.
    let mut a = h.submit("t", prompt(20, 1), sampling(40, 0.0, 1), 256);
    h.run_tick();
    let mut d = h.submit("t", prompt(70, 2), sampling(4, 0.0, 1), 256);
    h.run_tick();
    let mut b = h.submit("t", prompt(20, 3), sampling(40, 0.0, 1), 256);
    let mut finished_at: [Option<usize>; 3] = [None; 3];
    for tick in 0..300 {
        h.run_tick();
        for (i, s) in [&mut a, &mut b, &mut d].into_iter().enumerate() {
            s.drain();
            if s.finish().is_some() && finished_at[i].is_none() {
                finished_at[i] = Some(tick);
            }
        }
        if finished_at.iter().all(Option::is_some) {
            break;
        }
    }
    assert!(h.stats().preempted > 0, "B was preempted when A needed its fourth block");
    for s in [&a, &b, &d] {
        assert_eq!(s.finish(), Some(FinishReason::Length), "{:?}", s.error());
    }
    let [a_end, b_end, d_end] = finished_at.map(Option::unwrap);
    assert!(a_end < b_end && b_end < d_end, "A, then the preempted B, then D: {finished_at:?}");
    assert_eq!(b.tokens(), run_alone(prompt(20, 3), sampling(40, 0.0, 1)));
}

#[test]
fn a_prompt_preempted_mid_prefill_starts_over_and_both_complete() {
    let block_bytes = model().kv_layout(16).block_bytes() as u64;
    // A 16-token budget spreads P's 60-token prompt over four ticks; A needs its third block
    // (position 32) in the middle of them, and P, the newest, gives its blocks up.
    let mut h = Harness::new(limits(8, 16), TenantLimits::default(), block_bytes * 6);
    let mut a = h.submit("t", prompt(15, 1), sampling(30, 0.0, 1), 256);
    for _ in 0..16 {
        h.run_tick();
    }
    let mut p = h.submit("t", prompt(60, 2), sampling(4, 0.0, 1), 256);
    let mut saw_prefill_preempted = false;
    for _ in 0..200 {
        let prefilling = h.count(|ph| *ph == Phase::Prefill) > 0;
        let before = h.stats().preempted;
        h.run_tick();
        saw_prefill_preempted |= prefilling && h.stats().preempted > before;
        a.drain();
        p.drain();
        if a.finish().is_some() && p.finish().is_some() {
            break;
        }
    }
    assert!(saw_prefill_preempted, "P was preempted while prefilling");
    assert_eq!(a.finish(), Some(FinishReason::Length), "{:?}", a.error());
    assert_eq!(p.finish(), Some(FinishReason::Length), "{:?}", p.error());
    assert_eq!(a.tokens(), run_alone(prompt(15, 1), sampling(30, 0.0, 1)));
    assert_eq!(p.tokens(), run_alone(prompt(60, 2), sampling(4, 0.0, 1)));
    assert_eq!(h.kv_used(), 0);
}

/// A client that stops reading (its channel full with events waiting) for `stream_stall`
/// loses its request: cancelled, its KV blocks freed, instead of holding them until the
/// deadline.
#[test]
fn a_stream_whose_client_stopped_reading_is_cancelled_and_its_blocks_freed() {
    let mut l = limits(8, 64);
    l.stream_stall = Duration::from_millis(50);
    let mut h = Harness::new(l, TenantLimits::default(), KV_BYTES);
    // Room for two events: the stream stalls after `started` and one token.
    let _stalled = h.submit("a", prompt(20, 1), sampling(200, 0.0, 1), 2);
    for _ in 0..5 {
        h.run_tick();
    }
    assert!(h.kv_used() > 0 && h.live_requests() == 1, "holding blocks while stalled");
    for _ in 0..60 {
        h.run_tick();
    }
    assert_eq!((h.kv_used(), h.live_requests()), (0, 0), "the stalled request was ended and its blocks freed");
}

/// When the KV cache cannot grow a sequence, a stalled one gives up its blocks first,
/// though it was admitted before the sequence that needs them.
#[test]
fn preemption_takes_a_stalled_sequence_before_a_newer_reading_one() {
    let block_bytes = model().kv_layout(16).block_bytes() as u64;
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), block_bytes * 6);
    let mut stalled = h.submit("a", prompt(20, 1), sampling(60, 0.0, 1), 2);
    for _ in 0..3 {
        h.run_tick();
    }
    assert_eq!((h.kv_used(), h.live_requests()), (2, 1), "the stalled request holds its prompt's blocks");
    // 20 + 60 positions need 5 blocks; with the stalled request's 2, the cache runs out.
    let mut reader = h.submit("a", prompt(20, 2), sampling(60, 0.0, 1), 256);
    for _ in 0..200 {
        h.run_tick();
        reader.drain();
        if reader.finish().is_some() {
            break;
        }
    }
    assert_eq!(reader.finish(), Some(FinishReason::Length), "{:?}", reader.error());
    assert!(h.stats().preempted > 0, "the cache ran out");
    stalled.drain();
    assert!(stalled.finish().is_none(), "the stalled request was preempted, not ended");
}

/// Constrained sequences preempted for KV room recompute and return exactly the tokens they
/// return alone (greedy and seeded): the grammar state follows the tokens, not the cache.
#[test]
fn preempted_constrained_sequences_keep_their_tokens() {
    let block_bytes = model().kv_layout(16).block_bytes() as u64;
    let schema = serde_json::json!({"type": "array", "minItems": 30, "maxItems": 30,
        "items": {"type": "integer", "minimum": 0, "maximum": 999}});
    let cases: Vec<(Vec<u32>, SamplingConfig)> = vec![
        (prompt(20, 20), sampling(40, 0.0, 1)),
        (prompt(20, 21), sampling(40, 0.8, 2)),
        (prompt(20, 22), sampling(40, 0.8, 3)),
    ];
    let run = |h: &mut Harness, streams: &mut Vec<Stream>| {
        for _ in 0..400 {
            h.run_tick();
            streams.iter_mut().for_each(Stream::drain);
            if streams.iter().all(|s| s.finish().is_some()) {
                break;
            }
        }
    };
    let alone: Vec<Vec<u32>> = cases
        .iter()
        .map(|(p, s)| {
            let mut h = Harness::new(limits(8, 64), TenantLimits::default(), KV_BYTES);
            let mut streams = vec![h.submit_constrained(p.clone(), s.clone(), &schema)];
            run(&mut h, &mut streams);
            assert_eq!(streams[0].finish(), Some(FinishReason::Length), "{:?}", streams[0].error());
            streams[0].tokens()
        })
        .collect();
    let mut h = Harness::new(limits(8, 64), TenantLimits::default(), block_bytes * 6);
    let mut streams: Vec<Stream> =
        cases.iter().map(|(p, s)| h.submit_constrained(p.clone(), s.clone(), &schema)).collect();
    run(&mut h, &mut streams);
    for (i, (s, want)) in streams.iter().zip(&alone).enumerate() {
        assert_eq!(s.finish(), Some(FinishReason::Length), "request {i}: {:?}", s.error());
        assert_eq!(&s.tokens(), want, "request {i} differs after preemption");
    }
    assert!(h.stats().preempted > 0, "the cap forced preemption");
    assert_eq!(h.kv_used(), 0, "every block returned");
    // The output so far is a prefix of a valid array of integers in range.
    let text = tokenizer().decode(&alone[1], true).unwrap();
    assert!(text.starts_with('['), "{text}");
    for n in text.trim_start_matches('[').split(", ").filter(|t| !t.is_empty()) {
        assert!(n.parse::<u32>().is_ok_and(|v| v <= 999), "{text}");
    }
}
