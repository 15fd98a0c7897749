//! The models the gateway routes to, late-bound: a [`ModelTable`] snapshot swapped whole
//! whenever a model starts loading, finishes, is unloaded or replaced. Handlers take one
//! snapshot (`Arc`) per request, so a swap never changes a request's model under it.

use std::sync::{Arc, RwLock};

use crate::engine::load::{Footprint, LoadError, LoadedModel, start_model_observed};
use crate::error::{ApiError, ErrorKind};
use crate::types::ModelId;

use super::AppState;

/// One consistent view of the served models.
#[derive(Clone, Default)]
pub struct ModelTable {
    /// Models serving requests, in load order (`ready[0]` serves requests naming no model).
    pub ready: Vec<Arc<LoadedModel>>,
    /// Models being loaded: requests naming them get 503 `model_loading`, and `/readyz` is 503.
    pub loading: Vec<ModelId>,
}

impl ModelTable {
    /// The serving model `id`, if any.
    pub fn get(&self, id: &str) -> Option<&Arc<LoadedModel>> {
        self.ready.iter().find(|m| m.id.as_str() == id)
    }

    /// Whether model `id` is being loaded.
    pub fn is_loading(&self, id: &str) -> bool {
        self.loading.iter().any(|l| l.as_str() == id)
    }

    /// The model a request names, or the first one when it names none.
    pub fn route(&self, name: Option<&str>) -> Result<Arc<LoadedModel>, ApiError> {
        match name {
            None => self.ready.first().cloned().ok_or_else(|| match self.loading.first() {
                Some(id) => loading_error(id.as_str()),
                None => ApiError::new(ErrorKind::Unavailable, "no model is loaded").with_code("no_model"),
            }),
            Some(name) => match self.get(name) {
                Some(m) => Ok(m.clone()),
                None if self.is_loading(name) => Err(loading_error(name)),
                None => {
                    let known: Vec<_> = self.ready.iter().map(|m| m.id.as_str()).collect();
                    Err(ApiError::new(
                        ErrorKind::NotFound,
                        format!("unknown model `{name}` (loaded: {})", known.join(", ")),
                    )
                    .with_code("model_not_found")
                    .with_param("model"))
                }
            },
        }
    }
}

fn loading_error(id: &str) -> ApiError {
    ApiError::new(ErrorKind::Unavailable, format!("model `{id}` is still loading; retry shortly"))
        .with_code("model_loading")
        .with_retry_after(1)
}

/// The swappable slot holding the current [`ModelTable`].
#[derive(Default)]
pub struct Models {
    current: RwLock<Arc<ModelTable>>,
}

impl Models {
    /// A slot serving `ready` from the start.
    pub fn new(ready: Vec<Arc<LoadedModel>>) -> Self {
        Models { current: RwLock::new(Arc::new(ModelTable { ready, loading: Vec::new() })) }
    }

    /// The current table (cheap: one `Arc` clone under a read lock).
    pub fn snapshot(&self) -> Arc<ModelTable> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `change` to a copy of the table and publishes it; returns what `change` returned.
    pub fn update<T>(&self, change: impl FnOnce(&mut ModelTable) -> T) -> T {
        let mut slot = self.current.write().unwrap_or_else(|e| e.into_inner());
        let mut next = ModelTable::clone(&slot);
        let out = change(&mut next);
        *slot = Arc::new(next);
        out
    }
}

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
