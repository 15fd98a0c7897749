//! The operations routes: `/healthz`, `/readyz`, `/metrics`, and `/admin/trace` (the
//! server checks the admin key before it runs).

use std::time::Duration;

use std::sync::atomic::Ordering;

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::error::{ApiError, ErrorKind};
use crate::gateway::render::{Body, bytes_response, json_response};
use crate::gateway::state::AppState;
use crate::telemetry::metrics::KvShape;
use crate::telemetry::trace::{self, TraceError};
use crate::telemetry::{Liveness, ModelView};

/// Default length of an admin trace capture.
const DEFAULT_CAPTURE: Duration = Duration::from_secs(5);

/// `GET /metrics`: every series in the Prometheus text format.
pub fn metrics(state: &AppState) -> Response<Body> {
    let table = state.models.snapshot();
    let kv: Vec<KvShape<'_>> = table
        .ready
        .iter()
        .map(|m| KvShape {
            model: m.id.as_str(),
            block_tokens: m.config.kv_cache.block_tokens.get(),
            blocks: m.engine.status.kv_blocks_total.load(Ordering::Relaxed),
        })
        .collect();
    let text = state.obs.metrics.render_with(&kv, state.config.telemetry.vllm_metric_names);
    bytes_response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text)
}

/// `GET /readyz`: 200 when the server should get traffic, else 503 with the reason.
pub fn readyz(state: &AppState) -> Response<Body> {
    let table = state.models.snapshot();
    let views: Vec<ModelView<'_>> = table
        .ready
        .iter()
        .map(|m| ModelView {
            id: m.id.as_str(),
            admission_open: m.engine.accepting(),
            kv_usage: m.engine.status.kv_usage(),
        })
        .collect();
    let draining = state.draining.load(Ordering::Relaxed);
    match state.obs.readiness(draining, !table.loading.is_empty(), &views) {
        None => json_response(StatusCode::OK, &json!({"status": "ready"})),
        Some(r) => {
            json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "not_ready", "reason": r.reason()}))
        }
    }
}

/// `GET /healthz`: 200 while every engine thread runs and ticks, else 503 naming the models
/// (stopped, restarting after a panic, or stuck).
pub fn healthz(state: &AppState) -> Response<Body> {
    let (mut stopped, mut stuck, mut restarting) = (vec![], vec![], vec![]);
    for m in &state.models.snapshot().ready {
        if m.engine.status.restarting.load(Ordering::Relaxed) {
            restarting.push(m.id.to_string());
            continue;
        }
        match state.obs.engine_liveness(m.id.as_str(), m.engine.status.stopped.load(Ordering::Relaxed)) {
            Liveness::Alive => {}
            Liveness::Stopped => stopped.push(m.id.to_string()),
            Liveness::Stuck { since_ms } => stuck.push(json!({"model": m.id.as_str(), "last_tick_ms_ago": since_ms})),
        }
    }
    if !stopped.is_empty() {
        json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "engine_stopped", "models": stopped}))
    } else if !restarting.is_empty() {
        json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "engine_restarting", "models": restarting}))
    } else if !stuck.is_empty() {
        json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "engine_stuck", "models": stuck}))
    } else {
        json_response(StatusCode::OK, &json!({"status": "ok"}))
    }
}

/// The `seconds` query parameter: (0, 60], default 5.
pub fn capture_seconds(query: Option<&str>) -> Result<Duration, ApiError> {
    let value = query.unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("seconds="));
    let Some(value) = value else { return Ok(DEFAULT_CAPTURE) };
    let max = trace::MAX_CAPTURE.as_secs_f64();
    match value.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= max => Ok(Duration::from_secs_f64(s)),
        _ => Err(ApiError::invalid_parameter("seconds", format!("`seconds` must be a number in (0, {max}]"))),
    }
}

/// `POST /admin/trace?seconds=N`: records a Chrome trace of the live server for N seconds
/// and returns it (a JSON array of trace events; open it in Perfetto or chrome://tracing).
pub async fn capture_trace(state: &AppState, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let seconds = capture_seconds(query)?;
    let path = trace::capture(&state.obs.trace_dir, seconds).await.map_err(|e| match e {
        TraceError::Busy | TraceError::StartupTrace(_) => ApiError::new(ErrorKind::Conflict, e.to_string()),
        TraceError::NotInstalled => ApiError::new(ErrorKind::Unavailable, e.to_string()),
        TraceError::Io { .. } | TraceError::Unfinished(_) => ApiError::new(ErrorKind::Internal, e.to_string()),
    })?;
    // The file is complete (the writer let go of it); reading a few MB here is brief.
    let bytes = std::fs::read(&path).map_err(|e| {
        ApiError::new(ErrorKind::Internal, format!("cannot read the trace file {}: {e}", path.display()))
    })?;
    let mut r = bytes_response(StatusCode::OK, "application/json", bytes);
    if let Ok(v) = HeaderValue::from_str(&path.display().to_string()) {
        r.headers_mut().insert("x-trace-file", v);
    }
    Ok(r)
}
