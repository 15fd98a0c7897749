//! Late-bound models and the model registry: readiness while a model loads, the download
//! cache (against a local HTTP server), and the admin lifecycle routes.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use starling::config::{AllowedHost, ApiKey, Config, Overrides};
use starling::engine::load::Footprint;
use starling::gateway::{AppState, load_configured};
use starling::model::gguf_writer::{TinyLlamaSpec, tiny_llama_f32};
use starling::registry::{Digest, HttpUrl, ModelCache, Origin, RegistryError, Source, resolve_local};
use starling::telemetry::Observability;
use starling::types::{ModelId, TenantId};

use crate::model::model_path;
use crate::support::{
    FileServer, HttpResponse, TestServer, get_as, metric_value, open, post_json, post_json_as, request,
};

const MODEL_ID: &str = "smollm2-135m";

/// A fresh scratch directory for one test under the target dir.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("registry").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn readyz(server: &TestServer) -> (u16, String) {
    let r = get_as(server.addr, None, "/readyz");
    let reason = r.json()["reason"].as_str().unwrap_or_default().to_owned();
    (r.status, reason)
}

fn loaded_gauge(server: &TestServer, id: &str) -> Option<f64> {
    metric_value(server.addr, &format!("starling_model_loaded{{model=\"{id}\"}}"))
}

#[test]
fn readiness_says_model_loading_until_the_model_is_published() {
    let server = TestServer::start_empty(|_| {});
    assert_eq!(readyz(&server), (503, "no model loaded".to_owned()));
    let r = post_json(server.addr, "/v1/generate", &json!({"prompt": "Hi", "max_tokens": 1}));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (503, json!("no_model")));

    server.state.begin_loading(&ModelId::from(MODEL_ID));
    assert_eq!(readyz(&server), (503, "model loading".to_owned()));
    assert_eq!(loaded_gauge(&server, MODEL_ID), Some(0.0));
    for body in [json!({"prompt": "Hi", "max_tokens": 1}), json!({"prompt": "Hi", "max_tokens": 1, "model": MODEL_ID})]
    {
        let r = post_json(server.addr, "/v1/generate", &body);
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "model_loading");
    }
    let r = post_json(server.addr, "/v1/generate", &json!({"prompt": "Hi", "model": "other"}));
    assert_eq!(r.status, 404, "a model nobody loads is unknown, not loading");

    load_configured(&server.state).expect("the configured model loads");
    assert_eq!(readyz(&server), (200, String::new()));
    assert_eq!(loaded_gauge(&server, MODEL_ID), Some(1.0));
    let r = post_json(server.addr, "/v1/generate", &json!({"prompt": "Hi", "max_tokens": 2, "model": MODEL_ID}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(server.state.models.snapshot().loading.is_empty());
}

#[test]
fn serve_binds_then_exits_non_zero_when_its_model_fails_to_load() {
    let dir = scratch("bad-model");
    let bad = dir.join("broken.gguf");
    std::fs::write(&bad, b"not a gguf file").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_starling"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .args(["serve", "--bind", "127.0.0.1:0", "--model", bad.to_str().unwrap()])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must fail: {err}");
    assert!(err.contains("listening"), "the server binds before loading: {err}");
    assert!(err.contains("broken.gguf"), "the error names the file: {err}");
}

#[test]
fn a_snapshot_keeps_its_models_while_the_table_changes() {
    let server = TestServer::start_empty(|_| {});
    let before = server.state.models.snapshot();
    server.state.begin_loading(&ModelId::from("x"));
    assert!(before.loading.is_empty(), "an old snapshot is not mutated");
    assert!(server.state.models.snapshot().is_loading("x"));
    server.state.abandon_loading(&ModelId::from("x"));
    assert!(!server.state.models.snapshot().is_loading("x"));
}

// ---- the download cache, against a local HTTP server ----

/// A tiny random llama GGUF (a different file per seed).
fn tiny_gguf(seed: u64) -> Vec<u8> {
    tiny_llama_f32(&TinyLlamaSpec { seed, ..TinyLlamaSpec::default() })
}

fn sha(bytes: &[u8]) -> Digest {
    Digest::of(Sha256::new_with_prefix(bytes))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

/// Names in the cache directory other than the index.
fn cache_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "index.json")
        .collect();
    names.sort();
    names
}

#[test]
fn a_miss_downloads_and_verifies_and_a_pinned_second_load_makes_no_request() {
    let files = FileServer::start();
    let body = tiny_gguf(1);
    files.put("/m.gguf", body.clone(), "v1");
    let dir = scratch("miss-hit");
    let cache = ModelCache::new(&dir, 64 << 20);
    let url = HttpUrl::parse(&files.url("/m.gguf")).unwrap();
    let digest = sha(&body);

    let first = block_on(cache.fetch(&url, Some(&digest), &[])).expect("downloads");
    assert_eq!(first.origin, Origin::Downloaded);
    assert_eq!((first.sha256.clone(), first.size), (digest.clone(), body.len() as u64));
    assert_eq!(std::fs::read(&first.path).unwrap(), body, "the cached file is the served file");
    assert_eq!(cache_files(&dir), [format!("{digest}.gguf")], "no temporary file is left");
    let entry = &cache.entries().unwrap()[0];
    assert_eq!((entry.source.as_str(), entry.etag.as_deref()), (url.as_str(), Some("\"v1\"")));

    let second = block_on(cache.fetch(&url, Some(&digest), &[])).expect("hit");
    assert_eq!((second.origin, second.path), (Origin::Hit, first.path));
    let log = files.log();
    assert_eq!(log.len(), 1, "the second load made no request: {log:?}");
    assert_eq!((log[0].status, log[0].body_bytes), (200, body.len()));
}

