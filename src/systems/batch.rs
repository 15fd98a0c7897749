//! `batch`: picks this tick's work: every running decode sequence, then chunks of prompts
//! under the token budget (chunked prefill), oldest first.

use bevy_ecs::prelude::*;

use super::fail;
use crate::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::kv::arena::BlockTable;

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
    mut links: Query<(&SessionLink, &mut CachedPrefix)>,
    mut sessions: Query<&mut SessionCache>,
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
        if *phase == Phase::Queued {
            if let Ok((link, mut cached)) = links.get_mut(entity)
                && let Ok(mut cache) = sessions.get_mut(link.0)
            {
                cached.0 = adopt_session_prefix(&mut cache, &mut handle.0, &tokens.ids);
            }
            // Memory-aware start: the whole prompt must fit before any of it runs.
            if handle.0.reserve(&mut kv.0, tokens.n_prompt).is_err() {
                continue;
            }
            *phase = Phase::Prefill;
        }
        let start = handle.0.len;
        let n = (tokens.ids.len() - start).min(budget);
        if !is_prefill && handle.0.reserve(&mut kv.0, start + n).is_err() {
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

/// Moves a session's cache into the request and returns how many prompt positions it covers.
/// At least the last prompt token is always recomputed, since its logits are needed.
fn adopt_session_prefix(cache: &mut SessionCache, table: &mut BlockTable, prompt: &[u32]) -> usize {
    let common = cache.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    let reuse = common.min(cache.table.len).min(prompt.len().saturating_sub(1));
    *table = std::mem::take(&mut cache.table);
    table.len = reuse;
    cache.tokens.clear();
    reuse
}
