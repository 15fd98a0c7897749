//! The one route table: every path pattern, its method, the handler it names, and who may
//! call it. 404 and 405 (with the methods a path allows) are derived from it.

use hyper::Method;

use crate::error::{ApiError, ErrorKind};

/// A handler, named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Metrics,
    Models,
    Generate,
    Completions,
    ChatCompletions,
    Tokenize,
    Detokenize,
    CloseSession,
    Cancel,
    AdminStats,
    AdminTrace,
    AdminListModels,
    AdminLoadModel,
    AdminUnloadModel,
    AdminReloadModel,
    AdminDrain,
    AdminReloadConfig,
    UiPage,
    UiAsset,
}

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guard {
    /// A client key when auth is on (the config may make such a route public).
    Client,
    /// The admin key, always.
    Admin,
    /// Never a key: the playground's static files (they hold no data).
    Public,
}

/// Every route: method, path pattern (`{id}` matches one non-empty segment), handler, guard.
const TABLE: &[(Method, &str, Route, Guard)] = &[
    (Method::GET, "/healthz", Route::Healthz, Guard::Client),
    // The name vLLM, llama.cpp's server and TGI serve (load balancers and benchmark clients
    // such as guidellm probe it): the same answer as `/healthz`.
    (Method::GET, "/health", Route::Healthz, Guard::Client),
    (Method::GET, "/readyz", Route::Readyz, Guard::Client),
    (Method::GET, "/metrics", Route::Metrics, Guard::Client),
    (Method::GET, "/v1/models", Route::Models, Guard::Client),
    (Method::POST, "/v1/generate", Route::Generate, Guard::Client),
    (Method::POST, "/v1/completions", Route::Completions, Guard::Client),
    (Method::POST, "/v1/chat/completions", Route::ChatCompletions, Guard::Client),
    (Method::POST, "/v1/tokenize", Route::Tokenize, Guard::Client),
    (Method::POST, "/v1/detokenize", Route::Detokenize, Guard::Client),
    (Method::POST, "/v1/session/close", Route::CloseSession, Guard::Client),
    (Method::POST, "/v1/cancel", Route::Cancel, Guard::Client),
    (Method::GET, "/admin/stats", Route::AdminStats, Guard::Admin),
    (Method::POST, "/admin/trace", Route::AdminTrace, Guard::Admin),
    (Method::GET, "/admin/models", Route::AdminListModels, Guard::Admin),
    (Method::POST, "/admin/models", Route::AdminLoadModel, Guard::Admin),
    (Method::DELETE, "/admin/models/{id}", Route::AdminUnloadModel, Guard::Admin),
    (Method::POST, "/admin/models/{id}/reload", Route::AdminReloadModel, Guard::Admin),
    (Method::POST, "/admin/drain", Route::AdminDrain, Guard::Admin),
    (Method::POST, "/admin/config/reload", Route::AdminReloadConfig, Guard::Admin),
    (Method::GET, "/", Route::UiPage, Guard::Public),
    (Method::GET, "/ui/{id}", Route::UiAsset, Guard::Public),
];

impl Route {
    /// Liveness and readiness probes, answered even past the connection cap.
    pub fn is_health(self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz)
    }

    /// Whether the route costs CPU (a generation, or tokenizing / detokenizing a body) and so
    /// spends the tenant's request rate limit.
    pub fn metered(self) -> bool {
        matches!(
            self,
            Route::Generate | Route::Completions | Route::ChatCompletions | Route::Tokenize | Route::Detokenize
        )
    }
}

/// A request matched against the table.
#[derive(Debug, PartialEq, Eq)]
pub struct Matched<'p> {
    pub route: Route,
    pub guard: Guard,
    /// The `{id}` segment, for routes that have one.
    pub id: Option<&'p str>,
}

/// Why a request matched no route.
#[derive(Debug, PartialEq, Eq)]
pub enum Unrouted {
    /// No pattern matches the path.
    NotFound,
    /// The path exists with these methods only.
    MethodNotAllowed(Vec<Method>),
}

