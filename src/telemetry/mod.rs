//! Observability: Prometheus metrics, structured logs, Chrome traces, readiness and liveness.
//!
//! - [`Metrics`] (one per server) holds every series; engines get resolved handles through
//!   [`Observability::model_metrics`], the gateway renders `/metrics` from it.
//! - [`init`] installs the global subscriber: text or JSON logs on stderr, and one Chrome
//!   trace layer that records when a trace file is configured or an admin capture runs.
//! - Every tick runs in a `tick` span and every stage in a `stage` span carrying the
//!   batch size and token count (the engine's observer opens them), so a Chrome trace opened
//!   in Perfetto or chrome://tracing shows each tick and its stages by name.
//! - [`health`]: readiness and liveness judged from plain numbers the engines publish.
//!
//! This layer imports only the foundation (`error`, `types`, `config`); the engine and the
//! gateway report into it and read from it.

pub mod health;
pub mod metrics;
pub mod trace;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing_subscriber::field::MakeExt;
use tracing_subscriber::filter::{LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use health::{Heartbeat, Liveness, ModelView, NotReady};
pub use metrics::{Metrics, MetricsError, ModelMetrics};

use crate::error::{ApiError, ErrorKind};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStyle {
    Text,
    Json,
}

/// Keeps the Chrome trace writer alive; the trace file becomes valid JSON when this is
/// dropped (so drop it before the process exits, never `process::exit` past it).
pub struct TelemetryGuard {
    _private: (),
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        trace::finish();
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter `{filter}`: {message}")]
    Filter { filter: String, message: String },
    #[error("cannot create trace file {path}: {source}")]
    TraceFile { path: String, source: std::io::Error },
    #[error("a global subscriber is already installed")]
    AlreadyInstalled,
}

/// Installs the global subscriber: logs to stderr at `level` (an `EnvFilter` directive;
/// `RUST_LOG` wins when set), plus a Chrome trace written to `chrome_trace` if given.
pub fn init(style: LogStyle, level: &str, chrome_trace: Option<&Path>) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => env,
        _ => level.to_owned(),
    };
    let env_filter = EnvFilter::try_new(&filter)
        .map_err(|e| TelemetryError::Filter { filter: filter.clone(), message: e.to_string() })?;
    let fmt_layer = match style {
        LogStyle::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .fmt_fields(escaped_fields())
            .boxed(),
        LogStyle::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let writer: Box<dyn std::io::Write + Send> = match chrome_trace {
        Some(path) => Box::new(trace_file(path)?),
        None => Box::new(std::io::sink()),
    };
    let (chrome_layer, guard) = tracing_chrome::ChromeLayerBuilder::new()
        .writer(writer)
        .include_args(true)
        .trace_style(tracing_chrome::TraceStyle::Threaded)
        .build();
    let recording = filter_fn(|meta| trace::capturing() && *meta.level() <= tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(env_filter))
        .with(chrome_layer.with_filter(recording).with_filter(LevelFilter::INFO))
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    trace::install(guard, chrome_trace.map(Path::to_path_buf));
    Ok(TelemetryGuard { _private: () })
}

/// Text log fields with control characters escaped (`\n`, `\u{1b}`), so a value that came
/// from a client (a model name, a message) can never forge a line or a terminal sequence.
fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        let text = escape_controls(&format!("{value:?}"));
        if field.name() == "message" { write!(w, "{text}") } else { write!(w, "{field}={text}") }
    })
    .delimited(" ")
}

/// `text` with every control character written as its Rust escape.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn trace_file(path: &Path) -> Result<std::fs::File, TelemetryError> {
    let err = |source| TelemetryError::TraceFile { path: path.display().to_string(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::File::create(path).map_err(err)
}

/// The server's observability state: metrics, engine heartbeats, and readiness settings.
pub struct Observability {
    pub metrics: Arc<Metrics>,
    /// Set while models are being loaded: `/readyz` answers 503 "model loading".
    pub loading: AtomicBool,
    /// `/readyz` turns 503 while any model's KV usage is above this share (0..=1).
    pub kv_ready_max: f64,
    /// `/healthz` turns 503 when an engine with pending work has not ticked for this long.
    pub tick_stall: Duration,
    /// Where admin trace captures are written.
    pub trace_dir: PathBuf,
    heartbeats: Mutex<Vec<(String, Arc<Heartbeat>)>>,
}

impl Observability {
    /// Default thresholds: KV usage 0.95, a tick stalled for 30 s, captures under `traces/`.
    pub fn new() -> Result<Observability, MetricsError> {
        Ok(Observability {
            metrics: Arc::new(Metrics::new()?),
            loading: AtomicBool::new(false),
            kv_ready_max: 0.95,
            tick_stall: Duration::from_secs(30),
            trace_dir: PathBuf::from("traces"),
            heartbeats: Mutex::new(Vec::new()),
        })
    }

    /// Metric handles for model `model`'s engine, resolved once.
    pub fn model_metrics(&self, model: &str) -> ModelMetrics {
        self.metrics.for_model(model)
    }

    /// A fresh heartbeat for model `model`'s engine, registered for `/healthz` (replacing
    /// the one of an earlier copy of the model).
    pub fn heartbeat_for(&self, model: &str) -> Arc<Heartbeat> {
        let beat = Arc::new(Heartbeat::default());
        if let Ok(mut beats) = self.heartbeats.lock() {
            beats.retain(|(m, _)| m != model);
            beats.push((model.to_owned(), beat.clone()));
        }
        beat
    }

    /// The heartbeat of `model`'s engine, if it has one.
    pub fn heartbeat(&self, model: &str) -> Option<Arc<Heartbeat>> {
        let beats = self.heartbeats.lock().ok()?;
        beats.iter().find(|(m, _)| m == model).map(|(_, h)| h.clone())
    }

    /// The first reason the server is not ready (see [`health::readiness`]), with this
    /// server's loading flag and KV threshold.
    pub fn readiness(&self, draining: bool, loading: bool, models: &[ModelView<'_>]) -> Option<NotReady> {
        health::readiness(draining, loading || self.loading.load(Ordering::Relaxed), self.kv_ready_max, models)
    }

    /// The liveness of model `id`'s engine, from whether its thread ended and its heartbeat.
    pub fn engine_liveness(&self, id: &str, stopped: bool) -> Liveness {
        let Some(beat) = self.heartbeat(id) else {
            return health::liveness(stopped, 0, Duration::ZERO, self.tick_stall);
        };
        let last = beat.last_tick_ms.load(Ordering::Relaxed);
        let age = Duration::from_millis(health::process_millis().saturating_sub(last));
        health::liveness(stopped, beat.pending.load(Ordering::Relaxed), age, self.tick_stall)
    }

    /// Counts and logs a request answered with an error, by its classified type.
    pub fn record_error(&self, request_id: &str, e: &ApiError) {
        self.metrics.record_error(e.kind);
        tracing::info!(
            request_id,
            error_type = e.kind.as_str(),
            code = e.code.unwrap_or(e.kind.as_str()),
            status = e.status(),
            error = %e.message,
            "request error"
        );
    }

    /// Counts a request refused at admission for `model` (a 429 or 503 before it started)
    /// and hands the error back; other errors pass through uncounted.
    pub fn rejected(&self, model: &str, e: ApiError) -> ApiError {
        if matches!(e.kind, ErrorKind::RateLimited | ErrorKind::Unavailable) {
            self.metrics.record_rejection(model, e.code);
        }
        e
    }
}
