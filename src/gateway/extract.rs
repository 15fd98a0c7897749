//! Request bodies in: reading them under the size limit, JSON objects with field names
//! checked, and the request id a client sent.

use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::Request;
use hyper::body::{Bytes, Incoming};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::{ApiError, ErrorKind};

/// Reads the whole body up to `limit` bytes (413 past it).
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!("the request body is larger than the limit of {limit} bytes"),
        )),
        Err(e) => Err(ApiError::new(ErrorKind::InvalidRequest, format!("cannot read the request body: {e}"))),
    }
}

/// Parses a JSON body; a syntax error names its line and column, a shape error its field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::new(ErrorKind::InvalidRequest, "the request body is empty; expected a JSON object"));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => "malformed JSON",
            Category::Data => "invalid request",
        };
        ApiError::new(ErrorKind::InvalidRequest, format!("{what}: {e}"))
    })
}

/// Reads a JSON object body of at most `limit` bytes.
pub async fn read_object(req: Request<Incoming>, limit: usize) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(req, limit).await?;
    match parse_json::<Value>(&bytes)? {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("expected a JSON object, found {}", json_kind(&other)),
        )),
    }
}

/// A JSON object body, or an empty one when the request has no body.
pub async fn read_optional_object(req: Request<Incoming>, limit: usize) -> Result<Map<String, Value>, ApiError> {
    let empty = req.headers().get(hyper::header::CONTENT_LENGTH).is_some_and(|v| v == "0");
    if empty { Ok(Map::new()) } else { read_object(req, limit).await }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Rejects fields a native route does not know (OpenAI routes ignore extras instead).
pub fn reject_unknown(map: &Map<String, Value>, allowed: &[&[&str]]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.iter().any(|list| list.contains(&k.as_str()))) {
        Some(k) => Err(ApiError::new(ErrorKind::InvalidRequest, format!("unknown field `{k}`")).with_param(k.clone())),
        None => Ok(()),
    }
}

/// A body object as a typed request.
pub fn from_map<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(map))
        .map_err(|e| ApiError::new(ErrorKind::InvalidRequest, format!("invalid request: {e}")))
}

/// A body object as a typed request; a shape error names the field's path.
pub fn from_map_with_path<T: DeserializeOwned>(map: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        ApiError::new(ErrorKind::InvalidRequest, format!("invalid request: `{path}`: {}", e.inner())).with_param(path)
    })
}

/// The client's `x-request-id` if it sent a sane one, else a fresh random one.
pub fn request_id(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| random_id("req"))
}

/// `prefix-` and 128 random bits in hex: ids a client cannot guess (a cancel names a
/// request by its id).
pub fn random_id(prefix: &str) -> String {
    use rand::RngExt;
    format!("{prefix}-{:032x}", rand::rng().random::<u128>())
}