#[test]
fn an_unpinned_source_is_revalidated_with_its_etag() {
    let files = FileServer::start();
    files.put("/m.gguf", tiny_gguf(2), "v1");
    let dir = scratch("revalidate");
    let cache = ModelCache::new(&dir, 64 << 20);
    let url = HttpUrl::parse(&files.url("/m.gguf")).unwrap();
    let first = block_on(cache.fetch(&url, None, &[])).unwrap();
    let again = block_on(cache.fetch(&url, None, &[])).unwrap();
    assert_eq!((again.origin, &again.sha256), (Origin::Revalidated, &first.sha256));
    let log = files.log();
    assert_eq!(log[1].if_none_match.as_deref(), Some("\"v1\""));
    assert_eq!((log[1].status, log[1].body_bytes), (304, 0), "revalidation transfers no body");

    let changed = tiny_gguf(3);
    files.put("/m.gguf", changed.clone(), "v2");
    let updated = block_on(cache.fetch(&url, None, &[])).unwrap();
    assert_eq!((updated.origin, updated.sha256), (Origin::Downloaded, sha(&changed)));
}

#[test]
fn a_checksum_mismatch_fails_cleanly_and_keeps_the_old_copy() {
    let files = FileServer::start();
    let good = tiny_gguf(4);
    files.put("/m.gguf", good.clone(), "v1");
    let dir = scratch("mismatch");
    let cache = ModelCache::new(&dir, 64 << 20);
    let url = HttpUrl::parse(&files.url("/m.gguf")).unwrap();
    let kept = block_on(cache.fetch(&url, Some(&sha(&good)), &[])).unwrap();

    files.put("/m.gguf", tiny_gguf(5), "v2");
    let wrong = Digest::parse(&"0".repeat(64)).unwrap();
    let err = block_on(cache.fetch(&url, Some(&wrong), &[])).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Checksum { .. }), "{msg}");
    assert!(msg.contains("sha256 mismatch") && msg.contains(&"0".repeat(64)), "{msg}");
    assert_eq!(cache_files(&dir), [format!("{}.gguf", sha(&good))], "the bad download is gone");
    assert_eq!(std::fs::read(&kept.path).unwrap(), good, "the previous good copy stays");
    assert_eq!(cache.entries().unwrap().len(), 1);
}

#[test]
fn a_connection_dropped_mid_body_leaves_nothing_under_the_final_name() {
    let files = FileServer::start();
    let body = tiny_gguf(6);
    files.put_cut("/m.gguf", body.clone(), body.len() / 3);
    let dir = scratch("dropped");
    let cache = ModelCache::new(&dir, 64 << 20);
    let url = HttpUrl::parse(&files.url("/m.gguf")).unwrap();
    let err = block_on(cache.fetch(&url, Some(&sha(&body)), &[])).unwrap_err();
    assert!(matches!(err, RegistryError::Http { .. } | RegistryError::Truncated { .. }), "{err}");
    assert!(cache_files(&dir).is_empty(), "no partial file: {:?}", cache_files(&dir));
    assert!(!cache.path_of(&sha(&body)).exists());
    assert!(cache.entries().unwrap().is_empty());

    // A partial left by a process that died mid-download is cleared by the next fetch.
    let orphan = dir.join(format!(".download-{}-0.part", u32::MAX));
    std::fs::write(&orphan, &body[..10]).unwrap();
    files.put("/whole.gguf", body.clone(), "w");
    let whole = HttpUrl::parse(&files.url("/whole.gguf")).unwrap();
    block_on(cache.fetch(&whole, Some(&sha(&body)), &[])).expect("downloads");
    assert!(!orphan.exists(), "the dead process's partial download is removed");
}

/// Reads one request's head from `stream` and returns its path.
fn read_request_path(stream: &TcpStream) -> String {
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    let _ = reader.read_line(&mut first);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    first.split(' ').nth(1).unwrap_or("/").to_owned()
}

/// A server on 127.0.0.1 that announces `body` whole but sends it one byte every 20 ms,
/// until the client goes away (at most a minute).
fn trickle_server(body: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let body = body.clone();
            std::thread::spawn(move || {
                read_request_path(&stream);
                let mut out = stream;
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = out.write_all(head.as_bytes());
                for b in body {
                    if out.write_all(&[b]).and_then(|()| out.flush()).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
    });
    addr
}

#[test]
fn a_download_past_its_deadline_fails_and_leaves_no_partial_file() {
    // 3,000 bytes at one per 20 ms: a minute, never idle long enough for the idle timeout.
    let body = vec![7u8; 3000];
    let url = HttpUrl::parse(&format!("http://{}/slow.gguf", trickle_server(body.clone()))).unwrap();
    let dir = scratch("deadline");
    let cache = ModelCache::new(&dir, 64 << 20).with_download_timeout(Duration::from_millis(300));
    let err = block_on(cache.fetch(&url, Some(&sha(&body)), &[])).unwrap_err();
    assert!(matches!(err, RegistryError::Deadline { .. }), "{err}");
    assert!(err.to_string().contains("registry.download_timeout_secs"), "{err}");
    assert!(cache_files(&dir).is_empty(), "the partial download is removed: {:?}", cache_files(&dir));
    assert!(cache.entries().unwrap().is_empty());
}

/// A server on 127.0.0.1 that logs `start <path>` when a request arrives and `end <path>`
/// before it sends the second half of the body, which it holds back until two requests
/// have started (or 20 s have passed, so a server that never sees the second still ends).
struct PacedServer {
    addr: SocketAddr,
    events: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl PacedServer {
    fn start(files: Vec<(&'static str, Vec<u8>)>) -> PacedServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let events = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let shared = events.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (events, files) = (shared.clone(), files.clone());
                std::thread::spawn(move || {
                    let path = read_request_path(&stream);
                    let body = files.iter().find(|(p, _)| *p == path).map(|(_, b)| b.clone()).unwrap_or_default();
                    let (log, turn) = &*events;
                    log.lock().unwrap().push(format!("start {path}"));
                    turn.notify_all();
                    let mut out = stream;
                    let head =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let half = body.len() / 2;
                    let _ = out.write_all(head.as_bytes()).and_then(|()| out.write_all(&body[..half]));
                    let _ = out.flush();
                    let started = |log: &mut Vec<String>| log.iter().filter(|e| e.starts_with("start")).count() < 2;
                    let (mut log, _) =
                        turn.wait_timeout_while(log.lock().unwrap(), Duration::from_secs(20), started).unwrap();
                    log.push(format!("end {path}"));
                    drop(log);
                    let _ = out.write_all(&body[half..]);
                });
            }
        });
        PacedServer { addr, events }
    }

    fn events(&self) -> Vec<String> {
        self.events.0.lock().unwrap().clone()
    }
}

