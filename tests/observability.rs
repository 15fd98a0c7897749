//! Observability: `/metrics` after real requests, readiness and liveness flipping, the
//! Chrome trace of ticks, JSON request logs, and the admin trace capture.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use starling::config::{Config, Format};
use starling::engine::load::start_model_observed;
use starling::gateway::{AppState, serve};
use starling::telemetry::Observability;

use crate::model::model_path;

const STAGES: &[&str] = &["admit", "tokenize", "batch", "forward", "sample", "emit", "evict"];

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A config for the default model with extra YAML sections.
pub(crate) fn config_yaml(extra: &str, model_extra: &str) -> String {
    let pipeline = manifest().join("pipelines/default.yaml");
    format!(
        "models:\n  - id: smollm2\n    path: {}\n    pipeline: {}\n    threads: 2\n{model_extra}{extra}",
        model_path().display(),
        pipeline.display()
    )
}

/// A server on a background runtime; dropping it stops the server.
struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(yaml: &str, with_model: bool, tune: impl FnOnce(&mut Observability)) -> Server {
        let config = Config::from_str(yaml, Format::Yaml).expect("test config is valid");
        let mut obs = Observability::new().expect("metrics registry");
        tune(&mut obs);
        let obs = Arc::new(obs);
        let models =
            if with_model { vec![start_model_observed(&config, 0, &obs).expect("model loads")] } else { vec![] };
        let state = Arc::new(
            AppState::new(Arc::new(config), models, obs).with_template_worker(crate::support::starling_binary()),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                serve(listener, st, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        Server { addr, state, stop: Some(stop), thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 exchange (Connection: close); returns the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.into() };
    (status, body)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

fn generate(addr: SocketAddr, body: Value) -> Value {
    let (status, text) = http(addr, "POST", "/v1/generate", &[], Some(&body));
    assert_eq!(status, 200, "generate failed: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Sum of the samples of `name` whose labels include every pair of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let (n, l) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
        if n != name || !labels.iter().all(|(k, v)| l.split(',').any(|p| p == format!("{k}=\"{v}\""))) {
            continue;
        }
        *found.get_or_insert(0.0) += value.parse::<f64>().unwrap();
    }
    found
}

fn scrape(addr: SocketAddr) -> String {
    let (status, text) = http(addr, "GET", "/metrics", &[], None);
    assert_eq!(status, 200);
    text
}

fn usage_sum(outs: &[Value], field: &str) -> f64 {
    outs.iter().map(|o| o["usage"][field].as_f64().unwrap()).sum()
}

#[test]
fn metrics_count_real_requests() {
    let server = Server::start(&config_yaml("", ""), true, |_| {});
    let addr = server.addr;
    let req = |session: Option<&str>| {
        let mut b = json!({"prompt": "The capital of France is", "max_tokens": 8, "ignore_eos": true,
            "temperature": 0.0, "stream": false});
        if let Some(s) = session {
            b["session_id"] = json!(s);
        }
        b
    };
    let outs = vec![generate(addr, req(None)), generate(addr, req(Some("s1"))), generate(addr, req(Some("s1")))];
    let (status, _) = http(addr, "POST", "/v1/generate", &[], Some(&json!({"max_tokens": 4})));
    assert_eq!(status, 400);
    let (status, _) = http(addr, "POST", "/v1/session/close", &[], Some(&json!({"session_id": "s1"})));
    assert_eq!(status, 200);

    // The session is freed on the engine's next tick (an idle engine ticks every 500 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(addr);
        if metric(&m, "starling_kv_evictions_total", &[("reason", "close")]) == Some(1.0) || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let model = [("model", "smollm2")];
    let get = |name: &str, labels: &[(&str, &str)]| {
        metric(&m, name, labels).unwrap_or_else(|| panic!("series {name} {labels:?} missing from /metrics:\n{m}"))
    };
    assert_eq!(get("starling_kv_evictions_total", &[("model", "smollm2"), ("reason", "close")]), 1.0);
    let ok = [("model", "smollm2"), ("tenant", "all"), ("status", "ok"), ("finish_reason", "length")];
    assert_eq!(get("starling_requests_total", &ok), 3.0);
    assert_eq!(get("starling_request_errors_total", &[("type", "invalid_request")]), 1.0);
    assert_eq!(get("starling_prompt_tokens_total", &model), usage_sum(&outs, "prompt_tokens"));
    assert_eq!(get("starling_generation_tokens_total", &model), 24.0);
    let cached = usage_sum(&outs, "cached_tokens");
    assert!(cached > 0.0, "the second session turn reuses its prefix");
    assert_eq!(get("starling_prompt_tokens_cached_total", &model), cached);
    let hits = outs.iter().filter(|o| o["usage"]["cached_tokens"].as_f64().unwrap_or(0.0) > 0.0).count();
    assert_eq!(get("starling_prefix_cache_queries_total", &model), outs.len() as f64);
    assert_eq!(get("starling_prefix_cache_hits_total", &model), hits as f64);
    assert!(hits >= 1);
    for h in
        ["starling_time_to_first_token_seconds", "starling_e2e_request_latency_seconds", "starling_queue_time_seconds"]
    {
        assert_eq!(get(&format!("{h}_count"), &model), 3.0, "{h}");
        assert!(get(&format!("{h}_sum"), &model) > 0.0, "{h}");
    }
    // 8 tokens per stream: 7 gaps each.
    assert_eq!(get("starling_inter_token_latency_seconds_count", &model), 21.0);
    let ttft_sum = get("starling_time_to_first_token_seconds_sum", &model);
    assert!(ttft_sum < get("starling_e2e_request_latency_seconds_sum", &model));
    // Forwarded tokens: each uncached prompt position once, then 7 decode steps per request.
    let forwarded = usage_sum(&outs, "prompt_tokens") - cached + 21.0;
    assert_eq!(get("starling_batch_tokens_sum", &model), forwarded);
    let passes = get("starling_batch_size_count", &model);
    assert!((8.0..=24.0).contains(&passes), "{passes} forward passes for 3 sequential requests");
    assert_eq!(get("starling_batch_size_sum", &model), passes, "sequential requests run one at a time");
    let ticks = get("starling_tick_duration_seconds_count", &model);
    assert!(ticks >= passes);
    for stage in STAGES {
        let n = get("starling_stage_duration_seconds_count", &[("model", "smollm2"), ("stage", stage)]);
        assert!(n >= ticks && n <= ticks + 1.0, "stage {stage}: {n} runs vs {ticks} ticks");
    }
    let rate = get("starling_generation_tokens_per_second", &model);
    assert!(rate > 0.0 && rate <= 24.0 / 5.0 + 1e-9, "tokens/s over the 5 s window: {rate}");
    assert_eq!(get("starling_queue_depth", &model), 0.0);
    assert_eq!(get("starling_running_sequences", &model), 0.0);
    let (used, free) = (
        get("starling_kv_cache_bytes", &[("model", "smollm2"), ("state", "used")]),
        get("starling_kv_cache_bytes", &[("model", "smollm2"), ("state", "free")]),
    );
    assert_eq!(used, 0.0, "every block is back after the session closed");
    assert!(free > 0.0 && free <= 512.0 * 1024.0 * 1024.0);
    assert_eq!(get("starling_kv_cache_usage_ratio", &model), 0.0);
    assert_eq!(get("starling_model_loaded", &model), 1.0);
    assert_eq!(get("starling_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(get("starling_admission_rejections_total", &[("model", "smollm2"), ("reason", "queue_full")]), 0.0);
}

fn readyz(addr: SocketAddr) -> (u16, String) {
    let (status, body) = http(addr, "GET", "/readyz", &[], None);
    let v: Value = serde_json::from_str(&body).unwrap();
    (status, v["reason"].as_str().unwrap_or("").to_owned())
}

/// Polls `probe` while `work` runs (the requests sent 30 ms apart, so each reaches the
/// engine's queue before the next arrives); returns every (status, reason) seen.
fn observe_during(addr: SocketAddr, probe: fn(SocketAddr) -> (u16, String), work: Vec<Value>) -> Vec<(u16, String)> {
    let handles: Vec<_> = work
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30 * i as u64));
                http(addr, "POST", "/v1/generate", &[], Some(&b))
            })
        })
        .collect();
    let mut seen = vec![];
    while !handles.iter().all(|h| h.is_finished()) {
        seen.push(probe(addr));
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in handles {
        let _ = h.join();
    }
    seen
}

