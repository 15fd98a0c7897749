//! Engine resources: what the stages share within a tick.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bevy_ecs::prelude::*;

use crate::engine::pipeline::Stage;
use crate::kv::cache::KvCache;
use crate::model::runtime::ModelRuntime;
use crate::protocol::EngineCommand;
use crate::sampler::PolicyRules;
use crate::tokenizer::GgufTokenizer;
use crate::types::{MonotonicOrigin, SessionId, TenantId, Timestamp};

/// Commands received since the last tick. Filled by the engine loop; drained by admit.
#[derive(Resource, Default)]
pub struct Inbox(pub VecDeque<EngineCommand>);

/// The engine's notion of now. Set by the engine loop before each tick (tests set it by
/// hand); read by admit (timestamps), evict (deadlines, TTL) and emit (timings).
#[derive(Resource, Clone, Copy, Debug, Default)]
pub struct TickClock {
    /// When the tick started: what deadlines and TTLs are judged against.
    pub now: Timestamp,
    pub tick: u64,
    /// The live clock, when the engine runs on one (tests that set `now` by hand leave it
    /// out, and [`TickClock::read`] is then `now`).
    pub live: Option<MonotonicOrigin>,
}

impl TickClock {
    /// The time at this moment: stamps what happens partway through a tick (a token emitted
    /// after the forward pass, a request finished), so timings include the tick's own work.
    pub fn read(&self) -> Timestamp {
        self.live.map_or(self.now, |origin| origin.now())
    }
}

/// The model runtime. Read by tokenize (vocabulary bounds), forward.
#[derive(Resource, Clone)]
pub struct Model(pub Arc<dyn ModelRuntime>);

/// The tokenizer. Read by tokenize, input_policy and emit.
#[derive(Resource, Clone)]
pub struct TokenizerRes(pub Arc<GgufTokenizer>);

/// The KV cache (arena, prefix index, idle sessions). Blocks are prepared by batch,
/// written by forward, released or parked by evict; read by tokenize (limits) and status.
#[derive(Resource)]
pub struct Kv(pub KvCache);

/// Limits the stages enforce, from the model's config.
#[derive(Resource, Clone, Debug)]
pub struct EngineLimits {
    pub max_batch: usize,
    pub max_batch_tokens: usize,
    /// Longest accepted prompt (≤ the model context).
    pub max_prompt_tokens: usize,
    /// The model's context length.
    pub n_ctx: usize,
    /// Queued requests at which admission closes, and at which it reopens.
    pub high_watermark: usize,
    pub low_watermark: usize,
    /// Queued prompt tokens at which admission closes.
    pub high_watermark_tokens: usize,
    pub max_sessions: usize,
    pub session_ttl: Duration,
    /// A stream whose client has read nothing for this long is cancelled and its KV freed.
    pub stream_stall: Duration,
    /// Speculative decoding, when the model's config turns it on.
    pub speculative: Option<crate::config::SpeculativeConfig>,
}

/// One planned piece of work: run `n_tokens` of `entity` starting at its KV length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanItem {
    pub entity: Entity,
    pub start_pos: usize,
    pub n_tokens: usize,
    /// The chunk ends at the last known token: the sequence gets a logits row and samples.
    pub samples: bool,
    /// Draft tokens run after the chunk's known tokens (the sequence's [`Drafting`] draft),
    /// each with its own logits row; counted in `n_tokens`.
    ///
    /// [`Drafting`]: crate::engine::components::Drafting
    pub draft: usize,
}

impl PlanItem {
    /// Logits rows the item gets: one per sampled position (the last known token and each
    /// draft token), none for a prefill chunk that does not reach the end.
    pub fn logit_rows(&self) -> usize {
        if self.samples { 1 + self.draft } else { 0 }
    }
}

/// This tick's batch. Written by batch; read by forward and sample.
#[derive(Resource, Default, Debug)]
pub struct BatchPlan {
    pub items: Vec<PlanItem>,
}