#[test]
fn downloads_of_different_files_run_at_the_same_time() {
    let (a, b) = (tiny_gguf(10), tiny_gguf(11));
    let server = PacedServer::start(vec![("/a.gguf", a.clone()), ("/b.gguf", b.clone())]);
    let dir = scratch("parallel");
    let cache = ModelCache::new(&dir, 64 << 20);
    let url = |p: &str| HttpUrl::parse(&format!("http://{}{p}", server.addr)).unwrap();
    let (ua, ub, da, db) = (url("/a.gguf"), url("/b.gguf"), sha(&a), sha(&b));
    let (ra, rb) = block_on(async { tokio::join!(cache.fetch(&ua, Some(&da), &[]), cache.fetch(&ub, Some(&db), &[])) });
    assert_eq!((ra.unwrap().sha256, rb.unwrap().sha256), (sha(&a), sha(&b)));
    let events = server.events();
    let first_end = events.iter().position(|e| e.starts_with("end")).unwrap();
    assert_eq!(
        events[..first_end].iter().filter(|e| e.starts_with("start")).count(),
        2,
        "the second download started before the first finished: {events:?}"
    );
    let mut names = cache_files(&dir);
    names.sort();
    let mut want = vec![format!("{}.gguf", sha(&a)), format!("{}.gguf", sha(&b))];
    want.sort();
    assert_eq!(names, want, "both are cached, no temporary file is left");
    assert_eq!(cache.entries().unwrap().len(), 2, "neither index update lost the other's entry");
}

