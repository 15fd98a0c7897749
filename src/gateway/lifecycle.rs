//! Model lifecycle while serving: load beside the running models, unload (stop admitting,
//! drain, then unmap), and hot reload (the new copy loads beside the old, routing switches
//! in one table swap, the old copy drains). The admin routes call these; so can tests.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, ModelConfig};
use crate::engine::load::{Footprint, LoadError, LoadedModel, start_model_observed};
use crate::registry::{Digest, ModelCache, RegistryError, Source, resolve_local, sha256_file};
use crate::types::ModelId;

use super::AppState;

/// Where a model is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    /// Serving while a new copy loads beside it.
    Reloading,
    /// No longer admitting; finishing its requests before it is unmapped.
    Draining,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Reloading => "reloading",
            ModelState::Draining => "draining",
        }
    }
}

/// What the registry knows about one model: where it came from and what it takes.
#[derive(Clone, Debug)]
pub struct ModelRecord {
    pub state: ModelState,
    /// The source as given (a path or URL).
    pub source: String,
    /// The verified digest, when one was given or the file was downloaded.
    pub sha256: Option<Digest>,
    pub footprint: Footprint,
    /// The settings the serving copy runs with (a reload keeps them).
    pub settings: ModelConfig,
}

/// The registry side of the server: the download cache and a record per model.
pub struct ModelRegistry {
    pub cache: ModelCache,
    records: Mutex<HashMap<ModelId, ModelRecord>>,
}

/// Why a lifecycle operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("model id `{0}`: expected 1..=64 characters from [A-Za-z0-9._:-]")]
    BadId(String),
    #[error("unknown model `{0}`")]
    Unknown(String),
    #[error("model `{id}` already exists (state: {})", state.as_str())]
    Exists { id: String, state: ModelState },
    #[error("model `{id}` is {}; retry when it is ready", state.as_str())]
    Busy { id: String, state: ModelState },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the loader task failed: {0}")]
    Task(String),
}

/// A model to load: its id, where its file comes from, the digest it must have, and the
/// engine settings that differ from the template.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub id: ModelId,
    pub source: Source,
    pub sha256: Option<Digest>,
    pub limits: ModelLimits,
}

/// Engine settings a load may choose; unset ones come from the template (`models[0]` of
/// the config for a new model, the running copy's settings for a reload).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelLimits {
    /// The model's own pipeline file (its stage list and default sampler order).
    pub pipeline: Option<std::path::PathBuf>,
    pub threads: Option<NonZeroUsize>,
    pub max_batch: Option<NonZeroUsize>,
    pub max_sessions: Option<NonZeroUsize>,
    pub kv_cache_max_bytes: Option<u64>,
}

impl ModelLimits {
    fn apply(&self, mc: &mut ModelConfig) {
        if let Some(p) = &self.pipeline {
            mc.pipeline = p.clone();
        }
        mc.threads = self.threads.unwrap_or(mc.threads);
        mc.max_batch = self.max_batch.unwrap_or(mc.max_batch);
        mc.max_sessions = self.max_sessions.unwrap_or(mc.max_sessions);
        mc.kv_cache.max_bytes = self.kv_cache_max_bytes.unwrap_or(mc.kv_cache.max_bytes);
    }
}

impl ModelRegistry {
    pub fn new(config: &Config) -> Self {
        ModelRegistry {
            cache: ModelCache::new(&config.registry.cache_dir, config.registry.cache_max_bytes),
            records: Mutex::new(HashMap::new()),
        }
    }

