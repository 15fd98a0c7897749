//! Scheduling policy as plain structs, free of the `World`: queue watermarks with
//! hysteresis, per-tenant shares and limits, weighted fair sharing by virtual time, and the
//! scheduler's counters. `systems::admit` and `systems::batch` apply them each tick.

use std::collections::{BTreeMap, HashMap};

use bevy_ecs::prelude::*;

use crate::config::TenantConfig;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::PromptInput;
use crate::types::TenantId;

/// One tenant's fair-share weight and limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantShare {
    /// Relative share of decode slots and prefill budget (≥ 1).
    pub weight: u32,
    /// Sequences of this tenant running (prefill or decode) at once.
    pub max_concurrent: usize,
    /// Requests of this tenant waiting in the queue; more are refused with 429.
    pub max_queued: usize,
    /// Sessions this tenant may hold at once; a new one past it is refused with 429.
    pub max_sessions: usize,
}

impl TenantShare {
    /// Weight 1 and no per-tenant limits (only the engine-wide ones apply).
    pub const UNLIMITED: TenantShare =
        TenantShare { weight: 1, max_concurrent: usize::MAX, max_queued: usize::MAX, max_sessions: usize::MAX };
}

/// Every tenant's share. Built by `engine::load` from config `tenants`; read by admit
/// (`max_queued`) and batch (`weight`, `max_concurrent`). Unknown tenants get `fallback`.
#[derive(Resource, Clone, Debug)]
pub struct TenantLimits {
    shares: HashMap<TenantId, TenantShare>,
    fallback: TenantShare,
}

impl Default for TenantLimits {
    fn default() -> Self {
        TenantLimits::new(TenantShare::UNLIMITED)
    }
}

impl TenantLimits {
    /// No tenant listed; every tenant gets `fallback`.
    pub fn new(fallback: TenantShare) -> Self {
        TenantLimits { shares: HashMap::new(), fallback }
    }

    /// Adds (or replaces) one tenant's share.
    pub fn with(mut self, tenant: impl Into<TenantId>, share: TenantShare) -> Self {
        self.shares.insert(tenant.into(), share);
        self
    }

    /// The configured tenants; unlisted tenants get the config defaults.
    pub fn from_config(tenants: &[TenantConfig]) -> Self {
        let fallback = share_of(&TenantConfig::with_defaults(TenantId::from("")));
        tenants.iter().fold(TenantLimits::new(fallback), |acc, t| acc.with(t.name.clone(), share_of(t)))
    }

    pub fn get(&self, tenant: &TenantId) -> TenantShare {
        self.shares.get(tenant).copied().unwrap_or(self.fallback)
    }
}

fn share_of(t: &TenantConfig) -> TenantShare {
    TenantShare {
        weight: t.weight.max(1),
        max_concurrent: t.max_concurrent.max(1) as usize,
        max_queued: t.max_queued.max(1) as usize,
        max_sessions: t.max_sessions.max(1) as usize,
    }
}

/// Why admission refused a request. `label` is the metrics label and the error `code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    /// The queue holds `high_watermark` requests (or admission is closed until it drains).
    QueueFull,
    /// The queue holds `high_watermark_tokens` prompt tokens.
    QueueTokensFull,
    /// The tenant has `max_queued` requests waiting.
    TenantQueueFull,
    /// The model holds its maximum of sessions.
    TooManySessions,
    /// The session already has a request in flight.
    SessionBusy,
}

impl Rejection {
    pub fn label(self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTokensFull => "queue_tokens_full",
            Rejection::TenantQueueFull => "tenant_queue_full",
            Rejection::TooManySessions => "too_many_sessions",
            Rejection::SessionBusy => "session_busy",
        }
    }
}

/// What is waiting in the queue right now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueLoad {
    pub requests: usize,
    /// Prompt tokens of the queued requests (estimated for prompts not yet tokenized).
    pub tokens: usize,
    pub per_tenant: HashMap<TenantId, usize>,
}

impl QueueLoad {
    pub fn add(&mut self, tenant: &TenantId, tokens: usize) {
        self.requests += 1;
        self.tokens += tokens;
        *self.per_tenant.entry(tenant.clone()).or_default() += 1;
    }

