//! Reusable helpers for tests that talk HTTP to an in-process server: start a server on
//! 127.0.0.1:0 with a config tweak, send JSON, and read an SSE stream incrementally over a
//! plain blocking `TcpStream` (HTTP/1.1, chunked bodies decoded by hand).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use serde_json::Value;
use starling::config::{Config, Format};
use starling::engine::load::start_model_observed;
use starling::gateway::{AppState, serve};
use starling::telemetry::Observability;
use tokio::sync::oneshot;

/// Every socket read gives up after this long, so a hung server fails the test instead of
/// hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A server running on its own tokio runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    stopped: std::sync::Mutex<std_mpsc::Receiver<()>>,
    _runtime: tokio::runtime::Runtime,
}

/// The `starling` binary cargo built for these tests: chat templates render in its
/// `template-worker` processes, as under `starling serve`.
pub fn starling_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_starling"))
}

/// The test config: the real model, 2 threads, a 64 MiB KV arena, then `tweak`.
pub fn test_config(tweak: impl FnOnce(&mut Config)) -> Config {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = Config::from_str("{}", Format::Json).expect("the default config is valid");
    let m = &mut config.models[0];
    m.path = crate::model::model_path();
    m.pipeline = root.join("pipelines/default.yaml");
    m.threads = 2.try_into().unwrap();
    m.kv_cache.max_bytes = 64 << 20;
    tweak(&mut config);
    config
}

impl TestServer {
    /// Loads the model with `tweak` applied to the test config and serves it on a free port.
    pub fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let config = test_config(tweak);
        let obs = Arc::new(Observability::new().expect("metrics registry"));
        let model = start_model_observed(&config, 0, &obs).expect("the model starts");
        TestServer::serve_state(Arc::new(
            AppState::new(Arc::new(config), vec![model], obs).with_template_worker(starling_binary()),
        ))
    }

    /// Serves every model of `config`.
    pub fn start_all(config: Config) -> TestServer {
        let obs = Arc::new(Observability::new().expect("metrics registry"));
        let models = (0..config.models.len())
            .map(|i| start_model_observed(&config, i, &obs).expect("the model starts"))
            .collect();
        TestServer::serve_state(Arc::new(
            AppState::new(Arc::new(config), models, obs).with_template_worker(starling_binary()),
        ))
    }

    /// Starts graceful shutdown (like SIGTERM) without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits until `serve` has returned.
    pub fn wait_stopped(&self, within: Duration) -> bool {
        self.stopped.lock().unwrap().recv_timeout(within).is_ok()
    }

    pub fn kv_blocks_used(&self) -> usize {
        self.state.models.snapshot().ready[0].engine.status.kv_blocks_used.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A finished HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An open response whose body is read a chunk at a time.
pub struct Conn {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
    length: Option<usize>,
    finished: bool,
}

/// Sends one request (with `Connection: close`) and reads the status line and headers.
pub fn open(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Conn {
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += &format!("Content-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut reader = BufReader::new(stream);
    let status_line = read_line(&mut reader);
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let mut headers = vec![];
    loop {
        let line = read_line(&mut reader);
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').expect("a header line");
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let length = get("content-length").and_then(|v| v.parse().ok());
    Conn { reader, status, headers, chunked, length, finished: false }
}

fn read_line(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("reads a line");
    line.trim_end_matches(['\r', '\n']).to_owned()
}

impl Conn {
    /// The next piece of the body as the server wrote it (one HTTP chunk), `None` at the end.
    pub fn next_chunk(&mut self) -> Option<Vec<u8>> {
        if self.finished {
            return None;
        }
        if !self.chunked {
            self.finished = true;
            let mut body = vec![];
            match self.length {
                Some(n) => {
                    body.resize(n, 0);
                    self.reader.read_exact(&mut body).unwrap();
                }
                None => {
                    self.reader.read_to_end(&mut body).unwrap();
                }
            }
            return Some(body);
        }
        let size_line = read_line(&mut self.reader);
        let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16).expect("a chunk size");
        let mut data = vec![0; size];
        self.reader.read_exact(&mut data).unwrap();
        read_line(&mut self.reader);
        if size == 0 {
            self.finished = true;
            return None;
        }
        Some(data)
    }

    /// The rest of the body.
    pub fn finish(mut self) -> HttpResponse {
        let mut body = vec![];
        while let Some(c) = self.next_chunk() {
            body.extend(c);
        }
        HttpResponse { status: self.status, headers: self.headers, body }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// An SSE reader over the rest of the body.
    pub fn sse(self) -> SseReader {
        SseReader { conn: self, buf: String::new(), chunks: 0 }
    }
}

/// One SSE frame (`event:` name if any, joined `data:` lines) or a comment.
#[derive(Clone, Debug, PartialEq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    pub comment: bool,
    /// Which HTTP chunk completed this frame (0-based): shows frames arrived separately.
    pub chunk: usize,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {}", self.data))
    }
}

/// Reads SSE frames as they arrive.
pub struct SseReader {
    conn: Conn,
    buf: String,
    chunks: usize,
}

impl SseReader {
    /// The next frame, reading more of the body only when needed; `None` at the end.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                return Some(parse_frame(&frame, self.chunks.saturating_sub(1)));
            }
            let chunk = self.conn.next_chunk()?;
            self.chunks += 1;
            self.buf.push_str(&String::from_utf8(chunk).expect("SSE is UTF-8"));
        }
    }

    /// Every remaining frame.
    pub fn rest(&mut self) -> Vec<SseEvent> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

