//! Hostile clients, bounded in time and count, on 127.0.0.1: each attack checks that other
//! clients keep being served (health answers within 100 ms, requests complete) and that the
//! server frees what the attackers held.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::TestServer;

/// `GET path` on a fresh connection: its status and how long the answer took.
pub fn probe(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return (0, started.elapsed()) };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if write!(s, "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").is_err() {
        return (0, started.elapsed());
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let status = std::str::from_utf8(&buf[..n]).ok().and_then(|t| t.split(' ').nth(1)?.parse().ok()).unwrap_or(0);
    (status, started.elapsed())
}

/// Probes `/healthz` and `/readyz` every 50 ms for `window`; returns the slowest answer and
/// every probe that failed or took longer than 100 ms.
fn probe_health_for(addr: SocketAddr, window: Duration) -> (Duration, Vec<(String, u16, Duration)>) {
    let (until, mut slowest, mut bad) = (Instant::now() + window, Duration::ZERO, Vec::new());
    while Instant::now() < until {
        for path in ["/healthz", "/readyz"] {
            let (status, took) = probe(addr, path);
            slowest = slowest.max(took);
            if status != 200 || took > Duration::from_millis(100) {
                bad.push((path.to_owned(), status, took));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (slowest, bad)
}

/// Whether the server has closed `s` (a read sees end of file or an error, not a timeout).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

/// A greedy stream that must keep flowing beside an attack: started, its first token read.
fn steady_stream(addr: SocketAddr, max_tokens: u32) -> crate::support::SseReader {
    let body = serde_json::json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": true});
    let mut sse = crate::support::stream_json(addr, "/v1/generate", &body).sse();
    assert_eq!(sse.next_event().expect("the steady stream started").event.as_deref(), Some("token"));
    sse
}

/// 600 connections that send half a request header and stop: health keeps answering within
/// 100 ms, and every one of them is closed by the header-read timeout (1 s here).
#[test]
fn slow_headers_are_cut_off_and_health_keeps_answering() {
    let server = TestServer::start(|c| {
        c.server.header_read_timeout = Duration::from_secs(1);
        c.server.max_connections = 64.try_into().unwrap();
    });
    let mut attackers: Vec<TcpStream> = (0..600)
        .filter_map(|_| {
            let mut s = TcpStream::connect(server.addr).ok()?;
            s.write_all(b"POST /v1/generate HTTP/1.1\r\nHost: a\r\nContent-Le").ok()?;
            Some(s)
        })
        .collect();
    assert!(attackers.len() >= 550, "only {} attackers connected", attackers.len());
    let (slowest, bad) = probe_health_for(server.addr, Duration::from_millis(2500));
    assert!(bad.is_empty(), "health probes failed or were slow during the attack: {bad:?}");
    let open = attackers.iter_mut().map(closed_by_server).filter(|closed| !closed).count();
    println!("slow headers: slowest health answer {slowest:?}; {open} of 600 attackers still open after 2.5 s");
    assert_eq!(open, 0, "connections with half a header outlived the header-read timeout");
}

/// Past `server.max_connections`, a connection gets one polite 429 with `Retry-After` (or
/// its health check answered), never a hang; when the attackers leave, requests are served.
#[test]
fn connections_past_the_cap_get_429_and_health_still_answers() {
    let server = TestServer::start(|c| {
        c.server.header_read_timeout = Duration::from_secs(5);
        c.server.max_connections = 16.try_into().unwrap();
    });
    // Sixteen idle connections take every served slot.
    let held: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(server.addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let r = crate::support::request(server.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "too_many_connections");
    // Forty more idle connections beyond the cap do not starve the health checks.
    let flood: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(server.addr).unwrap()).collect();
    let (slowest, bad) = probe_health_for(server.addr, Duration::from_millis(1000));
    assert!(bad.is_empty(), "health probes failed or were slow past the cap: {bad:?}");
    println!("past the cap: slowest health answer {slowest:?}");
    drop(held);
    drop(flood);
    std::thread::sleep(Duration::from_millis(200));
    let r = crate::support::request(server.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 200, "served again once the attackers left: {}", r.text());
}

/// A `starling serve` child process under `ulimit -n 256`, logging to a file; returns it,
/// its address once its model is loaded, and the log's path. `extra` is appended to the
/// config's `server:` section.
fn serve_with_fd_limit(name: &str, extra: &str) -> (std::process::Child, SocketAddr, std::path::PathBuf) {
    serve_limited(name, "ulimit -n 256", extra, "")
}

/// A `starling serve` child process started by bash after `limits` (shell commands such as
/// `ulimit -n 256`), logging to a file; returns it, its address once its model is loaded,
/// and the log's path. `extra` is appended to the config's `server:` section and
/// `kv_extra` to the model's `kv_cache` map.
pub(crate) fn serve_limited(
    name: &str,
    limits: &str,
    extra: &str,
    kv_extra: &str,
) -> (std::process::Child, SocketAddr, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("starling-hostile-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    let model = crate::model::model_path();
    let root = env!("CARGO_MANIFEST_DIR");
    std::fs::write(
        &config,
        format!(
            "server:\n  bind: 127.0.0.1:0\n  header_read_timeout_secs: 5\n{extra}\
             models:\n  - id: m\n    path: {}\n    pipeline: {root}/pipelines/default.yaml\n    threads: 1\n    \
             kv_cache: {{max_bytes: 16MiB{kv_extra}}}\n",
            model.display()
        ),
    )
    .unwrap();
    let log = dir.join("stderr.log");
    let child = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{limits} && exec '{}' serve --config '{}' 2>'{}'",
            env!("CARGO_BIN_EXE_starling"),
            config.display(),
            log.display()
        ))
        .env_remove("RUST_LOG")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr: SocketAddr = loop {
        assert!(Instant::now() < deadline, "the server did not report its address");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(rest) = text.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    while probe(addr, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "the model did not load");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr, log)
}

/// CPU seconds a process has used (user + system, from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Under `ulimit -n 256`, 400 idle connections: the default connection cap (sized from the
/// open-file limit) keeps descriptors for health checks, which answer within 100 ms. With a
/// cap set above what the limit allows, accepts fail for want of descriptors: the server
/// backs off instead of spinning and logs a bounded number of lines, and recovers when the
/// attackers leave.
#[test]
fn descriptor_exhaustion_neither_starves_health_nor_floods_the_log() {
    let (mut child, addr, _) = serve_with_fd_limit("capped", "");
    let attackers: Vec<TcpStream> = (0..400).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    let (slowest, bad) = probe_health_for(addr, Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(attackers);
    assert!(bad.is_empty(), "health probes failed or were slow with 400 idle connections: {bad:?}");
    println!("ulimit 256, default cap, 400 idle connections: slowest health answer {slowest:?}");

    let (mut child, addr, log) = serve_with_fd_limit("uncapped", "  max_connections: 1000\n");
    let (log_before, cpu_before) = (std::fs::metadata(&log).unwrap().len(), cpu_seconds(child.id()));
    let started = Instant::now();
    let attackers: Vec<TcpStream> = (0..400).filter_map(|_| TcpStream::connect(addr).ok()).collect();
    std::thread::sleep(Duration::from_secs(3));
    let (logged, busy) = (std::fs::metadata(&log).unwrap().len() - log_before, cpu_seconds(child.id()) - cpu_before);
    let wall = started.elapsed().as_secs_f64();
    drop(attackers);
    let recovered = Instant::now();
    while probe(addr, "/healthz").0 != 200 {
        assert!(recovered.elapsed() < Duration::from_secs(10), "health did not recover after the attackers left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    println!(
        "ulimit 256, cap 1000: {logged} log bytes and {busy:.2} CPU s in {wall:.1} s of exhaustion; \
         healthy again {:?} after the attackers left",
        recovered.elapsed()
    );
    assert!(text.contains("accept failed"), "the descriptor shortage was logged");
    assert!(logged < 4096, "{logged} bytes of log in {wall:.1} s");
    assert!(busy < 0.3 * wall, "{busy:.2} CPU seconds in {wall:.1} s: the accept loop spins");
}

/// 40 clients at once against a queue of 4: each is served or told 429 with `Retry-After`;
/// none sees a 503, which load balancers take for a dead replica.
#[test]
fn a_flood_past_the_queue_gets_429_never_503() {
    let server = TestServer::start(|c| {
        c.queue.high_watermark = 4;
        c.queue.low_watermark = 2;
        c.tenants.iter_mut().for_each(|t| t.max_queued = 1000);
    });
    let addr = server.addr;
    let body = serde_json::json!({"prompt": "Count to ten:", "max_tokens": 8, "stream": false, "ignore_eos": true});
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let body = body.clone();
            std::thread::spawn(move || crate::support::post_json(addr, "/v1/generate", &body))
        })
        .collect();
    let responses: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let count = |s: u16| responses.iter().filter(|r| r.status == s).count();
    println!("40 clients, queue of 4: {} served, {} told 429", count(200), count(429));
    for r in &responses {
        assert!(r.status == 200 || r.status == 429, "status {}: {}", r.status, r.text());
        if r.status == 429 {
            assert_eq!(r.header("retry-after"), Some("1"), "{}", r.text());
            assert_eq!(r.json()["error"]["code"], "queue_full");
        }
    }
    assert!(count(200) >= 4 && count(429) > 0, "{} served, {} refused", count(200), count(429));
}

/// `/metrics` is public by default: tenant names and their traffic appear in it only when
/// `telemetry.tenant_labels` is on.
#[test]
fn tenant_names_reach_metrics_only_when_asked_for() {
    for labels in [false, true] {
        let server = TestServer::start(|c| {
            c.auth.api_keys = starling::config::parse_api_keys("k-acme:acme-corp").unwrap();
            c.tenants.push(starling::config::TenantConfig::with_defaults("acme-corp".into()));
            c.telemetry.tenant_labels = labels;
        });
        let r = crate::support::post_json_as(
            server.addr,
            "k-acme",
            "/v1/generate",
            &serde_json::json!({"prompt": "Hi", "max_tokens": 2, "stream": false}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let deadline = Instant::now() + Duration::from_secs(5);
        let metrics = loop {
            let m = crate::support::request(server.addr, "GET", "/metrics", &[], b"").text();
            if m.contains("starling_requests_total{") || Instant::now() > deadline {
                break m;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(metrics.contains("starling_requests_total{"), "{metrics}");
        assert_eq!(metrics.contains("acme-corp"), labels, "tenant_labels {labels}:\n{metrics}");
    }
}

/// A spill directory without room for the spill file (a file-size limit below the spill
/// cap stands in for a full disk) turns spilling off with a warning: the model loads and
/// serves, and no partial spill file is left behind.
#[test]
fn a_spill_disk_without_room_turns_spill_off_and_the_model_serves() {
    let spill = std::env::temp_dir().join(format!("starling-hostile-spill-dir-{}", std::process::id()));
    let kv = format!(", spill: {{dir: '{}', max_bytes: 64MiB}}", spill.display());
    // 4,096 blocks of 512 or 1,024 bytes (dash or bash): 2 or 4 MiB, far below the cap.
    let limits = "ulimit -n 256 && ulimit -f 4096 && trap '' XFSZ";
    let (mut child, addr, log) = serve_limited("spill", limits, "", &kv);
    let body = serde_json::json!({"prompt": "Hi", "max_tokens": 4, "stream": false});
    let r = crate::support::post_json(addr, "/v1/generate", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("KV spill off") && text.contains("cannot reserve"), "{text}");
    let left: Vec<_> = std::fs::read_dir(&spill).unwrap().collect();
    assert!(left.is_empty(), "spill files left behind: {left:?}");
}

/// A model name with a newline in it (an unknown model, logged with the 404) cannot forge a
/// log line: control characters are escaped in text logs.
#[test]
fn control_characters_cannot_forge_log_lines() {
    let (mut child, addr, log) = serve_with_fd_limit("logs", "");
    let forged = "evil\n2026-01-01T00:00:00Z  INFO forged: admin logged in";
    let body = serde_json::json!({"model": forged, "prompt": "Hi", "max_tokens": 1});
    let r = crate::support::post_json(addr, "/v1/generate", &body);
    assert_eq!(r.status, 404, "{}", r.text());
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("evil\\n2026"), "the name is logged, escaped:\n{text}");
    assert!(!text.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")), "a forged line:\n{text}");
}

/// Keys that name no tenant are tenants of their own: one key cannot see another's
/// sessions, prefix cache or requests; request ids are 128 random bits; and one tenant
/// cannot take every session slot.
#[test]
fn keys_are_isolated_and_sessions_are_capped_per_tenant() {
    let server = TestServer::start(|c| {
        c.auth.api_keys = starling::config::parse_api_keys("key-one,key-two,key-three:small").unwrap();
        let mut small = starling::config::TenantConfig::with_defaults("small".into());
        small.max_sessions = 2;
        c.tenants.push(small);
        c.apply_overrides(&starling::config::Overrides::default()).unwrap();
    });
    let generate =
        |key: &str, body: serde_json::Value| crate::support::post_json_as(server.addr, key, "/v1/generate", &body);
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(6);
    let first =
        generate("key-one", serde_json::json!({"prompt": prompt, "max_tokens": 1, "stream": false, "session_id": "s"}));
    assert_eq!(first.status, 200, "{}", first.text());
    // The same prompt from another key finds nothing cached; its session "s" is its own.
    let second = generate("key-two", serde_json::json!({"prompt": prompt, "max_tokens": 1, "stream": false}));
    assert_eq!(second.json()["usage"]["cached_tokens"], 0, "a prefix leaked across keys: {}", second.text());
    // The same prompt from the first key again does find it: the cache works, per key.
    let again = generate("key-one", serde_json::json!({"prompt": prompt, "max_tokens": 1, "stream": false}));
    assert!(again.json()["usage"]["cached_tokens"].as_u64().unwrap() > 0, "no prefix cached: {}", again.text());
    let close = |key: &str| {
        crate::support::post_json_as(server.addr, key, "/v1/session/close", &serde_json::json!({"session_id": "s"}))
    };
    assert_eq!(close("key-two").status, 404, "key two sees key one's session");
    assert_eq!(close("key-one").status, 200);
    // Generated request ids are random 128-bit names.
    let fresh = generate("key-two", serde_json::json!({"prompt": "Hi", "max_tokens": 1, "stream": false}));
    let ids = [second.header("x-request-id").unwrap(), fresh.header("x-request-id").unwrap()];
    for id in ids {
        let hex = id.strip_prefix("req-").unwrap_or_else(|| panic!("{id}"));
        assert!(hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(ids[0], ids[1]);
    // A tenant capped at two sessions gets 429 for a third; others still open theirs.
    for s in ["a", "b"] {
        let r = generate(
            "key-three",
            serde_json::json!({"prompt": "Hi", "max_tokens": 1, "stream": false, "session_id": s}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r =
        generate("key-three", serde_json::json!({"prompt": "Hi", "max_tokens": 1, "stream": false, "session_id": "c"}));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (429, Some("too_many_sessions")), "{}", r.text());
    let r =
        generate("key-one", serde_json::json!({"prompt": "Hi", "max_tokens": 1, "stream": false, "session_id": "c"}));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Tokens are charged as they are generated: a client that disconnects mid-stream has
/// still spent its prompt and the tokens it received, and is refused once over its
/// tokens-per-minute limit.
#[test]
fn a_disconnect_mid_stream_still_pays_for_its_tokens() {
    let server = TestServer::start(|c| {
        c.auth.api_keys = starling::config::parse_api_keys("k-meter:metered").unwrap();
        let mut t = starling::config::TenantConfig::with_defaults("metered".into());
        t.tokens_per_minute = Some(30);
        c.tenants.push(t);
    });
    let body =
        serde_json::json!({"prompt": "Tell me a long story about a fox.", "max_tokens": 200, "ignore_eos": true});
    let conn = crate::support::open(
        server.addr,
        "POST",
        "/v1/generate",
        &[("Content-Type", "application/json"), ("Authorization", "Bearer k-meter")],
        body.to_string().as_bytes(),
    );
    let mut sse = conn.sse();
    for _ in 0..30 {
        assert_eq!(sse.next_event().expect("a token event").event.as_deref(), Some("token"));
    }
    drop(sse);
    std::thread::sleep(Duration::from_millis(100));
    let small = serde_json::json!({"prompt": "Hi", "max_tokens": 1, "stream": false});
    let r = crate::support::post_json_as(server.addr, "k-meter", "/v1/generate", &small);
    assert_eq!(r.status, 429, "the tokens streamed before the disconnect were charged: {}", r.text());
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
}

/// 32 prompts of about 1 MiB at once (refused afterwards as longer than the context) while
/// another client streams: they are tokenized on the CPU pool, not on the engine's thread,
/// so the stream keeps getting tokens and health keeps answering.
#[test]
fn large_prompts_at_once_do_not_stall_other_streams() {
    let server = TestServer::start(|c| c.server.max_body_bytes = (2 << 20).try_into().unwrap());
    let addr = server.addr;
    // A stream that ends while the floods are still being answered is followed by another.
    let mut sse = steady_stream(addr, 1000);
    let big = "All work and no play makes Jack a dull boy. ".repeat(23_000);
    let floods: Vec<_> = (0..32)
        .map(|_| {
            let body = serde_json::json!({"prompt": big, "max_tokens": 1, "stream": false});
            std::thread::spawn(move || crate::support::post_json(addr, "/v1/generate", &body).status)
        })
        .collect();
    let (mut gaps, mut last) = (Vec::new(), Instant::now());
    while !floods.iter().all(|f| f.is_finished()) {
        let e = sse.next_event().expect("the stream goes on");
        if e.event.as_deref() == Some("done") {
            // A new request may meet the queue full of floods: it is refused (429) until
            // there is room, which is backpressure, not a stall of a running stream.
            let body = serde_json::json!({"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": true});
            let deadline = Instant::now() + Duration::from_secs(60);
            let conn = loop {
                let conn = crate::support::stream_json(addr, "/v1/generate", &body);
                match conn.status {
                    429 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    _ => break conn,
                }
            };
            assert_eq!(conn.status, 200, "a new stream once the floods leave room");
            sse = conn.sse();
            let first = sse.next_event().expect("the new stream started");
            assert_eq!(first.event.as_deref(), Some("token"), "{first:?}");
            last = Instant::now();
            continue;
        }
        gaps.push(last.elapsed());
        last = Instant::now();
        assert_eq!(e.event.as_deref(), Some("token"), "{e:?}");
        if gaps.len() % 20 == 0 {
            let (status, took) = probe(addr, "/healthz");
            assert!(status == 200 && took < Duration::from_millis(100), "health {status} in {took:?}");
        }
    }
    let statuses: Vec<u16> = floods.into_iter().map(|f| f.join().unwrap()).collect();
    let worst = gaps.iter().max().copied().unwrap_or_default();
    println!("32 prompts of ~1 MiB: {} tokens streamed meanwhile, largest gap {worst:?}", gaps.len());
    assert!(statuses.iter().all(|&s| s == 413 || s == 429), "{statuses:?}");
    assert!(worst < Duration::from_secs(2), "the stream stalled for {worst:?}");
}

/// Three waves of 24 clients that leave at the worst moments (after the request line, with
/// half a body sent, after the response head, after the first token) while another client
/// streams: that stream never stalls, health keeps answering, and once the storm has passed
/// every KV block the leavers held is free again and new requests are served.
#[test]
fn a_disconnect_storm_loses_nothing_and_frees_every_block() {
    let server = TestServer::start(|_| {});
    let addr = server.addr;
    let mut sse = steady_stream(addr, 400);
    let leaver = |i: usize| {
        std::thread::spawn(move || {
            let body =
                serde_json::json!({"prompt": format!("Story number {i}:"), "max_tokens": 300, "ignore_eos": true})
                    .to_string();
            let Ok(mut s) = TcpStream::connect(addr) else { return };
            let head = format!(
                "POST /v1/generate HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            match i % 4 {
                0 => {}
                1 => drop(s.write_all(&body.as_bytes()[..body.len() / 2])),
                _ => {
                    let _ = s.write_all(body.as_bytes());
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 256];
                    // Case 2 leaves once the head has arrived, case 3 once a token has.
                    let want: &[u8] = if i % 4 == 2 { b"\r\n\r\n" } else { b"event: token" };
                    while !seen.windows(want.len()).any(|w| w == want) {
                        match s.read(&mut buf) {
                            Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                            _ => break,
                        }
                    }
                }
            }
        })
    };
    let (mut worst, mut last, mut tokens) = (Duration::ZERO, Instant::now(), 0);
    for wave in 0..3 {
        let leavers: Vec<_> = (0..24).map(|i| leaver(wave * 24 + i)).collect();
        while !leavers.iter().all(|t| t.is_finished()) {
            let e = sse.next_event().expect("the steady stream goes on");
            assert_eq!(e.event.as_deref(), Some("token"), "the steady stream ended early: {e:?}");
            worst = worst.max(last.elapsed());
            last = Instant::now();
            tokens += 1;
        }
        let (status, took) = probe(addr, "/healthz");
        assert!(status == 200 && took < Duration::from_millis(100), "health {status} in {took:?}");
    }
    drop(sse);
    println!("72 leavers in three waves: {tokens} steady tokens meanwhile, largest gap {worst:?}");
    assert!(worst < Duration::from_secs(2), "the steady stream stalled for {worst:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.kv_blocks_used() != 0 {
        assert!(Instant::now() < deadline, "{} KV blocks still held after the storm", server.kv_blocks_used());
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = crate::support::post_json(
        addr,
        "/v1/generate",
        &serde_json::json!({"prompt": "Hi", "max_tokens": 3, "stream": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Models whose files carry hostile chat templates, served beside the real one: nested loops
/// of 10^10 steps (stopped by fuel) and a list doubled 40 times (MiniJinja materializes 2^33
/// items without charging fuel; the render's worker process dies at its memory limit). Each
/// chat with them is a 400 `template_limit` naming the limit; their plain completions, the
/// real model's chats and the other model's stream go on being served.
#[test]
fn a_hostile_chat_template_fails_only_its_own_requests() {
    use starling::model::gguf::GgufValue;
    use starling::model::gguf_writer::{TinyModelSpec, tiny_model_writer};
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = crate::support::test_config(|c| {
        // Small enough to be met in a second or two, with time to spare under a loaded
        // machine (the worker runs at nice 10).
        c.server.template_memory_bytes = 96 << 20;
        c.server.template_timeout = Duration::from_secs(60);
        c.server.cpu_workers = 1.try_into().unwrap();
    });
    let bombs = [
        (
            "loops",
            "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}",
            "work budget",
        ),
        (
            "doubling",
            "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
            "96 MiB of memory",
        ),
    ];
    let mut files = vec![];
    for (name, template, _) in bombs {
        let path = std::env::temp_dir().join(format!("starling-hostile-template-{name}-{}.gguf", std::process::id()));
        let mut w = tiny_model_writer(&TinyModelSpec::family("llama"));
        w.metadata("tokenizer.chat_template", GgufValue::String(template.into()));
        w.write(&path).unwrap();
        let mut hostile = config.models[0].clone();
        hostile.id = name.into();
        hostile.path = path.clone();
        hostile.pipeline = root.join("pipelines/default.yaml");
        config.models.push(hostile);
        files.push(path);
    }
    let server = TestServer::start_all(config);
    let addr = server.addr;

    let mut sse = steady_stream(addr, 400);
    for (name, _, limit) in bombs {
        let chat = serde_json::json!({"model": name, "messages": [{"role": "user", "content": "hi"}]});
        for _ in 0..2 {
            let started = Instant::now();
            let r = crate::support::post_json(addr, "/v1/chat/completions", &chat);
            assert_eq!(r.status, 400, "{name}: {}", r.text());
            assert_eq!(r.json()["error"]["code"], "template_limit", "{name}: {}", r.text());
            let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
            assert!(message.contains(limit), "{name}: the error names the limit `{limit}`: {message}");
            let took = started.elapsed();
            assert!(took < Duration::from_secs(30), "{name}: the refusal took {took:?}");
            println!("hostile template `{name}`: 400 template_limit after {took:?}");
            assert_eq!(sse.next_event().expect("the steady stream goes on").event.as_deref(), Some("token"));
        }
        let plain = serde_json::json!({"model": name, "prompt": "hi", "max_tokens": 3, "stream": false});
        assert_eq!(crate::support::post_json(addr, "/v1/completions", &plain).status, 200, "{name}");
    }
    let real = serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    let r = crate::support::post_json(addr, "/v1/chat/completions", &real);
    assert_eq!(r.status, 200, "the real model's chat after the workers died: {}", r.text());

    // Two doubling chats at once hold template slots for seconds; a completion meanwhile
    // (tokenized on the one CPU thread) is not queued behind them.
    let bomb = serde_json::json!({"model": "doubling", "messages": [{"role": "user", "content": "hi"}]});
    let bombs: Vec<_> = (0..2)
        .map(|_| {
            let bomb = bomb.clone();
            std::thread::spawn(move || {
                let r = crate::support::post_json(addr, "/v1/chat/completions", &bomb);
                (r.status, Instant::now())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let plain = serde_json::json!({"prompt": "hi", "max_tokens": 3, "stream": false});
    assert_eq!(crate::support::post_json(addr, "/v1/completions", &plain).status, 200);
    let served = Instant::now();
    for b in bombs {
        let (status, at) = b.join().unwrap();
        assert_eq!(status, 400);
        assert!(served < at, "the completion waited for a hostile render to end");
    }
    for path in files {
        let _ = std::fs::remove_file(&path);
    }
}

/// Hostile model files loaded through the admin API while a client streams: each is refused
/// with a 4xx naming the problem, the stream goes on, and only the real model is listed.
#[test]
fn hostile_model_files_are_refused_while_others_are_served() {
    use starling::model::gguf::GgufValue;
    use starling::model::gguf_writer::{TinyModelSpec, tiny_model, tiny_model_writer};
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hostile-files");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let llama = TinyModelSpec::family("llama");
    let with = |key: &str, value: GgufValue| {
        let mut w = tiny_model_writer(&llama);
        w.metadata(key, value);
        w.to_bytes()
    };
    let whole = tiny_model(&llama);
    let mut gemma = TinyModelSpec::family("gemma3");
    gemma.sliding_window = Some((gemma.n_ctx as u32 * 4, 2));
    let files: Vec<(&str, Vec<u8>, &str)> = vec![
        ("duplicate-key", with("llama.block_count", GgufValue::U32(2)), "llama.block_count"),
        ("vocab-mismatch", with("llama.vocab_size", GgufValue::U32(5)), "vocab_size"),
        ("truncated", whole[..whole.len() / 2].to_vec(), ""),
        ("garbage", b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\x7f".to_vec(), ""),
        ("window-past-context", tiny_model(&gemma), "sliding_window"),
    ];
    let server = TestServer::start(|c| {
        c.auth.admin_key = Some("admin-secret".into());
        c.registry.model_dirs = vec![dir.clone()];
        c.registry.cache_dir = dir.join("cache");
    });
    let addr = server.addr;
    let mut sse = steady_stream(addr, 200);
    for (name, bytes, named) in &files {
        let file = dir.join(format!("{name}.gguf"));
        std::fs::write(&file, bytes).unwrap();
        let body = serde_json::json!({"id": name, "source": file, "threads": 1, "kv_cache_max_bytes": 8 << 20});
        let r = crate::support::request(
            addr,
            "POST",
            "/admin/models",
            &[("Authorization", "Bearer admin-secret"), ("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert!((400..500).contains(&r.status), "{name}: {} {}", r.status, r.text());
        let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(named), "{name}: the error names `{named}`: {message}");
        assert_eq!(sse.next_event().expect("the steady stream goes on").event.as_deref(), Some("token"), "{name}");
    }
    let listed = crate::support::get_as(addr, None, "/v1/models").json();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
}

/// Tokenizing and detokenizing cost CPU, so they count against the request rate limit.
#[test]
fn tokenize_and_detokenize_count_against_the_rate_limit() {
    let server = TestServer::start(|c| {
        c.auth.api_keys = starling::config::parse_api_keys("k-rate:rated").unwrap();
        let mut t = starling::config::TenantConfig::with_defaults("rated".into());
        t.requests_per_minute = Some(2);
        c.tenants.push(t);
    });
    let call = |path: &str, body: serde_json::Value| crate::support::post_json_as(server.addr, "k-rate", path, &body);
    assert_eq!(call("/v1/tokenize", serde_json::json!({"text": "hello"})).status, 200);
    assert_eq!(call("/v1/detokenize", serde_json::json!({"tokens": [1, 2]})).status, 200);
    let r = call("/v1/tokenize", serde_json::json!({"text": "hello"}));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (429, Some("rate_limit_exceeded")), "{}", r.text());
}
