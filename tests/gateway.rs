//! The HTTP gateway against the real model on 127.0.0.1 (port 0): native and OpenAI routes,
//! streaming, validation, auth, quotas, sessions, shutdown, and a short soak.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{TestServer, post_json, post_json_as, request, stream_json};

/// One server with the default test config, shared by tests that need no tweak.
fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start(|_| {}))
}

fn error_of(v: &Value) -> (&str, &str, Option<&str>) {
    let e = &v["error"];
    (e["type"].as_str().unwrap(), e["code"].as_str().unwrap(), e["param"].as_str())
}

#[test]
fn streamed_tokens_arrive_frame_by_frame_and_match_the_json_result() {
    let s = shared();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": true,
                      "temperature": 0.8, "seed": 42, "stream": true});
    let conn = stream_json(s.addr, "/v1/generate", &body);
    assert_eq!(conn.status, 200);
    assert_eq!(conn.header("content-type"), Some("text/event-stream"));
    let mut sse = conn.sse();
    let mut text = String::new();
    let mut chunks = vec![];
    let done = loop {
        let e = sse.next_event().expect("the stream ends with a done event");
        match e.event.as_deref() {
            Some("token") => {
                let v = e.json();
                assert!(v["id"].is_u64());
                text.push_str(v["text"].as_str().unwrap());
                chunks.push(e.chunk);
            }
            Some("done") => break e,
            other => panic!("unexpected frame {other:?}: {}", e.data),
        }
    };
    assert_eq!(chunks.len(), 12);
    chunks.dedup();
    assert_eq!(chunks.len(), 12, "each token was written as its own chunk");
    assert!(done.chunk > chunks[0], "the first token arrived before the request finished");
    let d = done.json();
    text.push_str(d["text"].as_str().unwrap());
    assert_eq!(d["finish_reason"], "length");
    assert_eq!(d["seed"], 42);
    assert_eq!(d["usage"]["completion_tokens"], 12);
    assert!(d["usage"]["prompt_tokens"].as_u64().unwrap() >= 4);
    assert!(sse.next_event().is_none(), "nothing follows done");

    let mut body = body;
    body["stream"] = json!(false);
    let whole = post_json(s.addr, "/v1/generate", &body);
    assert_eq!(whole.status, 200, "{}", whole.text());
    let w = whole.json();
    assert_eq!(w["text"].as_str().unwrap(), text, "same seed, same text");
    assert_eq!(w["usage"], d["usage"]);
    assert_eq!(w["tokens"].as_array().unwrap().len(), 12);
}

#[test]
fn validation_errors_have_documented_statuses_and_bodies() {
    let s = shared();
    let json_hdr = [("Content-Type", "application/json")];
    let r = request(s.addr, "POST", "/v1/generate", &json_hdr, b"{\"prompt\": \"hi\",, }");
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(error_of(&v).0, "invalid_request");
    assert!(v["error"]["message"].as_str().unwrap().contains("line 1 column"), "{v}");

    let r = post_json(s.addr, "/v1/generate", &json!({"prompt": "hi", "temprature": 1.0}));
    assert_eq!((r.status, error_of(&r.json()).2), (400, Some("temprature")));

    let r = post_json(s.addr, "/v1/generate", &json!({"prompt": "hi", "top_p": 1.5}));
    assert_eq!(r.status, 422);
    let v = r.json();
    assert_eq!(error_of(&v), ("invalid_parameter", "invalid_parameter", Some("top_p")));
    assert!(v["error"]["message"].as_str().unwrap().contains("(0, 1]"), "{v}");

    let r = post_json(s.addr, "/v1/generate", &json!({"prompt": "hi", "model": "gpt-9"}));
    assert_eq!((r.status, error_of(&r.json()).1), (404, "model_not_found"));

    let huge = vec![b' '; s.state.config.server.max_body_bytes.get() + 1];
    let r = request(s.addr, "POST", "/v1/generate", &json_hdr, &huge);
    assert_eq!((r.status, error_of(&r.json()).0), (413, "payload_too_large"));

    let long = "hello ".repeat(9000);
    let r = post_json(s.addr, "/v1/generate", &json!({"prompt": long, "max_tokens": 1, "stream": false}));
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(error_of(&r.json()).0, "context_length_exceeded");

    let r =
        post_json(s.addr, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}));
    assert_eq!((r.status, error_of(&r.json()).2), (422, Some("n")));

    let r = request(s.addr, "GET", "/v1/generate", &[], b"");
    assert_eq!(r.status, 405);
    let r = request(s.addr, "GET", "/nope", &[], b"");
    assert_eq!((r.status, error_of(&r.json()).1), (404, "route_not_found"));
}

