//! The one place where errors become HTTP statuses and stable snake_case types.
//!
//! Every area has its own `thiserror` enum; each converts into an [`ApiError`], whose
//! [`ErrorKind`] decides the status code, the JSON `type`, and the metrics label.

use serde::Serialize;

/// A classified error kind. `as_str` is the stable wire/metrics name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// 400: the request could not be parsed or is structurally wrong.
    InvalidRequest,
    /// 413: the prompt does not fit the context, the prompt limit, or the KV cache.
    ContextLengthExceeded,
    /// 400: a prompt matched an input content rule.
    ContentPolicy,
    /// 401: missing or unknown API key.
    Unauthorized,
    /// 403: the key is valid but not allowed here.
    Forbidden,
    /// 404: unknown model, session or route.
    NotFound,
    /// 405: the route exists with another method.
    MethodNotAllowed,
    /// 409: the resource is busy (e.g. a session with a request in flight).
    Conflict,
    /// 413: the body is larger than the configured limit.
    PayloadTooLarge,
    /// 422: a parameter is outside its valid range.
    InvalidParameter,
    /// 429: a queue watermark or tenant limit was hit.
    RateLimited,
    /// 503: not ready, draining, or out of KV memory right now.
    Unavailable,
    /// 500: a bug or an unexpected runtime failure.
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::ContentPolicy => 400,
            ErrorKind::ContextLengthExceeded => 413,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::InvalidParameter => 422,
            ErrorKind::RateLimited => 429,
            ErrorKind::Unavailable => 503,
            ErrorKind::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::ContextLengthExceeded => "context_length_exceeded",
            ErrorKind::ContentPolicy => "content_policy",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::Conflict => "conflict",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::InvalidParameter => "invalid_parameter",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Internal => "internal_error",
        }
    }
}

/// An error on its way to a client: kind, a human message, and the offending field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    /// A finer machine-readable code (e.g. `queue_full`); defaults to the kind's name.
    pub code: Option<&'static str>,
    pub message: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// Seconds a client should wait before retrying (429/503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, code: None, message: message.into(), param: None, retry_after: None }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn invalid_parameter(param: &str, message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::InvalidParameter, message).with_param(param)
    }

    /// A 400 naming the request field that is wrong in shape or content (a bad schema, an
    /// unknown tool), as opposed to a number out of its range (422).
    pub fn invalid_field(param: &str, message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::InvalidRequest, message).with_param(param)
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The JSON body: `{"error":{"type","code","message","param"}}`.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                r#type: self.kind.as_str(),
                code: self.code.unwrap_or(self.kind.as_str()),
                message: &self.message,
                param: self.param.as_deref(),
            },
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.body()).expect("error body serializes")
    }
}

#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize)]
pub struct ErrorDetail<'a> {
    pub r#type: &'static str,
    pub code: &'static str,
    pub message: &'a str,
    pub param: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_names_type_code_and_param() {
        let e = ApiError::invalid_parameter("top_p", "`top_p` must be in (0, 1]");
        assert_eq!(e.status(), 422);
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_parameter");
        assert_eq!(v["error"]["code"], "invalid_parameter");
        assert_eq!(v["error"]["param"], "top_p");
        assert_eq!(v["error"]["message"], "`top_p` must be in (0, 1]");
    }

    #[test]
    fn code_overrides_without_changing_type() {
        let e = ApiError::new(ErrorKind::RateLimited, "queue full").with_code("queue_full");
        assert_eq!(e.status(), 429);
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "rate_limited");
        assert_eq!(v["error"]["code"], "queue_full");
    }
}
