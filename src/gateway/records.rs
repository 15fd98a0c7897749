//! What the server knows about each model besides its engine: where it came from, its
//! verified digest, what it takes in memory, and where it is in its life. The lifecycle
//! operations (`lifecycle`) read and write these records; the admin routes list them.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;

use crate::config::{Config, ModelConfig};
use crate::engine::load::{Footprint, LoadError};
use crate::registry::{Digest, ModelCache, RegistryError, Source, Transfer};
use crate::types::ModelId;

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
    /// Bytes of the memory budget held for a copy of this model being loaded (see
    /// [`ModelRegistry::reserve`]); 0 otherwise.
    pub reserved: u64,
    /// The settings the serving copy runs with (a reload keeps them).
    pub settings: ModelConfig,
    /// How far the download of its file has got, while one runs (a load or reload from a URL).
    pub download: Option<Transfer>,
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
    /// The load's own pipeline file was refused (see `resolve_pipeline`).
    #[error("pipeline: {0}")]
    Pipeline(RegistryError),
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
    /// Overrides `mc`'s settings with the ones this load chose.
    pub fn apply(&self, mc: &mut ModelConfig) {
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
            cache: ModelCache::new(&config.registry.cache_dir, config.registry.cache_max_bytes)
                .with_download_timeout(config.registry.download_timeout),
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
            reserved: 0,
            settings: mc.clone(),
            download: None,
        };
        self.records().insert(mc.id.clone(), record);
    }

    pub(super) fn records(&self) -> std::sync::MutexGuard<'_, HashMap<ModelId, ModelRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every model's record (loading, serving or draining).
    pub fn list(&self) -> Vec<(ModelId, ModelRecord)> {
        let mut all: Vec<_> = self.records().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        all.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        all
    }

    /// Checks that `footprint` fits under `budget` beside every copy in memory (a model being
    /// reloaded keeps its serving copy) and every other reservation, and holds it for `id`,
    /// all under the one records lock: two loads that each fit alone but not together cannot
    /// both pass. `id` must have a record (a load's placeholder or the copy being reloaded).
    /// The bytes are given back when the [`Reservation`] is dropped.
    pub fn reserve(
        &self,
        id: &ModelId,
        footprint: Footprint,
        budget: Option<u64>,
    ) -> Result<Reservation<'_>, LifecycleError> {
        let mut records = self.records();
        let in_use =
            records.values().map(|r| r.footprint.total().saturating_add(r.reserved)).fold(0, u64::saturating_add);
        footprint.check_budget(id, in_use, budget)?;
        let Some(record) = records.get_mut(id) else { return Err(LifecycleError::Unknown(id.to_string())) };
        record.reserved = footprint.total();
        Ok(Reservation { registry: self, id: id.clone() })
    }

    /// Digests of cached files in use (not to be evicted).
    pub(super) fn digests(&self) -> Vec<Digest> {
        self.records().values().filter_map(|r| r.sha256.clone()).collect()
    }

    /// Records how far `id`'s download has got (`None` once it ends).
    pub(super) fn set_download(&self, id: &ModelId, download: Option<Transfer>) {
        if let Some(r) = self.records().get_mut(id) {
            r.download = download;
        }
    }

    pub(super) fn set_state(&self, id: &ModelId, state: ModelState) {
        if let Some(r) = self.records().get_mut(id) {
            r.state = state;
        }
    }

    /// Moves `id` from `from` to `to`, or says why not.
    pub(super) fn transition(&self, id: &str, from: ModelState, to: ModelState) -> Result<ModelRecord, LifecycleError> {
        let mut records = self.records();
        let Some(r) = records.get_mut(&ModelId::from(id)) else { return Err(LifecycleError::Unknown(id.to_owned())) };
        if r.state != from {
            return Err(LifecycleError::Busy { id: id.to_owned(), state: r.state });
        }
        r.state = to;
        Ok(r.clone())
    }
}

/// Memory budget held for a model being loaded ([`ModelRegistry::reserve`]). Dropping it
/// gives the bytes back: after a failed load, or once the loaded copy's record counts them.
pub struct Reservation<'a> {
    registry: &'a ModelRegistry,
    id: ModelId,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(record) = self.registry.records().get_mut(&self.id) {
            record.reserved = 0;
        }
    }
}

/// Checks an id given over the admin API (no `/`: it is part of the admin paths).
pub fn parse_id(id: &str) -> Result<ModelId, LifecycleError> {
    let ok = (1..=64).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
    if ok { Ok(ModelId::from(id)) } else { Err(LifecycleError::BadId(id.to_owned())) }
}