/// Opens the FIFO at `path` for writing if a reader waits on it (never blocks; `None` when
/// nobody reads it or it is no longer a FIFO) and writes an empty cache index into it.
#[cfg(target_os = "linux")]
fn feed_index_fifo(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    /// `O_NONBLOCK` on Linux: opening a FIFO for writing fails at once when no reader waits.
    const O_NONBLOCK: i32 = 0o4000;
    let Ok(mut fifo) = std::fs::OpenOptions::new().write(true).custom_flags(O_NONBLOCK).open(path) else {
        return false;
    };
    if !fifo.metadata().is_ok_and(|m| m.file_type().is_fifo()) {
        return false;
    }
    fifo.write_all(br#"{"next_seq": 0, "entries": []}"#).is_ok()
}

#[cfg(target_os = "linux")]
#[test]
fn cache_file_work_leaves_the_async_worker_free() {
    use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
    const PROBE: u8 = 1;
    const WATCHDOG: u8 = 2;
    let files = FileServer::start();
    let body = tiny_gguf(12);
    files.put("/m.gguf", body.clone(), "f1");
    let dir = scratch("off-worker");
    // The index is a FIFO: reading it blocks until someone writes it.
    let index = dir.join("index.json");
    assert!(Command::new("mkfifo").arg(&index).status().unwrap().success());
    let fed_first = Arc::new(AtomicU8::new(0));
    // Were the index read on the runtime's only thread, the probe task below could not run:
    // the watchdog then feeds the FIFO every 20 s so the test ends (and fails).
    let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
    let watchdog = {
        let (index, fed_first) = (index.clone(), fed_first.clone());
        std::thread::spawn(move || {
            while cancelled.recv_timeout(Duration::from_secs(20)).is_err() {
                if feed_index_fifo(&index) {
                    let _ = fed_first.compare_exchange(0, WATCHDOG, Ordering::SeqCst, Ordering::SeqCst);
                }
            }
        })
    };
    let cache = Arc::new(ModelCache::new(&dir, 64 << 20));
    let url = HttpUrl::parse(&files.url("/m.gguf")).unwrap();
    let digest = sha(&body);
    let done = Arc::new(AtomicBool::new(false));
    let fetched = block_on(async {
        let fetch = tokio::spawn(async move { cache.fetch(&url, Some(&digest), &[]).await });
        let probe = {
            let (index, fed_first, done) = (index.clone(), fed_first.clone(), done.clone());
            tokio::spawn(async move {
                // Feeds the index whenever the fetch waits reading it, until the fetch ends.
                while !done.load(Ordering::SeqCst) {
                    if feed_index_fifo(&index) {
                        let _ = fed_first.compare_exchange(0, PROBE, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let fetched = fetch.await.unwrap();
        done.store(true, Ordering::SeqCst);
        probe.await.unwrap();
        fetched
    });
    let _ = cancel.send(());
    watchdog.join().unwrap();
    assert_eq!(fed_first.load(Ordering::SeqCst), PROBE, "another task ran while the index was being read");
    assert_eq!(fetched.expect("the download completes").origin, Origin::Downloaded);
}

#[test]
fn the_size_cap_evicts_the_least_recently_used_model_not_in_use() {
    let files = FileServer::start();
    let bodies: Vec<Vec<u8>> = (10..14).map(tiny_gguf).collect();
    for (i, b) in bodies.iter().enumerate() {
        files.put(&format!("/{i}.gguf"), b.clone(), &format!("e{i}"));
    }
    let size = bodies[0].len() as u64;
    let dir = scratch("lru");
    let cache = ModelCache::new(&dir, size * 5 / 2);
    let fetch = |i: usize, in_use: &[Digest]| {
        let url = HttpUrl::parse(&files.url(&format!("/{i}.gguf"))).unwrap();
        block_on(cache.fetch(&url, Some(&sha(&bodies[i])), in_use)).unwrap()
    };
    let cached = |i: usize| cache.path_of(&sha(&bodies[i])).exists();
    fetch(0, &[]);
    fetch(1, &[]);
    assert_eq!(fetch(0, &[]).origin, Origin::Hit, "model 0 is now the most recently used");
    fetch(2, &[]);
    assert!(cached(0) && !cached(1) && cached(2), "model 1 was the least recently used");
    // Model 0 is older than 2 now, but loaded: the next eviction passes over it.
    fetch(3, &[sha(&bodies[0])]);
    assert!(cached(0) && !cached(2) && cached(3));
    let listed: Vec<String> = cache.entries().unwrap().into_iter().map(|e| e.sha256).collect();
    assert_eq!(listed, [sha(&bodies[0]).to_string(), sha(&bodies[3]).to_string()]);
}

#[test]
fn local_sources_stay_inside_the_model_directories() {
    let root = scratch("local");
    let models = root.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::write(models.join("a.gguf"), b"x").unwrap();
    std::fs::write(root.join("outside.gguf"), b"x").unwrap();
    std::os::unix::fs::symlink(root.join("outside.gguf"), models.join("escape.gguf")).unwrap();
    let dirs = [models.clone()];
    let ok = resolve_local(Path::new("a.gguf"), &dirs).unwrap();
    assert_eq!(ok, models.canonicalize().unwrap().join("a.gguf"));
    assert_eq!(resolve_local(&models.join("a.gguf"), &dirs).unwrap(), ok, "an absolute path inside is fine");
    let dotdot = resolve_local(Path::new("../outside.gguf"), &dirs).unwrap_err();
    assert!(matches!(dotdot, RegistryError::ParentComponent { .. }), "{dotdot}");
    let link = resolve_local(Path::new("escape.gguf"), &dirs).unwrap_err();
    assert!(matches!(link, RegistryError::OutsideDirs { .. }), "{link}");
    let abs = resolve_local(&root.join("outside.gguf"), &dirs).unwrap_err();
    assert!(abs.to_string().contains("outside `registry.model_dirs`"), "{abs}");
    let missing = resolve_local(Path::new("nope.gguf"), &dirs).unwrap_err();
    assert!(missing.to_string().contains("nope.gguf"), "{missing}");
    let ftp = Source::parse("ftp://example.org/m.gguf").unwrap_err();
    assert!(ftp.to_string().contains("unsupported scheme `ftp`"), "{ftp}");
}

// ---- several models and the admin API ----

const ADMIN: &str = "admin-secret";
const CLIENT: &str = "client-key";

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A server on the real model with an admin key and a client key, whose model directories
/// are `dir` (holding a tiny second model, `tiny.gguf`) and the repository's `models/`.
fn admin_server(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
    std::fs::write(dir.join("tiny.gguf"), tiny_gguf(42)).unwrap();
    TestServer::start(|c| {
        c.auth.admin_key = Some(ADMIN.into());
        c.auth.api_keys = vec![ApiKey { key: CLIENT.into(), tenant: TenantId::from("anonymous") }];
        c.registry.model_dirs = vec![dir.to_owned(), manifest().join("models")];
        c.registry.cache_dir = dir.join("cache");
        c.registry.drain_grace = Duration::from_secs(20);
        tweak(c);
    })
}

fn admin(server: &TestServer, method: &str, path: &str, body: Option<&Value>) -> HttpResponse {
    let auth = format!("Bearer {ADMIN}");
    let text = body.map(Value::to_string).unwrap_or_default();
    request(
        server.addr,
        method,
        path,
        &[("Authorization", &auth), ("Content-Type", "application/json")],
        text.as_bytes(),
    )
}

fn generate_with(server: &TestServer, model: &str) -> HttpResponse {
    let body = json!({"prompt": "Hello", "max_tokens": 3, "model": model, "ignore_eos": true, "stream": false});
    post_json_as(server.addr, CLIENT, "/v1/generate", &body)
}

#[test]
fn models_load_route_and_unload_through_the_admin_api() {
    let dir = scratch("lifecycle");
    let server = admin_server(&dir, |_| {});
    let listed = get_as(server.addr, Some(CLIENT), "/admin/models");
    assert_eq!(listed.status, 403, "a client key may not use admin routes");
    assert_eq!(get_as(server.addr, None, "/admin/models").status, 401);

    let zero = json!({"id": "tiny", "source": "tiny.gguf", "threads": 0});
    let r = admin(&server, "POST", "/admin/models", Some(&zero));
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (422, json!("threads")));
    let missing = json!({"id": "tiny", "source": "tiny.gguf", "pipeline": "pipelines/nonexistent.yaml"});
    let r = admin(&server, "POST", "/admin/models", Some(&missing));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("invalid_pipeline")), "{}", r.text());
    assert!(r.text().contains("nonexistent.yaml"), "the error names the pipeline file: {}", r.text());
    let guarded = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines/guarded.yaml");
    let own = json!({"id": "tiny", "source": "tiny.gguf", "threads": 1, "kv_cache_max_bytes": 8 << 20,
        "pipeline": guarded});
    let r = admin(&server, "POST", "/admin/models", Some(&own));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["pipeline"], json!(guarded), "the model runs its own pipeline file");
    assert_eq!((v["state"].clone(), v["memory"]["kv_cap_bytes"].clone()), (json!("ready"), json!(8 << 20)));
    assert_eq!(
        (v["threads"].clone(), v["max_batch"].clone()),
        (json!(1), json!(32)),
        "unset settings come from models[0]"
    );
    let all = admin(&server, "GET", "/admin/models", None).json();
    let ids: Vec<&str> = all["models"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [MODEL_ID, "tiny"]);

    let tiny = generate_with(&server, "tiny");
    assert_eq!((tiny.status, tiny.json()["model"].clone()), (200, json!("tiny")), "{}", tiny.text());
    let real = generate_with(&server, MODEL_ID);
    assert_eq!(real.json()["model"], MODEL_ID);
    assert_ne!(tiny.json()["tokens"], real.json()["tokens"], "each id reached its own model");

    let again = admin(&server, "POST", "/admin/models", Some(&json!({"id": "tiny", "source": "tiny.gguf"})));
    assert_eq!((again.status, again.json()["error"]["code"].clone()), (409, json!("model_exists")));
    let escape = admin(&server, "POST", "/admin/models", Some(&json!({"id": "x", "source": "../tiny.gguf"})));
    assert_eq!((escape.status, escape.json()["error"]["code"].clone()), (400, json!("invalid_source")));
    let unknown = admin(&server, "DELETE", "/admin/models/nope", None);
    assert_eq!(unknown.status, 404);

    let reloaded = admin(&server, "POST", "/admin/models/tiny/reload", None);
    assert_eq!(reloaded.status, 200, "{}", reloaded.text());
    assert_eq!(reloaded.json()["memory"]["kv_cap_bytes"], json!(8 << 20), "a reload keeps the model's settings");
    assert_eq!(reloaded.json()["threads"], json!(1));
    assert_eq!(reloaded.json()["pipeline"], json!(guarded));

    let gone = admin(&server, "DELETE", "/admin/models/tiny", None);
    assert_eq!((gone.status, gone.json()["drained"].clone()), (200, json!(true)), "{}", gone.text());
    assert_eq!(generate_with(&server, "tiny").status, 404, "an unloaded model is unknown");
    assert_eq!(metric_value(server.addr, "starling_model_loaded{model=\"tiny\"}"), Some(0.0));
    assert_eq!(generate_with(&server, MODEL_ID).status, 200, "the other model keeps serving");
}

#[test]
fn a_url_source_is_downloaded_verified_and_loaded() {
    let dir = scratch("url-load");
    let server = admin_server(&dir, |_| {});
    let files = FileServer::start();
    let body = tiny_gguf(7);
    files.put("/tiny.gguf", body.clone(), "t1");
    let bad = json!({"id": "web", "source": files.url("/tiny.gguf"), "sha256": "ab".repeat(32)});
    let r = admin(&server, "POST", "/admin/models", Some(&bad));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("checksum_mismatch")));
    assert_eq!(generate_with(&server, "web").status, 404, "a failed load leaves no model behind");

    let good = json!({"id": "web", "source": files.url("/tiny.gguf"), "sha256": sha(&body).to_string()});
    let r = admin(&server, "POST", "/admin/models", Some(&good));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["sha256"], sha(&body).to_string());
    assert_eq!(r.json()["source"], files.url("/tiny.gguf"));
    assert_eq!(generate_with(&server, "web").status, 200);
    let ftp = json!({"id": "s", "source": "ftp://example.org/m.gguf", "sha256": sha(&body).to_string()});
    let r = admin(&server, "POST", "/admin/models", Some(&ftp));
    assert!(r.status == 400 && r.text().contains("unsupported scheme `ftp`"), "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_source");
}