fn long_request() -> Value {
    json!({"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": true, "stream": false})
}

#[test]
fn readiness_flips_with_queue_pressure_and_back() {
    let yaml = config_yaml("queue:\n  high_watermark: 2\n  low_watermark: 1\n", "    max_batch: 1\n");
    let server = Server::start(&yaml, true, |_| {});
    assert_eq!(readyz(server.addr), (200, String::new()));
    let seen = observe_during(server.addr, readyz, (0..5).map(|_| long_request()).collect());
    assert!(
        seen.iter().any(|(s, r)| *s == 503 && r.starts_with("queue at the high watermark")),
        "never saw queue pressure: {seen:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while readyz(server.addr).0 != 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(readyz(server.addr), (200, String::new()), "ready again once the queue drained");
    let m = scrape(server.addr);
    let rejected = metric(&m, "starling_admission_rejections_total", &[("model", "smollm2"), ("reason", "queue_full")]);
    let finished = metric(&m, "starling_requests_total", &[("model", "smollm2")]).unwrap_or(0.0);
    assert_eq!(rejected.unwrap_or(0.0) + finished, 5.0, "every request either ran or was rejected:\n{m}");

    server.state.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(readyz(server.addr), (503, "draining".to_owned()));
    server.state.draining.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(readyz(server.addr).0, 200);
}

#[test]
fn readiness_flips_with_kv_pressure_and_back() {
    let server = Server::start(&config_yaml("", ""), true, |o| o.kv_ready_max = 0.0);
    assert_eq!(readyz(server.addr).0, 200, "an empty cache is below any threshold");
    let seen = observe_during(server.addr, readyz, vec![long_request()]);
    assert!(seen.iter().any(|(s, r)| *s == 503 && r.starts_with("KV cache usage")), "{seen:?}");
    assert_eq!(readyz(server.addr).0, 200, "blocks are back after the request");
}

#[test]
fn readiness_before_a_model_is_loaded() {
    let server =
        Server::start(&config_yaml("", ""), false, |o| o.loading.store(true, std::sync::atomic::Ordering::Relaxed));
    assert_eq!(readyz(server.addr), (503, "model loading".to_owned()));
    server.state.obs.loading.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(readyz(server.addr), (503, "no model loaded".to_owned()));
}

fn healthz(addr: SocketAddr) -> (u16, String) {
    let (status, body) = http(addr, "GET", "/healthz", &[], None);
    let v: Value = serde_json::from_str(&body).unwrap();
    (status, v["status"].as_str().unwrap_or("").to_owned())
}

#[test]
fn healthz_reports_an_engine_that_stops_ticking() {
    // A zero stall allowance: any gap between ticks while work is pending counts as stuck.
    let server = Server::start(&config_yaml("", ""), true, |o| o.tick_stall = Duration::ZERO);
    assert_eq!(healthz(server.addr), (200, "ok".to_owned()), "no pending work, no stall");
    let seen = observe_during(server.addr, healthz, vec![long_request()]);
    assert!(seen.iter().any(|(s, r)| *s == 503 && r == "engine_stuck"), "{seen:?}");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(healthz(server.addr), (200, "ok".to_owned()));
}

/// A `starling serve` child process with JSON logs on stderr.
pub(crate) struct ChildServer {
    child: Child,
    pub(crate) addr: SocketAddr,
    logs: std::sync::mpsc::Receiver<String>,
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // Already gone after `stop`; killed here when a test failed before it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildServer {
    pub(crate) fn start(name: &str, yaml: &str, extra_args: &[&str]) -> ChildServer {
        let dir = std::env::temp_dir().join(format!("starling-obs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
            .args(["--log-format", "json"])
            .args(extra_args)
            .args(["serve", "--bind", "127.0.0.1:0", "--config"])
            .arg(&config)
            .current_dir(manifest())
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, logs) = std::sync::mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let addr = loop {
            let line = logs.recv_timeout(Duration::from_secs(60)).expect("the server starts");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("log line is not JSON: {line}"));
            if v["message"] == "listening" {
                break v["addr"].as_str().unwrap().parse().unwrap();
            }
        };
        // The server binds before its model loads: wait until it is ready for traffic.
        let deadline = Instant::now() + Duration::from_secs(60);
        while http(addr, "GET", "/readyz", &[], None).0 != 200 {
            assert!(Instant::now() < deadline, "the server did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        ChildServer { child, addr, logs }
    }

    /// SIGTERM, wait for exit, and return the remaining log lines.
    fn stop(mut self) -> Vec<Value> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "server exit: {exit:?}");
        self.logs.try_iter().map(|l| serde_json::from_str(&l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect()
    }
}

/// A numeric trace arg (tracing-chrome writes every arg as its Debug string).
fn arg(e: &Value, name: &str) -> u64 {
    let v = &e["args"][name];
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
}

fn stage_events<'a>(events: &'a [Value], stage: &str) -> impl Iterator<Item = &'a Value> {
    let stage = stage.to_owned();
    events.iter().filter(move |e| e["name"] == "stage" && e["args"]["stage"] == stage.as_str())
}

#[test]
fn chrome_trace_and_json_request_logs() {
    let trace = std::env::temp_dir().join(format!("starling-obs-trace-{}/ticks.json", std::process::id()));
    let _ = std::fs::remove_file(&trace);
    let trace_arg = trace.display().to_string();
    let speculative = "    speculative: {method: ngram}\n";
    let server = ChildServer::start("trace", &config_yaml("", speculative), &["--trace-chrome", &trace_arg]);
    let body = json!({"prompt": "Hi", "max_tokens": 4, "ignore_eos": true, "stream": false, "session_id": "chat-7"});
    let out = generate(server.addr, body);
    generate(server.addr, json!({"prompt": "Hello there", "max_tokens": 3, "ignore_eos": true, "stream": false}));
    // A prompt the model goes on repeating: its decode steps carry drafts.
    let repeat = "one two three four five six seven eight. ".repeat(4);
    let body = json!({"prompt": repeat, "max_tokens": 24, "temperature": 0, "ignore_eos": true, "stream": false});
    generate(server.addr, body);
    let (status, _) = http(server.addr, "POST", "/v1/generate", &[], Some(&json!({"tokens": [], "prompt": "x"})));
    assert_eq!(status, 400);
    let logs = server.stop();

    let events: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).expect("valid JSON");
    assert!(events.iter().any(|e| e["name"] == "tick" && e["ph"] == "B"), "tick spans");
    for stage in STAGES {
        assert!(stage_events(&events, stage).next().is_some(), "stage {stage} missing from the trace");
    }
    assert!(stage_events(&events, "forward").any(|e| arg(e, "batch_size") >= 1), "forward spans carry the batch size");
    assert!(stage_events(&events, "forward").any(|e| arg(e, "batch_tokens") >= 2), "a prefill of the prompt");
    assert!(stage_events(&events, "sample").any(|e| e["args"]["requests"].is_string()), "request ids on spans");
    // The draft length of each request of a step, beside the request ids.
    let drafting = stage_events(&events, "forward").find(|e| arg(e, "draft_tokens") > 0).expect("a step with drafts");
    let drafts = drafting["args"]["drafts"].as_str().unwrap_or_default();
    assert!(drafts.split(',').any(|d| d.parse::<u64>().is_ok_and(|n| n > 0)), "per-request draft lengths: {drafting}");
    assert_eq!(drafts.split(',').count(), drafting["args"]["requests"].as_str().unwrap_or_default().split(',').count());

    let finished: Vec<&Value> = logs.iter().filter(|l| l["message"] == "request finished").collect();
    assert_eq!(finished.len(), 3, "one line per request: {logs:?}");
    let first = finished.iter().find(|l| l["session_id"] == "chat-7").expect("the session request's line");
    for field in ["request_id", "tenant", "model", "ttft_ms", "duration_ms"] {
        assert!(!first[field].is_null(), "{field} missing from {first}");
    }
    let id = first["request_id"].as_str().unwrap_or_default();
    assert!(id.starts_with("req-"), "the gateway's request id (x-request-id), not an engine number: {first}");
    assert_eq!(first["tenant"], "anonymous");
    assert_eq!(first["model"], "smollm2");
    assert_eq!(first["finish_reason"], "length");
    assert_eq!(first["generated_tokens"], 4);
    assert_eq!(first["prompt_tokens"], out["usage"]["prompt_tokens"]);
    assert_eq!(first["cached_tokens"], 0);
    assert!(first["ttft_ms"].as_f64().unwrap() <= first["duration_ms"].as_f64().unwrap());
    assert!(finished.iter().all(|l| l.get("prompt").is_none()), "no prompt text unless log_prompts");
    let error = logs.iter().find(|l| l["message"] == "request error").expect("error line");
    assert_eq!(error["error_type"], "invalid_request");
    assert_eq!(error["status"], 400);
}

