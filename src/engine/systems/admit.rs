//! `admit`: turns inbox commands into entities, enforcing the queue watermarks.

use std::sync::atomic::Ordering;

use bevy_ecs::prelude::*;

use crate::config::SpeculativeConfig;
use crate::engine::components::*;
use crate::engine::resources::*;
use crate::engine::scheduler::{
    QueueLoad, Rejection, SchedulerStats, TenantLimits, TenantShare, Watermarks, estimate_tokens, rejection_error,
};
use crate::engine::speculate::Drafter;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::{EngineCommand, FinishReason, GenerateRequest, StreamEvent};
use crate::sampler::{SamplerState, TextGate};
use crate::tokenizer::StreamDecoder;
use crate::types::{SessionId, TenantId, Timestamp};

/// Live requests: their phase and tenant (queue load), prompt tokens, and client-given name.
type LiveQuery<'w, 's> =
    Query<'w, 's, (Entity, &'static Phase, &'static Tenant, Option<&'static Tokens>, Option<&'static ClientId>)>;

/// Drains the inbox: spawns request entities (and session entities on first use), refuses
/// work over the queue watermarks or the tenant's `max_queued` with 429 and a reason,
/// cancels requests by name, closes sessions, and notes a shutdown request.
#[allow(clippy::too_many_arguments)]
pub fn admit_requests(
    mut commands: Commands,
    mut inbox: ResMut<Inbox>,
    mut gate: ResMut<AdmissionGate>,
    mut sessions: ResMut<SessionIndex>,
    mut report: ResMut<TickReport>,
    mut stats: ResMut<SchedulerStats>,
    mut caches: Query<&mut SessionCache>,
    queued: LiveQuery,
    clock: Res<TickClock>,
    limits: Res<EngineLimits>,
    tenants: Res<TenantLimits>,
    status: Res<Status>,
) {
    let mut load = queue_load(&queued);
    let marks = watermarks(&limits);
    marks.update(&mut gate.open, &load);
    // Requests spawned by this pass (their entities exist once the commands are applied).
    let mut spawned: Vec<(Entity, TenantId, String)> = vec![];
    while let Some(cmd) = inbox.0.pop_front() {
        let (req, name) = match cmd {
            EngineCommand::Generate(req) => {
                let name = req.name();
                (req, name)
            }
            EngineCommand::Cancel { tenant, request_id, reply } => {
                let _ = reply.send(cancel(&mut commands, &queued, &spawned, &tenant, &request_id));
                continue;
            }
            EngineCommand::CloseSession { tenant, session, reply } => {
                let _ = reply.send(close_session(&mut commands, &mut sessions, &caches, (tenant, session)));
                continue;
            }
            EngineCommand::Shutdown => {
                report.stop_requested = true;
                continue;
            }
        };
        let share = tenants.get(&req.tenant);
        let tokens = estimate_tokens(&req.input);
        if let Err(reason) = marks.admit(&mut gate.open, &load, &req.tenant, share, tokens) {
            stats.reject(reason);
            reject(&req, rejection_error(reason, &load, &req.tenant, share));
            continue;
        }
        let session = match req.session.clone() {
            Some(id) => {
                match session_entity(&mut commands, &mut sessions, &mut caches, &req, id, (&limits, share), clock.now) {
                    Ok(e) => Some(e),
                    Err((reason, e)) => {
                        stats.reject(reason);
                        reject(&req, e);
                        continue;
                    }
                }
            }
            None => None,
        };
        load.add(&req.tenant, tokens);
        stats.admitted += 1;
        let tenant = req.tenant.clone();
        let entity =
            spawn_request(&mut commands, *req, ClientId(name.clone()), session, limits.speculative, clock.read());
        spawned.push((entity, tenant, name));
    }
    stats.queue_depth = load.requests;
    stats.queued_tokens = load.tokens;
    stats.max_queue_depth = stats.max_queue_depth.max(load.requests);
    status.0.admission_open.store(gate.open, Ordering::Relaxed);
}

/// Ends every live request of `tenant` named `name` (`cancelled`; evict frees its blocks in
/// this tick). A request already finished is left as it is. Another tenant's request of the
/// same name is not found.
fn cancel(
    commands: &mut Commands,
    live: &LiveQuery,
    spawned: &[(Entity, TenantId, String)],
    tenant: &TenantId,
    name: &str,
) -> Result<(), ApiError> {
    let earlier = live.iter().filter(|(_, _, t, _, c)| &t.0 == tenant && c.is_some_and(|c| c.0 == name));
    let earlier = earlier.map(|(e, phase, ..)| (e, matches!(phase, Phase::Finished(_))));
    let now = spawned.iter().filter(|(_, t, n)| t == tenant && n == name).map(|(e, ..)| (*e, false));
    let mut found = false;
    for (entity, finished) in earlier.chain(now) {
        found = true;
        if !finished {
            commands.entity(entity).insert(Phase::Finished(FinishReason::Cancelled));
        }
    }
    if found {
        Ok(())
    } else {
        Err(ApiError::new(ErrorKind::NotFound, format!("no running request `{name}`"))
            .with_code("request_not_found")
            .with_param("request_id"))
    }
}