#[test]
fn a_url_source_must_be_pinned_on_reload_as_on_load() {
    let dir = scratch("reload-pin");
    let server = admin_server(&dir, |_| {});
    let files = FileServer::start();
    files.put("/tiny.gguf", tiny_gguf(8), "p1");
    let unpinned = json!({"id": "web", "source": files.url("/tiny.gguf")});
    let load = admin(&server, "POST", "/admin/models", Some(&unpinned));
    let reload = admin(
        &server,
        "POST",
        &format!("/admin/models/{MODEL_ID}/reload"),
        Some(&json!({"source": files.url("/tiny.gguf")})),
    );
    for r in [&load, &reload] {
        let e = &r.json()["error"];
        assert_eq!(
            (r.status, e["code"].clone(), e["param"].clone()),
            (400, json!("sha256_required"), json!("sha256")),
            "{}",
            r.text()
        );
    }
    assert_eq!(load.json()["error"]["message"], reload.json()["error"]["message"], "one rule, one message");
    assert!(files.log().is_empty(), "nothing was downloaded: {:?}", files.log());
    let listed = admin(&server, "GET", "/admin/models", None).json();
    assert_eq!(listed["models"][0]["state"], "ready", "the refused reload left the model serving");
    assert_eq!(generate_with(&server, MODEL_ID).status, 200);
}

#[test]
fn a_url_whose_host_is_not_allowed_is_refused_before_any_connection() {
    let files = FileServer::start();
    let body = tiny_gguf(9);
    files.put("/tiny.gguf", body.clone(), "h1");
    let host = |host: &str, port: Option<u16>| AllowedHost { host: host.to_owned(), port };
    // Another host, and the server's host on another port: both refused.
    let other_port = vec![host("models.example.org", None), host("127.0.0.1", Some(files.addr.port() ^ 1))];
    let dir = scratch("allowed-hosts");
    let server = admin_server(&dir, |c| c.registry.allowed_hosts = Some(other_port));
    let load = json!({"id": "web", "source": files.url("/tiny.gguf"), "sha256": sha(&body).to_string()});
    let r = admin(&server, "POST", "/admin/models", Some(&load));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("host_not_allowed")), "{}", r.text());
    assert!(r.text().contains("registry.allowed_hosts"), "{}", r.text());
    let reload = json!({"source": files.url("/tiny.gguf"), "sha256": sha(&body).to_string()});
    let r = admin(&server, "POST", &format!("/admin/models/{MODEL_ID}/reload"), Some(&reload));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("host_not_allowed")), "{}", r.text());
    assert!(files.log().is_empty(), "no request reached the server: {:?}", files.log());
    assert_eq!(generate_with(&server, "web").status, 404);

    let dir = scratch("allowed-hosts-ok");
    let listed = vec![host("127.0.0.1", Some(files.addr.port()))];
    let server = admin_server(&dir, |c| c.registry.allowed_hosts = Some(listed));
    let r = admin(&server, "POST", "/admin/models", Some(&load));
    assert_eq!(r.status, 201, "a listed host and port load: {}", r.text());
}

