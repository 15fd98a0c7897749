//! `batch`: picks this tick's work: every running decode sequence, then chunks of prompts
//! under the token budget (chunked prefill), oldest first.

use bevy_ecs::prelude::*;

use super::fail;
use crate::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::kv::arena::BlockTable;
use crate::kv::cache::KvCache;

type SeqQuery<'w, 's> = Query<
    'w,
    's,
    (Entity, &'static mut Phase, &'static Tokens, &'static mut KvHandle, &'static mut Outbox, &'static Timing),
>;

/// Builds the [`BatchPlan`]: decode first (one token each, up to `max_batch`), then prefill
/// chunks until `max_batch_tokens`. A prompt starts only when the KV cache can hold it; a
/// session's cached prefix is reused instead of recomputed.
pub fn assemble_batch(
    mut plan: ResMut<BatchPlan>,
    mut kv: ResMut<Kv>,
    mut seqs: SeqQuery,
    mut links: Query<(Option<&SessionLink>, &Tenant, &mut CachedPrefix)>,
    limits: Res<EngineLimits>,
) {
    plan.items.clear();
    let mut budget = limits.max_batch_tokens;
    let mut order: Vec<(bool, u64, Entity)> = seqs
        .iter()
        .filter(|(_, phase, _, _, outbox, _)| outbox.pending.is_empty() && runnable(**phase))
        .map(|(e, phase, _, _, _, timing)| (*phase != Phase::Decode, timing.admitted.0, e))
        .collect();
    order.sort_unstable();
    for (is_prefill, _, entity) in order {
        if plan.items.len() >= limits.max_batch || budget == 0 {
            break;
        }
        let Ok((_, mut phase, tokens, mut handle, mut outbox, _)) = seqs.get_mut(entity) else { continue };
        let Ok((link, tenant, mut cached)) = links.get_mut(entity) else { continue };
        if *phase == Phase::Queued {
            if handle.0.blocks.is_empty() {
                let session = link.map(|l| l.0.to_bits());
                cached.0 = adopt_cached_prefix(&mut kv.0, &mut handle.0, tenant.0.as_str(), session, &tokens.ids);
            }
            // Memory-aware start: the whole prompt must fit before any of it runs.
            if kv.0.prepare(&mut handle.0, tenant.0.as_str(), tokens.n_prompt).is_err() {
                continue;
            }
            *phase = Phase::Prefill;
        }
        let start = handle.0.len;
        let n = (tokens.ids.len() - start).min(budget);
        if !is_prefill && kv.0.prepare(&mut handle.0, tenant.0.as_str(), start + n).is_err() {
            let error = ApiError::new(ErrorKind::Unavailable, "the KV cache is full; the generation was stopped")
                .with_code("kv_cache_full");
            fail(&mut phase, &mut outbox, error);
            continue;
        }
        budget -= n;
        plan.items.push(PlanItem { entity, start_pos: start, n_tokens: n, samples: start + n == tokens.ids.len() });
    }
}

fn runnable(phase: Phase) -> bool {
    matches!(phase, Phase::Queued | Phase::Prefill | Phase::Decode)
}

/// Gives a starting request the K/V it can reuse and returns how many prompt positions
/// that covers: its session's parked blocks (up to where the prompt diverges), or else the
/// tenant's shared prefix blocks. At least the last prompt token is always recomputed.
fn adopt_cached_prefix(
    kv: &mut KvCache,
    table: &mut BlockTable,
    tenant: &str,
    session: Option<u64>,
    prompt: &[u32],
) -> usize {
    if let Some((known, mut parked)) = session.and_then(|key| kv.take_session(key)) {
        let common = known.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let reuse = common.min(parked.len).min(prompt.len().saturating_sub(1));
        if reuse > 0 {
            parked.len = reuse;
            *table = parked;
            return reuse;
        }
        kv.release(&mut parked, tenant, &known);
    }
    *table = kv.lookup_prefix(tenant, prompt);
    table.len
}