#[test]
fn unknown_sessions_are_404_and_request_ids_are_echoed() {
    let s = shared();
    let r = post_json(s.addr, "/v1/session/close", &json!({"session_id": "never-opened"}));
    assert_eq!((r.status, error_of(&r.json()).0), (404, "not_found"));
    assert!(r.header("x-request-id").is_some_and(|id| !id.is_empty()), "a fresh id is generated");

    let body = json!({"session_id": "x"}).to_string();
    let r = request(s.addr, "POST", "/v1/session/close", &[("x-request-id", "trace-abc-123")], body.as_bytes());
    assert_eq!(r.header("x-request-id"), Some("trace-abc-123"));
}

#[test]
fn a_sessions_second_turn_reuses_cached_prompt_tokens() {
    let s = shared();
    let first = json!({"prompt": "The capital of France is", "session_id": "turns", "max_tokens": 6,
                       "temperature": 0, "stream": false});
    let r1 = post_json(s.addr, "/v1/generate", &first).json();
    assert_eq!(r1["usage"]["cached_tokens"], 0);
    let prompt2 = format!("The capital of France is{} And Germany's is", r1["text"].as_str().unwrap());
    let second = json!({"prompt": prompt2, "session_id": "turns", "max_tokens": 4, "temperature": 0, "stream": false});
    let r2 = post_json(s.addr, "/v1/generate", &second).json();
    let (prompt, cached) =
        (r2["usage"]["prompt_tokens"].as_u64().unwrap(), r2["usage"]["cached_tokens"].as_u64().unwrap());
    assert!(cached >= r1["usage"]["prompt_tokens"].as_u64().unwrap(), "the first turn's prompt is cached: {r2}");
    assert!(prompt - cached < prompt, "fewer prompt tokens are computed than sent");
    let r = post_json(s.addr, "/v1/session/close", &json!({"session_id": "turns"}));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn openai_chat_stream_has_openai_chunks_usage_and_done() {
    let s = shared();
    let body = json!({"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hello."}],
                      "max_tokens": 8, "stream": true, "stream_options": {"include_usage": true},
                      "seed": 3, "some_client_extra": {"ignored": true}});
    let conn = stream_json(s.addr, "/v1/chat/completions", &body);
    let mut sse = conn.sse();
    let events = sse.rest();
    assert!(events.len() >= 4, "{events:?}");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| e.json()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    let total = &usage["usage"]["total_tokens"];
    assert_eq!(
        total.as_u64(),
        Some(usage["usage"]["prompt_tokens"].as_u64().unwrap() + usage["usage"]["completion_tokens"].as_u64().unwrap())
    );
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert!(finish["finish_reason"] == "length" || finish["finish_reason"] == "stop", "{finish}");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!text.trim().is_empty());
}