#[test]
fn a_model_beyond_the_memory_budget_is_refused() {
    let dir = scratch("budget");
    let real = std::fs::metadata(model_path()).unwrap().len() + (64 << 20);
    let server = admin_server(&dir, |c| c.registry.memory_budget = Some(real + 1024));
    let r = admin(&server, "POST", "/admin/models", Some(&json!({"id": "tiny", "source": "tiny.gguf"})));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (409, json!("memory_budget_exceeded")), "{}", r.text());
    assert!(r.text().contains("memory budget"), "{}", r.text());
    assert_eq!(generate_with(&server, "tiny").status, 404);
}

#[test]
fn a_kv_cap_beyond_the_memory_budget_or_the_machine_is_refused_before_allocating() {
    let dir = scratch("kv-bound");
    let budget = 1u64 << 40;
    let server = admin_server(&dir, |c| c.registry.memory_budget = Some(budget));
    let over = json!({"id": "tiny", "source": "tiny.gguf", "kv_cache_max_bytes": budget + 1});
    let r = admin(&server, "POST", "/admin/models", Some(&over));
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (422, json!("kv_cache_max_bytes")), "{}", r.text());
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains(&format!("at most {budget}")) && message.contains("registry.memory_budget"), "{message}");

    // Without a budget, the machine's memory bounds it.
    let dir = scratch("kv-bound-machine");
    let server = admin_server(&dir, |c| c.registry.memory_budget = None);
    let huge = json!({"id": "tiny", "source": "tiny.gguf", "kv_cache_max_bytes": 1u64 << 62});
    let r = admin(&server, "POST", "/admin/models", Some(&huge));
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (422, json!("kv_cache_max_bytes")), "{}", r.text());
    assert!(r.text().contains("MemTotal"), "{}", r.text());
    assert_eq!(generate_with(&server, "tiny").status, 404);
}

#[test]
fn a_reservation_holds_the_budget_until_it_is_dropped() {
    let server = TestServer::start_empty(|_| {});
    let registry = &server.state.registry;
    for id in ["a", "b"] {
        let mut mc = server.state.config.models[0].clone();
        mc.id = ModelId::from(id);
        registry.record(&mc, Footprint::default());
    }
    let six = Footprint { weights_bytes: 600, kv_cap_bytes: 0 };
    let held = registry.reserve(&ModelId::from("a"), six, Some(1000)).expect("600 of 1000 fit");
    let refused = registry.reserve(&ModelId::from("b"), six, Some(1000)).err().expect("600 more do not fit");
    assert!(refused.to_string().contains("only 400 of the 1000-byte"), "{refused}");
    drop(held);
    assert!(registry.reserve(&ModelId::from("b"), six, Some(1000)).is_ok(), "a dropped reservation is given back");
}

#[test]
fn two_concurrent_loads_that_fit_only_one_at_a_time_cannot_both_pass() {
    let dir = scratch("budget-race");
    let kv = 8u64 << 20;
    let tiny = tiny_gguf(42).len() as u64;
    let serving = std::fs::metadata(model_path()).unwrap().len() + (64 << 20);
    let server = admin_server(&dir, |c| c.registry.memory_budget = Some(serving + tiny + kv + (4 << 20)));
    let addr = server.addr;
    let loads: Vec<_> = ["t1", "t2"]
        .map(|id| {
            std::thread::spawn(move || {
                let body = json!({"id": id, "source": "tiny.gguf", "kv_cache_max_bytes": kv}).to_string();
                let headers =
                    [("Authorization", format!("Bearer {ADMIN}")), ("Content-Type", "application/json".into())];
                let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let r = request(addr, "POST", "/admin/models", &headers, body.as_bytes());
                (r.status, r.json()["error"]["code"].clone())
            })
        })
        .into_iter()
        .collect();
    let mut outcomes: Vec<(u16, Value)> = loads.into_iter().map(|t| t.join().unwrap()).collect();
    outcomes.sort_by_key(|o| o.0);
    assert_eq!(outcomes, [(201, Value::Null), (409, json!("memory_budget_exceeded"))]);
}

#[test]
fn a_pipeline_file_must_be_a_small_regular_file_under_the_pipeline_dirs() {
    let dir = scratch("pipeline-dirs");
    let own = dir.join("pipelines");
    std::fs::create_dir_all(own.join("sub")).unwrap();
    std::fs::write(own.join("big.yaml"), vec![b'#'; 64 * 1024 + 1]).unwrap();
    std::os::unix::fs::symlink(manifest().join("config/starling.yaml"), own.join("out.yaml")).unwrap();
    assert!(Command::new("mkfifo").arg(own.join("fifo.yaml")).status().unwrap().success());
    let server = admin_server(&dir, |c| c.registry.pipeline_dirs = vec![manifest().join("pipelines"), own.clone()]);
    let load = |pipeline: &Path| {
        let body = json!({"id": "tiny", "source": "tiny.gguf", "pipeline": pipeline});
        let r = admin(&server, "POST", "/admin/models", Some(&body));
        (r.status, r.json()["error"]["code"].clone(), r.json()["error"]["param"].clone(), r.text())
    };
    let cases = [
        (manifest().join("config/starling.yaml"), "pipeline_outside_dirs"),
        (PathBuf::from("../pipelines/default.yaml"), "pipeline_outside_dirs"),
        (own.join("out.yaml"), "pipeline_outside_dirs"),
        (own.join("sub"), "pipeline_not_a_file"),
        (own.join("fifo.yaml"), "pipeline_not_a_file"),
        (own.join("big.yaml"), "pipeline_too_large"),
        (own.join("missing.yaml"), "invalid_pipeline"),
    ];
    for (pipeline, code) in cases {
        let (status, got, param, text) = load(&pipeline);
        assert_eq!((status, got, param), (400, json!(code), json!("pipeline")), "{}: {text}", pipeline.display());
    }
    assert_eq!(generate_with(&server, "tiny").status, 404, "no refused load left a model");
    let (status, _, _, text) = load(Path::new("guarded.yaml"));
    assert_eq!(status, 201, "a relative name resolves under a pipeline dir: {text}");
    let listed = admin(&server, "GET", "/admin/models", None).json();
    let tiny = listed["models"].as_array().unwrap().iter().find(|m| m["id"] == "tiny").unwrap().clone();
    assert_eq!(tiny["pipeline"], json!(manifest().join("pipelines/guarded.yaml").canonicalize().unwrap()));
}

