//! The engine's observer: stage and tick timing, batch shape, per-token latency, and one
//! record (metrics and a log line) per finished request.
//!
//! The runner calls [`stage_span`], [`after_stage`] and [`after_tick`]; request completion
//! is seen by an observer on the despawn of its entity, so the stages themselves carry no
//! telemetry code. What it records goes to `telemetry`'s metric handles and heartbeat.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bevy_ecs::prelude::*;
use prometheus::Histogram;
use tracing::field::Empty;

use crate::engine::components::*;
use crate::engine::pipeline::Stage;
use crate::engine::resources::{BatchPlan, Kv, SpecStats, Status, TickClock, TokenizerRes};
use crate::engine::scheduler::SchedulerStats;
use crate::protocol::FinishReason;
use crate::telemetry::Observability;
use crate::telemetry::health::{Heartbeat, process_millis};
use crate::telemetry::metrics::{ModelMetrics, RequestOutcome};
use crate::telemetry::trace;

/// How far back `starling_generation_tokens_per_second` looks.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The engine's telemetry resource: resolved metric handles and small reusable state.
#[derive(Resource)]
pub struct EngineTelemetry {
    metrics: ModelMetrics,
    /// Also log the prompt text on the per-request line (`telemetry.log_prompts`).
    log_prompts: bool,
    heartbeat: Arc<Heartbeat>,
    /// Stage duration histograms, resolved on first use.
    stages: Vec<(Stage, Histogram)>,
    /// Ticks that sampled tokens in the rate window: (when, tokens).
    rate: VecDeque<(Instant, u32)>,
    tokens_query: Option<QueryState<(&'static Outbox, &'static mut LastTokenAt)>>,
    /// The KV cache's counters at the last tick (metrics advance by the difference).
    last_kv: crate::kv::cache::KvStats,
    /// The scheduler's preemption count at the last tick.
    last_preempted: u64,
    /// The speculative-decoding counts at the last tick.
    last_spec: SpecStats,
}

impl EngineTelemetry {
    /// Telemetry reporting to `metrics`, beating `heartbeat` (which `/healthz` reads).
    pub fn new(metrics: ModelMetrics, heartbeat: Arc<Heartbeat>, log_prompts: bool) -> Self {
        EngineTelemetry {
            metrics,
            log_prompts,
            heartbeat,
            stages: Vec::with_capacity(16),
            rate: VecDeque::with_capacity(1024),
            tokens_query: None,
            last_kv: Default::default(),
            last_preempted: 0,
            last_spec: SpecStats::default(),
        }
    }

    /// Telemetry for model `model`'s engine reporting to `obs`, whose `/healthz` then reads
    /// this engine's heartbeat.
    pub fn observed_by(obs: &Observability, model: &str, log_prompts: bool) -> Self {
        EngineTelemetry::new(obs.model_metrics(model), obs.heartbeat_for(model), log_prompts)
    }

    /// Moves this telemetry into a fresh world (after an engine restart): cached queries
    /// belong to the world that built them, so they are dropped.
    pub fn for_new_world(mut self) -> Self {
        self.tokens_query = None;
        // The new world's counters start again from zero.
        self.last_preempted = 0;
        self.last_spec = SpecStats::default();
        self
    }

    /// Labels request and token series with tenant names (`telemetry.tenant_labels`).
    pub fn with_tenant_labels(mut self, on: bool) -> Self {
        self.metrics.tenant_labels = on;
        self
    }

    fn stage_histogram(&mut self, stage: Stage) -> &Histogram {
        let i = match self.stages.iter().position(|(s, _)| *s == stage) {
            Some(i) => i,
            None => {
                self.stages.push((stage, self.metrics.stage(stage.name())));
                self.stages.len() - 1
            }
        };
        &self.stages[i].1
    }
}

/// When the previous token of a stream was sampled (for inter-token latency).
#[derive(Component, Default)]
pub struct LastTokenAt(Option<Instant>);

/// Inserts the resource and the completion/eviction observers into an engine world.
pub fn install(world: &mut World, telemetry: EngineTelemetry) {
    world.insert_resource(telemetry);
    world.add_observer(|ev: On<Add<Request>>, mut commands: Commands| {
        commands.entity(ev.event().entity).insert(LastTokenAt::default());
    });
    world.add_observer(on_request_removed);
}

/// Which stages run after the batch is planned, and so carry its shape and request ids.
fn sees_batch(stage: Stage) -> bool {
    matches!(stage, Stage::Forward | Stage::Constrain | Stage::Sample | Stage::OutputPolicy | Stage::Emit)
}

/// The span one stage runs in. Stages after `batch` carry the batch size and token count
/// (and, while a trace is being written, the request ids of the batch).
pub fn stage_span(world: &World, stage: Stage) -> tracing::Span {
    let span = tracing::info_span!(
        "stage",
        stage = %stage,
        batch_size = Empty,
        batch_tokens = Empty,
        draft_tokens = Empty,
        requests = Empty,
        drafts = Empty
    );
    if sees_batch(stage) {
        record_batch(world, &span);
    }
    span
}

