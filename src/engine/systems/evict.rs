//! `evict`: deadlines, cancellations, finished requests, and idle sessions.

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::kv::arena::BlockTable;
use crate::kv::cache::EvictReason;
use crate::protocol::FinishReason;
use crate::types::TokenId;

type RequestQuery<'w, 's> = Query<
    'w,
    's,
    (
        Entity,
        &'static mut Phase,
        &'static mut Outbox,
        &'static StreamTx,
        &'static Deadline,
        &'static mut KvHandle,
        Option<&'static Tokens>,
        Option<&'static SessionLink>,
        &'static Tenant,
    ),
>;

/// The token ids whose K/V the table holds.
fn held_tokens<'a>(tokens: Option<&'a Tokens>, table: &BlockTable) -> &'a [TokenId] {
    tokens.map_or(&[][..], |t| &t.ids[..table.len.min(t.ids.len())])
}

/// Ends requests past their deadline (`deadline`) or whose client left or stopped reading
/// for `stream_stall` (`cancelled`),
/// despawns delivered requests (their full blocks are published for prefix sharing, then
/// released, or parked in the KV cache for their session; a finished request without a
/// session whose last events wait for a slow reader releases its blocks at once), and
/// frees sessions that were closed or idle past the TTL.
#[allow(clippy::too_many_arguments)]
pub fn evict_finished(
    mut commands: Commands,
    mut requests: RequestQuery,
    mut sessions: Query<(Entity, &mut SessionCache, &mut LastUsed, &SessionName, Has<CloseRequested>)>,
    mut index: ResMut<SessionIndex>,
    mut kv: ResMut<Kv>,
    clock: Res<TickClock>,
    limits: Res<EngineLimits>,
) {
    for (entity, mut phase, mut outbox, tx, deadline, mut handle, tokens, link, tenant) in &mut requests {
        if tx.0.is_closed() {
            if !matches!(*phase, Phase::Finished(_)) {
                *phase = Phase::Finished(FinishReason::Cancelled);
            }
            outbox.pending.clear();
            outbox.closed = true;
        } else if outbox.stalled_since.is_some_and(|since| clock.now.saturating_since(since) >= limits.stream_stall) {
            // The client stopped reading: give its KV blocks back instead of holding them
            // until the deadline.
            if !matches!(*phase, Phase::Finished(_)) {
                *phase = Phase::Finished(FinishReason::Cancelled);
            }
            outbox.pending.clear();
            outbox.closed = true;
        } else if !matches!(*phase, Phase::Finished(_)) && clock.now >= deadline.0 {
            *phase = Phase::Finished(FinishReason::Deadline);
        }
        let finished = matches!(*phase, Phase::Finished(_));
        if !outbox.delivered() {
            if finished && link.is_none() && !handle.0.blocks.is_empty() {
                // Its last events wait for a slow reader; its K/V is no longer needed.
                let mut table = std::mem::take(&mut handle.0);
                let held = held_tokens(tokens, &table);
                kv.0.release(&mut table, tenant.0.as_str(), held);
            }
            continue;
        }
        let table = std::mem::take(&mut handle.0);
        let known = held_tokens(tokens, &table);
        match link.and_then(|l| sessions.get_mut(l.0).ok()) {
            Some((session, mut cache, mut last_used, _, _)) => {
                kv.0.park_session(session.to_bits(), tenant.0.as_str(), table, known, clock.now);
                cache.in_flight = false;
                last_used.0 = clock.now;
            }
            None => kv.0.release(&mut { table }, tenant.0.as_str(), known),
        }
        commands.entity(entity).despawn();
    }
    for (entity, cache, last_used, name, close) in &mut sessions {
        let expired = clock.now.saturating_since(last_used.0) >= limits.session_ttl;
        if cache.in_flight || !(close || expired) {
            continue;
        }
        let reason = if close { EvictReason::Close } else { EvictReason::Ttl };
        kv.0.drop_session(entity.to_bits(), reason);
        let key = (name.tenant.clone(), name.id.clone());
        if index.0.get(&key) == Some(&entity) {
            index.0.remove(&key);
        }
        commands.entity(entity).despawn();
    }
}
