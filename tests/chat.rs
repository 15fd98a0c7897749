//! `starling chat` as a user runs it: piped stdin against a live server (the session's
//! cache serves the second turn), slash commands as the server receives them (a scripted
//! stand-in server records each request), and a terminal session under `script` (a pty):
//! two turns, Ctrl-C stopping a reply while the program goes on.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{IO_TIMEOUT, TestServer};

fn starling() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_starling"));
    c.current_dir(env!("CARGO_MANIFEST_DIR")).env_remove("RUST_LOG").env_remove("STARLING_API_KEY");
    c
}

/// Runs `chat` with `args`, `input` on stdin; returns (success, stdout, stderr).
fn chat_piped(args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = starling()
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The numbers after `cached tokens: ` in `/stats` output, in order.
fn cached_tokens(stdout: &str) -> Vec<usize> {
    stdout.lines().filter_map(|l| l.strip_prefix("cached tokens: ")?.trim().parse().ok()).collect()
}

#[test]
fn piped_turns_share_a_session_so_the_second_is_served_from_cache() {
    let server = TestServer::start(|_| {});
    let url = format!("http://{}", server.addr);
    let input = "Hi there\n/stats\nWhat is 2+2?\n/stats\n";
    let (ok, stdout, stderr) = chat_piped(&["--url", &url, "--temperature", "0", "--max-tokens", "8"], input);
    assert!(ok, "chat failed: {stderr}");
    assert_eq!(cached_tokens(&stdout).len(), 2, "{stdout}");
    let cached = cached_tokens(&stdout);
    assert_eq!(cached[0], 0, "a new session has nothing cached: {stdout}");
    assert!(cached[1] > 0, "the second turn must reuse the first's cache: {stdout}");
    let prompts: Vec<usize> =
        stdout.lines().filter_map(|l| l.strip_prefix("prompt tokens: ")?.trim().parse().ok()).collect();
    assert!(prompts[1] > prompts[0], "the second turn carries the first: {stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("tokens/s: ")), "{stdout}");
    let sessions = server.state.models.snapshot().ready[0].engine.status.sessions.load(Ordering::Relaxed);
    assert_eq!(sessions, 1, "the conversation holds one session on the server");

    // `/reset` closes the conversation's session on the server: one session is left, not two.
    let (ok, _, stderr) =
        chat_piped(&["--url", &url, "--temperature", "0", "--max-tokens", "4"], "Hi there\n/reset\nAgain\n");
    assert!(ok && !stderr.contains("warning"), "{stderr}");
    let sessions = server.state.models.snapshot().ready[0].engine.status.sessions.load(Ordering::Relaxed);
    assert_eq!(sessions, 2, "the first chat's session and the second chat's last one");
}

/// In this process, `/reset` closes the session in the local engine: after two
/// conversations it holds one session (`/stats` says so).
#[test]
fn a_local_reset_closes_its_session() {
    let model = crate::model::model_path();
    let args = [model.to_str().unwrap(), "--temperature", "0", "--max-tokens", "2"];
    let (ok, stdout, stderr) = chat_piped(&args, "Hi\n/reset\nHi\n/stats\n");
    assert!(ok, "chat failed: {stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    assert!(stdout.lines().any(|l| l == "sessions held: 1"), "{stdout}");
}

/// What the stand-in server does with one request.
#[derive(Clone)]
enum Reply {
    /// Streams this text as one chunk and finishes.
    Text(&'static str),
    /// Streams this text, then waits for the client to hang up.
    Hang(&'static str),
    /// Streams this text as one chunk sent in two writes, cut at this byte (inside a
    /// character), and finishes.
    Split(&'static str, usize),
}

/// A scripted `/v1/chat/completions` on 127.0.0.1: records each request body and answers
/// the replies in order; `hangups` counts clients that left a `Hang` reply. Session closes
/// (`/v1/session/close`) are answered 200 and recorded in `closed` (the session ids).
struct FakeServer {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    hangups: Arc<Mutex<usize>>,
    closed: Arc<Mutex<Vec<Value>>>,
}

impl FakeServer {
    fn start(replies: Vec<Reply>) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(vec![]));
        let hangups = Arc::new(Mutex::new(0));
        let closed = Arc::new(Mutex::new(vec![]));
        let (b, h, c) = (bodies.clone(), hangups.clone(), closed.clone());
        std::thread::spawn(move || {
            let mut replies = replies.into_iter();
            loop {
                let Ok((stream, _)) = listener.accept() else { return };
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let (path, body) = read_request(&stream);
                let mut w = &stream;
                if path == "/v1/session/close" {
                    let answer = serde_json::json!({"closed": body["session_id"]}).to_string();
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close";
                    let _ = write!(w, "{head}\r\ncontent-length: {}\r\n\r\n{answer}", answer.len());
                    c.lock().unwrap().push(body["session_id"].clone());
                    continue;
                }
                let Some(reply) = replies.next() else { continue };
                b.lock().unwrap().push(body);
                let chunk = |text: &str| {
                    let v = serde_json::json!({"choices": [{"index": 0, "delta": {"content": text}}]});
                    format!("data: {v}\n\n")
                };
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                match reply {
                    Reply::Text(text) => {
                        let usage = r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":0}}}"#;
                        let _ = write!(w, "{head}{}data: {usage}\n\ndata: [DONE]\n\n", chunk(text));
                    }
                    Reply::Split(text, at) => {
                        let usage = r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":0}}}"#;
                        let all = format!("{head}{}data: {usage}\n\ndata: [DONE]\n\n", chunk(text));
                        let cut = all.find(text).unwrap() + at;
                        let _ = w.write_all(&all.as_bytes()[..cut]).and_then(|()| w.flush());
                        std::thread::sleep(Duration::from_millis(100));
                        let _ = w.write_all(&all.as_bytes()[cut..]);
                    }
                    Reply::Hang(text) => {
                        let _ = write!(w, "{head}{}", chunk(text));
                        let _ = w.flush();
                        let mut rest = vec![];
                        // Returns at the client's hang-up (EOF or reset).
                        let _ = (&stream).read_to_end(&mut rest);
                        *h.lock().unwrap() += 1;
                    }
                }
            }
        });
        FakeServer { url, bodies, hangups, closed }
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// Reads one request's path and its `content-length` body as JSON.
fn read_request(stream: &TcpStream) -> (String, Value) {
    let mut r = BufReader::new(stream);
    let mut length = 0;
    let mut request_line = String::new();
    r.read_line(&mut request_line).unwrap();
    let path = request_line.split(' ').nth(1).unwrap_or_default().to_owned();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body).unwrap();
    (path, serde_json::from_slice(&body).unwrap())
}

/// The (role, content) pairs of a request's `messages`.
fn messages(body: &Value) -> Vec<(String, String)> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_owned(), m["content"].as_str().unwrap().to_owned()))
        .collect()
}

fn pair(role: &str, content: &str) -> (String, String) {
    (role.to_owned(), content.to_owned())
}

#[test]
fn slash_commands_change_what_the_next_request_sends() {
    let server = FakeServer::start(vec![Reply::Text("R0"), Reply::Text("R1"), Reply::Text("R2"), Reply::Text("R3")]);
    let input = "First\n/temperature 0.5\n/top_p 0.25\n/seed 42\n/max_tokens 7\nSecond\n\
                 /system Be brief.\nThird\n/reset\nFourth\n/seed x\n/bogus\n/help\n";
    let (ok, stdout, stderr) = chat_piped(&["--url", &server.url], input);
    assert!(ok, "chat failed: {stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with('R')).collect::<Vec<_>>(), ["R0", "R1", "R2", "R3"]);
    assert!(stderr.contains("`x` is not an integer") && stderr.contains("unknown command /bogus"), "{stderr}");
    assert!(stdout.contains("/max_tokens N"), "/help lists the commands: {stdout}");

    let b = server.bodies();
    assert_eq!(b.len(), 4);
    for field in ["temperature", "top_p", "seed", "max_tokens"] {
        assert!(b[0].get(field).is_none(), "nothing set yet, yet {field} was sent: {}", b[0]);
    }
    assert_eq!(messages(&b[0]), [pair("user", "First")]);
    assert_eq!(b[0]["stream"], true);

    assert_eq!(b[1]["temperature"], 0.5);
    assert_eq!(b[1]["top_p"], 0.25);
    assert_eq!(b[1]["seed"], 42);
    assert_eq!(b[1]["max_tokens"], 7);
    assert_eq!(messages(&b[1]), [pair("user", "First"), pair("assistant", "R0"), pair("user", "Second")]);
    assert_eq!(b[1]["session_id"], b[0]["session_id"], "one conversation, one session");

    // `/system` starts over with the system message first, in a new session.
    assert_eq!(messages(&b[2]), [pair("system", "Be brief."), pair("user", "Third")]);
    assert_ne!(b[2]["session_id"], b[1]["session_id"]);
    // `/reset` forgets the turns but keeps the system message and the settings.
    assert_eq!(messages(&b[3]), [pair("system", "Be brief."), pair("user", "Fourth")]);
    assert_ne!(b[3]["session_id"], b[2]["session_id"]);
    assert_eq!(b[3]["seed"], 42, "a bad /seed changes nothing");
    // Each used session was closed when `/system` and `/reset` left it; the last one is
    // left to the server (the chat ended, it did not reset).
    assert_eq!(*server.closed.lock().unwrap(), [b[1]["session_id"].clone(), b[2]["session_id"].clone()]);
}

/// Output of a child read on a thread, so the test can wait for text with a deadline.
struct Output(Arc<Mutex<String>>);

impl Output {
    fn collect(mut from: impl Read + Send + 'static) -> Output {
        let text = Arc::new(Mutex::new(String::new()));
        let t = text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Output(text)
    }

    /// Waits until `needle` appears at or after byte `from`; returns where it ends.
    fn wait_for(&self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            {
                let text = self.0.lock().unwrap();
                if let Some(i) = text.get(from..).and_then(|t| t.find(needle)) {
                    return from + i + needle.len();
                }
                assert!(Instant::now() < deadline, "`{needle}` never appeared after byte {from}: {text:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `starling chat --url URL ARGS` in a pseudo-terminal (`script`): the child, its input and
/// what the terminal shows.
fn chat_in_terminal(url: &str, args: &[&str]) -> (std::process::Child, std::process::ChildStdin, Output) {
    // `exec`: `script` runs `$SHELL -c`, and a shell that forks (dash) would take the
    // terminal's SIGINT itself and die with 130.
    let command = format!("exec {} chat --url {url} {}", env!("CARGO_BIN_EXE_starling"), args.join(" "));
    let mut child = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TERM", "xterm")
        .env("SHELL", "/bin/sh")
        .env_remove("STARLING_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let out = Output::collect(child.stdout.take().unwrap());
    (child, stdin, out)
}

/// Under a pty (`script`), with the line editor: a reply that would never end is stopped by
/// Ctrl-C (the server sees the client leave), the prompt comes back, the next turn carries
/// what was said, and `/exit` leaves cleanly.
#[test]
fn ctrl_c_in_a_terminal_stops_the_reply_not_the_program() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    }
    let server = FakeServer::start(vec![Reply::Hang("Once upon a time"), Reply::Text("Fine.")]);
    let (mut child, mut stdin, out) = chat_in_terminal(&server.url, &[]);
    let at = out.wait_for("you> ", 0);
    stdin.write_all(b"tell me a story\r").unwrap();
    let at = out.wait_for("Once upon a time", at);
    stdin.write_all(b"\x03").unwrap();
    let at = out.wait_for("[cancelled]", at);
    let at = out.wait_for("you> ", at);
    let deadline = Instant::now() + IO_TIMEOUT;
    while *server.hangups.lock().unwrap() == 0 {
        assert!(Instant::now() < deadline, "the server never saw the client leave");
        std::thread::sleep(Duration::from_millis(20));
    }
    stdin.write_all(b"and then?\r").unwrap();
    let at = out.wait_for("Fine.", at);
    out.wait_for("you> ", at);
    stdin.write_all(b"/exit\r").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "chat exited with {status}");
    let b = server.bodies();
    assert_eq!(
        messages(&b[1]),
        [pair("user", "tell me a story"), pair("assistant", "Once upon a time"), pair("user", "and then?")]
    );
}

/// Under a pty against a real server: two turns answered, and the second one's `/stats`
/// reports tokens served from the session's cache.
#[test]
fn a_terminal_chat_answers_two_turns_and_the_second_is_cached() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    }
    let server = TestServer::start(|_| {});
    let url = format!("http://{}", server.addr);
    let (mut child, mut stdin, out) = chat_in_terminal(&url, &["--temperature", "0", "--max-tokens", "6"]);
    let mut at = out.wait_for("you> ", 0);
    for turn in ["What is the capital of France?\r", "And of Italy?\r"] {
        stdin.write_all(turn.as_bytes()).unwrap();
        at = out.wait_for("you> ", at);
        stdin.write_all(b"/stats\r").unwrap();
        at = out.wait_for("time to first token", at);
        at = out.wait_for("you> ", at);
    }
    stdin.write_all(b"/exit\r").unwrap();
    assert!(child.wait().unwrap().success());
    let shown = out.0.lock().unwrap().replace('\r', "");
    let cached = cached_tokens(&shown);
    assert_eq!(cached.len(), 2, "{shown}");
    assert_eq!(cached[0], 0, "{shown}");
    assert!(cached[1] > 0, "the second turn reused the session's cache: {shown}");
}

/// A character the network splits across two frames reaches the terminal whole.
#[test]
fn a_character_split_across_frames_arrives_whole() {
    let text = "h\u{e9}llo \u{1f426}";
    let server = FakeServer::start(vec![Reply::Split(text, 2), Reply::Split(text, 9)]);
    let (ok, stdout, stderr) = chat_piped(&["--url", &server.url], "one\ntwo\n");
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().filter(|l| *l == text).count(), 2, "{stdout:?}");
    assert!(!stdout.contains('\u{fffd}'), "{stdout:?}");
}
