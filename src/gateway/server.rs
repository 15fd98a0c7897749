//! The HTTP server: accepts connections, authenticates each request against the route
//! table, applies the tenant's rate limits to generation routes, and dispatches to the
//! route modules. Graceful shutdown lives here too.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use super::auth::Caller;
use super::extract::request_id;
use super::quota::RateInfo;
use super::render::{Body, error_response, set_request_id};
use super::router::{self, Matched, Route, Unrouted};
use super::routes::{admin, native, openai, ops, ui};
use super::service::SESSION_HEADER;
use super::state::{AppState, Ctx};
use crate::error::{ApiError, ErrorKind};

/// How long cancelled streams get to write their final event after the grace period.
const CANCEL_FLUSH: Duration = Duration::from_secs(2);

/// Most connections beyond `server.max_connections` answered at once (fewer when the cap
/// is small: an eighth of it, at least 4). When a new one arrives and they are all taken,
/// the oldest is closed: an idle flood cannot keep a health probe from being answered.
const OVERFLOW_MAX: usize = 256;
/// How long a connection beyond the cap has to send its request's headers.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Open connections, served and beyond the cap, and the signal that all have closed.
struct Connections {
    served: AtomicUsize,
    /// Connections beyond the cap, oldest first, with the signal that closes each.
    overflow: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    max_overflow: usize,
    next_id: AtomicU64,
    open: AtomicUsize,
    all_closed: Notify,
}

/// Holds one connection's place in [`Connections`] until it closes.
struct ConnectionSlot {
    conns: Arc<Connections>,
    /// Beyond the cap: its id in the overflow list and the signal that closes it early.
    overflow: Option<(u64, Arc<Notify>)>,
}

impl Connections {
    fn new(max_served: usize) -> Arc<Self> {
        Arc::new(Connections {
            served: AtomicUsize::new(0),
            overflow: Mutex::new(VecDeque::new()),
            max_overflow: (max_served / 8).clamp(4, OVERFLOW_MAX),
            next_id: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            all_closed: Notify::new(),
        })
    }

    /// A slot for a new connection: served if under `max`, else one answered once beyond
    /// it (closing the oldest such connection if there are too many).
    fn enter(self: &Arc<Self>, max: usize) -> ConnectionSlot {
        self.open.fetch_add(1, Ordering::AcqRel);
        if self.served.fetch_add(1, Ordering::AcqRel) < max {
            return ConnectionSlot { conns: self.clone(), overflow: None };
        }
        self.served.fetch_sub(1, Ordering::AcqRel);
        let (id, close) = (self.next_id.fetch_add(1, Ordering::Relaxed), Arc::new(Notify::new()));
        let mut overflow = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
        if overflow.len() >= self.max_overflow
            && let Some((_, oldest)) = overflow.pop_front()
        {
            oldest.notify_one();
        }
        overflow.push_back((id, close.clone()));
        ConnectionSlot { conns: self.clone(), overflow: Some((id, close)) }
    }

    /// Waits until every connection has closed.
    async fn closed(&self) {
        loop {
            let wait = self.all_closed.notified();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            wait.await;
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        match &self.overflow {
            None => {
                self.conns.served.fetch_sub(1, Ordering::AcqRel);
            }
            Some((id, _)) => {
                let mut overflow = self.conns.overflow.lock().unwrap_or_else(|e| e.into_inner());
                overflow.retain(|(other, _)| other != id);
            }
        }
        if self.conns.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conns.all_closed.notify_waiters();
        }
    }
}

/// Backs off after failed accepts (out of file descriptors, say) instead of spinning, and
/// logs them at most once per [`AcceptBackoff::REPORT_EVERY`].
#[derive(Default)]
struct AcceptBackoff {
    delay: Duration,
    failures: u64,
    reported: Option<Instant>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    /// Short enough that a connection waiting behind an exhaustion is accepted within a
    /// health check's budget once descriptors free up; 20 failed accepts a second cost nothing.
    const MAX: Duration = Duration::from_millis(50);
    const REPORT_EVERY: Duration = Duration::from_secs(5);

    async fn failed(&mut self, e: &std::io::Error) {
        self.failures += 1;
        if self.reported.is_none_or(|at| at.elapsed() >= Self::REPORT_EVERY) {
            tracing::warn!(error = %e, failures = self.failures, "accept failed; backing off");
            self.reported = Some(Instant::now());
            self.failures = 0;
        }
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        tokio::time::sleep(self.delay).await;
    }

