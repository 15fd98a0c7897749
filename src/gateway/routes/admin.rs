//! Admin routes (the server checks the admin key before any of them runs): engine stats,
//! the model lifecycle and live config: `GET /admin/stats`, `GET/POST /admin/models`,
//! `DELETE /admin/models/{id}`, `POST /admin/models/{id}/reload`, `POST /admin/drain`,
//! `POST /admin/config/reload`.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::{Config, Machine};
use crate::engine::load::{LoadError, LoadedModel};
use crate::error::{ApiError, ErrorKind};
use crate::gateway::extract::{from_map, read_object, read_optional_object, reject_unknown};
use crate::gateway::records::{LifecycleError, LoadSpec, ModelLimits, ModelRecord, parse_id};
use crate::gateway::render::{Body, json_response};
use crate::gateway::state::AppState;
use crate::registry::{Digest, RegistryError, Source};

/// The one mapping from lifecycle errors to HTTP errors.
fn api_error(e: LifecycleError) -> ApiError {
    let message = e.to_string();
    let (kind, code) = match &e {
        LifecycleError::BadId(_) => (ErrorKind::InvalidRequest, "invalid_model_id"),
        LifecycleError::Unknown(_) => (ErrorKind::NotFound, "model_not_found"),
        LifecycleError::Exists { .. } => (ErrorKind::Conflict, "model_exists"),
        LifecycleError::Busy { .. } => (ErrorKind::Conflict, "model_busy"),
        LifecycleError::Registry(r) => match r {
            RegistryError::Checksum { .. } => (ErrorKind::InvalidRequest, "checksum_mismatch"),
            RegistryError::Http { .. } | RegistryError::Status { .. } | RegistryError::Truncated { .. } => {
                (ErrorKind::Unavailable, "download_failed")
            }
            RegistryError::TooLarge { .. } => (ErrorKind::InvalidRequest, "model_too_large"),
            RegistryError::Io { error, .. } if error.kind() != std::io::ErrorKind::NotFound => {
                (ErrorKind::Internal, "io_error")
            }
            RegistryError::Deadline { .. } => (ErrorKind::Unavailable, "download_timeout"),
            RegistryError::Index { .. } | RegistryError::Task(_) => (ErrorKind::Internal, "cache_index"),
            RegistryError::HostNotAllowed { .. } => (ErrorKind::InvalidRequest, "host_not_allowed"),
            _ => (ErrorKind::InvalidRequest, "invalid_source"),
        },
        LifecycleError::Pipeline(r) => {
            let code = match r {
                RegistryError::ParentComponent { .. } | RegistryError::OutsideDirs { .. } => "pipeline_outside_dirs",
                RegistryError::NotAFile { .. } => "pipeline_not_a_file",
                RegistryError::FileTooLarge { .. } => "pipeline_too_large",
                _ => "invalid_pipeline",
            };
            return ApiError::new(ErrorKind::InvalidRequest, message).with_code(code).with_param("pipeline");
        }
        LifecycleError::Load(LoadError::OverBudget { .. }) => (ErrorKind::Conflict, "memory_budget_exceeded"),
        LifecycleError::Load(LoadError::Thread { .. } | LoadError::Telemetry { .. }) => {
            (ErrorKind::Internal, "load_failed")
        }
        LifecycleError::Load(_) => (ErrorKind::InvalidRequest, "invalid_model"),
        LifecycleError::Task(_) => (ErrorKind::Internal, "load_failed"),
    };
    ApiError::new(kind, message).with_code(code)
}

fn describe(id: &str, record: &ModelRecord, model: Option<&Arc<LoadedModel>>) -> Value {
    let mut v = json!({
        "id": id,
        "state": record.state.as_str(),
        "source": record.source,
        "sha256": record.sha256.as_ref().map(Digest::to_string),
        "memory": {
            "weights_bytes": record.footprint.weights_bytes,
            "kv_cap_bytes": record.footprint.kv_cap_bytes,
            "total_bytes": record.footprint.total(),
        },
        "pipeline": record.settings.pipeline,
        "threads": record.settings.threads,
        "max_batch": record.settings.max_batch,
        "max_sessions": record.settings.max_sessions,
    });
    if let Some(t) = record.download {
        v["download"] = json!({"received_bytes": t.received, "total_bytes": t.total, "percent": t.percent()});
    }
    if let Some(m) = model {
        let s = &m.engine.status;
        v["sessions"] = json!(s.sessions.load(Ordering::Relaxed));
        v["queued"] = json!(s.queued.load(Ordering::Relaxed));
        v["running"] = json!(s.running.load(Ordering::Relaxed));
        v["kv_blocks_used"] = json!(s.kv_blocks_used.load(Ordering::Relaxed));
        v["context_length"] = json!(m.model.desc.n_ctx_train);
    }
    v
}

