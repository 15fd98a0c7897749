//! Responses out: JSON bodies, the one place an [`ApiError`] becomes an HTTP response, and
//! the streamed shapes (native SSE in [`native`], OpenAI chunks in [`openai`], both fed by
//! [`sse`]).

pub mod native;
pub mod openai;
pub mod sse;

use std::convert::Infallible;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;

use crate::error::ApiError;

/// Every response body: a full buffer or a stream of SSE frames.
pub type Body = BoxBody<Bytes, Infallible>;

/// A whole response body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A response with a body of the given content type.
pub fn bytes_response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON response.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("response types serialize");
    bytes_response(status, "application/json", body)
}

/// The one place an [`ApiError`] becomes an HTTP response.
pub fn error_response(e: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_response(status, &e.body());
    if let Some(secs) = e.retry_after {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if status.is_server_error() {
        tracing::warn!(status = status.as_u16(), r#type = e.kind.as_str(), message = %e.message, "request failed");
    }
    r
}

/// Echoes the request id on the response.
pub fn set_request_id(response: &mut Response<Body>, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-request-id", v);
    }
}
