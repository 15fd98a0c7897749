//! Readiness (`/readyz`: should this instance get traffic?) and liveness (`/healthz`: are
//! the engine threads alive and ticking?).

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// What an engine publishes for `/healthz`: when it last finished a tick, and how much work
/// it had then. Written by the engine's observer; read by [`engine_liveness`].
#[derive(Debug, Default)]
pub struct Heartbeat {
    /// Milliseconds since [`process_millis`]'s origin at the end of the last tick.
    pub last_tick_ms: AtomicU64,
    /// Requests alive in the engine at the end of the last tick.
    pub pending: AtomicU64,
}

/// Milliseconds since the first call in this process (a shared monotonic clock).
pub fn process_millis() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

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
    /// The engine admits new requests (its queue is under the high watermark).
    pub admission_open: bool,
    /// Share of the KV blocks held (0..=1).
    pub kv_usage: f64,
}

/// The first reason the server is not ready, or `None` when it is; `loading` is whether
/// any model is being loaded, `kv_ready_max` the KV usage above which a model is under
/// pressure.
pub fn readiness(draining: bool, loading: bool, kv_ready_max: f64, models: &[ModelView<'_>]) -> Option<NotReady> {
    if draining {
        return Some(NotReady::Draining);
    }
    if loading {
        return Some(NotReady::ModelLoading);
    }
    if models.is_empty() {
        return Some(NotReady::NoModel);
    }
    for m in models {
        if !m.admission_open {
            return Some(NotReady::QueueFull { model: m.id.to_owned() });
        }
        if m.kv_usage > kv_ready_max {
            return Some(NotReady::KvPressure { model: m.id.to_owned(), usage: m.kv_usage });
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