    fn recovered(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// Serves HTTP on `listener` until `shutdown` resolves, then stops accepting, marks the
/// server draining, and waits up to the configured grace period for open connections.
///
/// Each connection must send its headers within `server.header_read_timeout` (also when
/// idle between kept-alive requests). Past `server.max_connections`, a connection is
/// answered once, 429 `too_many_connections` (or its health check), then closed.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let (max, header_timeout) = (state.config.server.max_connections.get(), state.config.server.header_read_timeout);
    let conns = Connections::new(max);
    let (closing, _) = watch::channel(false);
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        backoff.failed(&e).await;
                        continue;
                    }
                };
                backoff.recovered();
                let slot = conns.enter(max);
                let over = slot.overflow.is_some();
                let service = service_fn({
                    let state = state.clone();
                    move |req| handle(state.clone(), peer, over, req)
                });
                let mut builder = http1::Builder::new();
                builder.timer(TokioTimer::new());
                builder.header_read_timeout(if over { OVERFLOW_HEADER_TIMEOUT } else { header_timeout });
                builder.keep_alive(!over);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::spawn(run_connection(conn, slot, closing.subscribe()));
            }
            () = &mut shutdown => break,
        }
    }
    state.draining.store(true, Ordering::Relaxed);
    tracing::info!("shutting down: waiting for in-flight requests");
    closing.send_replace(true);
    let grace = state.config.server.shutdown_grace;
    if tokio::time::timeout(grace, conns.closed()).await.is_err() {
        tracing::warn!(?grace, "grace period over; cancelling the remaining requests");
        state.cancel.send_replace(true);
        if tokio::time::timeout(CANCEL_FLUSH, conns.closed()).await.is_err() {
            tracing::warn!("connections still open after cancellation; closing them");
        }
    }
}

/// Drives one connection until it ends; on shutdown, or when it is beyond the cap and a
/// newer connection needs its place, it is closed gracefully (in-flight requests finish).
async fn run_connection<S>(
    conn: http1::Connection<TokioIo<tokio::net::TcpStream>, S>,
    slot: ConnectionSlot,
    mut closing: watch::Receiver<bool>,
) where
    S: hyper::service::HttpService<Incoming, ResBody = Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let close = slot.overflow.as_ref().map(|(_, close)| close.clone());
    let evicted = async move {
        match close {
            Some(close) => close.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(evicted);
    let shutdown = async move {
        let _ = closing.wait_for(|c| *c).await.map(|_| ());
    };
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = &mut shutdown => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = &mut evicted => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
    drop(slot);
}

async fn handle(
    state: Arc<AppState>,
    _peer: SocketAddr,
    over_cap: bool,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let request_id = request_id(&req);
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let span = tracing::info_span!("gateway", %method, %path, request_id = %request_id, tenant = tracing::field::Empty);
    let started = Instant::now();
    let routed = router::resolve(&method, &path);
    let (guard, metered) = match &routed {
        Ok(m) => (m.guard, m.route.metered()),
        Err(_) => (Unrouted::guard(&path), false),
    };
    let mut response = match gate(&state, &req, &path, guard, metered) {
        Err(refused) => refused,
        Ok((caller, rate)) => {
            span.record("tenant", caller.tenant.as_str());
            let session_header = req.headers().get(SESSION_HEADER).cloned();
            let ctx = Ctx { caller, request_id: request_id.clone(), received_at: started, session_header };
            let mut r = match routed {
                Ok(matched) if over_cap && !matched.route.is_health() => {
                    let e = ApiError::new(
                        ErrorKind::RateLimited,
                        "the server has too many open connections; retry shortly",
                    )
                    .with_code("too_many_connections")
                    .with_retry_after(1);
                    failed(&state, &request_id, &e)
                }
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

/// Authentication for the route's guard, then the tenant's rate limits for routes that cost
/// CPU.
#[allow(clippy::result_large_err)]
fn gate(
    state: &AppState,
    req: &Request<Incoming>,
    path: &str,
    guard: router::Guard,
    metered: bool,
) -> Result<(Caller, RateInfo), Response<Body>> {
    let header = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let live = state.live();
    let caller = live.auth.authenticate(live.auth.access(guard, path), header).map_err(|e| error_response(&e))?;
    if !metered {
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
        Route::UiPage => ui::page(state),
        Route::UiAsset => ui::asset(state, id),
    }
}