    pub fn of(&self, tenant: &TenantId) -> usize {
        self.per_tenant.get(tenant).copied().unwrap_or(0)
    }
}

/// Prompt tokens a not-yet-tokenized prompt is counted as: exact for token ids, one token
/// per 4 bytes of text (typical of BPE on English) otherwise; tokenize makes it exact.
pub fn estimate_tokens(input: &PromptInput) -> usize {
    match input {
        PromptInput::Tokens(ids) => ids.len(),
        PromptInput::Text { text, .. } => text.len().div_ceil(4).max(1),
    }
}

/// Queue watermarks with hysteresis: admission closes when the queue reaches `high`
/// requests or `high_tokens` tokens, and reopens only once it is back to `low` requests
/// and `low_tokens` tokens (`high_tokens` scaled by `low / high`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    pub high: usize,
    pub low: usize,
    pub high_tokens: usize,
}

impl Watermarks {
    fn low_tokens(&self) -> usize {
        (self.high_tokens as u128 * self.low as u128 / self.high.max(1) as u128) as usize
    }

    /// Updates the gate for the queue as it is at the start of a tick.
    pub fn update(&self, open: &mut bool, load: &QueueLoad) {
        if load.requests >= self.high || load.tokens >= self.high_tokens {
            *open = false;
        } else if load.requests <= self.low && load.tokens <= self.low_tokens() {
            *open = true;
        }
    }

    /// Whether one more request of `tokens` tokens from a tenant with `share` may join the
    /// queue. Admitting never takes the queue past either watermark (a lone request larger
    /// than the token watermark is still admitted into an empty queue).
    pub fn admit(
        &self,
        open: &mut bool,
        load: &QueueLoad,
        tenant: &TenantId,
        share: TenantShare,
        tokens: usize,
    ) -> Result<(), Rejection> {
        if !*open || load.requests >= self.high {
            *open = false;
            return Err(Rejection::QueueFull);
        }
        if load.requests > 0 && load.tokens + tokens > self.high_tokens {
            *open = false;
            return Err(Rejection::QueueTokensFull);
        }
        if load.of(tenant) >= share.max_queued {
            return Err(Rejection::TenantQueueFull);
        }
        Ok(())
    }
}

/// The 429 a rejection becomes (the reason is the error `code` and is named in the message).
pub fn rejection_error(reason: Rejection, load: &QueueLoad, tenant: &TenantId, share: TenantShare) -> ApiError {
    let message = match reason {
        Rejection::QueueFull => format!("the request queue is full ({} waiting); retry later", load.requests),
        Rejection::QueueTokensFull => {
            format!("the request queue holds too many prompt tokens ({} waiting); retry later", load.tokens)
        }
        Rejection::TenantQueueFull => {
            format!("tenant `{tenant}` already has {} requests queued (max_queued); retry later", share.max_queued)
        }
        Rejection::TooManySessions | Rejection::SessionBusy => reason.label().replace('_', " "),
    };
    ApiError::new(ErrorKind::RateLimited, message).with_code(reason.label()).with_retry_after(1)
}

/// Fixed-point scale of virtual time (divisible by every weight up to 16).
const VTIME_SCALE: u64 = 720_720;

/// Weighted fair sharing by virtual time (start-time fair queueing). Serving `n` tokens of
/// a tenant advances its virtual time by `n / weight`; the tenant with the least virtual
/// time goes first. A tenant that becomes active is brought up to the least virtual time
/// of the active tenants, so idle time earns no credit. Written by batch.
#[derive(Resource, Clone, Debug, Default)]
pub struct FairShare {
    vtime: HashMap<TenantId, u64>,
}