#[test]
fn openai_completion_json_has_choices_usage_and_logprobs() {
    let s = shared();
    // Logprobs describe the final sampling distribution, so sample (temperature 0 leaves one).
    let body = json!({"prompt": "My favourite food is", "max_tokens": 4, "temperature": 1.0, "top_p": 1.0,
                      "min_p": 0.0, "seed": 5, "logprobs": 2, "stop": "\n"});
    let r = post_json(s.addr, "/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    let choice = &v["choices"][0];
    assert!(!choice["text"].as_str().unwrap().is_empty());
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(choice["logprobs"]["tokens"].as_array().unwrap().len(), n);
    assert_eq!(choice["logprobs"]["top_logprobs"][0].as_object().unwrap().len(), 2, "{v}");
    assert!(choice["logprobs"]["token_logprobs"][0].as_f64().unwrap() <= 0.0);

    let models = request(s.addr, "GET", "/v1/models", &[], b"").json();
    assert_eq!(models["object"], "list");
    assert!(models["data"][0]["id"].is_string());
}

#[test]
fn auth_maps_keys_to_tenants_and_keeps_sessions_apart() {
    let mut s = TestServer::start(|c| {
        c.auth.api_keys = starling::config::parse_api_keys("key-a:alpha,key-b:beta").unwrap();
        c.auth.admin_key = Some("root-key".into());
        for t in ["alpha", "beta"] {
            c.tenants.push(starling::config::TenantConfig::with_defaults(t.into()));
        }
    });
    let body = json!({"prompt": "Hi", "max_tokens": 2, "stream": false, "session_id": "mine"});
    let r = post_json(s.addr, "/v1/generate", &body);
    assert_eq!((r.status, error_of(&r.json()).1), (401, "missing_api_key"));
    let r = post_json_as(s.addr, "key-c", "/v1/generate", &body);
    assert_eq!((r.status, error_of(&r.json()).1), (401, "invalid_api_key"));
    assert_eq!(request(s.addr, "GET", "/healthz", &[], b"").status, 200, "health is public");

    assert_eq!(post_json_as(s.addr, "key-a", "/v1/generate", &body).status, 200);
    let close = json!({"session_id": "mine"});
    let r = post_json_as(s.addr, "key-b", "/v1/session/close", &close);
    assert_eq!(r.status, 404, "another tenant's session is not found");
    assert_eq!(post_json_as(s.addr, "key-a", "/v1/session/close", &close).status, 200);

    let admin = |key: &str| request(s.addr, "GET", "/admin/stats", &[("Authorization", &format!("Bearer {key}"))], b"");
    assert_eq!(admin("key-a").status, 403, "a client key is not allowed on admin routes");
    assert_eq!(admin("no-such-key").status, 401);
    let stats = admin("root-key");
    assert_eq!(stats.status, 200);
    assert!(stats.json()["models"][0]["kv_blocks_total"].as_u64().unwrap() > 0);
    s.begin_shutdown();
    assert!(s.wait_stopped(Duration::from_secs(30)));
}

#[test]
fn over_quota_requests_get_429_with_retry_after_and_rate_headers() {
    let mut s = TestServer::start(|c| {
        let t = c.tenants.iter_mut().find(|t| t.name.as_str() == "anonymous").unwrap();
        t.requests_per_minute = Some(2);
    });
    let body = json!({"prompt": "Hi", "max_tokens": 1, "stream": false});
    let first = post_json(s.addr, "/v1/generate", &body);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(post_json(s.addr, "/v1/generate", &body).status, 200);
    let r = post_json(s.addr, "/v1/generate", &body);
    assert_eq!(r.status, 429);
    assert_eq!(error_of(&r.json()), ("rate_limited", "rate_limit_exceeded", None));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(request(s.addr, "GET", "/healthz", &[], b"").status, 200, "only generation routes are limited");
    s.begin_shutdown();
    assert!(s.wait_stopped(Duration::from_secs(30)));
}

#[test]
fn shutdown_finishes_short_streams_and_cancels_long_ones_with_a_final_event() {
    let mut s = TestServer::start(|c| {
        c.server.shutdown_grace = Duration::from_secs(2);
        c.models[0].kv_cache.max_bytes = 256 << 20;
    });
    let long = json!({"prompt": "Count:", "max_tokens": 4000, "ignore_eos": true});
    let mut sse = stream_json(s.addr, "/v1/generate", &long).sse();
    assert_eq!(sse.next_event().unwrap().event.as_deref(), Some("token"));
    s.begin_shutdown();
    let events = sse.rest();
    let last = events.last().expect("a final event");
    assert_eq!(last.event.as_deref(), Some("error"), "{last:?}");
    assert_eq!(last.json()["error"]["code"], "shutdown");
    assert!(s.state.draining.load(std::sync::atomic::Ordering::Relaxed));
    assert!(s.wait_stopped(Duration::from_secs(10)));
    assert!(std::net::TcpStream::connect(s.addr).is_err(), "the listener is closed");
}

#[test]
fn soak_short_mixed_clients_leave_no_5xx_and_no_leaked_blocks() {
    let s = TestServer::start(|_| {});
    let baseline = s.kv_blocks_used();
    let report = crate::gateway::soak(s.addr, 8, Duration::from_secs(10));
    assert_eq!(report.server_errors, 0, "{report:?}");
    assert_eq!(report.unterminated, 0, "{report:?}");
    assert!(report.completed >= 8, "{report:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.kv_blocks_used() != baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.kv_blocks_used(), baseline, "KV blocks return to the idle baseline");
}

/// What a soak run saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Requests that ended as intended (done/[DONE], an intended disconnect, or a 4xx).
    pub completed: usize,
    /// Responses with a 5xx status.
    pub server_errors: usize,
    /// Streams that ended without a final frame.
    pub unterminated: usize,
    /// Clients that left mid-stream on purpose.
    pub disconnects: usize,
}

/// `clients` threads mixing chat, completions, session turns and mid-stream disconnects
/// for `duration`; sessions are closed at the end.
pub fn soak(addr: std::net::SocketAddr, clients: usize, duration: Duration) -> SoakReport {
    let until = Instant::now() + duration;
    let threads: Vec<_> = (0..clients).map(|c| std::thread::spawn(move || soak_client(addr, c, until))).collect();
    let mut total = SoakReport::default();
    for t in threads {
        let r = t.join().expect("a soak client panicked");
        total.completed += r.completed;
        total.server_errors += r.server_errors;
        total.unterminated += r.unterminated;
        total.disconnects += r.disconnects;
    }
    total
}

fn soak_client(addr: std::net::SocketAddr, client: usize, until: Instant) -> SoakReport {
    let mut r = SoakReport::default();
    let session = format!("soak-{client}");
    let mut i = client;
    while Instant::now() < until {
        let (path, body) = match i % 4 {
            0 => (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": format!("Tell me about {i}")}], "max_tokens": 8, "stream": true}),
            ),
            1 => ("/v1/completions", json!({"prompt": format!("Number {i} is"), "max_tokens": 8, "stream": true})),
            2 => ("/v1/generate", json!({"prompt": format!("Turn {i}:"), "session_id": session, "max_tokens": 6})),
            _ => ("/v1/generate", json!({"prompt": "A long story:", "max_tokens": 64, "ignore_eos": true})),
        };
        i += 1;
        let conn = stream_json(addr, path, &body);
        if conn.status >= 500 {
            r.server_errors += 1;
            continue;
        }
        if conn.status != 200 {
            r.completed += 1;
            conn.finish();
            continue;
        }
        let mut sse = conn.sse();
        if path == "/v1/generate" && body["max_tokens"] == 64 {
            let _ = sse.next_event();
            r.disconnects += 1;
            continue;
        }
        let last = sse.rest().into_iter().rfind(|e| !e.comment);
        let terminated =
            last.is_some_and(|e| e.data == "[DONE]" || matches!(e.event.as_deref(), Some("done" | "error")));
        if terminated { r.completed += 1 } else { r.unterminated += 1 }
    }
    let closed = post_json(addr, "/v1/session/close", &json!({"session_id": session}));
    if closed.status >= 500 {
        r.server_errors += 1;
    }
    r
}

/// A virtualenv with the official `openai` package (created once, reused across runs).
fn openai_venv() -> std::path::PathBuf {
    use std::process::Command;
    let venv = std::env::temp_dir().join("starling-openai-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status().expect("python3 runs");
        assert!(made.success(), "python3 -m venv failed");
    }
    let has = Command::new(&python).args(["-c", "import openai"]).status().expect("venv python runs");
    if !has.success() {
        let pip = Command::new(&python).args(["-m", "pip", "install", "-q", "openai"]).status().expect("pip runs");
        assert!(pip.success(), "pip install openai failed (PyPI must be reachable)");
    }
    python
}

#[test]
fn the_official_openai_python_client_streams_chat_and_completions() {
    let s = shared();
    let python = openai_venv();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/openai-check.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .args(["--base-url", &format!("http://{}/v1", s.addr)])
        .output()
        .expect("the check script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["ok"], true);
    assert!(v["chat"]["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(), "{v}");
    assert!(!v["completion"]["text"].as_str().unwrap().is_empty());
}

#[test]
fn tokenize_and_detokenize_answer_as_documented() {
    let s = TestServer::start(|_| {});
    let r = post_json(
        s.addr,
        "/v1/tokenize",
        &json!({"text": "<|im_start|>Hello world", "with_offsets": true, "with_pieces": true}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["ids"], json!([1, 19556, 905]));
    assert_eq!(v["offsets"], json!([[0, 12], [12, 17], [17, 23]]));
    assert_eq!(v["pieces"], json!(["<|im_start|>", "Hello", "Ġworld"]));
    let plain = post_json(s.addr, "/v1/tokenize", &json!({"text": "<|im_start|>", "parse_special": false})).json();
    assert!(plain["ids"].as_array().unwrap().len() > 1, "without parse_special the marker is ordinary text");

    let r = post_json(s.addr, "/v1/detokenize", &json!({"tokens": [19556, 905]}));
    assert_eq!((r.status, r.json()["text"].clone()), (200, json!("Hello world")));

    let r = post_json(s.addr, "/v1/detokenize", &json!({"tokens": [19556, 49152]}));
    assert_eq!(r.status, 422);
    let e = r.json();
    assert_eq!(e["error"]["param"], "tokens");
    assert!(e["error"]["message"].as_str().unwrap().contains("49152"), "{e}");
    let r = post_json(s.addr, "/v1/detokenize", &json!({"tokens": [-1]}));
    assert_eq!(r.status, 422);
    let r = post_json(s.addr, "/v1/tokenize", &json!({"txt": "typo"}));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("txt"));
}
