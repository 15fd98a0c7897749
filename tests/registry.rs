//! Late-bound models and the model registry: readiness while a model loads, the download
//! cache (against a local HTTP server), and the admin lifecycle routes.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::json;
use starling::gateway::load_configured;
use starling::types::ModelId;

use crate::support::{TestServer, get_as, metric_value, post_json};

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
