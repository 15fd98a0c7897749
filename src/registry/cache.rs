//! The download cache: verified copies of remote model files, an index, and LRU clean-up.
//!
//! File work (the index, temporary files, writes, fsync, renames, eviction) runs on tokio's
//! blocking threads, never on the async workers. Fetches of different files
//! run in parallel: each holds the lock of its destination (the pinned digest, else the URL)
//! for its whole run, and the index lock only while the index is read, changed and written.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

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
/// Body bytes gathered before they are written out on a blocking thread.
const WRITE_CHUNK: usize = 1 << 20;
/// How long a whole download may take unless [`ModelCache::with_download_timeout`] says
/// otherwise (`registry.download_timeout_secs`).
pub const DEFAULT_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(3600);

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

/// How far a download has got: bytes received, of the length the server announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub received: u64,
    pub total: Option<u64>,
}

impl Transfer {
    /// Whole percent received, when the length is known.
    pub fn percent(&self) -> Option<u64> {
        self.total.filter(|t| *t > 0).map(|t| (u128::from(self.received.min(t)) * 100 / u128::from(t)) as u64)
    }
}

/// What a download answers to: its deadline and the observer of its progress.
struct Watch<'o> {
    deadline: Instant,
    observe: &'o mut (dyn FnMut(Transfer) + Send),
}

/// A verified file in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub path: PathBuf,
    pub sha256: Digest,
    pub size: u64,
    pub origin: Origin,
}

/// The cache directory, its index, its size cap, and the download deadline.
pub struct ModelCache {
    files: Files,
    /// How long one fetch may take, from connecting to the last byte.
    download_timeout: Duration,
    /// One fetch at a time per destination; fetches of different files run in parallel.
    destinations: KeyedLocks,
}

/// The cache directory and the file work done in it, cloned into blocking tasks.
#[derive(Clone)]
struct Files {
    dir: PathBuf,
    max_bytes: u64,
    /// Held while the index is read, changed and written, never across network I/O.
    index_lock: Arc<Mutex<()>>,
}

/// What the index says before a request is made.
enum Lookup {
    /// The pinned digest is cached (its use is recorded).
    Hit(Fetched),
    /// Not cached: download, revalidating with this ETag when one is known.
    Miss { etag: Option<String> },
}

