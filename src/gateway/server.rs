//! The HTTP server: accepts connections, authenticates each request against the route
//! table, applies the tenant's rate limits to generation routes, and dispatches to the
//! route modules. Graceful shutdown lives here too.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::Instrument;

use super::auth::Caller;
use super::extract::request_id;
use super::quota::RateInfo;
use super::render::{Body, error_response, set_request_id};
use super::router::{self, Matched, Route, Unrouted};
use super::routes::{admin, native, openai, ops};
use super::state::{AppState, Ctx};
use crate::error::ApiError;

/// How long cancelled streams get to write their final event after the grace period.
const CANCEL_FLUSH: Duration = Duration::from_secs(2);

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

async fn handle(state: Arc<AppState>, _peer: SocketAddr, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let request_id = request_id(&req);
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let span = tracing::info_span!("gateway", %method, %path, request_id = %request_id, tenant = tracing::field::Empty);
    let started = Instant::now();
    let routed = router::resolve(&method, &path);
    let (guard, generates) = match &routed {
        Ok(m) => (m.guard, m.route.generates()),
        Err(_) => (Unrouted::guard(&path), false),
    };
    let mut response = match gate(&state, &req, &path, guard, generates) {
        Err(refused) => refused,
        Ok((caller, rate)) => {
            span.record("tenant", caller.tenant.as_str());
            let ctx = Ctx { caller, request_id: request_id.clone() };
            let mut r = match routed {
                Ok(matched) => dispatch(&state, ctx, matched, req)
                    .instrument(span.clone())
                    .await
                    .unwrap_or_else(|e| failed(&state, &request_id, &e)),
                Err(unrouted) => {
                    let mut r = failed(&state, &request_id, &unrouted.error(&method, &path));
                    if let Unrouted::MethodNotAllowed(allowed) = &unrouted
                        && let Ok(v) = HeaderValue::from_str(&router::allow_header(allowed))
                    {
                        r.headers_mut().insert(ALLOW, v);
                    }
                    r
                }
            };
            rate.write(r.headers_mut());
            r
        }
    };
    set_request_id(&mut response, &request_id);
    span.in_scope(|| {
        tracing::info!(status = response.status().as_u16(), ms = started.elapsed().as_millis() as u64, "request")
    });
    Ok(response)
}

/// Counts and logs a failed request, and renders its error.
fn failed(state: &AppState, request_id: &str, e: &ApiError) -> Response<Body> {
    state.obs.record_error(request_id, e);
    error_response(e)
}

/// Authentication for the route's guard, then the tenant's rate limits for generation routes.
#[allow(clippy::result_large_err)]
fn gate(
    state: &AppState,
    req: &Request<Incoming>,
    path: &str,
    guard: router::Guard,
    generates: bool,
) -> Result<(Caller, RateInfo), Response<Body>> {
    let header = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let live = state.live();
    let caller = live.auth.authenticate(live.auth.access(guard, path), header).map_err(|e| error_response(&e))?;
    if !generates {
        return Ok((caller, RateInfo::default()));
    }
    match live.quotas.admit(&caller.tenant, Instant::now()) {
        Ok(rate) => Ok((caller, rate)),
        Err(refusal) => {
            let mut r = error_response(&refusal.error);
            refusal.write(r.headers_mut());
            Err(r)
        }
    }
}

/// Runs the matched route's handler.
async fn dispatch(
    state: &Arc<AppState>,
    ctx: Ctx,
    matched: Matched<'_>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let id = matched.id.unwrap_or_default();
    match matched.route {
        Route::Healthz => Ok(ops::healthz(state)),
        Route::Readyz => Ok(ops::readyz(state)),
        Route::Metrics => Ok(ops::metrics(state)),
        Route::Models => Ok(native::list_models(state)),
        Route::Generate => native::generate(state, &ctx, req).await,
        Route::Completions => openai::completions(state, &ctx, req).await,
        Route::ChatCompletions => openai::chat_completions(state, &ctx, req).await,
        Route::Tokenize => native::tokenize(state, req).await,
        Route::Detokenize => native::detokenize(state, req).await,
        Route::CloseSession => native::close_session(state, &ctx, req).await,
        Route::Cancel => native::cancel(state, &ctx, req).await,
        Route::AdminStats => Ok(admin::stats(state)),
        Route::AdminTrace => ops::capture_trace(state, req.uri().query()).await,
        Route::AdminListModels => Ok(admin::list_models(state)),
        Route::AdminLoadModel => admin::load(state, req).await,
        Route::AdminUnloadModel => admin::unload(state, id).await,
        Route::AdminReloadModel => admin::reload(state, id, req).await,
        Route::AdminDrain => admin::drain(state, req).await,
        Route::AdminReloadConfig => admin::reload_config(state).await,
    }
}
