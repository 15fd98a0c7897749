//! `batch`: picks this tick's work. Every running decode sequence first (one token each),
//! then the drafts of speculating sequences from what budget and free blocks are left, then
//! prompt chunks under the token budget (chunked prefill), shared between tenants by
//! weight (virtual-time fair sharing), each tenant's requests oldest first.
//!
//! Within a tenant, sessions are served in arrival order: a session has at most one request
//! in flight, so arrival order across a tenant's requests is round-robin across its sessions.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::engine::scheduler::{FairShare, SchedulerStats, TenantLimits, weighted_quotas};
use crate::error::{ApiError, ErrorKind};
use crate::kv::arena::BlockTable;
use crate::kv::cache::KvCache;
use crate::types::TenantId;

type SeqQuery<'w, 's> = Query<
    'w,
    's,
    (
        Entity,
        &'static mut Phase,
        &'static Tokens,
        &'static mut KvHandle,
        &'static mut Outbox,
        &'static Timing,
        &'static Tenant,
        Has<Preempted>,
        Option<&'static mut Drafting>,
        &'static Sampling,
    ),
>;

type LinkQuery<'w, 's> = Query<'w, 's, (Option<&'static SessionLink>, &'static mut CachedPrefix)>;

/// The scheduling state of one tick, shared by the decode and prefill passes.
struct Tick<'a> {
    plan: &'a mut BatchPlan,
    fair: &'a mut FairShare,
    tenants: &'a TenantLimits,
    limits: &'a EngineLimits,
    budget: usize,
    /// Running (prefill or decode) sequences, in total and per tenant.
    running: usize,
    running_of: HashMap<TenantId, usize>,
    /// Plan index of each entity already planned this tick.
    planned: HashMap<Entity, usize>,
    /// Sequences preempted this tick.
    preemptions: u64,
}

impl Tick<'_> {
    fn full(&self) -> bool {
        self.budget == 0 || self.plan.items.len() >= self.limits.max_batch
    }

    fn charge(&mut self, tenant: &TenantId, n: usize) {
        self.budget -= n;
        self.fair.charge(tenant, self.tenants.get(tenant).weight, n);
    }
}

/// A sequence that may get work this tick.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    entity: Entity,
    queued: bool,
}

/// Builds the [`BatchPlan`]: every running decode sequence (up to `max_batch`), then
/// prefill chunks until `max_batch_tokens`, split between tenants by weight. A queued
/// prompt starts only when the running set has room (`max_batch`, the tenant's
/// `max_concurrent`) and the KV cache can hold the whole prompt; a session's cached prefix
/// is reused instead of recomputed. A decode sequence whose client is not reading
/// (undelivered events) is paused, not batched. A decode sequence the KV cache cannot grow
/// preempts the most recently admitted running sequence (recompute preemption).
#[allow(clippy::too_many_arguments)]
pub fn assemble_batch(
    mut commands: Commands,
    mut plan_res: ResMut<BatchPlan>,
    mut kv: ResMut<Kv>,
    mut seqs: SeqQuery,
    mut links: LinkQuery,
    mut fair: ResMut<FairShare>,
    mut stats: ResMut<SchedulerStats>,
    limits: Res<EngineLimits>,
    tenants: Res<TenantLimits>,
) {
    let plan = &mut *plan_res;
    plan.items.clear();
    let (decode, prefill, running_of) = collect_candidates(&seqs, &mut stats);
    fair.activate(running_of.keys().chain(prefill.keys()));
    let mut tick = Tick {
        plan,
        fair: &mut fair,
        tenants: &tenants,
        limits: &limits,
        budget: limits.max_batch_tokens,
        running: running_of.values().sum(),
        running_of,
        planned: HashMap::new(),
        preemptions: 0,
    };
    for (entity, tenant) in decode {
        if tick.full() {
            break;
        }
        plan_decode(&mut tick, &mut seqs, &mut kv.0, &mut commands, entity, &tenant);
    }
    // Drafts only once every decode step has its token and its blocks.
    let decoding = tick.plan.items.len();
    for i in 0..decoding {
        if tick.budget == 0 {
            break;
        }
        plan_draft(&mut tick, &mut seqs, &mut kv.0, i, decoding);
    }
    stats.preempted += tick.preemptions;
    plan_prefill(&mut tick, prefill, &mut seqs, &mut kv.0, &mut links);
    stats.running = tick.running;
}

type Collected = (Vec<(Entity, TenantId)>, BTreeMap<TenantId, VecDeque<Candidate>>, HashMap<TenantId, usize>);