/// `GET /admin/stats`: every engine's counters.
pub fn stats(state: &AppState) -> Response<Body> {
    let table = state.models.snapshot();
    let models: Vec<_> = table
        .ready
        .iter()
        .map(|m| {
            let s = &m.engine.status;
            json!({
                "id": m.id,
                "ticks": s.ticks.load(Ordering::Relaxed),
                "queued": s.queued.load(Ordering::Relaxed),
                "running": s.running.load(Ordering::Relaxed),
                "sessions": s.sessions.load(Ordering::Relaxed),
                "kv_blocks_used": s.kv_blocks_used.load(Ordering::Relaxed),
                "kv_blocks_total": s.kv_blocks_total.load(Ordering::Relaxed),
                "forward_calls": s.forward_calls.load(Ordering::Relaxed),
                "admission_open": s.admission_open.load(Ordering::Relaxed),
                "restarts": s.restarts.load(Ordering::Relaxed),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"draining": state.draining.load(Ordering::Relaxed), "models": models}))
}

/// `GET /admin/models`: every model with its state, source, digest, memory and load.
pub fn list_models(state: &AppState) -> Response<Body> {
    let table = state.models.snapshot();
    let models: Vec<Value> =
        state.registry.list().iter().map(|(id, r)| describe(id.as_str(), r, table.get(id.as_str()))).collect();
    let budget = state.config.registry.memory_budget;
    json_response(StatusCode::OK, &json!({"models": models, "memory_budget_bytes": budget}))
}

#[derive(Deserialize)]
struct LoadBody {
    id: String,
    source: String,
    sha256: Option<String>,
    pipeline: Option<String>,
    threads: Option<u64>,
    max_batch: Option<u64>,
    max_sessions: Option<u64>,
    kv_cache_max_bytes: Option<u64>,
}

/// Fields `POST /admin/models` accepts.
const LOAD_FIELDS: &[&str] =
    &["id", "source", "sha256", "pipeline", "threads", "max_batch", "max_sessions", "kv_cache_max_bytes"];

/// Largest thread pool a model may ask for.
const MAX_THREADS: u64 = 1024;

fn limit(name: &str, value: Option<u64>, max: u64) -> Result<Option<NonZeroUsize>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if (1..=max).contains(&v) => Ok(NonZeroUsize::new(v as usize)),
        Some(_) => Err(ApiError::invalid_parameter(name, format!("`{name}` must be in [1, {max}]"))),
    }
}

/// The largest KV arena a load may ask for, and what sets it: the memory budget, else the
/// machine's memory. The arena is committed whole at load, so this is checked first.
fn kv_bound(state: &AppState) -> Option<(u64, &'static str)> {
    match state.config.registry.memory_budget {
        Some(budget) => Some((budget, "`registry.memory_budget`")),
        None => Machine::detect().mem_total.map(|total| (total, "the machine's memory (MemTotal)")),
    }
}

fn limits(body: &LoadBody, kv_bound: Option<(u64, &str)>) -> Result<ModelLimits, ApiError> {
    let kv = match (body.kv_cache_max_bytes, kv_bound) {
        (Some(v), _) if v < MIN_KV_BYTES => {
            let message = format!("`kv_cache_max_bytes` must be at least {MIN_KV_BYTES}");
            return Err(ApiError::invalid_parameter("kv_cache_max_bytes", message));
        }
        (Some(v), Some((max, what))) if v > max => {
            let message = format!("`kv_cache_max_bytes` must be at most {max} bytes ({what})");
            return Err(ApiError::invalid_parameter("kv_cache_max_bytes", message));
        }
        (other, _) => other,
    };
    let pipeline = match body.pipeline.as_deref().map(str::trim) {
        Some("") => return Err(ApiError::invalid_parameter("pipeline", "`pipeline` names a pipeline file")),
        other => other.map(std::path::PathBuf::from),
    };
    Ok(ModelLimits {
        pipeline,
        threads: limit("threads", body.threads, MAX_THREADS)?,
        max_batch: limit("max_batch", body.max_batch, u32::MAX as u64)?,
        max_sessions: limit("max_sessions", body.max_sessions, u32::MAX as u64)?,
        kv_cache_max_bytes: kv,
    })
}

/// Smallest KV arena a loaded model may ask for (1 MiB).
const MIN_KV_BYTES: u64 = 1 << 20;

/// Refuses an `http(s)://` source without the digest it must have: a URL's content may
/// change under it, so load and reload alike pin it (400 `sha256_required`).
fn require_pin(source: &Source, sha256: Option<&Digest>) -> Result<(), ApiError> {
    if matches!(source, Source::Http(_)) && sha256.is_none() {
        let message = "a URL source needs the expected `sha256` (64 hex digits)";
        return Err(ApiError::new(ErrorKind::InvalidRequest, message)
            .with_code("sha256_required")
            .with_param("sha256"));
    }
    Ok(())
}

