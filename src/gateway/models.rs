//! The models the gateway routes to, late-bound: a [`ModelTable`] snapshot swapped whole
//! whenever a model starts loading, finishes, is unloaded or replaced. Handlers take one
//! snapshot (`Arc`) per request, so a swap never changes a request's model under it.

use std::sync::{Arc, RwLock};

use crate::engine::load::LoadedModel;
use crate::error::{ApiError, ErrorKind};
use crate::types::ModelId;

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
