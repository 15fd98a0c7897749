//! The observability routes: `/metrics`, `/readyz`, `/healthz`, and `/admin/trace`.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::health::{self, Liveness, ModelView};
use super::trace::{self, TraceError};
use crate::error::{ApiError, ErrorKind};
use crate::gateway::{AppState, Body};

/// Default length of an admin trace capture.
const DEFAULT_CAPTURE: Duration = Duration::from_secs(5);

fn response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_body(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    response(status, "application/json", value.to_string())
}

/// `GET /metrics`: every series in the Prometheus text format.
pub fn metrics(state: &AppState) -> Response<Body> {
    response(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", state.obs.metrics.render())
}

/// `GET /readyz`: 200 when the server should get traffic, else 503 with the reason.
pub fn readyz(state: &AppState) -> Response<Body> {
    let table = state.models.snapshot();
    let views: Vec<ModelView<'_>> =
        table.ready.iter().map(|m| ModelView { id: m.id.as_str(), status: &m.engine.status }).collect();
    let draining = state.draining.load(std::sync::atomic::Ordering::Relaxed);
    match health::readiness(&state.obs, draining, !table.loading.is_empty(), &views) {
        None => json_body(StatusCode::OK, &json!({"status": "ready"})),
        Some(r) => json_body(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "not_ready", "reason": r.reason()})),
    }
}

/// `GET /healthz`: 200 while every engine thread runs and ticks, else 503 naming the models.
pub fn healthz(state: &AppState) -> Response<Body> {
    let mut stopped = vec![];
    let mut stuck = vec![];
    for m in &state.models.snapshot().ready {
        match health::engine_liveness(&state.obs, m.id.as_str(), &m.engine.status) {
            Liveness::Alive => {}
            Liveness::Stopped => stopped.push(m.id.to_string()),
            Liveness::Stuck { since_ms } => stuck.push(json!({"model": m.id.as_str(), "last_tick_ms_ago": since_ms})),
        }
    }
    if !stopped.is_empty() {
        json_body(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "engine_stopped", "models": stopped}))
    } else if !stuck.is_empty() {
        json_body(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "engine_stuck", "models": stuck}))
    } else {
        json_body(StatusCode::OK, &json!({"status": "ok"}))
    }
}

/// Whether the request carries `Authorization: Bearer <admin_key>`.
pub fn check_admin(state: &AppState, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(expected) = state.config.auth.admin_key.as_deref() else {
        return Err(ApiError::new(ErrorKind::Forbidden, "the admin API is disabled: set `auth.admin_key`"));
    };
    let given = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match given.and_then(|v| v.strip_prefix("Bearer ")) {
        None => Err(ApiError::new(ErrorKind::Unauthorized, "admin routes need `Authorization: Bearer <admin key>`")),
        Some(key) if constant_time_eq(key.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(ErrorKind::Forbidden, "the admin key is not valid")),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
pub async fn capture_trace(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    check_admin(state, &req)?;
    let seconds = capture_seconds(req.uri().query())?;
    let path = trace::capture(&state.obs.trace_dir, seconds).await.map_err(|e| match e {
        TraceError::Busy | TraceError::StartupTrace(_) => ApiError::new(ErrorKind::Conflict, e.to_string()),
        TraceError::NotInstalled => ApiError::new(ErrorKind::Unavailable, e.to_string()),
        TraceError::Io { .. } | TraceError::Unfinished(_) => ApiError::new(ErrorKind::Internal, e.to_string()),
    })?;
    // The file is complete (the writer let go of it); reading a few MB here is brief.
    let bytes = std::fs::read(&path).map_err(|e| {
        ApiError::new(ErrorKind::Internal, format!("cannot read the trace file {}: {e}", path.display()))
    })?;
    let mut r = response(StatusCode::OK, "application/json", bytes);
    if let Ok(v) = HeaderValue::from_str(&path.display().to_string()) {
        r.headers_mut().insert("x-trace-file", v);
    }
    Ok(r)
}
