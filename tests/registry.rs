//! Late-bound models and the model registry: readiness while a model loads, the download
//! cache (against a local HTTP server), and the admin lifecycle routes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::json;
use sha2::{Digest as _, Sha256};
use starling::gateway::load_configured;
use starling::model::gguf_writer::{TinyLlamaSpec, tiny_llama_f32};
use starling::registry::{Digest, HttpUrl, ModelCache, Origin, RegistryError, Source, resolve_local};
use starling::types::ModelId;

use crate::support::{FileServer, TestServer, get_as, metric_value, post_json};

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
    let _keep: Arc<_> = before;
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
    assert!(matches!(link, RegistryError::OutsideModelDirs { .. }), "{link}");
    let abs = resolve_local(&root.join("outside.gguf"), &dirs).unwrap_err();
    assert!(abs.to_string().contains("outside the model directories"), "{abs}");
    let missing = resolve_local(Path::new("nope.gguf"), &dirs).unwrap_err();
    assert!(missing.to_string().contains("nope.gguf"), "{missing}");
    let ftp = Source::parse("ftp://example.org/m.gguf").unwrap_err();
    assert!(ftp.to_string().contains("unsupported scheme `ftp`"), "{ftp}");
}
