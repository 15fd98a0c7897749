//! `admit`: turns inbox commands into entities, enforcing the queue watermarks.

use std::sync::atomic::Ordering;

use bevy_ecs::prelude::*;

use crate::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::{EngineCommand, GenerateRequest, StreamEvent};
use crate::sampler::{SamplerState, TextGate};
use crate::tokenizer::StreamDecoder;
use crate::types::{SessionId, Timestamp};

/// Drains the inbox: spawns request entities (and session entities on first use), rejects
/// work over the watermark with 429, closes sessions, and notes a shutdown request.
#[allow(clippy::too_many_arguments)]
pub fn admit_requests(
    mut commands: Commands,
    mut inbox: ResMut<Inbox>,
    mut gate: ResMut<AdmissionGate>,
    mut sessions: ResMut<SessionIndex>,
    mut report: ResMut<TickReport>,
    mut caches: Query<&mut SessionCache>,
    queued: Query<&Phase>,
    clock: Res<TickClock>,
    limits: Res<EngineLimits>,
    status: Res<Status>,
) {
    let mut n_queued = queued.iter().filter(|p| **p == Phase::Queued).count();
    update_gate(&mut gate, n_queued, &limits);
    while let Some(cmd) = inbox.0.pop_front() {
        match cmd {
            EngineCommand::Generate(req) => {
                if !gate.open || n_queued >= limits.high_watermark {
                    gate.open = false;
                    reject(&req, over_watermark(n_queued));
                    continue;
                }
                let session = match req.session.clone() {
                    Some(id) => {
                        match session_entity(&mut commands, &mut sessions, &mut caches, &req, id, &limits, clock.now) {
                            Ok(e) => Some(e),
                            Err(e) => {
                                reject(&req, e);
                                continue;
                            }
                        }
                    }
                    None => None,
                };
                spawn_request(&mut commands, *req, session, clock.now);
                n_queued += 1;
            }
            EngineCommand::CloseSession { tenant, session, reply } => {
                let key = (tenant, session);
                let result = match sessions.0.get(&key).copied() {
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
                    None => Err(ApiError::new(ErrorKind::NotFound, format!("unknown session `{}`", key.1))
                        .with_param("session_id")),
                };
                let _ = reply.send(result);
            }
            EngineCommand::Shutdown => report.stop_requested = true,
        }
    }
    status.0.admission_open.store(gate.open, Ordering::Relaxed);
}

/// Hysteresis: closed at the high watermark, open again only at the low one.
fn update_gate(gate: &mut AdmissionGate, n_queued: usize, limits: &EngineLimits) {
    if n_queued >= limits.high_watermark {
        gate.open = false;
    } else if n_queued <= limits.low_watermark {
        gate.open = true;
    }
}

fn over_watermark(n_queued: usize) -> ApiError {
    ApiError::new(ErrorKind::RateLimited, format!("the request queue is full ({n_queued} waiting); retry later"))
        .with_code("queue_full")
        .with_retry_after(1)
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
    limits: &EngineLimits,
    now: Timestamp,
) -> Result<Entity, ApiError> {
    let key = (req.tenant.clone(), id.clone());
    if let Some(&e) = sessions.0.get(&key) {
        let mut cache = caches.get_mut(e).map_err(|_| ApiError::new(ErrorKind::Internal, "session entity lost"))?;
        if cache.in_flight {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!("session `{id}` already has a request in flight; send turns one at a time"),
            )
            .with_code("session_busy")
            .with_param("session_id"));
        }
        cache.in_flight = true;
        commands.entity(e).insert(LastUsed(now));
        return Ok(e);
    }
    if sessions.0.len() >= limits.max_sessions {
        return Err(ApiError::new(
            ErrorKind::RateLimited,
            format!("the model holds its maximum of {} sessions; close one or retry later", limits.max_sessions),
        )
        .with_code("too_many_sessions")
        .with_retry_after(5));
    }
    let e = commands
        .spawn((
            SessionName { tenant: req.tenant.clone(), id },
            SessionCache { in_flight: true, ..Default::default() },
            LastUsed(now),
        ))
        .id();
    sessions.0.insert(key, e);
    Ok(e)
}

fn spawn_request(commands: &mut Commands, req: GenerateRequest, session: Option<Entity>, now: Timestamp) {
    let waited = req.received_at.elapsed();
    let received = Timestamp(now.0.saturating_sub(waited.as_micros() as u64));
    let deadline = Deadline(received.after(req.timeout));
    let stops = req.sampling.stop.clone();
    let mut e = commands.spawn((
        Request(req.id),
        Tenant(req.tenant),
        Prompt(req.input),
        Phase::Queued,
        KvHandle::default(),
        StreamTx(req.events),
        deadline,
        Timing { received, admitted: now, first_token: None },
        Outbox::default(),
        TextOut { decoder: StreamDecoder::new(true), gate: TextGate::new(&stops, None) },
        Sampling(SamplerState::new(req.sampling)),
        CachedPrefix(0),
    ));
    if let Some(s) = session {
        e.insert(SessionLink(s));
    }
}