impl Unrouted {
    /// Admin paths keep their guard even when unrouted, so their shape is not revealed
    /// to callers without the admin key.
    pub fn guard(path: &str) -> Guard {
        if path == "/admin" || path.starts_with("/admin/") { Guard::Admin } else { Guard::Client }
    }

    /// The error the client gets (404 `route_not_found`, or 405 naming the allowed methods).
    pub fn error(&self, method: &Method, path: &str) -> ApiError {
        match self {
            Unrouted::NotFound => {
                ApiError::new(ErrorKind::NotFound, format!("no route {path}")).with_code("route_not_found")
            }
            Unrouted::MethodNotAllowed(allowed) => ApiError::new(
                ErrorKind::MethodNotAllowed,
                format!("{method} is not allowed on {path} (allowed: {})", allow_header(allowed)),
            ),
        }
    }
}

/// The value of an `Allow` header.
pub fn allow_header(methods: &[Method]) -> String {
    methods.iter().map(Method::as_str).collect::<Vec<_>>().join(", ")
}

/// Matches `path` against `pattern`, returning the `{id}` segment if the pattern has one.
fn matches<'p>(pattern: &str, path: &'p str) -> Option<Option<&'p str>> {
    let (mut pat, mut segs) = (pattern.split('/'), path.split('/'));
    let mut id = None;
    loop {
        match (pat.next(), segs.next()) {
            (None, None) => return Some(id),
            (Some("{id}"), Some(seg)) if !seg.is_empty() => id = Some(seg),
            (Some(p), Some(seg)) if p == seg => {}
            _ => return None,
        }
    }
}

/// The route for `method` and `path`.
pub fn resolve<'p>(method: &Method, path: &'p str) -> Result<Matched<'p>, Unrouted> {
    let mut allowed = Vec::new();
    for (m, pattern, route, guard) in TABLE {
        if let Some(id) = matches(pattern, path) {
            if m == method {
                return Ok(Matched { route: *route, guard: *guard, id });
            }
            allowed.push(m.clone());
        }
    }
    if allowed.is_empty() { Err(Unrouted::NotFound) } else { Err(Unrouted::MethodNotAllowed(allowed)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_resolves_to_its_route_and_others_are_404_or_405() {
        let m = resolve(&Method::POST, "/v1/generate").unwrap();
        assert_eq!((m.route, m.guard, m.id), (Route::Generate, Guard::Client, None));
        let m = resolve(&Method::POST, "/admin/models/smol/reload").unwrap();
        assert_eq!((m.route, m.guard, m.id), (Route::AdminReloadModel, Guard::Admin, Some("smol")));
        assert_eq!(resolve(&Method::DELETE, "/admin/models/smol").unwrap().route, Route::AdminUnloadModel);
        assert_eq!(resolve(&Method::GET, "/v1/generate").unwrap_err(), Unrouted::MethodNotAllowed(vec![Method::POST]));
        assert_eq!(
            resolve(&Method::PUT, "/admin/models").unwrap_err(),
            Unrouted::MethodNotAllowed(vec![Method::GET, Method::POST])
        );
        assert_eq!(resolve(&Method::GET, "/admin/models//reload").unwrap_err(), Unrouted::NotFound);
        assert_eq!(resolve(&Method::GET, "/nope").unwrap_err(), Unrouted::NotFound);
        assert!(resolve(&Method::GET, "/admin/models").is_ok());
    }

    #[test]
    fn a_405_names_the_allowed_methods() {
        let e = Unrouted::MethodNotAllowed(vec![Method::GET, Method::POST]).error(&Method::PUT, "/admin/models");
        assert_eq!(e.status(), 405);
        assert!(e.message.contains("allowed: GET, POST"), "{}", e.message);
    }

    #[test]
    fn admin_paths_are_admin_guarded_even_when_unknown() {
        assert_eq!(Unrouted::guard("/admin/nope"), Guard::Admin);
        assert_eq!(Unrouted::guard("/administrator"), Guard::Client);
        assert!(TABLE.iter().all(|(_, p, _, g)| p.starts_with("/admin/") == (*g == Guard::Admin)));
    }
}