fn record_batch(world: &World, span: &tracing::Span) {
    let Some(plan) = world.get_resource::<BatchPlan>() else { return };
    span.record("batch_size", plan.items.len());
    span.record("batch_tokens", plan.total_tokens());
    span.record("draft_tokens", plan.draft_tokens());
    if trace::capturing() {
        // Each request's id and, in the same order, its draft length.
        let named = plan.items.iter().filter_map(|i| Some((world.get::<ClientId>(i.entity)?.0.as_str(), i.draft)));
        let (ids, drafts): (Vec<&str>, Vec<String>) = named.map(|(id, d)| (id, d.to_string())).unzip();
        span.record("requests", tracing::field::display(ids.join(",")));
        span.record("drafts", tracing::field::display(drafts.join(",")));
    }
}

/// Records a stage's duration; after `batch` the batch shape, after `sample` token gaps.
pub fn after_stage(world: &mut World, stage: Stage, span: &tracing::Span, started: Instant) {
    let elapsed = started.elapsed().as_secs_f64();
    if !world.contains_resource::<EngineTelemetry>() {
        return;
    }
    world.resource_scope(|world, mut tel: Mut<EngineTelemetry>| {
        tel.stage_histogram(stage).observe(elapsed);
        match stage {
            Stage::Batch => {
                record_batch(world, span);
                let plan = world.resource::<BatchPlan>();
                if !plan.items.is_empty() {
                    tel.metrics.batch_size.observe(plan.items.len() as f64);
                    tel.metrics.batch_tokens.observe(plan.total_tokens() as f64);
                }
            }
            Stage::Sample => observe_tokens(world, &mut tel),
            _ => {}
        }
    });
}

/// Every stream that sampled a token this tick: one inter-token gap each (after the first).
fn observe_tokens(world: &mut World, tel: &mut EngineTelemetry) {
    let now = Instant::now();
    let mut query = tel.tokens_query.take().unwrap_or_else(|| world.query());
    let mut sampled = 0u32;
    for (outbox, mut last) in query.iter_mut(world) {
        if outbox.fresh.is_empty() {
            continue;
        }
        sampled += outbox.fresh.len() as u32;
        if let Some(prev) = last.0 {
            tel.metrics.itl.observe(now.saturating_duration_since(prev).as_secs_f64());
        }
        last.0 = Some(now);
    }
    tel.tokens_query = Some(query);
    if sampled > 0 {
        tel.rate.push_back((now, sampled));
    }
}

/// Records the tick's duration, queue and KV gauges, the token rate and the heartbeat.
pub fn after_tick(world: &mut World, started: Instant) {
    let now = Instant::now();
    let kv = world.resource::<Kv>().0.stats();
    let preempted = world.get_resource::<SchedulerStats>().map_or(0, |s| s.preempted);
    let spec = world.get_resource::<SpecStats>().copied().unwrap_or_default();
    let status = world.get_resource::<Status>().map(|s| s.0.clone());
    let Some(mut tel) = world.get_resource_mut::<EngineTelemetry>() else { return };
    let m = &tel.metrics;
    m.tick.observe(now.saturating_duration_since(started).as_secs_f64());
    m.kv_used.set(kv.bytes_used as i64);
    m.kv_cached.set(kv.bytes_cached as i64);
    m.kv_free.set(kv.bytes_free as i64);
    m.kv_usage.set(if kv.blocks_total == 0 { 0.0 } else { kv.blocks_used as f64 / kv.blocks_total as f64 });
    // The cache counts since start; counters advance by what changed this tick.
    let last = std::mem::replace(&mut tel.last_kv, kv.clone());
    let last_preempted = std::mem::replace(&mut tel.last_preempted, preempted);
    let last_spec = std::mem::replace(&mut tel.last_spec, spec);
    let m = &tel.metrics;
    let (drafted, accepted) =
        (spec.drafted.saturating_sub(last_spec.drafted), spec.accepted.saturating_sub(last_spec.accepted));
    m.spec_drafted.inc_by(drafted);
    m.spec_accepted.inc_by(accepted);
    m.spec_wasted.inc_by(drafted.saturating_sub(accepted));
    m.evicted_lru.inc_by(kv.evictions_lru.saturating_sub(last.evictions_lru));
    m.evicted_ttl.inc_by(kv.evictions_ttl.saturating_sub(last.evictions_ttl));
    m.evicted_close.inc_by(kv.evictions_close.saturating_sub(last.evictions_close));
    m.preemptions.inc_by(preempted.saturating_sub(last_preempted));

    if let Some(s) = &status {
        let (queued, running) = (s.queued.load(Ordering::Relaxed), s.running.load(Ordering::Relaxed));
        m.queue_depth.set(queued as i64);
        m.running.set(running as i64);
        tel.heartbeat.pending.store((queued + running) as u64, Ordering::Relaxed);
    }
    tel.heartbeat.last_tick_ms.store(process_millis(), Ordering::Relaxed);
    while tel.rate.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > RATE_WINDOW) {
        tel.rate.pop_front();
    }
    let tokens: u64 = tel.rate.iter().map(|(_, n)| u64::from(*n)).sum();
    tel.metrics.tokens_per_second.set(tokens as f64 / RATE_WINDOW.as_secs_f64());
}