/// Decode sequences (oldest first), prefill candidates per tenant (running prompts first,
/// then preempted ones, then queued ones, each oldest first), and running sequences per
/// tenant.
fn collect_candidates(seqs: &SeqQuery, stats: &mut SchedulerStats) -> Collected {
    let mut decode = vec![];
    let mut prefill: BTreeMap<TenantId, Vec<(bool, bool, u64, Entity)>> = BTreeMap::new();
    let mut running_of: HashMap<TenantId, usize> = HashMap::new();
    for (entity, phase, _, _, outbox, timing, tenant, preempted, ..) in seqs {
        let admitted = timing.admitted.0;
        match *phase {
            Phase::Decode | Phase::Prefill => *running_of.entry(tenant.0.clone()).or_default() += 1,
            Phase::Queued | Phase::Finished(_) => {}
        }
        match *phase {
            Phase::Decode if !outbox.pending.is_empty() => stats.paused += 1,
            Phase::Decode => decode.push((admitted, entity, tenant.0.clone())),
            Phase::Prefill => prefill.entry(tenant.0.clone()).or_default().push((false, false, admitted, entity)),
            Phase::Queued => prefill.entry(tenant.0.clone()).or_default().push((true, !preempted, admitted, entity)),
            Phase::Finished(_) => {}
        }
    }
    decode.sort_unstable();
    let decode = decode.into_iter().map(|(_, e, t)| (e, t)).collect();
    let prefill = prefill
        .into_iter()
        .map(|(t, mut v)| {
            v.sort_unstable();
            (t, v.into_iter().map(|(queued, _, _, entity)| Candidate { entity, queued }).collect())
        })
        .collect();
    (decode, prefill, running_of)
}

/// Plans one decode step. When the KV cache cannot grow the sequence, waiting sequences
/// give back blocks they adopted, then the most recently admitted running sequence
/// (possibly this one) is preempted, until it can; a sequence that still cannot grow when
/// it holds every block left is stopped with an error.
fn plan_decode(
    tick: &mut Tick,
    seqs: &mut SeqQuery,
    kv: &mut KvCache,
    commands: &mut Commands,
    entity: Entity,
    tenant: &TenantId,
) {
    loop {
        let Ok((_, phase, tokens, mut handle, ..)) = seqs.get_mut(entity) else { return };
        if *phase != Phase::Decode {
            return; // preempted earlier in this tick
        }
        let (start, end) = (handle.0.len, tokens.ids.len());
        if kv.prepare(&mut handle.0, tenant.as_str(), end).is_ok() {
            tick.planned.insert(entity, tick.plan.items.len());
            tick.plan.items.push(PlanItem { entity, start_pos: start, n_tokens: end - start, samples: true, draft: 0 });
            tick.charge(tenant, end - start);
            return;
        }
        match pick_victim(seqs, entity) {
            Some(victim) => {
                preempt(tick, seqs, kv, commands, victim);
                if victim == entity {
                    return;
                }
            }
            None => {
                let Ok((_, mut phase, _, _, mut outbox, ..)) = seqs.get_mut(entity) else { return };
                let error = ApiError::new(ErrorKind::Unavailable, "the KV cache is full; the generation was stopped")
                    .with_code("kv_cache_full");
                fail(&mut phase, &mut outbox, error);
                return;
            }
        }
    }
}

/// Extends decode step `i` of the plan with its sequence's draft, if it speculates: within
/// the token budget left after every decode step, the context and `max_tokens` (a step
/// samples at most one token more than its draft), and only from free KV blocks, so a draft
/// never evicts cached work or preempts anyone. `decoding` sequences decode this tick
/// (drafts must pay for themselves in a step that large).
fn plan_draft(tick: &mut Tick, seqs: &mut SeqQuery, kv: &mut KvCache, i: usize, decoding: usize) {
    let item = tick.plan.items[i];
    let Ok((_, phase, tokens, mut handle, _, _, tenant, _, Some(mut drafting), sampling)) = seqs.get_mut(item.entity)
    else {
        return;
    };
    let end = tokens.ids.len();
    // A step with one known position (always, for a decode step) gets one row per draft token.
    if *phase != Phase::Decode || item.n_tokens != 1 || item.start_pos + 1 != end {
        return;
    }
    let remaining = (sampling.0.config().max_tokens as usize).saturating_sub(tokens.n_generated());
    // The token sampled after the last draft position must still fit the context.
    let limit = tick.budget.min(tick.limits.n_ctx.saturating_sub(end + 1)).min(remaining.saturating_sub(1));
    let draft = drafting.0.propose(&tokens.ids, limit, decoding);
    if draft == 0 {
        return;
    }
    if kv.prepare_from_free(&mut handle.0, tenant.0.as_str(), end + draft).is_err() {
        drafting.0.clear();
        return;
    }
    let planned = &mut tick.plan.items[i];
    planned.n_tokens += draft;
    planned.draft = draft;
    tick.charge(&tenant.0, draft);
}