fn parse_frame(frame: &str, chunk: usize) -> SseEvent {
    let mut e = SseEvent { event: None, data: String::new(), comment: false, chunk };
    let mut data = vec![];
    for line in frame.lines() {
        if line.starts_with(':') {
            e.comment = true;
        } else if let Some(v) = line.strip_prefix("event:") {
            e.event = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    e.data = data.join("\n");
    e
}

/// Sends a request and reads the whole response.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    open(addr, method, path, headers, body).finish()
}

/// POSTs `body` as JSON and reads the whole response.
pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> HttpResponse {
    request(addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
}

/// POSTs `body` as JSON with `Authorization: Bearer <key>`.
pub fn post_json_as(addr: SocketAddr, key: &str, path: &str, body: &Value) -> HttpResponse {
    let auth = format!("Bearer {key}");
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json"), ("Authorization", &auth)],
        body.to_string().as_bytes(),
    )
}

/// POSTs `body` and returns the open stream (check `status` before reading events).
pub fn stream_json(addr: SocketAddr, path: &str, body: &Value) -> Conn {
    open(addr, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
}

impl TestServer {
    /// Serves `state` as it is (models may be empty, or loaded later) on a free port.
    pub fn serve_state(state: Arc<AppState>) -> TestServer {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (done_tx, stopped) = std_mpsc::channel();
        let served = state.clone();
        runtime.spawn(async move {
            serve(listener, served, async move { stop_rx.await.unwrap_or(()) }).await;
            let _ = done_tx.send(());
        });
        TestServer { addr, state, stop: Some(stop), stopped: std::sync::Mutex::new(stopped), _runtime: runtime }
    }

    /// A server on the test config (after `tweak`) with no model loaded yet.
    pub fn start_empty(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let config = test_config(tweak);
        let obs = Arc::new(Observability::new().expect("metrics registry"));
        TestServer::serve_state(Arc::new(
            AppState::new(Arc::new(config), Vec::new(), obs).with_template_worker(starling_binary()),
        ))
    }
}

/// GETs `path` with `Authorization: Bearer <key>` when a key is given.
pub fn get_as(addr: SocketAddr, key: Option<&str>, path: &str) -> HttpResponse {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    request(addr, "GET", path, &headers, b"")
}

/// The value of the Prometheus sample whose line starts with `series` (name and labels).
pub fn metric_value(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = request(addr, "GET", "/metrics", &[], b"").text();
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// One request the [`FileServer`] answered.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedRequest {
    pub path: String,
    pub if_none_match: Option<String>,
    pub status: u16,
    /// Body bytes written (0 for 304/404).
    pub body_bytes: usize,
}

/// A file the [`FileServer`] serves: its bytes, its ETag, and optionally the byte after
/// which the connection is dropped (a download interrupted mid-body).
#[derive(Clone, Debug)]
pub struct ServedFile {
    pub body: Vec<u8>,
    pub etag: String,
    pub cut_after: Option<usize>,
    /// The body goes out in this many pieces with this pause after each (a slow link).
    pub paced: Option<(usize, Duration)>,
}

/// A tiny HTTP/1.1 file server on 127.0.0.1 (std::net, one thread per connection) with
/// ETags, `If-None-Match` → 304, and a log of every request.
pub struct FileServer {
    pub addr: SocketAddr,
    files: Arc<std::sync::Mutex<std::collections::HashMap<String, ServedFile>>>,
    log: Arc<std::sync::Mutex<Vec<LoggedRequest>>>,
}

impl FileServer {
    pub fn start() -> FileServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let files = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (f, l) = (files.clone(), log.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let (f, l) = (f.clone(), l.clone());
                std::thread::spawn(move || serve_file(stream, &f, &l));
            }
        });
        FileServer { addr, files, log }
    }

    /// Serves `body` at `path` with ETag `"<etag>"`.
    pub fn put(&self, path: &str, body: Vec<u8>, etag: &str) {
        let file = ServedFile { body, etag: format!("\"{etag}\""), cut_after: None, paced: None };
        self.files.lock().unwrap().insert(path.to_owned(), file);
    }

    /// Serves `body` at `path` but drops the connection after `cut_after` body bytes.
    pub fn put_cut(&self, path: &str, body: Vec<u8>, cut_after: usize) {
        let file = ServedFile { body, etag: "\"cut\"".into(), cut_after: Some(cut_after), paced: None };
        self.files.lock().unwrap().insert(path.to_owned(), file);
    }

    /// Serves `body` at `path` in `pieces` pieces, pausing `pause` after each.
    pub fn put_paced(&self, path: &str, body: Vec<u8>, pieces: usize, pause: Duration) {
        let file = ServedFile { body, etag: "\"paced\"".into(), cut_after: None, paced: Some((pieces, pause)) };
        self.files.lock().unwrap().insert(path.to_owned(), file);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn log(&self) -> Vec<LoggedRequest> {
        self.log.lock().unwrap().clone()
    }
}

