//! Readiness (`/readyz`: should this instance get traffic?) and liveness (`/healthz`: are
//! the engine threads alive and ticking?).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Observability;
use super::engine::process_millis;
use crate::engine::resources::EngineStatus;

/// Why the server should not get new traffic now.
#[derive(Clone, Debug, PartialEq)]
pub enum NotReady {
    Draining,
    ModelLoading,
    NoModel,
    /// A model's engine admission gate is closed (queue at the high watermark).
    QueueFull {
        model: String,
    },
    /// A model's KV cache usage is above the readiness threshold.
    KvPressure {
        model: String,
        usage: f64,
    },
}

impl NotReady {
    /// The reason as shown in the `/readyz` body.
    pub fn reason(&self) -> String {
        match self {
            NotReady::Draining => "draining".into(),
            NotReady::ModelLoading => "model loading".into(),
            NotReady::NoModel => "no model loaded".into(),
            NotReady::QueueFull { model } => format!("queue at the high watermark (model `{model}`)"),
            NotReady::KvPressure { model, usage } => {
                format!("KV cache usage {:.0}% above the threshold (model `{model}`)", usage * 100.0)
            }
        }
    }
}

/// One model as readiness sees it.
pub struct ModelView<'a> {
    pub id: &'a str,
    pub status: &'a EngineStatus,
}

/// The first reason the server is not ready, or `None` when it is; `loading` is whether
/// any model is being loaded.
pub fn readiness(obs: &Observability, draining: bool, loading: bool, models: &[ModelView<'_>]) -> Option<NotReady> {
    if draining {
        return Some(NotReady::Draining);
    }
    if loading || obs.loading.load(Ordering::Relaxed) {
        return Some(NotReady::ModelLoading);
    }
    if models.is_empty() {
        return Some(NotReady::NoModel);
    }
    for m in models {
        if !m.status.admission_open.load(Ordering::Relaxed) {
            return Some(NotReady::QueueFull { model: m.id.to_owned() });
        }
        let usage = m.status.kv_usage();
        if usage > obs.kv_ready_max {
            return Some(NotReady::KvPressure { model: m.id.to_owned(), usage });
        }
    }
    None
}

/// Whether one engine is alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// The engine thread has ended.
    Stopped,
    /// Work is pending but the engine has not finished a tick for longer than allowed.
    Stuck {
        since_ms: u64,
    },
}

/// Liveness from the engine's state: `pending` requests, the age of its last tick.
pub fn liveness(stopped: bool, pending: u64, last_tick_age: Duration, stall: Duration) -> Liveness {
    if stopped {
        Liveness::Stopped
    } else if pending > 0 && last_tick_age > stall {
        Liveness::Stuck { since_ms: last_tick_age.as_millis() as u64 }
    } else {
        Liveness::Alive
    }
}

/// The liveness of model `id`'s engine, from its status and registered heartbeat.
pub fn engine_liveness(obs: &Observability, id: &str, status: &EngineStatus) -> Liveness {
    let stopped = status.stopped.load(Ordering::Relaxed);
    let Some(beat) = obs.heartbeat(id) else {
        return liveness(stopped, 0, Duration::ZERO, obs.tick_stall);
    };
    let last = beat.last_tick_ms.load(Ordering::Relaxed);
    let age = Duration::from_millis(process_millis().saturating_sub(last));
    liveness(stopped, beat.pending.load(Ordering::Relaxed), age, obs.tick_stall)
}