fn parse_sha(text: Option<&str>) -> Result<Option<Digest>, ApiError> {
    text.map(Digest::parse)
        .transpose()
        .map_err(|e| ApiError::invalid_parameter("sha256", e.to_string()).with_code("invalid_sha256"))
}

/// `POST /admin/models` `{"id","source","sha256"}`: loads a model; 201 once it serves.
pub async fn load(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let map = read_object(req, state.config.server.max_body_bytes.get()).await?;
    reject_unknown(&map, &[LOAD_FIELDS])?;
    let body: LoadBody = from_map(map)?;
    let limits = limits(&body, kv_bound(state))?;
    let id = parse_id(&body.id).map_err(api_error)?;
    let source = Source::parse(&body.source).map_err(|e| api_error(e.into()))?;
    let sha256 = parse_sha(body.sha256.as_deref())?;
    require_pin(&source, sha256.as_ref())?;
    let spec = LoadSpec { id: id.clone(), source, sha256, limits };
    let record = state.load_model(spec).await.map_err(api_error)?;
    let table = state.models.snapshot();
    Ok(json_response(StatusCode::CREATED, &describe(id.as_str(), &record, table.get(id.as_str()))))
}

/// `DELETE /admin/models/{id}`: stops admitting, drains, and unmaps the model.
pub async fn unload(state: &Arc<AppState>, id: &str) -> Result<Response<Body>, ApiError> {
    let drained = state.unload_model(id).await.map_err(api_error)?;
    Ok(json_response(StatusCode::OK, &json!({"id": id, "state": "unloaded", "drained": drained})))
}

/// `POST /admin/models/{id}/reload` (optional `{"source", "sha256"}`, a URL source pinned
/// like a load's): a new copy loads beside the serving one, then takes over.
pub async fn reload(state: &Arc<AppState>, id: &str, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let map = read_optional_object(req, state.config.server.max_body_bytes.get()).await?;
    reject_unknown(&map, &[&["source", "sha256"]])?;
    let sha256 = parse_sha(map.get("sha256").and_then(Value::as_str))?;
    let source = match map.get("source").and_then(Value::as_str) {
        Some(s) => {
            let source = Source::parse(s).map_err(|e| api_error(e.into()))?;
            require_pin(&source, sha256.as_ref())?;
            Some((source, sha256))
        }
        None if sha256.is_some() => {
            return Err(ApiError::invalid_parameter("sha256", "`sha256` needs a `source` beside it"));
        }
        None => None,
    };
    let record = state.reload_model(id, source).await.map_err(api_error)?;
    let table = state.models.snapshot();
    Ok(json_response(StatusCode::OK, &describe(id, &record, table.get(id))))
}

/// `POST /admin/drain` (`{"draining": false}` undoes it): `/readyz` turns 503 "draining"
/// and new generations are refused while requests in flight finish.
pub async fn drain(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let map = read_optional_object(req, state.config.server.max_body_bytes.get()).await?;
    reject_unknown(&map, &[&["draining"]])?;
    let on = match map.get("draining") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid_parameter("draining", "`draining` must be a boolean")),
    };
    state.draining.store(on, Ordering::Relaxed);
    let table = state.models.snapshot();
    let in_flight: usize = table
        .ready
        .iter()
        .map(|m| m.engine.status.queued.load(Ordering::Relaxed) + m.engine.status.running.load(Ordering::Relaxed))
        .sum();
    Ok(json_response(StatusCode::OK, &json!({"draining": on, "in_flight": in_flight})))
}

/// `POST /admin/config/reload`: re-reads the config file; tenants, keys and limits apply to
/// the next request. An invalid file is refused with its error and the running config kept.
pub async fn reload_config(state: &Arc<AppState>) -> Result<Response<Body>, ApiError> {
    let Some((path, overrides)) = state.config_source.clone() else {
        return Err(ApiError::new(ErrorKind::Conflict, "the server was not started from a config file")
            .with_code("no_config_file"));
    };
    let loaded = tokio::task::spawn_blocking(move || Config::load_with_overrides(&path, &overrides))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("config reload task failed: {e}")))?;
    let config = loaded.map_err(|e| {
        ApiError::new(ErrorKind::InvalidRequest, format!("config not reloaded: {e}")).with_code("invalid_config")
    })?;
    let tenants: Vec<String> = config.tenants.iter().map(|t| t.name.to_string()).collect();
    let keys = config.auth.api_keys.len();
    state.replace_live(config);
    tracing::info!(tenants = tenants.len(), api_keys = keys, "config reloaded");
    Ok(json_response(StatusCode::OK, &json!({"reloaded": true, "tenants": tenants, "api_keys": keys})))
}