#[test]
fn admin_trace_capture_of_the_live_server() {
    let yaml = config_yaml("auth:\n  admin_key: sekrit\n", "");
    let server = ChildServer::start("capture", &yaml, &[]);
    let addr = server.addr;
    assert_eq!(http(addr, "POST", "/admin/trace?seconds=1", &[], None).0, 401);
    assert_eq!(http(addr, "POST", "/admin/trace?seconds=1", &[("Authorization", "Bearer wrong")], None).0, 401);
    let auth = [("Authorization", "Bearer sekrit")];
    assert_eq!(http(addr, "POST", "/admin/trace?seconds=0", &auth, None).0, 422);
    let capture = std::thread::spawn(move || http(addr, "POST", "/admin/trace?seconds=1.5", &auth, None));
    std::thread::sleep(Duration::from_millis(300));
    generate(addr, json!({"prompt": "Hi", "max_tokens": 4, "ignore_eos": true, "stream": false}));
    let (status, body) = capture.join().unwrap();
    server.stop();
    assert_eq!(status, 200, "{body}");
    let events: Vec<Value> = serde_json::from_str(&body).expect("the capture is a JSON array");
    for stage in STAGES {
        assert!(stage_events(&events, stage).next().is_some(), "stage {stage} missing from the capture");
    }
    assert!(stage_events(&events, "forward").any(|e| arg(e, "batch_size") >= 1));
    for f in std::fs::read_dir(manifest().join("traces")).unwrap().flatten() {
        if f.file_name().to_string_lossy().starts_with("capture-") {
            let _ = std::fs::remove_file(f.path());
        }
    }
}

