//! The download cache: verified copies of remote model files, an index, and LRU clean-up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::digest::Digest;
use super::error::RegistryError;
use super::http::HttpUrl;
use super::http::{self, Reply};

/// Name prefix of partial downloads (`{prefix}{pid}-{n}.part`).
const DOWNLOAD_PREFIX: &str = ".download-";

/// The index file in the cache directory.
const INDEX: &str = "index.json";
/// How long a download may wait for the next piece of its body.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One cached file, as recorded in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The URL it was last fetched from.
    pub source: String,
    /// Its sha256 (the file is `<sha256>.gguf` in the cache directory).
    pub sha256: String,
    pub size: u64,
    /// The server's ETag, sent back as `If-None-Match` on revalidation.
    pub etag: Option<String>,
    /// Last use, seconds since the Unix epoch.
    pub last_used: u64,
    /// Order of last use across the cache (LRU clean-up goes by it).
    pub use_seq: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    next_seq: u64,
    entries: Vec<CacheEntry>,
}

/// How a fetch was satisfied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The pinned digest was already cached: no request was made.
    Hit,
    /// The server answered `304 Not Modified` to `If-None-Match`.
    Revalidated,
    /// The file was downloaded and verified.
    Downloaded,
}

/// A verified file in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub sha256: Digest,
    pub size: u64,
    pub origin: Origin,
}

/// The cache directory, its index, and its size cap.
pub struct ModelCache {
    dir: PathBuf,
    max_bytes: u64,
    /// One fetch at a time per process: the index is read, changed and written whole.
    lock: tokio::sync::Mutex<()>,
}