/// The sequence whose blocks `needy` takes: a waiting one still holding adopted blocks,
/// else one whose client stopped reading, else the most recently admitted running one. `None` when `needy` holds the only blocks
/// there are to take.
fn pick_victim(seqs: &SeqQuery, needy: Entity) -> Option<Entity> {
    let holders = seqs
        .iter()
        .filter(|(_, phase, _, handle, ..)| !matches!(**phase, Phase::Finished(_)) && !handle.0.blocks.is_empty());
    let (victim, others) = holders.fold((None, 0usize), |(best, n), (e, phase, _, _, outbox, timing, ..)| {
        let key = (*phase == Phase::Queued, outbox.stalled_since.is_some(), timing.admitted.0, e);
        (Some(best.map_or(key, |b: (bool, bool, u64, Entity)| b.max(key))), n + usize::from(e != needy))
    });
    victim.map(|(.., e)| e).filter(|_| others > 0)
}

/// Recompute preemption: frees the sequence's blocks (its full blocks stay in the prefix
/// cache, so a restart may reuse what eviction has not taken) and queues it again at the
/// head of its tenant's queue. Its tokens, sampler state and delivered events are kept: on
/// restart it prefills prompt plus generated tokens and samples on as if never stopped.
/// A waiting sequence only gives back the blocks it adopted.
fn preempt(tick: &mut Tick, seqs: &mut SeqQuery, kv: &mut KvCache, commands: &mut Commands, victim: Entity) {
    let Ok((_, mut phase, tokens, mut handle, _, _, tenant, ..)) = seqs.get_mut(victim) else { return };
    let mut table = std::mem::take(&mut handle.0);
    let held = &tokens.ids[..table.len.min(tokens.ids.len())];
    kv.release(&mut table, tenant.0.as_str(), held);
    if *phase == Phase::Queued {
        return;
    }
    *phase = Phase::Queued;
    commands.entity(victim).insert(Preempted);
    tick.running = tick.running.saturating_sub(1);
    if let Some(n) = tick.running_of.get_mut(&tenant.0) {
        *n = n.saturating_sub(1);
    }
    tick.preemptions += 1;
}

/// Hands the prefill budget out in two passes: first each tenant up to its weighted quota
/// (so a tenant with huge prompts cannot take a whole tick from one with short ones), then
/// whatever is left to whoever still has work. Within a pass the tenant with the least
/// virtual time goes first.
fn plan_prefill(
    tick: &mut Tick,
    mut queues: BTreeMap<TenantId, VecDeque<Candidate>>,
    seqs: &mut SeqQuery,
    kv: &mut KvCache,
    links: &mut LinkQuery,
) {
    let weights: Vec<(TenantId, u32)> = queues.keys().map(|t| (t.clone(), tick.tenants.get(t).weight)).collect();
    let mut quotas = weighted_quotas(tick.budget, &weights);
    for capped in [true, false] {
        while !tick.full() {
            let quota = |t: &TenantId| quotas.get(t).copied().unwrap_or(0);
            let eligible = queues.iter().filter(|(t, q)| !q.is_empty() && (!capped || quota(t) > 0));
            let Some(tenant) = tick.fair.pick(eligible.map(|(t, _)| t)).cloned() else { break };
            let cap = if capped { quota(&tenant) } else { usize::MAX };
            let Some(queue) = queues.get_mut(&tenant) else { break };
            let n = plan_chunk(tick, queue, seqs, kv, links, &tenant, cap);
            if let Some(q) = quotas.get_mut(&tenant) {
                *q = q.saturating_sub(n);
            }
        }
    }
}