/// Streams one generation and says whether it ended with a `done` event.
fn stream_ok(addr: std::net::SocketAddr) -> Result<(), String> {
    let body = json!({"prompt": "Count: one, two,", "max_tokens": 6, "ignore_eos": true, "stream": true});
    let auth = format!("Bearer {CLIENT}");
    let conn = open(addr, "POST", "/v1/generate", &[("Authorization", &auth)], body.to_string().as_bytes());
    if conn.status != 200 {
        let status = conn.status;
        return Err(format!("status {status}: {}", conn.finish().text()));
    }
    let events = conn.sse().rest();
    match events.iter().rev().find(|e| !e.comment) {
        Some(e) if e.event.as_deref() == Some("done") => Ok(()),
        other => Err(format!("stream ended with {other:?}")),
    }
}

#[test]
fn hot_reload_while_eight_clients_stream_fails_no_request() {
    let dir = scratch("hot-reload");
    let server = admin_server(&dir, |_| {});
    let before = server.state.models.snapshot().get(MODEL_ID).cloned().unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let addr = server.addr;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (started, done) = (started_tx.clone(), done.clone());
            std::thread::spawn(move || {
                (0..4)
                    .map(|i| {
                        let r = stream_ok(addr);
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i == 0 {
                            let _ = started.send(());
                        }
                        r
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    started_rx.recv_timeout(Duration::from_secs(60)).expect("a client finished a request");
    let r = admin(&server, "POST", &format!("/admin/models/{MODEL_ID}/reload"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    let finished_by_then = done.load(std::sync::atomic::Ordering::SeqCst);
    assert!(finished_by_then < 32, "the reload happened while clients were still streaming");
    let results: Vec<Result<(), String>> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), results.len());
    let after = server.state.models.snapshot().get(MODEL_ID).cloned().unwrap();
    assert!(!Arc::ptr_eq(&before, &after), "the new copy serves");
    assert_eq!(generate_with(&server, MODEL_ID).status, 200);
    // Once nothing holds the old copy, its engine stops (the model is unmapped with it).
    let old_status = before.engine.status.clone();
    drop(before);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !old_status.stopped.load(std::sync::atomic::Ordering::Relaxed) {
        assert!(std::time::Instant::now() < deadline, "the old copy was never retired");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!after.engine.status.stopped.load(std::sync::atomic::Ordering::Relaxed));
}

#[test]
fn config_reload_changes_a_tenant_quota_live_and_keeps_the_config_on_error() {
    let dir = scratch("config-reload");
    let file = dir.join("starling.yaml");
    let yaml = |rpm: &str| {
        format!(
            "auth:\n  admin_key: {ADMIN}\ntenants:\n  - name: anonymous\n    requests_per_minute: {rpm}\nmodels:\n  - path: {}\n    pipeline: {}\n    threads: 2\n    kv_cache:\n      max_bytes: 64MiB\n",
            model_path().display(),
            manifest().join("pipelines/default.yaml").display()
        )
    };
    std::fs::write(&file, yaml("1")).unwrap();
    let config = Config::load(&file).unwrap();
    let obs = Arc::new(Observability::new().unwrap());
    let state = AppState::new(Arc::new(config), Vec::new(), obs)
        .with_template_worker(crate::support::starling_binary())
        .with_config_source(file.clone(), Overrides::default());
    let server = TestServer::serve_state(Arc::new(state));
    load_configured(&server.state).unwrap();
    let generate = || post_json(server.addr, "/v1/generate", &json!({"prompt": "Hi", "max_tokens": 1}));
    assert_eq!(generate().status, 200);
    assert_eq!(generate().status, 429, "one request per minute");

    std::fs::write(&file, yaml("1000")).unwrap();
    let r = admin(&server, "POST", "/admin/config/reload", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(generate().status, 200, "the new quota applies at once");

    std::fs::write(&file, yaml("-5")).unwrap();
    let r = admin(&server, "POST", "/admin/config/reload", None);
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("invalid_config")));
    assert!(r.text().contains("requests_per_minute"), "the error names the field: {}", r.text());
    assert_eq!(generate().status, 200, "the running config is kept");
}

#[test]
fn drain_turns_readiness_off_and_refuses_new_generations() {
    let dir = scratch("drain");
    let server = admin_server(&dir, |_| {});
    assert_eq!(readyz(&server).0, 200);
    let r = admin(&server, "POST", "/admin/drain", None);
    assert_eq!((r.status, r.json()["draining"].clone()), (200, json!(true)));
    assert_eq!(readyz(&server), (503, "draining".to_owned()));
    assert_eq!(generate_with(&server, MODEL_ID).status, 503);
    admin(&server, "POST", "/admin/drain", Some(&json!({"draining": false})));
    assert_eq!(readyz(&server).0, 200);
}

#[test]
fn unloading_lets_a_running_stream_finish_then_refuses_the_model() {
    let dir = scratch("unload-drain");
    let server = admin_server(&dir, |_| {});
    let r = admin(&server, "POST", "/admin/models", Some(&json!({"id": "tiny", "source": "tiny.gguf"})));
    assert_eq!(r.status, 201, "{}", r.text());
    let body = json!({"prompt": "a", "max_tokens": 24, "ignore_eos": true, "stream": true, "model": "tiny"});
    let auth = format!("Bearer {CLIENT}");
    let conn = open(server.addr, "POST", "/v1/generate", &[("Authorization", &auth)], body.to_string().as_bytes());
    assert_eq!(conn.status, 200);
    let mut sse = conn.sse();
    assert_eq!(sse.next_event().unwrap().event.as_deref(), Some("token"), "the stream has started");
    let addr = server.addr;
    let unload = std::thread::spawn(move || {
        let auth = format!("Bearer {ADMIN}");
        request(addr, "DELETE", "/admin/models/tiny", &[("Authorization", &auth)], b"")
    });
    let rest = sse.rest();
    let last = rest.iter().rev().find(|e| !e.comment).unwrap();
    assert_eq!(last.event.as_deref(), Some("done"), "the stream in flight finished: {last:?}");
    let r = unload.join().unwrap();
    assert_eq!((r.status, r.json()["drained"].clone()), (200, json!(true)), "{}", r.text());
    assert_eq!(generate_with(&server, "tiny").status, 404);
}

// ---- the CLI ----

fn starling_models(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_starling"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .arg("models")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn models_pull_downloads_once_and_models_list_shows_the_entry() {
    let files = FileServer::start();
    let body = tiny_gguf(21);
    files.put("/cli.gguf", body.clone(), "c1");
    let dir = scratch("cli-cache");
    let (url, digest, cache) = (files.url("/cli.gguf"), sha(&body).to_string(), dir.to_str().unwrap().to_owned());
    let pull = || starling_models(&["pull", &url, "--sha256", &digest, "--cache-dir", &cache, "--json"]);
    let out = pull();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["origin"].clone(), v["sha256"].clone()), (json!("downloaded"), json!(digest)));
    assert_eq!(std::fs::read(v["path"].as_str().unwrap()).unwrap(), body);
    let again: Value = serde_json::from_slice(&pull().stdout).unwrap();
    assert_eq!(again["origin"], "cached");
    assert_eq!(files.log().len(), 1, "the second pull made no request");

    let list = starling_models(&["list", "--cache-dir", &cache, "--json"]);
    let entries: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(entries[0]["source"], url.as_str());
    assert_eq!(entries[0]["sha256"], digest.as_str());
    assert_eq!(entries[0]["size"], body.len());

    let wrong = starling_models(&["pull", &url, "--sha256", &"1".repeat(64), "--cache-dir", &cache]);
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success() && err.contains("sha256 mismatch"), "{err}");
    let ftp = starling_models(&["pull", "ftp://example.org/x.gguf", "--sha256", &digest, "--cache-dir", &cache]);
    assert!(!ftp.status.success());
    assert!(String::from_utf8_lossy(&ftp.stderr).contains("unsupported scheme `ftp`"));
}

