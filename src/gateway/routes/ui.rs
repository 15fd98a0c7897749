//! The browser playground: `GET /` and `GET /ui/{file}`, a single page compiled into the
//! binary (plain HTML, CSS and JavaScript from `ui/`). It holds no data, so it is served
//! without a key; every API call it makes carries the key the user gives it. Its
//! Content-Security-Policy lets it reach only this server, whatever a reply contains.

use hyper::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, HeaderValue, X_CONTENT_TYPE_OPTIONS};
use hyper::{Response, StatusCode};

use crate::error::{ApiError, ErrorKind};
use crate::gateway::render::{Body, bytes_response};
use crate::gateway::state::AppState;

/// The page's files: name, content type, bytes.
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("../../../ui/index.html")),
    ("app.css", "text/css; charset=utf-8", include_str!("../../../ui/app.css")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../../ui/app.js")),
];

/// Only this origin, no inline script or style, no frames, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' blob: data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Total bytes of the page (README states it).
pub fn page_bytes() -> usize {
    FILES.iter().map(|(_, _, body)| body.len()).sum()
}

/// `GET /`.
pub fn page(state: &AppState) -> Result<Response<Body>, ApiError> {
    asset(state, "index.html")
}

/// `GET /ui/{file}`; 404 for another name, or for everything with `server.ui: false`.
pub fn asset(state: &AppState, name: &str) -> Result<Response<Body>, ApiError> {
    let found = FILES.iter().find(|(n, _, _)| *n == name).filter(|_| state.config.server.ui);
    let Some((_, content_type, body)) = found else {
        return Err(ApiError::new(ErrorKind::NotFound, "no such page").with_code("route_not_found"));
    };
    let mut r = bytes_response(StatusCode::OK, content_type, body.as_bytes());
    let h = r.headers_mut();
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}
