//! The HTTP gateway (hyper 1 on tokio): routes, validation, and streaming.
//!
//! Handlers parse and validate requests into engine commands, send them over the model's
//! bounded inbox, and turn the per-request event stream into SSE frames or one JSON body.
//! The gateway shares nothing mutable with engines.

mod http;
mod native;
mod sse;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::engine::load::LoadedModel;
use crate::error::{ApiError, ErrorKind};
use crate::telemetry::Observability;
pub use http::Body;

/// Everything handlers read. Engines are reached only through their handles.
pub struct AppState {
    pub config: Arc<Config>,
    /// Loaded models by id, in config order.
    pub models: Vec<Arc<LoadedModel>>,
    /// Set on shutdown: `/readyz` turns 503 and new generations are refused.
    pub draining: AtomicBool,
    /// Metrics, engine heartbeats and readiness thresholds.
    pub obs: Arc<Observability>,
}

impl AppState {
    /// State whose models report to `obs` (see `start_model_observed`).
    pub fn new(config: Arc<Config>, models: Vec<LoadedModel>, obs: Arc<Observability>) -> Self {
        AppState { config, models: models.into_iter().map(Arc::new).collect(), draining: AtomicBool::new(false), obs }
    }

    /// The model a request names, or the first one when it names none.
    pub fn model(&self, name: Option<&str>) -> Result<&Arc<LoadedModel>, ApiError> {
        match name {
            None => self
                .models
                .first()
                .ok_or_else(|| ApiError::new(ErrorKind::Unavailable, "no model is loaded").with_code("no_model")),
            Some(name) => self.models.iter().find(|m| m.id.as_str() == name).ok_or_else(|| {
                let known: Vec<_> = self.models.iter().map(|m| m.id.as_str()).collect();
                ApiError::new(ErrorKind::NotFound, format!("unknown model `{name}` (loaded: {})", known.join(", ")))
                    .with_code("model_not_found")
                    .with_param("model")
            }),
        }
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
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(?grace, "grace period over; cancelling the remaining requests");
    }
}

async fn handle(state: Arc<AppState>, _peer: SocketAddr, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let request_id = http::request_id(&req);
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let span = tracing::info_span!("gateway", %method, %path, request_id = %request_id);
    let _g = span.enter();
    let result = route(&state, req).await;
    if let Err(e) = &result {
        state.obs.record_error(&request_id, e);
    }
    let mut response = result.unwrap_or_else(|e| http::error_response(&e));
    http::set_request_id(&mut response, &request_id);
    Ok(response)
}

async fn route(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let known: HashMap<&str, &[Method]> = ROUTES.iter().copied().collect();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => Ok(native::healthz(state)),
        (Method::GET, "/readyz") => Ok(native::readyz(state)),
        (Method::GET, "/v1/models") => Ok(native::list_models(state)),
        (Method::GET, "/metrics") => Ok(crate::telemetry::routes::metrics(state)),
        (Method::POST, "/admin/trace") => crate::telemetry::routes::capture_trace(state, req).await,
        (Method::POST, "/v1/generate") => native::generate(state, req).await,
        (Method::POST, "/v1/tokenize") => native::tokenize(state, req).await,
        (Method::POST, "/v1/detokenize") => native::detokenize(state, req).await,
        (Method::POST, "/v1/session/close") => native::close_session(state, req).await,
        (method, p) => match known.get(p) {
            Some(allowed) => Err(ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!(
                    "{method} is not allowed on {p} (allowed: {})",
                    allowed.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
                ),
            )),
            None => Err(ApiError::new(ErrorKind::NotFound, format!("no route {p}")).with_code("route_not_found")),
        },
    }
}

const ROUTES: &[(&str, &[Method])] = &[
    ("/healthz", &[Method::GET]),
    ("/readyz", &[Method::GET]),
    ("/v1/models", &[Method::GET]),
    ("/metrics", &[Method::GET]),
    ("/admin/trace", &[Method::POST]),
    ("/v1/generate", &[Method::POST]),
    ("/v1/tokenize", &[Method::POST]),
    ("/v1/detokenize", &[Method::POST]),
    ("/v1/session/close", &[Method::POST]),
];