/// Distinguishes temporary files of concurrent downloads in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl ModelCache {
    /// A cache in `dir` (created on first use) holding at most `max_bytes` of files.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> ModelCache {
        ModelCache { dir: dir.into(), max_bytes, lock: tokio::sync::Mutex::new(()) }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every cached file, least recently used first.
    pub fn entries(&self) -> Result<Vec<CacheEntry>, RegistryError> {
        let mut entries = self.read_index()?.entries;
        entries.sort_by_key(|e| e.use_seq);
        Ok(entries)
    }

    /// The cached file with digest `sha256`.
    pub fn path_of(&self, sha256: &Digest) -> PathBuf {
        self.dir.join(format!("{sha256}.gguf"))
    }

    /// A verified copy of `url`. With `expected`, a cached copy of that digest is used
    /// without any request and a download must match it; without, a cached copy of the URL
    /// is revalidated with its ETag. After a download, least recently used entries whose
    /// digests are not in `in_use` are deleted until the cache fits its cap.
    pub async fn fetch(
        &self,
        url: &HttpUrl,
        expected: Option<&Digest>,
        in_use: &[Digest],
    ) -> Result<Fetched, RegistryError> {
        let _one_at_a_time = self.lock.lock().await;
        std::fs::create_dir_all(&self.dir).map_err(RegistryError::io(&self.dir))?;
        // Partial downloads of processes that died mid-transfer.
        crate::stale::remove_stale_files(&self.dir, DOWNLOAD_PREFIX);
        let mut index = self.read_index()?;
        if let Some(want) = expected
            && let Some(hit) = self.present(&index, |e| e.sha256 == want.as_str())
        {
            return self.touch(&mut index, hit, url, Origin::Hit);
        }
        let prior = self.present(&index, |e| e.source == url.as_str());
        let etag = prior.and_then(|i| index.entries[i].etag.clone()).filter(|_| expected.is_none());
        let (etag, length, body) = match http::get(url, etag.as_deref()).await? {
            Reply::NotModified => match prior {
                Some(i) => return self.touch(&mut index, i, url, Origin::Revalidated),
                None => {
                    let reason = "304 Not Modified without a cached copy".to_owned();
                    return Err(RegistryError::Http { url: url.as_str().to_owned(), reason });
                }
            },
            Reply::Body { etag, length, body } => (etag, length, body),
        };
        let (sha256, size) = self.download(url, length, body, expected).await?;
        let entry = CacheEntry {
            source: url.as_str().to_owned(),
            sha256: sha256.to_string(),
            size,
            etag,
            last_used: unix_now(),
            use_seq: next_seq(&mut index),
        };
        index.entries.retain(|e| e.sha256 != entry.sha256);
        index.entries.push(entry);
        let mut keep: Vec<&str> = in_use.iter().map(Digest::as_str).collect();
        keep.push(sha256.as_str());
        self.evict(&mut index, &keep);
        self.write_index(&index)?;
        Ok(Fetched { path: self.path_of(&sha256), sha256, size, origin: Origin::Downloaded })
    }

    /// The position of the first entry matching `pick` whose file is present and whole.
    fn present(&self, index: &Index, pick: impl Fn(&CacheEntry) -> bool) -> Option<usize> {
        index.entries.iter().position(|e| {
            pick(e)
                && Digest::parse(&e.sha256)
                    .is_ok_and(|d| std::fs::metadata(self.path_of(&d)).is_ok_and(|m| m.len() == e.size))
        })
    }

    /// Records a use of entry `i` and returns it.
    fn touch(&self, index: &mut Index, i: usize, url: &HttpUrl, origin: Origin) -> Result<Fetched, RegistryError> {
        let seq = next_seq(index);
        let e = &mut index.entries[i];
        e.last_used = unix_now();
        e.use_seq = seq;
        e.source = url.as_str().to_owned();
        let sha256 = Digest::parse(&e.sha256)?;
        let size = e.size;
        self.write_index(index)?;
        Ok(Fetched { path: self.path_of(&sha256), sha256, size, origin })
    }

    /// Streams `body` into a temporary file, verifies it, and renames it to its digest's
    /// name. On any failure the temporary file is removed and nothing else changes.
    async fn download(
        &self,
        url: &HttpUrl,
        length: Option<u64>,
        body: Incoming,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), RegistryError> {
        if let Some(n) = length.filter(|n| *n > self.max_bytes) {
            return Err(RegistryError::TooLarge { from: url.as_str().to_owned(), size: n, cap: self.max_bytes });
        }
        let temp = self.dir.join(format!(
            "{DOWNLOAD_PREFIX}{}-{}.part",
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = self.write_verified(url, length, body, expected, &temp).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    async fn write_verified(
        &self,
        url: &HttpUrl,
        length: Option<u64>,
        mut body: Incoming,
        expected: Option<&Digest>,
        temp: &Path,
    ) -> Result<(Digest, u64), RegistryError> {
        let from = || url.as_str().to_owned();
        let mut file = std::fs::File::create(temp).map_err(RegistryError::io(temp))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let frame = tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await.map_err(|_| RegistryError::Http {
                url: from(),
                reason: format!("no data for {IDLE_TIMEOUT:?}; download abandoned"),
            })?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| RegistryError::Http { url: from(), reason: format!("body: {e}") })?;
            let Ok(data) = frame.into_data() else { continue };
            size += data.len() as u64;
            if size > self.max_bytes {
                return Err(RegistryError::TooLarge { from: from(), size, cap: self.max_bytes });
            }
            hasher.update(&data);
            file.write_all(&data).map_err(RegistryError::io(temp))?;
        }
        if let Some(expected) = length.filter(|n| *n != size) {
            return Err(RegistryError::Truncated { url: from(), received: size, expected });
        }
        let actual = Digest::of(hasher);
        if let Some(want) = expected.filter(|w| **w != actual) {
            return Err(RegistryError::Checksum {
                from: from(),
                expected: want.to_string(),
                actual: actual.to_string(),
            });
        }
        file.sync_all().map_err(RegistryError::io(temp))?;
        drop(file);
        let dest = self.path_of(&actual);
        std::fs::rename(temp, &dest).map_err(RegistryError::io(&dest))?;
        sync_dir(&self.dir);
        Ok((actual, size))
    }

    /// Deletes least recently used entries not in `keep` until the total fits the cap.
    fn evict(&self, index: &mut Index, keep: &[&str]) {
        let mut total: u64 = index.entries.iter().map(|e| e.size).sum();
        let mut order: Vec<usize> = (0..index.entries.len()).collect();
        order.sort_by_key(|&i| index.entries[i].use_seq);
        let mut gone = vec![];
        for i in order {
            if total <= self.max_bytes {
                break;
            }
            let e = &index.entries[i];
            if keep.contains(&e.sha256.as_str()) {
                continue;
            }
            let path = self.dir.join(format!("{}.gguf", e.sha256));
            if let Err(error) = std::fs::remove_file(&path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), %error, "cannot evict a cached model");
                continue;
            }
            tracing::info!(sha256 = %e.sha256, source = %e.source, size = e.size, "evicted a cached model (LRU)");
            total -= e.size;
            gone.push(e.sha256.clone());
        }
        index.entries.retain(|e| !gone.contains(&e.sha256));
    }

    fn read_index(&self) -> Result<Index, RegistryError> {
        let path = self.dir.join(INDEX);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| RegistryError::Index { path, reason: format!("not a valid index: {e}") }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::default()),
            Err(error) => Err(RegistryError::Io { path, error }),
        }
    }

    /// Writes the index to a temporary file and renames it over the old one.
    fn write_index(&self, index: &Index) -> Result<(), RegistryError> {
        let path = self.dir.join(INDEX);
        let temp = self.dir.join(format!(".{INDEX}.{}.tmp", std::process::id()));
        let bytes = serde_json::to_vec_pretty(index)
            .map_err(|e| RegistryError::Index { path: path.clone(), reason: e.to_string() })?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&temp, &path)
        };
        write().map_err(RegistryError::io(&path))?;
        sync_dir(&self.dir);
        Ok(())
    }
}

fn next_seq(index: &mut Index) -> u64 {
    index.next_seq += 1;
    index.next_seq
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Makes a rename durable (best effort: not every filesystem allows syncing a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