/// An admin load from a slow URL (a running `starling serve`): `GET /admin/models` shows the
/// download while it runs (bytes received of the announced length) and not once the model
/// serves, and the server logs its progress once per tenth of the file, not per piece.
#[test]
fn an_admin_download_shows_its_progress_and_logs_each_tenth() {
    let files = FileServer::start();
    let body = tiny_gguf(7);
    let digest = sha(&body);
    files.put_paced("/slow.gguf", body.clone(), 50, Duration::from_millis(40));
    let cache = scratch("download-progress");
    let extra = format!("auth:\n  admin_key: adm\nregistry:\n  cache_dir: {}\n", cache.display());
    let (mut child, addr, log) = crate::hostile::serve_limited("download-progress", "true", &extra, "");
    let load = json!({"id": "slow", "source": files.url("/slow.gguf"), "sha256": digest.to_string(),
        "threads": 1, "kv_cache_max_bytes": 8 << 20});
    let loading = std::thread::spawn(move || {
        let headers = [("Authorization", "Bearer adm"), ("Content-Type", "application/json")];
        request(addr, "POST", "/admin/models", &headers, load.to_string().as_bytes())
    });
    let mut seen = vec![];
    while !loading.is_finished() {
        let listed = get_as(addr, Some("adm"), "/admin/models").json();
        let slow = listed["models"].as_array().unwrap().iter().find(|m| m["id"] == "slow").cloned();
        if let Some(d) = slow.map(|m| m["download"].clone()).filter(|d| !d.is_null()) {
            seen.push((d["received_bytes"].as_u64().unwrap(), d["total_bytes"].as_u64().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = loading.join().unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let total = body.len() as u64;
    assert!(seen.iter().all(|&(_, t)| t == total), "{seen:?}");
    assert!(seen.iter().any(|&(r, _)| r > 0 && r < total), "a partial download was listed: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "received bytes only grow: {seen:?}");
    let listed = get_as(addr, Some("adm"), "/admin/models").json();
    let slow = listed["models"].as_array().unwrap().iter().find(|m| m["id"] == "slow").unwrap().clone();
    assert!(slow["download"].is_null() && slow["state"] == "ready", "{slow}");

    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let percents: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("downloading model file"))
        .map(|l| l.split("percent=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(percents.first(), Some(&0), "{text}");
    assert_eq!(percents.last(), Some(&100), "{text}");
    assert!(percents.len() <= 11, "at most one line per tenth for 50 pieces: {percents:?}");
    assert!(percents.windows(2).all(|w| w[1] / 10 > w[0] / 10), "one line per tenth: {percents:?}");
}
