//! What every handler reads: the server's config, its models, the live (reloadable) keys
//! and quotas, and the shutdown signals. Engines are reached only through their handles.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::auth::{Authenticator, Caller};
use super::cpu::CpuPool;
use super::models::Models;
use super::quota::Quotas;
use super::records::ModelRegistry;
use super::template::sandbox::{Limits, TemplateSandbox};
use crate::config::{Config, Overrides};
use crate::engine::load::{Footprint, LoadedModel};
use crate::error::ApiError;
use crate::telemetry::Observability;

/// Everything handlers read. Engines are reached only through their handles.
pub struct AppState {
    /// The config the server started with (`server:` and `models:` are read from here).
    pub config: Arc<Config>,
    /// The served models, late-bound: swapped whole on load, unload and reload.
    pub models: Models,
    /// Set on shutdown: `/readyz` turns 503 and new generations are refused.
    pub draining: AtomicBool,
    /// Turns `true` when the shutdown grace period is over: open streams end with an error event.
    pub cancel: watch::Sender<bool>,
    /// Metrics, engine heartbeats and readiness thresholds.
    pub obs: Arc<Observability>,
    /// The download cache and what is known about each model.
    pub registry: ModelRegistry,
    /// The file `POST /admin/config/reload` reads, with the overrides given at startup.
    pub config_source: Option<(PathBuf, Overrides)>,
    /// Where tokenizing, detokenizing and chat-template rendering run.
    pub cpu: CpuPool,
    /// The worker processes chat templates render in.
    pub templates: Arc<TemplateSandbox>,
    /// Threads that wait on template workers: their own pool, so renders held up to their
    /// time limit never keep `cpu` from tokenizing other requests.
    pub template_slots: CpuPool,
    /// Where JSON schemas and grammars compile: their own pool, so a costly grammar never
    /// holds up tokenizing, and the engines never compile.
    pub grammar_slots: CpuPool,
    live: RwLock<Arc<Live>>,
}

/// The parts of the config that `POST /admin/config/reload` replaces while serving.
pub struct Live {
    /// The latest accepted config (tenants, keys and limits are read from here).
    pub config: Arc<Config>,
    /// API keys and route access.
    pub auth: Authenticator,
    /// Per-tenant request and token buckets.
    pub quotas: Quotas,
}

impl Live {
    fn new(config: Arc<Config>) -> Self {
        Live { auth: Authenticator::new(&config), quotas: Quotas::new(&config), config }
    }
}

/// What every handler knows about the request besides its body.
pub struct Ctx {
    pub caller: Caller,
    pub request_id: String,
    /// When the request's head arrived: where its queue time and time to first token start.
    pub received_at: std::time::Instant,
    /// The `x-session-id` header, if sent: a session named where a proxy can see it (and
    /// route a conversation's turns to the replica holding its KV).
    pub session_header: Option<hyper::header::HeaderValue>,
}

impl AppState {
    /// State whose models report to `obs` (see `start_model_observed`); `models` may be
    /// empty and filled later (see `load_configured`).
    pub fn new(config: Arc<Config>, models: Vec<LoadedModel>, obs: Arc<Observability>) -> Self {
        let registry = ModelRegistry::new(&config);
        for m in &models {
            registry.record(&m.config, Footprint::of(&m.config).unwrap_or_default());
        }
        AppState {
            live: RwLock::new(Arc::new(Live::new(config.clone()))),
            registry,
            config_source: None,
            cpu: CpuPool::new(config.server.cpu_workers.get(), config.server.cpu_queue),
            template_slots: CpuPool::new(config.server.cpu_workers.get(), config.server.cpu_queue),
            grammar_slots: CpuPool::new(config.server.cpu_workers.get(), config.server.cpu_queue),
            templates: Arc::new(TemplateSandbox::this_binary(Limits::of(&config), config.server.cpu_workers.get())),
            models: Models::new(models.into_iter().map(Arc::new).collect()),
            draining: AtomicBool::new(false),
            cancel: watch::Sender::new(false),
            obs,
            config,
        }
    }

    /// Names the config file `POST /admin/config/reload` re-reads (with `overrides` applied).
    pub fn with_config_source(mut self, path: PathBuf, overrides: Overrides) -> Self {
        self.config_source = Some((path, overrides));
        self
    }

    /// Template workers run `program` instead of this process's binary (a program embedding
    /// the library, such as a test, names a `starling` binary here).
    pub fn with_template_worker(mut self, program: PathBuf) -> Self {
        let limits = Limits::of(&self.config);
        self.templates = Arc::new(TemplateSandbox::new(program, limits, self.config.server.cpu_workers.get()));
        self
    }

    /// The live config, keys and quotas (one snapshot per request).
    pub fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the live config: tenants, keys and limits apply to the next request (rate
    /// buckets start full). The admin key stays the one the server started with.
    pub fn replace_live(&self, mut config: Config) {
        config.auth.admin_key = self.config.auth.admin_key.clone();
        let next = Arc::new(Live::new(Arc::new(config)));
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// The model a request names, or the first one when it names none.
    pub fn model(&self, name: Option<&str>) -> Result<Arc<LoadedModel>, ApiError> {
        self.models.snapshot().route(name)
    }
}