/// Distinguishes temporary files of concurrent downloads in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl ModelCache {
    /// A cache in `dir` (created on first use) holding at most `max_bytes` of files, whose
    /// downloads may each take [`DEFAULT_DOWNLOAD_TIMEOUT`].
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> ModelCache {
        ModelCache {
            files: Files { dir: dir.into(), max_bytes, index_lock: Arc::new(Mutex::new(())) },
            download_timeout: DEFAULT_DOWNLOAD_TIMEOUT,
            destinations: KeyedLocks::default(),
        }
    }

    /// The same cache with each fetch (connect, response head and body) bounded by `timeout`:
    /// past it the fetch fails with [`RegistryError::Deadline`] and its partial file is removed.
    pub fn with_download_timeout(mut self, timeout: Duration) -> ModelCache {
        self.download_timeout = timeout;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.files.dir
    }

    /// Every cached file, least recently used first (reads the index on this thread).
    pub fn entries(&self) -> Result<Vec<CacheEntry>, RegistryError> {
        let mut entries = self.files.read_index()?.entries;
        entries.sort_by_key(|e| e.use_seq);
        Ok(entries)
    }

    /// The cached file with digest `sha256`.
    pub fn path_of(&self, sha256: &Digest) -> PathBuf {
        self.files.path_of(sha256)
    }

    /// A verified copy of `url`. With `expected`, a cached copy of that digest is used
    /// without any request and a download must match it; without, a cached copy of the URL
    /// is revalidated with its ETag. After a download, least recently used entries whose
    /// digests are not in `in_use` are deleted until the cache fits its cap. The whole fetch
    /// must end within the download timeout.
    pub async fn fetch(
        &self,
        url: &HttpUrl,
        expected: Option<&Digest>,
        in_use: &[Digest],
    ) -> Result<Fetched, RegistryError> {
        self.fetch_observed(url, expected, in_use, &mut |_| {}).await
    }

    /// [`fetch`](Self::fetch), telling `observe` how far the download has got: once when the
    /// body starts and after each piece of it (not called for a cached copy).
    pub async fn fetch_observed(
        &self,
        url: &HttpUrl,
        expected: Option<&Digest>,
        in_use: &[Digest],
        observe: &mut (dyn FnMut(Transfer) + Send),
    ) -> Result<Fetched, RegistryError> {
        let deadline = Instant::now() + self.download_timeout;
        let destination = expected.map_or_else(|| url.as_str().to_owned(), Digest::to_string);
        let _one_per_destination = self.destinations.lock(destination).await;
        let (files, source, want) = (self.files.clone(), url.as_str().to_owned(), expected.cloned());
        let etag = match blocking(move || files.lookup(&source, want.as_ref())).await? {
            Lookup::Hit(hit) => return Ok(hit),
            Lookup::Miss { etag } => etag,
        };
        let reply = tokio::time::timeout_at(deadline, http::get(url, etag.as_deref()))
            .await
            .map_err(|_| self.deadline_passed(url))??;
        let (etag, length, body) = match reply {
            Reply::NotModified => {
                let (files, source) = (self.files.clone(), url.as_str().to_owned());
                return blocking(move || files.revalidated(&source)).await;
            }
            Reply::Body { etag, length, body } => (etag, length, body),
        };
        let temp = self.files.dir.join(format!(
            "{DOWNLOAD_PREFIX}{}-{}.part",
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let watch = Watch { deadline, observe };
        let written = self.write_verified(url, (length, body), expected, &temp, watch).await;
        let (sha256, size) = match written {
            Ok(done) => done,
            Err(e) => {
                let _ = blocking(move || Ok(std::fs::remove_file(&temp))).await;
                return Err(e);
            }
        };
        let entry = CacheEntry {
            source: url.as_str().to_owned(),
            sha256: sha256.to_string(),
            size,
            etag,
            last_used: unix_now(),
            use_seq: 0,
        };
        let (files, keep) = (self.files.clone(), in_use.to_vec());
        blocking(move || files.commit(&temp, entry, &keep)).await?;
        Ok(Fetched { path: self.path_of(&sha256), sha256, size, origin: Origin::Downloaded })
    }

    fn deadline_passed(&self, url: &HttpUrl) -> RegistryError {
        RegistryError::Deadline { url: url.as_str().to_owned(), limit: self.download_timeout }
    }

    /// Streams `body` into `temp` while hashing it, checks its length and digest, and
    /// fsyncs it. Fails once the watch's deadline passes; the caller removes `temp` on any
    /// failure.
    async fn write_verified(
        &self,
        url: &HttpUrl,
        (length, mut body): (Option<u64>, Incoming),
        expected: Option<&Digest>,
        temp: &Path,
        Watch { deadline, observe }: Watch<'_>,
    ) -> Result<(Digest, u64), RegistryError> {
        let from = || url.as_str().to_owned();
        let cap = self.files.max_bytes;
        if let Some(n) = length.filter(|n| *n > cap) {
            return Err(RegistryError::TooLarge { from: from(), size: n, cap });
        }
        let path = temp.to_owned();
        let mut file = blocking(move || std::fs::File::create(&path).map_err(RegistryError::io(&path))).await?;
        let mut pending = Vec::with_capacity(WRITE_CHUNK);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        observe(Transfer { received: 0, total: length });
        loop {
            let wait = deadline.min(Instant::now() + IDLE_TIMEOUT);
            let Ok(frame) = tokio::time::timeout_at(wait, body.frame()).await else {
                if Instant::now() >= deadline {
                    return Err(self.deadline_passed(url));
                }
                let reason = format!("no data for {IDLE_TIMEOUT:?}; download abandoned");
                return Err(RegistryError::Http { url: from(), reason });
            };
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| RegistryError::Http { url: from(), reason: format!("body: {e}") })?;
            let Ok(data) = frame.into_data() else { continue };
            size += data.len() as u64;
            if size > cap {
                return Err(RegistryError::TooLarge { from: from(), size, cap });
            }
            hasher.update(&data);
            observe(Transfer { received: size, total: length });
            pending.extend_from_slice(&data);
            if pending.len() >= WRITE_CHUNK {
                (file, pending) = write_out(file, pending, false, temp).await?;
            }
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
        write_out(file, pending, true, temp).await?;
        Ok((actual, size))
    }
}

impl Files {
    fn path_of(&self, sha256: &Digest) -> PathBuf {
        self.dir.join(format!("{sha256}.gguf"))
    }

    fn index(&self) -> MutexGuard<'_, ()> {
        self.index_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the directory, clears partial downloads of dead processes, and looks `source`
    /// up: a present file of digest `expected` is a hit (its use recorded).
    fn lookup(&self, source: &str, expected: Option<&Digest>) -> Result<Lookup, RegistryError> {
        std::fs::create_dir_all(&self.dir).map_err(RegistryError::io(&self.dir))?;
        crate::stale::remove_stale_files(&self.dir, DOWNLOAD_PREFIX);
        let _index = self.index();
        let mut index = self.read_index()?;
        if let Some(want) = expected
            && let Some(hit) = self.present(&index, |e| e.sha256 == want.as_str())
        {
            return self.touch(&mut index, hit, source, Origin::Hit).map(Lookup::Hit);
        }
        let prior = self.present(&index, |e| e.source == source);
        let etag = prior.and_then(|i| index.entries[i].etag.clone()).filter(|_| expected.is_none());
        Ok(Lookup::Miss { etag })
    }

    /// After a `304 Not Modified`: the cached copy of `source`, its use recorded.
    fn revalidated(&self, source: &str) -> Result<Fetched, RegistryError> {
        let _index = self.index();
        let mut index = self.read_index()?;
        match self.present(&index, |e| e.source == source) {
            Some(i) => self.touch(&mut index, i, source, Origin::Revalidated),
            None => {
                let reason = "304 Not Modified without a cached copy".to_owned();
                Err(RegistryError::Http { url: source.to_owned(), reason })
            }
        }
    }

    /// Renames the verified `temp` to its digest's name, records `entry`, and evicts least
    /// recently used entries not in `keep` until the cache fits its cap.
    fn commit(&self, temp: &Path, mut entry: CacheEntry, keep: &[Digest]) -> Result<(), RegistryError> {
        let digest = Digest::parse(&entry.sha256)?;
        let dest = self.path_of(&digest);
        if let Err(error) = std::fs::rename(temp, &dest) {
            let _ = std::fs::remove_file(temp);
            return Err(RegistryError::Io { path: dest, error });
        }
        sync_dir(&self.dir);
        let _index = self.index();
        let mut index = self.read_index()?;
        entry.use_seq = next_seq(&mut index);
        index.entries.retain(|e| e.sha256 != entry.sha256);
        index.entries.push(entry);
        let mut keep: Vec<&str> = keep.iter().map(Digest::as_str).collect();
        keep.push(digest.as_str());
        self.evict(&mut index, &keep);
        self.write_index(&index)
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
    fn touch(&self, index: &mut Index, i: usize, source: &str, origin: Origin) -> Result<Fetched, RegistryError> {
        let seq = next_seq(index);
        let e = &mut index.entries[i];
        e.last_used = unix_now();
        e.use_seq = seq;
        e.source = source.to_owned();
        let sha256 = Digest::parse(&e.sha256)?;
        let size = e.size;
        self.write_index(index)?;
        Ok(Fetched { path: self.path_of(&sha256), sha256, size, origin })
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

/// Async locks by name. An entry nobody holds or awaits is dropped on the next [`lock`].
///
/// [`lock`]: KeyedLocks::lock
#[derive(Default)]
struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Waits for the lock named `key`; it is held until the guard is dropped.
    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            // Only the map holds these: nobody holds or awaits them.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(key).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// Appends `bytes` to `file` (the temporary file `temp`) on a blocking thread, fsyncing it
/// when `sync`; hands both back, `bytes` emptied.
async fn write_out(
    mut file: std::fs::File,
    mut bytes: Vec<u8>,
    sync: bool,
    temp: &Path,
) -> Result<(std::fs::File, Vec<u8>), RegistryError> {
    let path = temp.to_owned();
    blocking(move || {
        file.write_all(&bytes).map_err(RegistryError::io(&path))?;
        if sync {
            file.sync_all().map_err(RegistryError::io(&path))?;
        }
        bytes.clear();
        Ok((file, bytes))
    })
    .await
}

/// Runs file work on a blocking thread, off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| RegistryError::Task(e.to_string()))?
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