#[test]
fn liveness_needs_pending_work_and_a_stale_tick() {
    use starling::telemetry::health::{Liveness, liveness};
    let (s, stall) = (Duration::from_secs, Duration::from_secs(30));
    assert_eq!(liveness(false, 3, s(1), stall), Liveness::Alive);
    assert_eq!(liveness(false, 0, s(600), stall), Liveness::Alive, "an idle engine is not stuck");
    assert_eq!(liveness(false, 1, s(31), stall), Liveness::Stuck { since_ms: 31_000 });
    assert_eq!(liveness(true, 0, s(0), stall), Liveness::Stopped);
}

#[test]
fn capture_seconds_is_bounded() {
    use starling::gateway::capture_seconds;
    assert_eq!(capture_seconds(None).unwrap(), Duration::from_secs(5));
    assert_eq!(capture_seconds(Some("x=1&seconds=2.5")).unwrap(), Duration::from_millis(2500));
    for bad in ["seconds=0", "seconds=61", "seconds=abc", "seconds=-1"] {
        let e = capture_seconds(Some(bad)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("seconds"), "{bad}");
    }
}

#[test]
fn grafana_dashboard_charts_every_series() {
    let text = std::fs::read_to_string(manifest().join("deploy/grafana-dashboard.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let exprs: Vec<&str> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap()))
        .collect();
    let m = starling::telemetry::Metrics::new().unwrap();
    let mm = m.for_model("m");
    // Series with no labelled child yet are not rendered: touch every family once.
    m.record_error(starling::error::ErrorKind::Internal);
    mm.stage("admit").observe(0.001);
    mm.record_outcome(&starling::telemetry::metrics::RequestOutcome {
        tenant: "t",
        status: "ok",
        finish_reason: "stop",
        prompt_tokens: 1,
        cached_tokens: 0,
        generated_tokens: 1,
    });
    let rendered = m.render();
    let names: Vec<&str> = rendered.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
    assert_eq!(names.len(), 28, "{names:?}");
    for name in names {
        assert!(exprs.iter().any(|e| e.contains(name)), "no panel charts {name}");
    }
}

/// Server-reported timings agree with what a streaming client measures on its own clock,
/// within 20 ms: time to first token and total duration from the `done` event, and the
/// time-to-first-token histogram, for a prompt prefilled in one tick and for one of three
/// chunks (about 660 tokens through 256-token ticks).
#[test]
fn reported_timings_match_what_the_client_measures() {
    let server = crate::support::TestServer::start(|c| {
        c.models[0].max_batch_tokens = 256.try_into().unwrap();
    });
    let series = "starling_time_to_first_token_seconds_sum{model=\"smollm2-135m\"}";
    let long = "All work and no play makes Jack a dull boy. ".repeat(60);
    for (what, prompt) in [("one tick", "The capital of France is"), ("three chunks", long.as_str())] {
        let before = crate::support::metric_value(server.addr, series).unwrap_or(0.0);
        let body = json!({"prompt": prompt, "max_tokens": 8, "ignore_eos": true, "temperature": 0});
        let sent = Instant::now();
        let mut sse = crate::support::stream_json(server.addr, "/v1/generate", &body).sse();
        let mut first = None;
        let done = loop {
            let e = sse.next_event().unwrap_or_else(|| panic!("{what}: the stream ended early"));
            match e.event.as_deref() {
                Some("token") => {
                    first.get_or_insert_with(|| sent.elapsed());
                }
                Some("done") => break (serde_json::from_str::<Value>(&e.data).unwrap(), sent.elapsed()),
                other => panic!("{what}: unexpected event {other:?}"),
            }
        };
        let (client_ttft, client_total) = (first.unwrap().as_secs_f64() * 1e3, done.1.as_secs_f64() * 1e3);
        let timings = &done.0["timings"];
        let (ttft, total) =
            (timings["time_to_first_token_ms"].as_f64().unwrap(), timings["total_ms"].as_f64().unwrap());
        println!("{what}: ttft {ttft:.1} ms (client {client_ttft:.1}), total {total:.1} ms (client {client_total:.1})");
        assert!((ttft - client_ttft).abs() < 20.0, "{what}: server ttft {ttft} ms, client {client_ttft} ms");
        assert!((total - client_total).abs() < 20.0, "{what}: server total {total} ms, client {client_total} ms");
        let deadline = Instant::now() + Duration::from_secs(5);
        let observed = loop {
            let now = crate::support::metric_value(server.addr, series).unwrap_or(0.0);
            if now != before || Instant::now() > deadline {
                break (now - before) * 1e3;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!((observed - client_ttft).abs() < 20.0, "{what}: histogram {observed} ms, client {client_ttft} ms");
    }
}