impl FairShare {
    /// Brings tenants that have work (`active`) up to the least virtual time among the
    /// active tenants already known.
    pub fn activate<'a>(&mut self, active: impl IntoIterator<Item = &'a TenantId> + Clone) {
        let floor = active.clone().into_iter().filter_map(|t| self.vtime.get(t)).min().copied().unwrap_or(0);
        for t in active {
            let v = self.vtime.entry(t.clone()).or_insert(floor);
            *v = (*v).max(floor);
        }
    }

    /// The candidate with the least virtual time (ties broken by name, for determinism).
    pub fn pick<'a>(&self, candidates: impl IntoIterator<Item = &'a TenantId>) -> Option<&'a TenantId> {
        candidates.into_iter().min_by(|a, b| self.vtime_of(a).cmp(&self.vtime_of(b)).then_with(|| a.cmp(b)))
    }

    /// Records that `tokens` tokens of `tenant` were scheduled.
    pub fn charge(&mut self, tenant: &TenantId, weight: u32, tokens: usize) {
        let step = tokens as u64 * VTIME_SCALE / u64::from(weight.max(1));
        *self.vtime.entry(tenant.clone()).or_default() += step;
    }

    pub fn vtime_of(&self, tenant: &TenantId) -> u64 {
        self.vtime.get(tenant).copied().unwrap_or(0)
    }
}

/// Splits `budget` tokens among tenants in proportion to their weights (each gets at least
/// one token while any budget is left). Leftover from rounding goes to nobody here; the
/// batch hands unused budget out in a second, unrestricted pass.
pub fn weighted_quotas(budget: usize, weights: &[(TenantId, u32)]) -> HashMap<TenantId, usize> {
    let total: u64 = weights.iter().map(|(_, w)| u64::from((*w).max(1))).sum();
    weights
        .iter()
        .map(|(t, w)| {
            let share = budget as u64 * u64::from((*w).max(1)) / total.max(1);
            (t.clone(), (share as usize).max(1).min(budget))
        })
        .collect()
}

/// The scheduler's gauges and counters. Written by admit (queue, admissions, rejections)
/// and batch (running, pauses, preemptions); read by the engine's observer (preemptions)
/// and by tests, from the world.
#[derive(Resource, Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Requests waiting (gauge, at the end of admission).
    pub queue_depth: usize,
    /// Prompt tokens waiting (gauge).
    pub queued_tokens: usize,
    /// Sequences in prefill or decode (gauge, after batching).
    pub running: usize,
    /// The most requests ever waiting at once.
    pub max_queue_depth: usize,
    pub admitted: u64,
    /// Refused requests by [`Rejection::label`].
    pub rejected: BTreeMap<&'static str, u64>,
    /// Sequence-ticks skipped because the client's stream channel was full.
    pub paused: u64,
    /// Running sequences preempted (blocks freed, recomputed later) so that an older
    /// sequence the KV cache could not grow could go on.
    pub preempted: u64,
}

impl SchedulerStats {
    pub fn reject(&mut self, reason: Rejection) {
        *self.rejected.entry(reason.label()).or_default() += 1;
    }

