//! Scale-out: three `starling serve` replicas behind HAProxy with the committed
//! `deploy/haproxy/haproxy.cfg` (least connections, health checks on `/readyz`, affinity on
//! `x-session-id`), and the series the Gateway API Inference Extension's endpoint picker
//! scrapes (vLLM's names) under load.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{TestServer, post_json, request};

/// Requests a replica has answered (its `starling_requests_total`, every label summed).
fn served(addr: SocketAddr) -> f64 {
    let text = request(addr, "GET", "/metrics", &[], b"").text();
    text.lines()
        .filter(|l| l.starts_with("starling_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// HAProxy running the committed config against `replicas`; killed on drop.
struct Balancer {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Balancer {
    fn start(replicas: &[SocketAddr]) -> Balancer {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/haproxy.cfg");
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(config).env("STARLING_LB_BIND", addr.to_string());
        for (i, r) in replicas.iter().enumerate() {
            cmd.env(format!("STARLING_REPLICA_{}", i + 1), r.to_string());
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let balancer = Balancer { child, addr };
        // Up once every replica passed its first health checks.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "HAProxy did not come up on {addr}");
            if std::net::TcpStream::connect(addr).is_ok() && request(addr, "GET", "/readyz", &[], b"").status == 200 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(800));
        balancer
    }
}

/// Whether HAProxy is here; in CI (`CI=true`) it must be (`scripts/test-deps.sh` installs it).
fn have_haproxy() -> bool {
    let found = Command::new("haproxy").arg("-v").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "haproxy is missing: run scripts/test-deps.sh");
        eprintln!("skipped: haproxy is not installed (scripts/test-deps.sh installs it)");
    }
    found
}

/// `n` completions of `max_tokens` through `addr`, `concurrency` at a time; their statuses.
fn completions(addr: SocketAddr, n: usize, concurrency: usize, max_tokens: u32) -> Vec<u16> {
    let body = json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": false});
    let mut statuses = vec![];
    for wave in 0..n.div_ceil(concurrency) {
        let threads: Vec<_> = (wave * concurrency..n.min((wave + 1) * concurrency))
            .map(|_| {
                let body = body.clone();
                std::thread::spawn(move || post_json(addr, "/v1/completions", &body).status)
            })
            .collect();
        statuses.extend(threads.into_iter().map(|t| t.join().unwrap()));
    }
    statuses
}

#[test]
fn three_replicas_behind_haproxy_spread_drain_fail_over_and_keep_affinity() {
    if !have_haproxy() {
        return;
    }
    let admin = "auth:\n  admin_key: adm\n";
    let mut replicas: Vec<(Child, SocketAddr)> = (0..3)
        .map(|i| {
            let (child, addr, _) = crate::hostile::serve_limited(&format!("replica-{i}"), "true", admin, "");
            (child, addr)
        })
        .collect();
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.1).collect();
    let lb = Balancer::start(&addrs);

    // Spread: 24 requests, 6 at a time, reach every replica.
    let before: Vec<f64> = addrs.iter().map(|&a| served(a)).collect();
    let statuses = completions(lb.addr, 24, 6, 4);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let spread: Vec<f64> = addrs.iter().zip(&before).map(|(&a, b)| served(a) - b).collect();
    println!("24 requests over three replicas: {spread:?}");
    assert!(spread.iter().all(|&n| n > 0.0), "every replica got requests: {spread:?}");

    // Affinity: a conversation's second turn, routed by `x-session-id`, is served from the
    // replica that holds the first turn's KV.
    let chat = |messages: Value| {
        let body = json!({"messages": messages, "max_tokens": 8, "temperature": 0});
        let headers = [("Content-Type", "application/json"), ("x-session-id", "conversation-1")];
        let r = request(lb.addr, "POST", "/v1/chat/completions", &headers, body.to_string().as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let first = chat(json!([{"role": "user", "content": "What is the capital of France?"}]));
    let reply = first["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let second = chat(json!([
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And of Italy?"}
    ]));
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    println!("second turn through the balancer: {cached} cached tokens");
    assert!(cached > 0, "the second turn reached the replica holding the session: {second}");

    // Drain replica 1: no request fails, and once its health check says so it gets none.
    let auth = [("Authorization", "Bearer adm"), ("Content-Type", "application/json")];
    assert_eq!(request(addrs[0], "POST", "/admin/drain", &auth, b"{}").status, 200);
    let statuses = completions(lb.addr, 12, 6, 4);
    assert!(statuses.iter().all(|&s| s == 200), "no request fails during a drain: {statuses:?}");
    std::thread::sleep(Duration::from_millis(1000));
    let drained_before = served(addrs[0]);
    let statuses = completions(lb.addr, 12, 6, 4);
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(served(addrs[0]), drained_before, "the drained replica got new requests");

    // SIGKILL replica 2 while requests are in flight; the health check takes it out and
    // later requests succeed.
    let in_flight = std::thread::spawn({
        let lb = lb.addr;
        move || completions(lb, 6, 6, 48)
    });
    std::thread::sleep(Duration::from_millis(300));
    replicas[1].0.kill().unwrap();
    replicas[1].0.wait().unwrap();
    let statuses = in_flight.join().unwrap();
    let failed = statuses.iter().filter(|&&s| s != 200).count();
    println!("replica killed with 6 requests in flight: {failed} failed ({statuses:?})");
    let statuses = completions(lb.addr, 12, 4, 4);
    assert!(statuses.iter().all(|&s| s == 200), "requests after the kill: {statuses:?}");

    drop(lb);
    for (mut child, _) in replicas {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The endpoint picker's series under vLLM's names: gauges with `model_name`, the queue
/// rising under a flood and back to 0 after it, KV use a fraction that matches
/// `/admin/stats`, and the cache shape as info labels.
#[test]
fn the_endpoint_pickers_series_follow_the_load() {
    let server = TestServer::start(|c| {
        c.auth.admin_key = Some("adm".into());
        c.models[0].max_batch = 2.try_into().unwrap();
    });
    let addr = server.addr;
    let metrics = || request(addr, "GET", "/metrics", &[], b"").text();
    let value = |text: &str, series: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let text = metrics();
    for name in ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"] {
        assert!(text.contains(&format!("# TYPE {name} gauge")), "{name} is a gauge:\n{text}");
    }
    let info = text.lines().find(|l| l.starts_with("vllm:cache_config_info{")).expect("the cache shape");
    let blocks_total = {
        let stats = request(addr, "GET", "/admin/stats", &[("Authorization", "Bearer adm")], b"").json();
        stats["models"][0]["kv_blocks_total"].as_u64().unwrap()
    };
    let block_tokens = server.state.config.models[0].kv_cache.block_tokens.get();
    let model = server.state.config.models[0].id.to_string();
    assert!(
        info.contains(&format!("block_size=\"{block_tokens}\""))
            && info.contains(&format!("num_gpu_blocks=\"{blocks_total}\""))
            && info.contains(&format!("model_name=\"{model}\""))
            && info.ends_with(" 1"),
        "{info}"
    );

    // A flood of 8 long requests against 2 running slots: some wait.
    let flood: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                let body = json!({"prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": true, "stream": false});
                post_json(addr, "/v1/generate", &body).status
            })
        })
        .collect();
    let series = format!("vllm:num_requests_waiting{{model_name=\"{model}\"}}");
    let running = format!("vllm:num_requests_running{{model_name=\"{model}\"}}");
    let usage_series = format!("vllm:kv_cache_usage_perc{{model_name=\"{model}\"}}");
    let (mut peak_waiting, mut peak_running) = (0.0f64, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !flood.iter().all(|t| t.is_finished()) && Instant::now() < deadline {
        let text = metrics();
        peak_waiting = peak_waiting.max(value(&text, &series));
        peak_running = peak_running.max(value(&text, &running));
        let usage = value(&text, &usage_series);
        assert!((0.0..=1.0).contains(&usage), "KV use is a fraction: {usage}");
        // The same figure as /admin/stats reports in blocks (both read at nearly the same time).
        let stats = request(addr, "GET", "/admin/stats", &[("Authorization", "Bearer adm")], b"").json();
        let used = stats["models"][0]["kv_blocks_used"].as_u64().unwrap() as f64;
        assert!((usage - used / blocks_total as f64).abs() <= 0.25, "usage {usage} vs {used}/{blocks_total} blocks");
        std::thread::sleep(Duration::from_millis(20));
    }
    for t in flood {
        assert_eq!(t.join().unwrap(), 200);
    }
    println!("flood of 8 on 2 slots: waiting peaked at {peak_waiting}, running at {peak_running}");
    assert!(peak_waiting >= 1.0, "the queue gauge rose under the flood");
    assert!((1.0..=2.0).contains(&peak_running), "running peaked at {peak_running}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while value(&metrics(), &series) != 0.0 {
        assert!(Instant::now() < deadline, "the queue gauge went back to 0");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(value(&metrics(), &running), 0.0);
    assert_eq!(request(addr, "GET", "/health", &[], b"").status, 200, "the probe vLLM and llama.cpp serve");
}

/// `x-session-id` names the session as the body's `session_id` does (a proxy can see it):
/// the session it opens can be closed by name; a body and header that disagree are a 422.
#[test]
fn the_session_header_names_the_session() {
    let server = TestServer::start(|_| {});
    let addr = server.addr;
    let generate = |headers: &[(&str, &str)], body: Value| {
        let mut all = vec![("Content-Type", "application/json")];
        all.extend_from_slice(headers);
        request(addr, "POST", "/v1/generate", &all, body.to_string().as_bytes())
    };
    let body = json!({"prompt": "Hello", "max_tokens": 2, "stream": false});
    assert_eq!(generate(&[("x-session-id", "from-header")], body.clone()).status, 200);
    let close = |id: &str| post_json(addr, "/v1/session/close", &json!({"session_id": id}));
    assert_eq!(close("from-header").status, 200, "the header opened the session");
    assert_eq!(close("never-opened").status, 404);

    let mut both = body.clone();
    both["session_id"] = json!("in-body");
    let r = generate(&[("x-session-id", "in-header")], both.clone());
    assert_eq!(r.status, 422, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "session_id");
    assert_eq!(generate(&[("x-session-id", "in-body")], both).status, 200, "agreeing names are fine");
}

/// The Kubernetes manifests (base and both overlays) validate offline: core kinds against
/// the Kubernetes schemas, the GIE objects against their v1 fields, and their references
/// to each other; the Starling config they carry is one Starling accepts. A broken copy is
/// refused, naming the field.
#[test]
fn the_kubernetes_manifests_validate_offline() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/test-venv/bin/python");
    if !python.exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "no test venv: run scripts/test-deps.sh");
        eprintln!("skipped: target/test-venv is missing (scripts/test-deps.sh makes it)");
        return;
    }
    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("k8s");
    let _ = std::fs::remove_dir_all(&tmp);
    let run = |dir: &std::path::Path| {
        Command::new(&python).arg(dir.join("validate.py")).arg(tmp.join("configs")).output().unwrap()
    };
    let out = run(&root.join("deploy/kubernetes"));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(out.status.success(), "{report:#}\n{}", String::from_utf8_lossy(&out.stderr));
    let gie = report["overlays/gie"]["resources"].as_array().unwrap();
    for kind in ["InferencePool/starling", "HTTPRoute/starling", "Deployment/starling-epp", "Service/starling-epp"] {
        assert!(gie.iter().any(|r| r == kind), "the gie overlay has {kind}: {gie:?}");
    }
    let autoscale = report["overlays/autoscale"]["resources"].as_array().unwrap();
    assert!(autoscale.iter().any(|r| r == "HorizontalPodAutoscaler/starling"), "{autoscale:?}");
    for overlay in ["base", "overlays-autoscale", "overlays-gie"] {
        let text = std::fs::read_to_string(tmp.join("configs").join(format!("{overlay}.yaml"))).unwrap();
        // The image's pipelines are this checkout's (Containerfile copies them there), and
        // its /models holds the file the init step pulled (here: the tests' copy).
        let text = text
            .replace("/usr/share/starling/pipelines", &root.join("pipelines").display().to_string())
            .replace("/models/", &format!("{}/", crate::model::model_path().parent().unwrap().display()));
        let config = starling::config::Config::from_str(&text, starling::config::Format::Yaml)
            .unwrap_or_else(|e| panic!("{overlay}: the ConfigMap's config: {e}"));
        assert!(config.telemetry.vllm_metric_names, "the endpoint picker reads vLLM's names");
    }

    // A copy with a misspelt InferencePool field fails, naming it.
    let broken = tmp.join("broken");
    let copied = Command::new("cp").arg("-r").arg(root.join("deploy/kubernetes")).arg(&broken).status().unwrap();
    assert!(copied.success());
    let pool = broken.join("overlays/gie/inferencepool.yaml");
    let text = std::fs::read_to_string(&pool).unwrap().replace("targetPorts:", "targetPortz:");
    std::fs::write(&pool, text).unwrap();
    let out = run(&broken);
    assert!(!out.status.success(), "a misspelt field passed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("targetPortz"), "{}", String::from_utf8_lossy(&out.stdout));
}