fn serve_file(
    stream: TcpStream,
    files: &std::sync::Mutex<std::collections::HashMap<String, ServedFile>>,
    log: &std::sync::Mutex<Vec<LoggedRequest>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let request_line = read_line(&mut reader);
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
    let mut if_none_match = None;
    loop {
        let line = read_line(&mut reader);
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("if-none-match")
        {
            if_none_match = Some(v.trim().to_owned());
        }
    }
    let file = files.lock().unwrap().get(&path).cloned();
    let paced = file.as_ref().and_then(|f| f.paced);
    let (status, response) = match file {
        None => (404, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()),
        Some(f) if if_none_match.as_deref() == Some(f.etag.as_str()) => {
            (304, format!("HTTP/1.1 304 Not Modified\r\nETag: {}\r\nConnection: close\r\n\r\n", f.etag).into_bytes())
        }
        Some(f) => {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {}\r\nConnection: close\r\n\r\n",
                f.body.len(),
                f.etag
            )
            .into_bytes();
            r.extend_from_slice(&f.body[..f.cut_after.unwrap_or(f.body.len()).min(f.body.len())]);
            (200, r)
        }
    };
    let body_bytes = if status == 200 {
        response.len() - response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() - 4
    } else {
        0
    };
    // Logged before answering, so a client that has its answer sees the entry.
    log.lock().unwrap().push(LoggedRequest { path, if_none_match, status, body_bytes });
    let mut out = stream;
    match paced.filter(|_| status == 200) {
        Some((pieces, pause)) => {
            let head = response.len() - body_bytes;
            let _ = out.write_all(&response[..head]);
            for piece in response[head..].chunks(body_bytes.div_ceil(pieces.max(1)).max(1)) {
                let _ = out.write_all(piece).and_then(|()| out.flush());
                std::thread::sleep(pause);
            }
        }
        None => {
            let _ = out.write_all(&response);
        }
    }
    let _ = out.flush();
    let _ = out.shutdown(std::net::Shutdown::Both);
}

/// Counts heap allocations made by every thread of this test binary (see
/// [`allocations_during`]).
pub struct CountingAlloc;

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is a side
// effect only.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract is passed through.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract is passed through.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract is passed through.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract is passed through.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Heap allocations (and reallocations) made by any thread while `f` runs. Other tests run
/// in parallel in this binary, so only a test alone in its process (see
/// [`run_alone_in_child`]) reads an exact figure.
pub fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(std::sync::atomic::Ordering::SeqCst);
    f();
    ALLOCATIONS.load(std::sync::atomic::Ordering::SeqCst) - before
}

/// Runs test `name` again in a child process of this binary, alone (`--exact`, one test
/// thread), and fails if it fails. Returns `true` in that child, where the caller does the
/// work; `false` in the parent once the child passed.
pub fn run_alone_in_child(name: &str) -> bool {
    const CHILD: &str = "STARLING_TEST_ALONE";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary path"))
        .args([name, "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .output()
        .expect("test binary runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed alone:\n{text}");
    assert!(text.contains("1 passed"), "{name} did not run alone:\n{text}");
    eprintln!("{}", text.lines().filter(|l| l.contains("allocations")).collect::<Vec<_>>().join("\n"));
    false
}
