//! Model lifecycle while serving: load beside the running models, unload (stop admitting,
//! drain, then unmap), and hot reload (the new copy loads beside the old, routing switches
//! in one table swap, the old copy drains). The admin routes call these; so can tests.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::records::{LifecycleError, LoadSpec, ModelLimits, ModelRecord, ModelState, Reservation};
use super::state::AppState;
use crate::config::{Config, ModelConfig};
use crate::engine::load::{Footprint, LoadError, LoadedModel, start_model_observed};
use crate::registry::{
    Digest, RegistryError, Source, Transfer, check_allowed_host, resolve_local, resolve_pipeline, sha256_file,
};
use crate::types::ModelId;

impl AppState {
    /// Marks model `id` as loading: `/readyz` turns 503 and its `starling_model_loaded` is 0.
    pub fn begin_loading(&self, id: &ModelId) {
        self.obs.metrics.model_loaded.with_label_values(&[id.as_str()]).set(0);
        self.models.update(|t| {
            if !t.is_loading(id.as_str()) {
                t.loading.push(id.clone());
            }
        });
    }

    /// Publishes a loaded model (replacing one with the same id) and clears its loading mark;
    /// returns the model it replaced, which the caller drains.
    pub fn finish_loading(&self, model: LoadedModel) -> Option<Arc<LoadedModel>> {
        let model = Arc::new(model);
        self.obs.metrics.model_loaded.with_label_values(&[model.id.as_str()]).set(1);
        self.models.update(|t| {
            t.loading.retain(|l| *l != model.id);
            match t.ready.iter_mut().find(|m| m.id == model.id) {
                Some(slot) => Some(std::mem::replace(slot, model)),
                None => {
                    t.ready.push(model);
                    None
                }
            }
        })
    }

    /// Clears model `id`'s loading mark after a failed load.
    pub fn abandon_loading(&self, id: &ModelId) {
        self.models.update(|t| t.loading.retain(|l| l != id));
    }

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
                reserved: 0,
                settings: self.config.models[0].clone(),
                download: None,
            };
            records.insert(spec.id.clone(), placeholder);
        }
        self.begin_loading(&spec.id);
        let result = self.bring_up(&spec, self.config.models[0].clone()).await;
        match result {
            Ok((model, record, reservation)) => {
                self.registry.records().insert(spec.id.clone(), record.clone());
                drop(reservation);
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
        let (model, record, reservation) = match self.bring_up(&spec, old.settings.clone()).await {
            Ok(up) => up,
            Err(e) => {
                self.registry.set_state(&spec.id, ModelState::Ready);
                return Err(e);
            }
        };
        self.registry.records().insert(spec.id.clone(), record.clone());
        drop(reservation);
        if let Some(previous) = self.finish_loading(model) {
            let grace = self.config.registry.drain_grace;
            tokio::spawn(async move {
                let drained = retire(previous, grace).await;
                tracing::info!(model = %spec.id, drained, "previous copy unloaded after reload");
            });
        }
        Ok(record)
    }

    /// Resolves the source, reserves its memory budget and starts the engine (off the async
    /// threads). The caller records the new copy, then drops the reservation.
    async fn bring_up(
        self: &Arc<Self>,
        spec: &LoadSpec,
        template: ModelConfig,
    ) -> Result<(LoadedModel, ModelRecord, Reservation<'_>), LifecycleError> {
        let mut limits = spec.limits.clone();
        if let Some(pipeline) = &limits.pipeline {
            let dirs = &self.config.registry.pipeline_dirs;
            limits.pipeline = Some(resolve_pipeline(pipeline, dirs).map_err(LifecycleError::Pipeline)?);
        }
        let (path, sha256) = self.resolve(spec).await?;
        let live = self.live();
        let mut config = Config::clone(&live.config);
        let mut mc = template;
        mc.id = spec.id.clone();
        mc.path = path;
        limits.apply(&mut mc);
        let footprint = Footprint::of(&mc)?;
        let reservation = self.registry.reserve(&spec.id, footprint, self.config.registry.memory_budget)?;
        config.models = vec![mc.clone()];
        let obs = self.obs.clone();
        let model = tokio::task::spawn_blocking(move || start_model_observed(&config, 0, &obs))
            .await
            .map_err(|e| LifecycleError::Task(e.to_string()))??;
        let record = ModelRecord {
            state: ModelState::Ready,
            source: spec.source.describe(),
            sha256,
            footprint,
            reserved: 0,
            settings: mc,
            download: None,
        };
        Ok((model, record, reservation))
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
                check_allowed_host(url, self.config.registry.allowed_hosts.as_deref())?;
                let mut progress = DownloadLog::new(&spec.id, url.as_str());
                let mut observe = |t: Transfer| {
                    self.registry.set_download(&spec.id, Some(t));
                    progress.observe(t);
                };
                let in_use = self.registry.digests();
                let fetched =
                    self.registry.cache.fetch_observed(url, spec.sha256.as_ref(), &in_use, &mut observe).await;
                self.registry.set_download(&spec.id, None);
                let fetched = fetched?;
                tracing::info!(source = url.as_str(), origin = ?fetched.origin, sha256 = %fetched.sha256, "model file ready");
                Ok((fetched.path, Some(fetched.sha256)))
            }
        }
    }
}

/// Logs a download's progress at a bounded rate: each tenth of a file of known length, or
/// every [`DownloadLog::EVERY`] when the server did not say how long it is.
struct DownloadLog<'a> {
    model: &'a ModelId,
    source: &'a str,
    /// The last tenth logged.
    tenth: Option<u64>,
    last: Option<Instant>,
}

impl<'a> DownloadLog<'a> {
    const EVERY: Duration = Duration::from_secs(10);

    fn new(model: &'a ModelId, source: &'a str) -> Self {
        DownloadLog { model, source, tenth: None, last: None }
    }

    fn observe(&mut self, t: Transfer) {
        let due = match t.percent() {
            Some(p) => self.tenth.replace(p / 10) != Some(p / 10),
            None => self.last.is_none_or(|at| at.elapsed() >= Self::EVERY),
        };
        if due {
            self.last = Some(Instant::now());
            tracing::info!(
                model = %self.model,
                source = self.source,
                received_bytes = t.received,
                total_bytes = t.total,
                percent = t.percent(),
                "downloading model file"
            );
        }
    }
}

/// Marks every configured model as loading. `serve` calls it before binding, so `/readyz`
/// never answers "no model loaded" in the moment before the loader starts.
pub fn mark_configured_loading(state: &AppState) {
    for m in &state.config.models {
        state.begin_loading(&m.id);
    }
}

/// Loads every configured model in order (all are marked loading first), publishing each as
/// it comes up. `serve` runs this on a blocking task after binding; the first failure is
/// returned and the remaining models stay unloaded.
pub fn load_configured(state: &AppState) -> Result<(), LoadError> {
    let config = state.config.clone();
    mark_configured_loading(state);
    let mut in_use = 0u64;
    for (index, m) in config.models.iter().enumerate() {
        let loaded = Footprint::of(m)
            .and_then(|f| f.check_budget(&m.id, in_use, config.registry.memory_budget).map(|()| f))
            .and_then(|f| start_model_observed(&config, index, &state.obs).map(|model| (f, model)));
        match loaded {
            Ok((footprint, model)) => {
                in_use += footprint.total();
                state.record_configured(m, footprint);
                state.finish_loading(model);
            }
            Err(e) => {
                for m in &config.models[index..] {
                    state.abandon_loading(&m.id);
                }
                return Err(e);
            }
        }
    }
    Ok(())
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