    /// Records a model loaded from the config (its source is its path).
    pub fn record(&self, mc: &ModelConfig, footprint: Footprint) {
        let record = ModelRecord {
            state: ModelState::Ready,
            source: mc.path.display().to_string(),
            sha256: None,
            footprint,
            settings: mc.clone(),
        };
        self.records().insert(mc.id.clone(), record);
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<ModelId, ModelRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every model's record (loading, serving or draining).
    pub fn list(&self) -> Vec<(ModelId, ModelRecord)> {
        let mut all: Vec<_> = self.records().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        all
    }

    /// Bytes taken by every model in memory, except `except`.
    fn in_use(&self, except: &ModelId) -> u64 {
        self.records().iter().filter(|(k, _)| *k != except).map(|(_, r)| r.footprint.total()).sum()
    }

    /// The footprint of `id`'s serving copy while a new one loads beside it (else 0).
    fn reloading_footprint(&self, id: &ModelId) -> u64 {
        let records = self.records();
        records.get(id).filter(|r| r.state == ModelState::Reloading).map_or(0, |r| r.footprint.total())
    }

    /// Digests of cached files in use (not to be evicted).
    fn digests(&self) -> Vec<Digest> {
        self.records().values().filter_map(|r| r.sha256.clone()).collect()
    }

    fn set_state(&self, id: &ModelId, state: ModelState) {
        if let Some(r) = self.records().get_mut(id) {
            r.state = state;
        }
    }

    /// Moves `id` from `from` to `to`, or says why not.
    fn transition(&self, id: &str, from: ModelState, to: ModelState) -> Result<ModelRecord, LifecycleError> {
        let mut records = self.records();
        let Some(r) = records.get_mut(&ModelId::from(id)) else { return Err(LifecycleError::Unknown(id.to_owned())) };
        if r.state != from {
            return Err(LifecycleError::Busy { id: id.to_owned(), state: r.state });
        }
        r.state = to;
        Ok(r.clone())
    }
}

/// Checks an id given over the admin API (no `/`: it is part of the admin paths).
pub fn parse_id(id: &str) -> Result<ModelId, LifecycleError> {
    let ok = (1..=64).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if ok { Ok(ModelId::from(id)) } else { Err(LifecycleError::BadId(id.to_owned())) }
}

impl AppState {
    /// Records a model loaded at startup (so the admin API can list, unload and reload it).
    pub fn record_configured(&self, mc: &ModelConfig, footprint: Footprint) {
        self.registry.record(mc, footprint);
    }

    /// Loads a new model beside the serving ones; returns once it serves.
    pub async fn load_model(self: &Arc<Self>, spec: LoadSpec) -> Result<ModelRecord, LifecycleError> {
        {
            let mut records = self.registry.records();
            if let Some(r) = records.get(&spec.id) {
                return Err(LifecycleError::Exists { id: spec.id.to_string(), state: r.state });
            }
            let placeholder = ModelRecord {
                state: ModelState::Loading,
                source: spec.source.describe(),
                sha256: spec.sha256.clone(),
                footprint: Footprint::default(),
                settings: self.config.models[0].clone(),
            };
            records.insert(spec.id.clone(), placeholder);
        }
        self.begin_loading(&spec.id);
        let result = self.bring_up(&spec, self.config.models[0].clone()).await;
        match result {
            Ok((model, record)) => {
                self.registry.records().insert(spec.id.clone(), record.clone());
                self.finish_loading(model);
                Ok(record)
            }
            Err(e) => {
                self.registry.records().remove(&spec.id);
                self.abandon_loading(&spec.id);
                Err(e)
            }
        }
    }

    /// Stops admitting requests for `id`, lets its requests finish for up to the drain grace
    /// (then cancels them), and unmaps it. Returns whether it drained before the grace ended.
    pub async fn unload_model(self: &Arc<Self>, id: &str) -> Result<bool, LifecycleError> {
        self.registry.transition(id, ModelState::Ready, ModelState::Draining)?;
        let model = self.models.update(|t| {
            let i = t.ready.iter().position(|m| m.id.as_str() == id)?;
            Some(t.ready.remove(i))
        });
        let drained = match model {
            Some(m) => retire(m, self.config.registry.drain_grace).await,
            None => true,
        };
        self.obs.metrics.model_loaded.with_label_values(&[id]).set(0);
        self.registry.records().remove(&ModelId::from(id));
        tracing::info!(model = id, drained, "model unloaded");
        Ok(drained)
    }