/// Plans the next chunk of the tenant's first candidate (starting it if queued); returns
/// the tokens planned. A candidate that cannot start, or whose prompt is fully planned,
/// leaves the queue.
#[allow(clippy::too_many_arguments)]
fn plan_chunk(
    tick: &mut Tick,
    queue: &mut VecDeque<Candidate>,
    seqs: &mut SeqQuery,
    kv: &mut KvCache,
    links: &mut LinkQuery,
    tenant: &TenantId,
    cap: usize,
) -> usize {
    let Some(&cand) = queue.front() else { return 0 };
    if cand.queued && !tick.planned.contains_key(&cand.entity) {
        let share = tick.tenants.get(tenant);
        let room = tick.running < tick.limits.max_batch
            && tick.running_of.get(tenant).copied().unwrap_or(0) < share.max_concurrent;
        if !room || !start_sequence(seqs, kv, links, cand.entity) {
            // No slot or no KV room yet: it waits (the next candidate may be smaller).
            queue.pop_front();
            return 0;
        }
        tick.running += 1;
        *tick.running_of.entry(tenant.clone()).or_default() += 1;
    }
    let Ok((_, phase, tokens, handle, ..)) = seqs.get(cand.entity) else {
        queue.pop_front();
        return 0;
    };
    if *phase != Phase::Prefill {
        // Preempted by a decode step earlier in this tick: it starts over from the queue.
        queue.pop_front();
        return 0;
    }
    let (len, total) = (handle.0.len, tokens.ids.len());
    let index = tick.planned.get(&cand.entity).copied();
    let already = index.map_or(0, |i| tick.plan.items[i].n_tokens);
    let n = (total - len - already).min(tick.budget).min(cap);
    if len + already + n == total {
        queue.pop_front();
    }
    if n == 0 {
        return 0;
    }
    let samples = len + already + n == total;
    match index {
        Some(i) => {
            tick.plan.items[i].n_tokens += n;
            tick.plan.items[i].samples = samples;
        }
        None => {
            tick.planned.insert(cand.entity, tick.plan.items.len());
            tick.plan.items.push(PlanItem { entity: cand.entity, start_pos: len, n_tokens: n, samples, draft: 0 });
        }
    }
    tick.charge(tenant, n);
    n
}

/// Moves a queued sequence to `Prefill` if the KV cache can hold all its known tokens
/// (its prompt, plus what it generated before a preemption), after adopting what the cache
/// already holds for it (its session's parked blocks or the tenant's shared prefix blocks).
/// Otherwise it stays queued: it keeps a session's blocks, and hands shared prefix blocks
/// back to the cache (where eviction may take them for running sequences).
fn start_sequence(seqs: &mut SeqQuery, kv: &mut KvCache, links: &mut LinkQuery, entity: Entity) -> bool {
    let Ok((_, mut phase, tokens, mut handle, _, _, tenant, preempted, ..)) = seqs.get_mut(entity) else {
        return false;
    };
    let tenant = tenant.0.as_str();
    let mut keep = true;
    if handle.0.blocks.is_empty()
        && let Ok((link, mut cached)) = links.get_mut(entity)
    {
        let session = link.map(|l| l.0.to_bits());
        let adopted = adopt_cached_prefix(kv, &mut handle.0, tenant, session, &tokens.ids);
        keep = adopted.from_session;
        if !preempted {
            // Usage reports what the prompt reused, not what a restart recovered.
            cached.0 = adopted.positions;
        }
    }
    if kv.prepare(&mut handle.0, tenant, tokens.ids.len()).is_err() {
        if !keep {
            let held = &tokens.ids[..handle.0.len.min(tokens.ids.len())];
            kv.release(&mut handle.0, tenant, held);
        }
        return false;
    }
    *phase = Phase::Prefill;
    true
}

/// What a starting sequence adopted from the cache.
struct Adopted {
    /// Known positions it need not compute.
    positions: usize,
    /// They are its session's parked blocks (not shared prefix blocks).
    from_session: bool,
}

/// Gives a starting request the K/V it can reuse: its session's parked blocks (up to where
/// the prompt diverges), or else the tenant's shared prefix blocks. At least the last
/// known token is always recomputed.
fn adopt_cached_prefix(
    kv: &mut KvCache,
    table: &mut BlockTable,
    tenant: &str,
    session: Option<u64>,
    prompt: &[u32],
) -> Adopted {
    if let Some((known, mut parked)) = session.and_then(|key| kv.take_session(key)) {
        let common = known.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let reuse = common.min(parked.len).min(prompt.len().saturating_sub(1));
        if reuse > 0 {
            parked.len = reuse;
            *table = parked;
            return Adopted { positions: reuse, from_session: true };
        }
        kv.release(&mut parked, tenant, &known);
    }
    *table = kv.lookup_prefix(tenant, prompt);
    Adopted { positions: table.len, from_session: false }
}