/// `ok` for a normal end, `aborted` for a client or deadline end, `error` otherwise.
fn status_of(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Length | FinishReason::ContentFilter => "ok",
        FinishReason::Cancelled | FinishReason::Deadline => "aborted",
        FinishReason::Error => "error",
    }
}

type FinishedQuery<'w, 's> = Query<
    'w,
    's,
    (
        &'static Request,
        Option<&'static ClientId>,
        &'static Tenant,
        &'static Phase,
        &'static Timing,
        Option<&'static Tokens>,
        &'static CachedPrefix,
        Option<&'static SessionLink>,
    ),
>;

/// A request entity is being despawned: record its metrics and write its log line.
fn on_request_removed(
    ev: On<Remove<Request>>,
    requests: FinishedQuery,
    names: Query<&SessionName>,
    tel: Res<EngineTelemetry>,
    clock: Res<TickClock>,
    tokenizer: Res<TokenizerRes>,
) {
    let Ok((request, name, tenant, phase, timing, tokens, cached, link)) = requests.get(ev.event().entity) else {
        return;
    };
    let request_id = name.map_or_else(|| request.0.to_string(), |n| n.0.clone());
    let reason = match phase {
        Phase::Finished(r) => *r,
        _ => FinishReason::Cancelled,
    };
    let secs = |from: crate::types::Timestamp, to: crate::types::Timestamp| to.saturating_since(from).as_secs_f64();
    let m = &tel.metrics;
    let (n_prompt, n_gen) = tokens.map_or((0, 0), |t| (t.n_prompt, t.n_generated()));
    m.record_outcome(&RequestOutcome {
        tenant: tenant.0.as_str(),
        status: status_of(reason),
        finish_reason: reason.as_str(),
        prompt_tokens: n_prompt,
        cached_tokens: cached.0,
        generated_tokens: n_gen,
    });
    // Every request that got as far as its prompt asked the cache (its session's blocks or the
    // tenant's shared prefixes); a hit reused at least one position.
    if tokens.is_some_and(|t| t.n_prompt > 0) {
        m.prefix_queries.inc();
        if cached.0 > 0 {
            m.prefix_hits.inc();
        }
    }
    m.queue_time.observe(secs(timing.received, timing.admitted));
    let ttft = timing.first_token.map(|f| secs(timing.received, f));
    if let Some(t) = ttft {
        m.ttft.observe(t);
    }
    let duration = secs(timing.received, clock.read());
    m.e2e.observe(duration);
    let session = link.and_then(|l| names.get(l.0).ok()).map_or("", |n| n.id.0.as_str());
    let prompt = match (tel.log_prompts, tokens) {
        (true, Some(t)) => tokenizer.0.decode(&t.ids[..t.n_prompt], false).ok(),
        _ => None,
    };
    let line = RequestLine {
        request_id: &request_id,
        session_id: session,
        tenant: tenant.0.as_str(),
        model: &m.model,
        prompt_tokens: n_prompt,
        cached_tokens: cached.0,
        generated_tokens: n_gen,
        ttft_ms: ttft.map_or(-1.0, |t| t * 1e3),
        duration_ms: duration * 1e3,
        finish_reason: reason.as_str(),
    };
    line.log(prompt.as_deref());
}

/// The fields of the one log line written per finished request.
struct RequestLine<'a> {
    /// The id the gateway logged and echoed (`x-request-id`), so the lines correlate.
    request_id: &'a str,
    session_id: &'a str,
    tenant: &'a str,
    model: &'a str,
    prompt_tokens: usize,
    cached_tokens: usize,
    generated_tokens: usize,
    /// -1 when no token was produced.
    ttft_ms: f64,
    duration_ms: f64,
    finish_reason: &'static str,
}

impl RequestLine<'_> {
    /// One line per finished request; `prompt` is recorded only when it is `Some`
    /// (`telemetry.log_prompts`).
    fn log(&self, prompt: Option<&str>) {
        tracing::info!(
            target: "starling::request",
            request_id = self.request_id,
            session_id = self.session_id,
            tenant = self.tenant,
            model = self.model,
            prompt_tokens = self.prompt_tokens,
            cached_tokens = self.cached_tokens,
            generated_tokens = self.generated_tokens,
            ttft_ms = self.ttft_ms,
            duration_ms = self.duration_ms,
            finish_reason = self.finish_reason,
            prompt,
            "request finished"
        );
    }
}
