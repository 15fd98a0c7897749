//! The browser playground, driven in headless Chromium through WebDriver (Debian's
//! `chromium` and `chromium-driver`, which `scripts/test-deps.sh` installs): chat with
//! streamed replies, stop, reproducible seeded replies, the token view, model output shown
//! as text, the server panel under load, a trace download, and the page with auth on. The
//! page reaches no host but the server. Screenshots go to target/tmp/screenshots/ (and to
//! docs/screenshots/, which README shows, with STARLING_UPDATE_SCREENSHOTS=1).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{TestServer, post_json, request};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const ENTER: &str = "\u{E007}";
const ESCAPE: &str = "\u{E00C}";

/// A chromedriver child and one browser session; both end on drop.
struct Browser {
    child: Child,
    driver: SocketAddr,
    session: String,
    _profile: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request(self.driver, "DELETE", &format!("/session/{}", self.session), &[], b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width`×`height`.
    fn start(width: u32, height: u32) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (scripts/test-deps.sh installs chromium-driver)");
        let driver: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(driver).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = std::env::temp_dir().join(format!("starling-chromium-{port}"));
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-default-apps",
                     format!("--user-data-dir={}", profile.display()), format!("--window-size={width},{height}")]}}}});
        let r =
            request(driver, "POST", "/session", &[("Content-Type", "application/json")], caps.to_string().as_bytes());
        assert_eq!(r.status, 200, "new session: {}", r.text());
        let session = r.json()["value"]["sessionId"].as_str().unwrap().to_owned();
        Browser { child, driver, session, _profile: tempdir::Dir(profile) }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = if method == "GET" { String::new() } else { body.to_string() };
        let r = request(self.driver, method, &path, &[("Content-Type", "application/json")], body.as_bytes());
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        r.json()["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({"url": url}));
    }

    /// Runs `script` (a function body; `arguments` available) in the page.
    fn js(&self, script: &str, args: Value) -> Value {
        self.call("POST", "/execute/sync", json!({"script": script, "args": args}))
    }

    fn find(&self, css: &str) -> String {
        let v = self.call("POST", "/element", json!({"using": "css selector", "value": css}));
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/click"), json!({}));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/value"), json!({"text": text}));
    }

    /// Replaces an input's value (clear, then type).
    fn set(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/clear"), json!({}));
        if !text.is_empty() {
            self.call("POST", &format!("/element/{id}/value"), json!({"text": text}));
        }
    }

    /// Polls `expr` (a JS expression) until it is truthy; returns its value.
    fn wait_for(&self, expr: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.js(&format!("return {expr};"), json!([]));
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            if Instant::now() > deadline {
                let page = self.js("return document.querySelector('main').innerText;", json!([]));
                panic!("timed out waiting for {expr}; the page shows:\n{}", page.as_str().unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(40));
        }
    }

    fn screenshot(&self, name: &str) {
        let b64 = self.call("GET", "/screenshot", json!({}));
        let png = base64_decode(b64.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        // Every run writes them under target/; with STARLING_UPDATE_SCREENSHOTS=1 they replace
        // the copies README shows (docs/screenshots/).
        let dir = if std::env::var("STARLING_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots")
        } else {
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }

    /// Every resource the page fetched (page, scripts, API calls), by URL.
    fn fetched(&self) -> Vec<String> {
        let v = self.js("return performance.getEntriesByType('resource').map(e => e.name);", json!([]));
        let mut urls: Vec<String> = v.as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()).collect();
        urls.push(self.js("return location.href;", json!([])).as_str().unwrap().to_owned());
        urls
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    bytes
        .chunks(4)
        .flat_map(|q| {
            let n = q.iter().enumerate().fold(0u32, |n, (i, &v)| n | (v as u32) << (18 - 6 * i));
            let out = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.into_iter().take(q.len() - 1)
        })
        .collect()
}

const LAST_REPLY: &str = "[...document.querySelectorAll('.msg.assistant')].pop()";

/// Types `text` and sends it with Enter; waits for the reply to finish; returns its text.
fn chat_turn(b: &Browser, text: &str) -> String {
    let before = b.js("return document.querySelectorAll('.msg.assistant').length;", json!([])).as_u64().unwrap();
    b.type_into("#input", &format!("{text}{ENTER}"));
    b.wait_for(
        &format!("document.querySelectorAll('.msg.assistant').length > {before} && {LAST_REPLY}.dataset.finish"),
        Duration::from_secs(60),
    );
    b.js(&format!("return {LAST_REPLY}.querySelector('.body').textContent;"), json!([])).as_str().unwrap().to_owned()
}

/// Chat: streamed text arrives piece by piece; Esc stops a long reply (what was generated
/// stays); a seeded reply at temperature 1.0 regenerates identically with its seed shown;
/// the token view colours each token with its alternatives; a reply holding `<script>` and
/// HTML shows as text and runs nothing; the page fetched nothing from another host; on a
/// phone-width window nothing overflows.
#[test]
fn the_playground_chats_in_a_real_browser() {
    let server = TestServer::start(|_| {});
    let origin = format!("http://{}", server.addr);
    let b = Browser::start(1100, 760);
    b.goto(&format!("{origin}/"));
    b.wait_for(
        "document.body.dataset.ready === '1' && document.querySelector('#model').value",
        Duration::from_secs(20),
    );
    assert_eq!(b.js("return document.querySelector('#model').value;", json!([])), "smollm2-135m");

    // Streaming: the reply's text is seen growing before it finishes.
    b.set("#k-max_tokens", "48");
    b.set("#k-temperature", "0");
    b.type_into("#input", &format!("Write three sentences about the sea.{ENTER}"));
    let mut lengths = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = b.js(
            &format!("const m = {LAST_REPLY}; return m ? [m.querySelector('.body').textContent.length, m.dataset.finish || ''] : [0, ''];"),
            json!([]),
        );
        if v[1] != "" {
            break;
        }
        lengths.insert(v[0].as_u64().unwrap());
        assert!(Instant::now() < deadline, "the reply did not finish");
        std::thread::sleep(Duration::from_millis(15));
    }
    lengths.remove(&0);
    assert!(lengths.len() >= 2, "text arrived in pieces: lengths seen while streaming {lengths:?}");
    let meta = b.js(&format!("return {LAST_REPLY}.querySelector('.meta').textContent;"), json!([]));
    assert!(meta.as_str().unwrap().contains("TTFT") && meta.as_str().unwrap().contains("tok/s"), "{meta}");

    // Stop: Esc cancels; the stream ends `cancelled` with the text generated so far.
    b.set("#k-max_tokens", "1000");
    b.set("#k-temperature", "0.8");
    b.type_into("#input", &format!("Tell me a very long story about a dragon.{ENTER}"));
    b.wait_for(
        &format!("{LAST_REPLY} && {LAST_REPLY}.querySelector('.body').textContent.length > 30"),
        Duration::from_secs(30),
    );
    let stopped = Instant::now();
    b.type_into("#input", ESCAPE);
    b.wait_for(&format!("{LAST_REPLY}.dataset.finish"), Duration::from_secs(10));
    assert!(stopped.elapsed() < Duration::from_secs(3), "stopped within {:?}", stopped.elapsed());
    assert_eq!(b.js(&format!("return {LAST_REPLY}.dataset.finish;"), json!([])), "cancelled");
    let kept = b.js(&format!("return {LAST_REPLY}.querySelector('.body').textContent;"), json!([]));
    assert!(kept.as_str().unwrap().len() > 30, "the generated text stays: {kept}");

    // Shift+Enter is a new line, not a send.
    let replies = b.js("return document.querySelectorAll('.msg.assistant').length;", json!([]));
    b.type_into("#input", "line one\u{E008}\u{E007}\u{E000}line two");
    assert_eq!(b.js("return document.querySelector('#input').value;", json!([])), "line one\nline two");
    assert_eq!(b.js("return document.querySelectorAll('.msg.assistant').length;", json!([])), replies);
    b.set("#input", "");

    // A conversation is one server session: the second turn reuses the first's cache.
    b.click("#new-chat");
    b.js("document.querySelector('#system').value = 'You answer in one short sentence.';", json!([]));
    b.set("#k-max_tokens", "16");
    chat_turn(&b, "What is the capital of France?");
    chat_turn(&b, "And of Italy?");
    let cached = b.js(&format!("return {LAST_REPLY}.querySelector('.meta .cached').textContent;"), json!([]));
    let n: u64 = cached.as_str().unwrap().trim_start_matches("cached tokens: ").parse().unwrap();
    assert!(n > 20, "the second turn reused the session's cache: {cached}");
    b.js("document.querySelector('#system').value = '';", json!([]));

    // Reproducible: temperature 1.0 and a seed; regenerate gives the same reply and seed.
    b.click("#new-chat");
    b.set("#k-max_tokens", "40");
    b.set("#k-temperature", "1.0");
    b.set("#k-seed", "42");
    let first = chat_turn(&b, "Give me a fun fact.");
    b.click("#regenerate");
    b.wait_for(&format!("{LAST_REPLY}.dataset.finish"), Duration::from_secs(60));
    let again = b.js(&format!("return {LAST_REPLY}.querySelector('.body').textContent;"), json!([]));
    assert_eq!(again.as_str().unwrap(), first, "the seeded reply reproduces");
    let meta = b.js(&format!("return {LAST_REPLY}.querySelector('.meta .seed').textContent;"), json!([]));
    assert_eq!(meta, "seed: 42");
    b.set("#k-seed", "43");
    b.click("#regenerate");
    b.wait_for(&format!("{LAST_REPLY}.dataset.finish"), Duration::from_secs(60));
    let other = b.js(&format!("return {LAST_REPLY}.querySelector('.body').textContent;"), json!([]));
    assert_ne!(other.as_str().unwrap(), first, "another seed, another reply");

    // The token view: one coloured span per token, alternatives in its title.
    b.js(&format!("{LAST_REPLY}.querySelector('.show-tokens').click();"), json!([]));
    let n = b.wait_for(&format!("{LAST_REPLY}.querySelectorAll('.tokens .tok').length"), Duration::from_secs(5));
    assert!(n.as_u64().unwrap() > 5, "{n}");
    let title = b.js(&format!("return {LAST_REPLY}.querySelector('.tokens .tok').title;"), json!([]));
    assert!(title.as_str().unwrap().starts_with("p = ") && title.as_str().unwrap().contains('%'), "{title}");
    b.screenshot("chat.png");

    // Model output with markup is text: a JSON schema forces `<script>` and an <img onerror>.
    let hostile = "<script>window.pwned=1</script><img src=x onerror='window.pwned=2'><b>bold</b>";
    b.js("document.querySelector('#k-schema').value = arguments[0];", json!([json!({"const": hostile}).to_string()]));
    let shown = chat_turn(&b, "Say something.");
    assert!(shown.contains("<script>window.pwned=1</script>") && shown.contains("<img"), "{shown}");
    assert_eq!(b.js("return typeof window.pwned;", json!([])), "undefined", "nothing ran");
    assert_eq!(
        b.js("return document.querySelectorAll('#messages img, #messages script, #messages b').length;", json!([])),
        0
    );
    b.js("document.querySelector('#k-schema').value = '';", json!([]));

    // The tokenizer view: pieces and ids as the server tokenizes them.
    b.click("button[data-tab=tokenizer]");
    b.set("#tok-text", "Hello, wörld!");
    b.click("#tok-go");
    let shown = b.wait_for("document.querySelectorAll('#tok-pieces .piece').length", Duration::from_secs(10));
    let want = post_json(server.addr, "/v1/tokenize", &json!({"text": "Hello, wörld!"})).json();
    assert_eq!(shown, want["count"], "one piece per token");
    let first = b.js("return document.querySelector('#tok-pieces .piece small').textContent;", json!([]));
    assert_eq!(first.as_str().unwrap(), want["ids"][0].to_string());
    b.click("button[data-tab=chat]");

    // Only the server was contacted.
    let fetched = b.fetched();
    assert!(fetched.len() >= 5, "{fetched:?}");
    assert!(fetched.iter().all(|u| u.starts_with(&origin)), "a request left the server: {fetched:?}");

    // Phone width: nothing wider than the window.
    b.call("POST", "/window/rect", json!({"width": 390, "height": 844}));
    let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth;", json!([]));
    assert!(overflow.as_i64().unwrap() <= 0, "the page overflows a phone-width window by {overflow} px");
}

/// The server panel: its figures follow load from other clients; an admin captures a tick
/// trace and gets a download link.
#[test]
fn the_server_panel_follows_load_and_captures_a_trace() {
    // A `starling serve` child: trace capture needs the process's tracing subscriber.
    let yaml = crate::observability::config_yaml("auth:\n  admin_key: adm-key\n", "");
    let server = crate::observability::ChildServer::start("webui", &yaml, &[]);
    let b = Browser::start(1100, 760);
    b.goto(&format!("http://{}/", server.addr));
    b.wait_for("document.body.dataset.ready === '1'", Duration::from_secs(20));
    b.click("button[data-tab=server]");
    b.wait_for("document.querySelector('#models-table tbody tr')", Duration::from_secs(10));
    // Idle first: the panel's first reading shows no tokens per second.
    let idle = b.wait_for(
        "document.querySelector('#m-tps').textContent !== '–' && document.querySelector('#m-tps').textContent",
        Duration::from_secs(10),
    );
    assert_eq!(idle, "0.0", "an idle server generates nothing");
    let addr = server.addr;
    let load = std::thread::spawn(move || {
        let body = json!({"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 120,
                          "ignore_eos": true, "temperature": 0});
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let body = body.clone();
                std::thread::spawn(move || {
                    for _ in 0..3 {
                        assert_eq!(post_json(addr, "/v1/chat/completions", &body).status, 200);
                    }
                })
            })
            .collect();
        workers.into_iter().for_each(|w| w.join().unwrap());
    });
    let busy = b.wait_for(
        "Number(document.querySelector('#m-tps').textContent) > 0 && Number(document.querySelector('#m-running').textContent) > 0 && document.querySelector('#m-tps').textContent",
        Duration::from_secs(60),
    );
    assert!(busy.as_str().unwrap().parse::<f64>().unwrap() > 0.0, "tokens/s rose under load: {busy}");
    // A few seconds of history in the charts before the picture.
    std::thread::sleep(Duration::from_secs(3));
    b.screenshot("server.png");
    load.join().unwrap();
    let hits = b.wait_for(
        "document.querySelector('#m-hits').textContent.includes('%') && document.querySelector('#m-hits').textContent",
        Duration::from_secs(10),
    );
    assert!(hits.as_str().unwrap().contains(" of "), "prefix-cache hit rate shown: {hits}");

    b.set("#admin-key", "adm-key");
    b.set("#trace-seconds", "1");
    b.click("#trace-go");
    let status = b.wait_for(
        "!document.querySelector('#trace-link').hidden && document.querySelector('#trace-status').textContent",
        Duration::from_secs(20),
    );
    assert!(status.as_str().unwrap().contains("KiB captured"), "{status}");
    let href = b.js("return document.querySelector('#trace-link').href;", json!([]));
    assert!(href.as_str().unwrap().starts_with("blob:"), "{href}");
}

/// With API keys on, the page asks for a key, keeps it in the browser, and chats with it.
#[test]
fn the_playground_asks_for_a_key_when_the_server_needs_one() {
    let server = TestServer::start(|c| c.auth.api_keys = starling::config::parse_api_keys("ui-key:ui").unwrap());
    assert_eq!(request(server.addr, "GET", "/", &[], b"").status, 200, "the page itself needs no key");
    let b = Browser::start(1100, 760);
    b.goto(&format!("http://{}/", server.addr));
    b.wait_for("document.querySelector('#key-dialog').open", Duration::from_secs(20));
    b.type_into("#key-input", "ui-key");
    b.click("#key-save");
    b.wait_for(
        "document.body.dataset.ready === '1' && document.querySelector('#model').value",
        Duration::from_secs(20),
    );
    assert_eq!(b.js("return localStorage.getItem('starling.key');", json!([])), "ui-key");
    b.set("#k-max_tokens", "8");
    let reply = chat_turn(&b, "Hi");
    assert!(!reply.is_empty());
    assert_eq!(b.js(&format!("return {LAST_REPLY}.dataset.finish;"), json!([])), "length");
}

/// `server.ui: false` turns the page off; with it on, the files carry a policy that lets
/// them reach only this server.
#[test]
fn the_page_is_compiled_in_and_can_be_turned_off() {
    let on = TestServer::start(|_| {});
    let page = request(on.addr, "GET", "/", &[], b"");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.header("content-security-policy").unwrap().contains("connect-src 'self'"));
    assert!(page.text().contains("/ui/app.js"));
    for file in ["app.js", "app.css"] {
        assert_eq!(request(on.addr, "GET", &format!("/ui/{file}"), &[], b"").status, 200, "{file}");
    }
    assert_eq!(request(on.addr, "GET", "/ui/nope.js", &[], b"").status, 404);
    let total = starling::gateway::ui_page_bytes();
    assert!(total < 64 * 1024, "the page stays small: {total} bytes");
    let off = TestServer::start(|c| c.server.ui = false);
    assert_eq!(request(off.addr, "GET", "/", &[], b"").status, 404);
    assert_eq!(request(off.addr, "GET", "/ui/app.js", &[], b"").status, 404);
}