impl BatchPlan {
    pub fn total_tokens(&self) -> usize {
        self.items.iter().map(|i| i.n_tokens).sum()
    }

    /// Draft tokens in the batch.
    pub fn draft_tokens(&self) -> usize {
        self.items.iter().map(|i| i.draft).sum()
    }

    /// Each sampling item with its run of `logits` ([`PlanItem::logit_rows`] rows of `vocab`,
    /// fewer if `logits` ends early), in plan order.
    pub fn sampled_rows<'a>(
        &'a self,
        logits: &'a mut [f32],
        vocab: usize,
    ) -> impl Iterator<Item = (&'a PlanItem, &'a mut [f32])> {
        let mut rest = logits;
        self.items.iter().filter(|i| i.samples).map(move |item| {
            let n = (item.logit_rows() * vocab).min(rest.len());
            let (own, tail) = std::mem::take(&mut rest).split_at_mut(n);
            rest = tail;
            (item, own)
        })
    }
}

/// Speculative decoding since the engine started: positions drafted, and draft tokens that
/// equalled the sampled token (kept). Written by sample; read by telemetry.
#[derive(Resource, Default, Debug, Clone, Copy)]
pub struct SpecStats {
    pub drafted: u64,
    pub accepted: u64,
}

/// Logits rows for the plan items that sample, in plan order. Written by forward; read by sample.
#[derive(Resource, Default)]
pub struct Logits(pub Vec<f32>);

/// Session entities by (tenant, name). Written by admit and evict.
#[derive(Resource, Default)]
pub struct SessionIndex(pub HashMap<(TenantId, SessionId), Entity>);

/// Whether admission is open (closes at the high watermark, reopens at the low one).
#[derive(Resource, Debug)]
pub struct AdmissionGate {
    pub open: bool,
}

/// Content-policy rules for the optional policy stages.
#[derive(Resource, Default, Clone)]
pub struct Policies {
    pub input: Vec<(Option<Vec<TenantId>>, Arc<PolicyRules>)>,
    pub output: Vec<(Option<Vec<TenantId>>, Arc<PolicyRules>)>,
}

/// The stages that ran, in order, when recording is on (tests and debugging).
#[derive(Resource, Default, Debug)]
pub struct StageLog {
    pub enabled: bool,
    pub stages: Vec<Stage>,
}

/// What the last tick did; the loop uses it to decide whether to sleep.
#[derive(Resource, Default, Debug, Clone, Copy)]
pub struct TickReport {
    pub planned_tokens: usize,
    pub events_sent: usize,
    pub forward_calls: u64,
    pub stop_requested: bool,
}

/// Counters and gauges the engine publishes for the gateway (readiness, stats, metrics).
/// Shared read-only with the gateway through an `Arc`; only the engine thread writes.
#[derive(Debug, Default)]
pub struct EngineStatus {
    pub ticks: AtomicU64,
    /// Milliseconds since the engine clock origin at the last tick start.
    pub last_tick_ms: AtomicU64,
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub sessions: AtomicUsize,
    /// KV blocks held by running sequences and parked sessions (cached prefix blocks, which
    /// eviction can reclaim at once, are not counted).
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub forward_calls: AtomicU64,
    pub admission_open: AtomicBool,
    pub stopped: AtomicBool,
    /// Set while the engine rebuilds itself after a panic.
    pub restarting: AtomicBool,
    /// Times the engine thread panicked and was restarted.
    pub restarts: AtomicU64,
}

impl EngineStatus {
    pub fn kv_usage(&self) -> f64 {
        let total = self.kv_blocks_total.load(Ordering::Relaxed);
        if total == 0 { 0.0 } else { self.kv_blocks_used.load(Ordering::Relaxed) as f64 / total as f64 }
    }
}

/// The status handle as a resource, so stages can publish.
#[derive(Resource, Clone)]
pub struct Status(pub Arc<EngineStatus>);
