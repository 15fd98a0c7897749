//! The model registry: where model files come from, and the download cache that keeps
//! verified copies of remote ones.
//!
//! - [`Source`]: a local path (only under the configured model directories; `..` and
//!   symlinks leading out of them are refused) or an `http://` or `https://` URL (rustls;
//!   see [`trust_pem`] for private CAs) whose host [`check_allowed_host`] checks against
//!   `registry.allowed_hosts` before any connection. A load's own pipeline file is held to
//!   the same rules under `registry.pipeline_dirs` ([`resolve_pipeline`]), and a size cap.
//! - [`ModelCache`]: downloads stream into a temporary file in the cache directory while
//!   their sha256 is computed, are fsync'd and renamed into place only once verified; an
//!   index (`index.json`) records source, sha256, size, ETag and last use. A pinned digest
//!   already in the cache is a hit with no request; an unpinned source is revalidated with
//!   `If-None-Match` (304 = hit). A size cap evicts the least recently used entries that are
//!   not in use. Each fetch has an overall deadline; fetches of different files run in
//!   parallel, and file work stays off the async workers.

mod cache;
mod digest;
mod error;
mod http;
mod source;
mod tls;

pub use cache::{CacheEntry, DEFAULT_DOWNLOAD_TIMEOUT, Fetched, ModelCache, Origin, Transfer};
pub use digest::{Digest, sha256_file, sha256_file_with};
pub use error::RegistryError;
pub use http::{HttpUrl, check_allowed_host};
pub use source::{MAX_PIPELINE_BYTES, Source, resolve_local, resolve_pipeline, resolve_under};
pub use tls::trust_pem;
