//! Logging and tracing set-up: text or JSON logs, and an optional Chrome trace of ticks.
//!
//! Every tick runs in a `tick` span and every stage in a `stage` span (see `engine`), so a
//! Chrome trace opened in Perfetto or chrome://tracing shows each tick and its stages by
//! name, with batch size and token count on the `forward` span.

use std::io::IsTerminal;
use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStyle {
    Text,
    Json,
}

/// Keeps the Chrome trace writer alive; the trace file becomes valid JSON when this is
/// dropped (so drop it before the process exits, never `process::exit` past it).
pub struct TelemetryGuard {
    _chrome: Option<tracing_chrome::FlushGuard>,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter `{filter}`: {message}")]
    Filter { filter: String, message: String },
    #[error("cannot create trace directory for {path}: {source}")]
    TraceDir { path: String, source: std::io::Error },
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
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .boxed(),
        LogStyle::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (chrome_layer, guard) = match chrome_trace {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|source| TelemetryError::TraceDir { path: path.display().to_string(), source })?;
            }
            let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new()
                .file(path)
                .include_args(true)
                .trace_style(tracing_chrome::TraceStyle::Threaded)
                .build();
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(env_filter))
        .with(chrome_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { _chrome: guard })
}
