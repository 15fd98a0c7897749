//! The HTTP gateway (hyper 1 on tokio): routes, validation, and streaming.
//!
//! Handlers parse and validate requests into engine commands, send them over the model's
//! bounded inbox, and turn the per-request event stream into SSE frames or one JSON body.
//! The gateway shares nothing mutable with engines.

mod admin;
mod auth;
mod http;
mod lifecycle;
mod models;
mod native;
mod openai;
mod quota;
mod sse;
mod template;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::{Config, Overrides};
use crate::engine::load::LoadedModel;
use crate::error::{ApiError, ErrorKind};
use crate::telemetry::Observability;
pub use auth::{Access, Authenticator, Caller};
pub use http::Body;
pub use lifecycle::{LifecycleError, LoadSpec, ModelLimits, ModelRecord, ModelRegistry, ModelState};
pub use models::{ModelTable, Models, load_configured, mark_configured_loading};
pub use quota::{Quotas, RateInfo};

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

impl AppState {
    /// State whose models report to `obs` (see `start_model_observed`); `models` may be
    /// empty and filled later (see [`load_configured`]).
    pub fn new(config: Arc<Config>, models: Vec<LoadedModel>, obs: Arc<Observability>) -> Self {
        let registry = ModelRegistry::new(&config);
        for m in &models {
            registry.record(&m.config, crate::engine::load::Footprint::of(&m.config).unwrap_or_default());
        }
        AppState {
            live: RwLock::new(Arc::new(Live::new(config.clone()))),
            registry,
            config_source: None,
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

/// Serves HTTP on `listener` until `shutdown` resolves, then stops accepting, marks the
/// server draining, and waits up to the configured grace period for open connections.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let state = state.clone();
                let service = service_fn(move |req| handle(state.clone(), peer, req));
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    state.draining.store(true, Ordering::Relaxed);
    tracing::info!("shutting down: waiting for in-flight requests");
    let grace = state.config.server.shutdown_grace;
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    if tokio::time::timeout(grace, &mut drained).await.is_err() {
        tracing::warn!(?grace, "grace period over; cancelling the remaining requests");
        state.cancel.send_replace(true);
        if tokio::time::timeout(CANCEL_FLUSH, drained).await.is_err() {
            tracing::warn!("connections still open after cancellation; closing them");
        }
    }
}

/// How long cancelled streams get to write their final event after the grace period.
const CANCEL_FLUSH: Duration = Duration::from_secs(2);

/// What every handler knows about the request besides its body.
pub struct Ctx {
    pub caller: Caller,
    pub request_id: String,
}

async fn handle(state: Arc<AppState>, _peer: SocketAddr, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let request_id = http::request_id(&req);
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let span = tracing::info_span!("gateway", %method, %path, request_id = %request_id, tenant = tracing::field::Empty);
    let started = Instant::now();
    let mut response = match gate(&state, &req) {
        Err(refused) => refused,
        Ok((caller, rate)) => {
            span.record("tenant", caller.tenant.as_str());
            let ctx = Ctx { caller, request_id: request_id.clone() };
            let mut r = route(&state, ctx, req).instrument(span.clone()).await.unwrap_or_else(|e| {
                state.obs.record_error(&request_id, &e);
                http::error_response(&e)
            });
            rate.write(r.headers_mut());
            r
        }
    };
    http::set_request_id(&mut response, &request_id);
    span.in_scope(|| {
        tracing::info!(status = response.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request")
    });
    Ok(response)
}

/// Authentication, then the tenant's rate limits for generation routes.
#[allow(clippy::result_large_err)]
fn gate(state: &AppState, req: &Request<Incoming>) -> Result<(Caller, RateInfo), Response<Body>> {
    let path = req.uri().path();
    let header = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let live = state.live();
    let caller = live.auth.authenticate(live.auth.access(path), header).map_err(|e| http::error_response(&e))?;
    if req.method() != Method::POST || !GENERATION_ROUTES.contains(&path) {
        return Ok((caller, RateInfo::default()));
    }
    match live.quotas.admit(&caller.tenant, Instant::now()) {
        Ok(rate) => Ok((caller, rate)),
        Err(refusal) => {
            let mut r = http::error_response(&refusal.error);
            refusal.write(r.headers_mut());
            Err(r)
        }
    }
}

/// Routes that start a generation (and so spend the tenant's quotas).
const GENERATION_ROUTES: &[&str] = &["/v1/generate", "/v1/completions", "/v1/chat/completions"];

async fn route(state: &Arc<AppState>, ctx: Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => Ok(native::healthz(state)),
        (Method::GET, "/readyz") => Ok(native::readyz(state)),
        (Method::GET, "/v1/models") => Ok(native::list_models(state)),
        (Method::POST, "/v1/generate") => native::generate(state, &ctx, req).await,
        (Method::POST, "/v1/completions") => openai::completions(state, &ctx, req).await,
        (Method::POST, "/v1/chat/completions") => openai::chat_completions(state, &ctx, req).await,
        (Method::GET, "/metrics") => Ok(crate::telemetry::routes::metrics(state)),
        (Method::POST, "/admin/trace") => crate::telemetry::routes::capture_trace(state, req).await,
        (Method::POST, "/v1/tokenize") => native::tokenize(state, req).await,
        (Method::POST, "/v1/detokenize") => native::detokenize(state, req).await,
        (Method::POST, "/v1/session/close") => native::close_session(state, &ctx, req).await,
        (Method::POST, "/v1/cancel") => native::cancel(state, &ctx, req).await,
        (Method::GET, "/admin/stats") => Ok(native::stats(state)),
        (Method::GET, "/admin/models") => Ok(admin::list_models(state)),
        (Method::POST, "/admin/models") => admin::load(state, req).await,
        (Method::POST, "/admin/drain") => admin::drain(state, req).await,
        (Method::POST, "/admin/config/reload") => admin::reload_config(state).await,
        (method, p) if p.starts_with("/admin/models/") => {
            let rest = p.trim_start_matches("/admin/models/").to_owned();
            admin::model_route(state, method, &rest, req).await
        }
        (method, p) => Err(no_route(&method, p)),
    }
}

fn no_route(method: &Method, path: &str) -> ApiError {
    let known: HashMap<&str, &[Method]> = ROUTES.iter().copied().collect();
    match known.get(path) {
        Some(allowed) => ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!(
                "{method} is not allowed on {path} (allowed: {})",
                allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
            ),
        ),
        None => ApiError::new(ErrorKind::NotFound, format!("no route {path}")).with_code("route_not_found"),
    }
}

/// Every route and its methods (405 for a known path with another method).
const ROUTES: &[(&str, &[Method])] = &[
    ("/healthz", &[Method::GET]),
    ("/readyz", &[Method::GET]),
    ("/v1/models", &[Method::GET]),
    ("/metrics", &[Method::GET]),
    ("/admin/trace", &[Method::POST]),
    ("/v1/generate", &[Method::POST]),
    ("/v1/completions", &[Method::POST]),
    ("/v1/chat/completions", &[Method::POST]),
    ("/v1/tokenize", &[Method::POST]),
    ("/v1/detokenize", &[Method::POST]),
    ("/v1/session/close", &[Method::POST]),
    ("/v1/cancel", &[Method::POST]),
    ("/admin/stats", &[Method::GET]),
    ("/admin/models", &[Method::GET, Method::POST]),
    ("/admin/drain", &[Method::POST]),
    ("/admin/config/reload", &[Method::POST]),
];