fn watermarks(limits: &EngineLimits) -> Watermarks {
    Watermarks { high: limits.high_watermark, low: limits.low_watermark, high_tokens: limits.high_watermark_tokens }
}

fn queue_load(queued: &LiveQuery) -> QueueLoad {
    let mut load = QueueLoad::default();
    for (_, phase, tenant, tokens, _) in queued {
        if *phase == Phase::Queued {
            load.add(&tenant.0, tokens.map_or(0, |t| t.n_prompt));
        }
    }
    load
}

fn close_session(
    commands: &mut Commands,
    sessions: &mut SessionIndex,
    caches: &Query<&mut SessionCache>,
    key: (TenantId, SessionId),
) -> Result<(), ApiError> {
    match sessions.0.get(&key).copied() {
        Some(e) if caches.get(e).is_ok_and(|c| c.in_flight) => Err(ApiError::new(
            ErrorKind::Conflict,
            format!("session `{}` has a request in flight; close it after the request ends", key.1),
        )
        .with_code("session_busy")),
        Some(e) => {
            commands.entity(e).insert(CloseRequested);
            sessions.0.remove(&key);
            Ok(())
        }
        None => {
            Err(ApiError::new(ErrorKind::NotFound, format!("unknown session `{}`", key.1)).with_param("session_id"))
        }
    }
}

fn reject(req: &GenerateRequest, error: ApiError) {
    // The receiver may already be gone; nothing else to do then.
    let _ = req.events.try_send(StreamEvent::Error(error));
}

/// The session entity for the request's `session_id`, created on first use.
fn session_entity(
    commands: &mut Commands,
    sessions: &mut SessionIndex,
    caches: &mut Query<&mut SessionCache>,
    req: &GenerateRequest,
    id: SessionId,
    (limits, share): (&EngineLimits, TenantShare),
    now: Timestamp,
) -> Result<Entity, (Rejection, ApiError)> {
    let key = (req.tenant.clone(), id.clone());
    if let Some(&e) = sessions.0.get(&key) {
        let mut cache = caches
            .get_mut(e)
            .map_err(|_| (Rejection::SessionBusy, ApiError::new(ErrorKind::Internal, "session entity lost")))?;
        if cache.in_flight {
            return Err((
                Rejection::SessionBusy,
                ApiError::new(
                    ErrorKind::Conflict,
                    format!("session `{id}` already has a request in flight; send turns one at a time"),
                )
                .with_code("session_busy")
                .with_param("session_id"),
            ));
        }
        cache.in_flight = true;
        commands.entity(e).insert(LastUsed(now));
        return Ok(e);
    }
    let held = sessions.0.keys().filter(|(tenant, _)| *tenant == req.tenant).count();
    if held >= share.max_sessions {
        return Err((
            Rejection::TooManySessions,
            ApiError::new(
                ErrorKind::RateLimited,
                format!(
                    "tenant `{}` holds its maximum of {} sessions (tenants[].max_sessions); close one or retry later",
                    req.tenant, share.max_sessions
                ),
            )
            .with_code("too_many_sessions")
            .with_retry_after(5),
        ));
    }
    if sessions.0.len() >= limits.max_sessions {
        return Err((
            Rejection::TooManySessions,
            ApiError::new(
                ErrorKind::RateLimited,
                format!("the model holds its maximum of {} sessions; close one or retry later", limits.max_sessions),
            )
            .with_code("too_many_sessions")
            .with_retry_after(5),
        ));
    }
    let e = commands
        .spawn((SessionName { tenant: req.tenant.clone(), id }, SessionCache { in_flight: true }, LastUsed(now)))
        .id();
    sessions.0.insert(key, e);
    Ok(e)
}

fn spawn_request(
    commands: &mut Commands,
    req: GenerateRequest,
    name: ClientId,
    session: Option<Entity>,
    speculative: Option<SpeculativeConfig>,
    now: Timestamp,
) -> Entity {
    // A request drafts when its model speculates, it did not opt out, and nothing
    // constrains its output.
    let speculative = speculative.filter(|_| req.sampling.speculative);
    let waited = req.received_at.elapsed();
    let received = Timestamp(now.0.saturating_sub(waited.as_micros() as u64));
    let deadline = Deadline(received.after(req.timeout));
    let stops = req.sampling.stop.clone();
    let constraint = req.constraint;
    let mut e = commands.spawn((
        Request(req.id),
        name,
        Tenant(req.tenant),
        Prompt(req.input),
        Phase::Queued,
        KvHandle::default(),
        StreamTx(req.events),
        deadline,
        Timing { received, admitted: now, first_token: None },
        Outbox::default(),
        TextOut { decoder: StreamDecoder::new(!req.keep_special), gate: TextGate::new(&stops, None) },
        Sampling(SamplerState::new(req.sampling)),
        CachedPrefix(0),
    ));
    if let Some(s) = session {
        e.insert(SessionLink(s));
    }
    match (constraint, speculative) {
        (Some(c), _) => {
            e.insert(Constrained(c));
        }
        (None, Some(config)) => {
            e.insert(Drafting(Drafter::new(&config)));
        }
        (None, None) => {}
    }
    e.id()
}
