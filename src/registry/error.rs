//! The registry's one error type.

use std::path::PathBuf;

/// Why a model file could not be found, fetched or verified.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error("source `{given}`: {reason}")]
    BadSource { given: String, reason: String },
    #[error("path {} contains `..`; name a file under `{key}`", path.display())]
    ParentComponent { path: PathBuf, key: &'static str },
    #[error("path {} resolves outside `{key}` ({dirs})", path.display())]
    OutsideDirs { path: PathBuf, key: &'static str, dirs: String },
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: {size} bytes exceed the {cap}-byte limit; nothing was read", path.display())]
    FileTooLarge { path: PathBuf, size: u64, cap: u64 },
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("GET {url}: the server answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: the download ended early ({received} of {expected} bytes); nothing was cached")]
    Truncated { url: String, received: u64, expected: u64 },
    #[error("{from}: sha256 mismatch: expected {expected}, got {actual} (the download was discarded)")]
    Checksum { from: String, expected: String, actual: String },
    #[error("`{0}` is not a sha256 digest (64 hex digits)")]
    BadDigest(String),
    #[error("{from}: {size} bytes exceed the cache cap of {cap} bytes")]
    TooLarge { from: String, size: u64, cap: u64 },
    #[error("{url}: host `{host}` is not in `registry.allowed_hosts` ({allowed}); nothing was fetched")]
    HostNotAllowed { url: String, host: String, allowed: String },
    #[error(
        "GET {url}: not finished within {limit:?} (`registry.download_timeout_secs`); the partial download was removed"
    )]
    Deadline { url: String, limit: std::time::Duration },
    #[error("a cache file task failed: {0}")]
    Task(String),
    #[error("cache index {}: {reason}", path.display())]
    Index { path: PathBuf, reason: String },
}

impl RegistryError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> RegistryError {
        let path = path.into();
        move |error| RegistryError::Io { path, error }
    }
}