    pub fn rejections(&self, reason: Rejection) -> u64 {
        self.rejected.get(reason.label()).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TenantId {
        TenantId::from(name)
    }

    fn load(requests: usize, tokens: usize) -> QueueLoad {
        QueueLoad { requests, tokens, per_tenant: HashMap::new() }
    }

    const MARKS: Watermarks = Watermarks { high: 4, low: 2, high_tokens: 100 };

    #[test]
    fn the_gate_closes_at_the_high_watermark_and_reopens_only_at_the_low_one() {
        let mut open = true;
        let mut trace = vec![];
        for depth in [0, 3, 4, 3, 3, 2, 3] {
            MARKS.update(&mut open, &load(depth, 0));
            trace.push(open);
        }
        assert_eq!(trace, [true, true, false, false, false, true, true]);
    }

    #[test]
    fn token_watermark_closes_and_reopens_at_the_scaled_low_mark() {
        let mut open = true;
        MARKS.update(&mut open, &load(1, 100));
        assert!(!open);
        MARKS.update(&mut open, &load(1, 51));
        assert!(!open, "50 tokens is the low mark (100 * 2 / 4)");
        MARKS.update(&mut open, &load(1, 50));
        assert!(open);
    }

    #[test]
    fn admission_never_takes_the_queue_past_a_watermark() {
        let mut open = true;
        let share = TenantShare::UNLIMITED;
        assert_eq!(MARKS.admit(&mut open, &load(3, 10), &t("a"), share, 5), Ok(()));
        assert_eq!(MARKS.admit(&mut open, &load(4, 10), &t("a"), share, 5), Err(Rejection::QueueFull));
        assert!(!open);
        let mut open = true;
        assert_eq!(MARKS.admit(&mut open, &load(1, 90), &t("a"), share, 11), Err(Rejection::QueueTokensFull));
        let mut open = true;
        assert_eq!(MARKS.admit(&mut open, &load(0, 0), &t("a"), share, 500), Ok(()), "a lone big prompt");
    }

    #[test]
    fn a_tenant_over_its_max_queued_is_refused_while_others_are_admitted() {
        let mut open = true;
        let mut q = QueueLoad::default();
        q.add(&t("a"), 1);
        q.add(&t("a"), 1);
        let share = TenantShare { weight: 1, max_concurrent: 1, max_queued: 2, max_sessions: 4 };
        assert_eq!(MARKS.admit(&mut open, &q, &t("a"), share, 1), Err(Rejection::TenantQueueFull));
        assert_eq!(MARKS.admit(&mut open, &q, &t("b"), share, 1), Ok(()));
        assert!(open, "a tenant limit does not close admission for everyone");
    }

    #[test]
    fn rejection_errors_are_429_with_retry_after_and_the_reason_as_code() {
        let e = rejection_error(Rejection::TenantQueueFull, &load(3, 0), &t("acme"), TenantShare::UNLIMITED);
        assert_eq!((e.status(), e.code, e.retry_after), (429, Some("tenant_queue_full"), Some(1)));
        assert!(e.message.contains("acme"), "{}", e.message);
    }

    #[test]
    fn fair_share_serves_tenants_in_proportion_to_their_weights() {
        let (a, b) = (t("a"), t("b"));
        let mut fair = FairShare::default();
        let mut served: HashMap<TenantId, usize> = HashMap::new();
        for _tick in 0..400 {
            fair.activate([&a, &b]);
            let who = fair.pick([&a, &b]).unwrap().clone();
            let weight = if who == a { 1 } else { 3 };
            fair.charge(&who, weight, 1);
            *served.entry(who).or_default() += 1;
        }
        assert_eq!((served[&a], served[&b]), (100, 300));
    }

    #[test]
    fn a_tenant_returning_from_idle_gets_no_banked_credit() {
        let (a, b) = (t("a"), t("b"));
        let mut fair = FairShare::default();
        fair.activate([&a]);
        fair.charge(&a, 1, 1000);
        fair.activate([&a, &b]);
        assert_eq!(fair.vtime_of(&b), fair.vtime_of(&a), "b starts level with a, not 1000 tokens behind");
        let mut wins_b = 0;
        for _ in 0..10 {
            let who = fair.pick([&a, &b]).unwrap().clone();
            wins_b += usize::from(who == b);
            fair.charge(&who, 1, 1);
        }
        assert_eq!(wins_b, 5, "equal weights alternate once level");
    }

    #[test]
    fn quotas_split_the_budget_by_weight() {
        let q = weighted_quotas(256, &[(t("a"), 1), (t("b"), 3)]);
        assert_eq!((q[&t("a")], q[&t("b")]), (64, 192));
        let tiny = weighted_quotas(1, &[(t("a"), 1), (t("b"), 1000)]);
        assert_eq!(tiny[&t("a")], 1, "every active tenant may make progress");
    }

    #[test]
    fn tenant_limits_fall_back_for_unknown_tenants() {
        let mut named = TenantConfig::with_defaults(t("gold"));
        named.weight = 5;
        named.max_queued = 3;
        let limits = TenantLimits::from_config(&[named]);
        assert_eq!(limits.get(&t("gold")).weight, 5);
        assert_eq!(limits.get(&t("gold")).max_queued, 3);
        assert_eq!(limits.get(&t("stranger")), share_of(&TenantConfig::with_defaults(t("x"))));
    }

    #[test]
    fn text_prompts_are_estimated_and_ids_counted_exactly() {
        assert_eq!(estimate_tokens(&PromptInput::Tokens(vec![1, 2, 3])), 3);
        assert_eq!(estimate_tokens(&PromptInput::Text { text: "abcdefghi".into(), parse_special: true }), 3);
    }
}