    /// Loads a new copy of `id` (from `source`, or where it came from) beside the serving
    /// one, switches routing to it at once, and drains the old copy in the background.
    pub async fn reload_model(
        self: &Arc<Self>,
        id: &str,
        source: Option<(Source, Option<Digest>)>,
    ) -> Result<ModelRecord, LifecycleError> {
        let old = self.registry.transition(id, ModelState::Ready, ModelState::Reloading)?;
        let spec = match source {
            Some((source, sha256)) => {
                LoadSpec { id: ModelId::from(id), source, sha256, limits: ModelLimits::default() }
            }
            None => match Source::parse(&old.source) {
                Ok(source) => LoadSpec {
                    id: ModelId::from(id),
                    source,
                    sha256: old.sha256.clone(),
                    limits: ModelLimits::default(),
                },
                Err(e) => {
                    self.registry.set_state(&ModelId::from(id), ModelState::Ready);
                    return Err(e.into());
                }
            },
        };
        let (model, record) = match self.bring_up(&spec, old.settings.clone()).await {
            Ok(up) => up,
            Err(e) => {
                self.registry.set_state(&spec.id, ModelState::Ready);
                return Err(e);
            }
        };
        self.registry.records().insert(spec.id.clone(), record.clone());
        if let Some(previous) = self.finish_loading(model) {
            let grace = self.config.registry.drain_grace;
            tokio::spawn(async move {
                let drained = retire(previous, grace).await;
                tracing::info!(model = %spec.id, drained, "previous copy unloaded after reload");
            });
        }
        Ok(record)
    }

    /// Resolves the source, checks the budget and starts the engine (off the async threads).
    async fn bring_up(
        self: &Arc<Self>,
        spec: &LoadSpec,
        template: ModelConfig,
    ) -> Result<(LoadedModel, ModelRecord), LifecycleError> {
        let (path, sha256) = self.resolve(spec).await?;
        let live = self.live();
        let mut config = Config::clone(&live.config);
        let mut mc = template;
        mc.id = spec.id.clone();
        mc.path = path;
        spec.limits.apply(&mut mc);
        let footprint = Footprint::of(&mc)?;
        // While reloading, the old copy stays in memory beside the new one.
        let old_copy = self.registry.reloading_footprint(&spec.id);
        let in_use = self.registry.in_use(&spec.id) + old_copy;
        footprint.check_budget(&spec.id, in_use, self.config.registry.memory_budget)?;
        config.models = vec![mc.clone()];
        let obs = self.obs.clone();
        let model = tokio::task::spawn_blocking(move || start_model_observed(&config, 0, &obs))
            .await
            .map_err(|e| LifecycleError::Task(e.to_string()))??;
        let record =
            ModelRecord { state: ModelState::Ready, source: spec.source.describe(), sha256, footprint, settings: mc };
        Ok((model, record))
    }

    /// The local file for `spec` and its digest (verified when one was given).
    async fn resolve(&self, spec: &LoadSpec) -> Result<(std::path::PathBuf, Option<Digest>), LifecycleError> {
        match &spec.source {
            Source::Local(path) => {
                let real = resolve_local(path, &self.config.registry.model_dirs)?;
                let Some(want) = spec.sha256.clone() else { return Ok((real, None)) };
                let file = real.clone();
                let got = tokio::task::spawn_blocking(move || sha256_file(&file))
                    .await
                    .map_err(|e| LifecycleError::Task(e.to_string()))??;
                if got != want {
                    let e = RegistryError::Checksum {
                        from: real.display().to_string(),
                        expected: want.to_string(),
                        actual: got.to_string(),
                    };
                    return Err(e.into());
                }
                Ok((real, Some(got)))
            }
            Source::Http(url) => {
                let fetched = self.registry.cache.fetch(url, spec.sha256.as_ref(), &self.registry.digests()).await?;
                tracing::info!(source = url.as_str(), origin = ?fetched.origin, sha256 = %fetched.sha256, "model file ready");
                Ok((fetched.path, Some(fetched.sha256)))
            }
        }
    }
}

/// How often draining checks whether a model is idle.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// Waits until nobody holds `model` but us and its engine has been idle for two whole ticks
/// (so a request admitted in the tick being run is seen), or until `grace` ends; then
/// stops the engine (cancelling what is left) and unmaps the model off the async threads.
async fn retire(model: Arc<LoadedModel>, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    let status = model.engine.status.clone();
    let mut quiet_since = None;
    let drained = loop {
        if status.stopped.load(Ordering::Relaxed) {
            break true;
        }
        let idle = Arc::strong_count(&model) == 1
            && status.queued.load(Ordering::Relaxed) == 0
            && status.running.load(Ordering::Relaxed) == 0;
        let ticks = status.ticks.load(Ordering::Relaxed);
        quiet_since = match (idle, quiet_since) {
            (false, _) => None,
            (true, None) => Some(ticks),
            (true, Some(t0)) if ticks >= t0 + 2 => break true,
            (true, since) => since,
        };
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    let _ = tokio::task::spawn_blocking(move || drop(model)).await;
    drained
}
