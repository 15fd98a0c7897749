//! Chat templates come from model files, so they are untrusted code: every render runs in a
//! worker process (`starling template-worker`) under an address-space limit and a wall-clock
//! alarm per render. MiniJinja's fuel bounds what it charges; what it does not charge (lazy
//! list concatenation that it later materializes at once, native filters looping over huge
//! lazy lists) can then only kill the worker. The server sees the worker die, answers that
//! request 400 `template_limit`, and starts a fresh worker for the next render.
//!
//! Workers are long-lived and reused (one render at a time each, as many as the CPU pool has
//! threads), so a render costs a pipe round trip, not a process start. The protocol is
//! length-prefixed JSON frames: the worker says hello, then answers each job with its text or
//! its template error. A worker that loses its parent reads end-of-file and exits.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{ChatMessage, Specials, TemplateError, render_chat};
use crate::config::Config;
use crate::tokenizer::GgufTokenizer;

/// The subcommand that runs a worker (hidden from `--help`).
pub const WORKER_SUBCOMMAND: &str = "template-worker";
/// Bumped when frames change, so a stale binary is refused at hello, not misread.
const PROTOCOL: u32 = 1;
/// Largest frame either side accepts (a job carries at most one request body).
const MAX_FRAME: usize = 1 << 30;
/// How long a new worker has to say hello (a process start, normally a few ms).
const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// Time past the render limit for the worker's reply to arrive.
const REPLY_MARGIN: Duration = Duration::from_secs(2);
/// Renders a worker serves before it is replaced (bounds what any slow leak can grow to;
/// a start costs ~2.4 ms, so this is 2.4 µs per render).
const RENDERS_PER_WORKER: u32 = 1000;

/// What one render may use in its worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The worker's address space (`RLIMIT_AS`): past it an allocation fails and it dies.
    pub memory_bytes: u64,
    /// Wall-clock time for one render: past it `SIGALRM` ends the worker.
    pub timeout: Duration,
}

impl Limits {
    /// The limits `server:` sets (`template_memory_bytes`, `template_timeout_ms`).
    pub fn of(config: &Config) -> Limits {
        Limits { memory_bytes: config.server.template_memory_bytes, timeout: config.server.template_timeout }
    }
}

/// Everything a render needs, sent to a worker as one frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenderJob {
    /// The model's name, for errors.
    pub model: String,
    /// The model's `tokenizer.chat_template`, if it has one.
    pub template: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub bos_token: String,
    pub eos_token: String,
    /// The request's tool definitions (OpenAI `tools`), if any.
    pub tools: Option<serde_json::Value>,
}

impl RenderJob {
    /// `messages` for `tok`'s model (`model` names it in errors), with its BOS and EOS texts.
    pub fn new(model: &str, tok: &GgufTokenizer, messages: Vec<ChatMessage>) -> RenderJob {
        let piece = |id: Option<u32>| id.and_then(|id| tok.token_text(id).ok()).unwrap_or("").to_owned();
        RenderJob {
            model: model.to_owned(),
            template: tok.chat_template().map(str::to_owned),
            messages,
            bos_token: piece(tok.bos_id()),
            eos_token: piece(tok.eos_id()),
            tools: None,
        }
    }

    /// Renders in this process (what a worker does with each job).
    pub fn render_here(&self) -> Result<String, TemplateError> {
        let specials = Specials { bos_token: &self.bos_token, eos_token: &self.eos_token, tools: self.tools.as_ref() };
        render_chat(&self.model, self.template.as_deref(), &self.messages, &specials)
    }
}

/// A worker's frames.
#[derive(Serialize, Deserialize)]
enum Reply {
    Hello { protocol: u32 },
    Text(String),
    Failed(TemplateError),
}

/// The server's side: a pool of idle workers, started on demand.
pub struct TemplateSandbox {
    program: PathBuf,
    limits: Limits,
    idle: Mutex<Vec<Worker>>,
    max_idle: usize,
}

impl TemplateSandbox {
    /// Workers run `program` (a `starling` binary) and at most `max_idle` wait between renders.
    pub fn new(program: PathBuf, limits: Limits, max_idle: usize) -> TemplateSandbox {
        TemplateSandbox { program, limits, idle: Mutex::new(Vec::new()), max_idle }
    }

    /// Workers run this very binary (the server's and the CLI's case): `/proc/self/exe`,
    /// which still names the running file after an upgrade replaced it on disk, so workers
    /// started later speak the same protocol as the server.
    pub fn this_binary(limits: Limits, max_idle: usize) -> TemplateSandbox {
        let proc = PathBuf::from("/proc/self/exe");
        let program =
            if proc.exists() { proc } else { std::env::current_exe().unwrap_or_else(|_| PathBuf::from("starling")) };
        TemplateSandbox::new(program, limits, max_idle)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Renders `job` in a worker. Blocks: call it from a thread that may wait (the CPU pool).
    pub fn render(&self, job: &RenderJob) -> Result<String, TemplateError> {
        let frame =
            serde_json::to_vec(job).map_err(|e| TemplateError::Sandbox(format!("cannot encode the job: {e}")))?;
        if frame.len() > MAX_FRAME {
            return Err(TemplateError::TooCostly(format!("needs {} bytes of input, over {MAX_FRAME}", frame.len())));
        }
        let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut worker = match reused {
            // An idle worker may have been killed from outside since its last job: a job it
            // cannot even take goes to a fresh one.
            Some(mut w) => match w.send(&frame) {
                Ok(()) => w,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.start_with(&frame)?,
                Err(e) => return Err(w.died(&self.limits, Some(e))),
            },
            None => self.start_with(&frame)?,
        };
        // The worker's alarm ends a render at the time limit; the margin covers the reply.
        worker.stdout.get_mut().deadline = Some(Instant::now() + self.limits.timeout + REPLY_MARGIN);
        let reply = match read_frame::<Reply>(&mut worker.stdout) {
            Ok(Some(reply)) => reply,
            Ok(None) => return Err(worker.died(&self.limits, None)),
            Err(e) => return Err(worker.died(&self.limits, Some(e))),
        };
        let result = match reply {
            Reply::Text(text) => Ok(text),
            Reply::Failed(e) => Err(e),
            Reply::Hello { .. } => return Err(worker.died(&self.limits, Some(io::Error::other("a second hello")))),
        };
        worker.renders += 1;
        // A render stopped by its budget may have left the worker's heap near its address
        // limit (allocators keep freed memory), which the next render would pay for; such a
        // worker, and any worker past its render count, ends instead of going back.
        let spent = matches!(result, Err(TemplateError::TooCostly(_))) || worker.renders >= RENDERS_PER_WORKER;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if !spent && idle.len() < self.max_idle {
            idle.push(worker);
        }
        result
    }

    /// Process ids of the workers waiting for a job now.
    pub fn idle_workers(&self) -> Vec<u32> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|w| w.child.id()).collect()
    }

    fn start_with(&self, frame: &[u8]) -> Result<Worker, TemplateError> {
        let mut worker = self.start()?;
        if let Err(e) = worker.send(frame) {
            return Err(worker.died(&self.limits, Some(e)));
        }
        Ok(worker)
    }

    fn start(&self) -> Result<Worker, TemplateError> {
        let failed = |e: &dyn std::fmt::Display| {
            TemplateError::Sandbox(format!("cannot start a template worker from {}: {e}", self.program.display()))
        };
        let mut child = Command::new(&self.program)
            // Its own process group: a terminal's Ctrl-C (meant for `starling chat` or a
            // foreground `serve`) does not reach it.
            .process_group(0)
            .arg(WORKER_SUBCOMMAND)
            .arg("--memory-bytes")
            .arg(self.limits.memory_bytes.to_string())
            .arg("--timeout-ms")
            .arg(self.limits.timeout.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| failed(&e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(failed(&"its pipes are missing"));
        };
        let deadline = Some(Instant::now() + HELLO_DEADLINE);
        let mut worker = Worker {
            child,
            stdin: BufWriter::new(stdin),
            stdout: BufReader::new(Deadline { inner: stdout, deadline }),
            renders: 0,
        };
        match read_frame::<Reply>(&mut worker.stdout) {
            Ok(Some(Reply::Hello { protocol: PROTOCOL })) => Ok(worker),
            Ok(Some(Reply::Hello { protocol })) => {
                Err(failed(&format!("it speaks protocol {protocol}, this server {PROTOCOL}")))
            }
            Ok(_) => Err(failed(&"it did not say hello")),
            Err(e) => Err(failed(&format!("it did not say hello ({e})"))),
        }
    }
}

/// One worker process and its pipes; dropping it ends the process.
struct Worker {
    child: Child,
    stdin: BufWriter<ChildStdin>,
    stdout: BufReader<Deadline>,
    /// Renders answered so far.
    renders: u32,
}

/// A worker's stdout whose reads fail with `TimedOut` once `deadline` passes, so a worker
/// that stops answering (stopped, or not a worker at all) cannot hold a thread forever.
struct Deadline {
    inner: ChildStdout,
    deadline: Option<Instant>,
}

impl Read for Deadline {
    #[allow(unsafe_code)]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the template worker stopped answering"));
                }
                let mut fd = libc::pollfd { fd: self.inner.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
                // SAFETY: `poll` reads and writes only the one `pollfd` it is given.
                match unsafe { libc::poll(&mut fd, 1, ms) } {
                    n if n > 0 => break,
                    0 => continue,
                    _ => {
                        let e = io::Error::last_os_error();
                        if e.kind() != io::ErrorKind::Interrupted {
                            return Err(e);
                        }
                    }
                }
            }
        }
        self.inner.read(buf)
    }
}

impl Worker {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        write_raw_frame(&mut self.stdin, frame)
    }

    /// Why the worker stopped answering: ends it and reads how it ended.
    fn died(mut self, limits: &Limits, error: Option<io::Error>) -> TemplateError {
        // A dead worker is unaffected by the kill (its status stays the one it died with); a
        // live one that sent garbage is stopped.
        let _ = self.child.kill();
        let status = self.child.wait();
        match status.as_ref().ok().and_then(|s| s.signal()) {
            Some(libc::SIGALRM) => {
                TemplateError::TooCostly(format!("took longer than {} ms", limits.timeout.as_millis()))
            }
            Some(libc::SIGABRT) => {
                TemplateError::TooCostly(format!("needed more than its {} MiB of memory", limits.memory_bytes >> 20))
            }
            // Killed by the kernel's OOM killer, or crashed inside the renderer: the render
            // ended its worker, which is the template's doing as far as this request knows.
            Some(signal) if error.as_ref().is_none_or(|e| e.kind() != io::ErrorKind::TimedOut) => {
                TemplateError::TooCostly(format!("ended its worker process (signal {signal})"))
            }
            _ => {
                let how = match (status, error) {
                    (_, Some(e)) => e.to_string(),
                    (Ok(s), None) => s.to_string(),
                    (Err(e), None) => e.to_string(),
                };
                TemplateError::Sandbox(format!("the template worker failed: {how}"))
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_raw_frame(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len()).ok().filter(|&n| n as usize <= MAX_FRAME);
    let len = len.ok_or_else(|| io::Error::other(format!("a frame of {} bytes is too large", bytes.len())))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

fn write_frame(w: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    write_raw_frame(w, &serde_json::to_vec(value)?)
}

/// The next frame, or `None` at end of input before one starts.
fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::other(format!("a frame of {len} bytes is too large")));
    }
    let mut bytes = vec![0u8; len];
    r.read_exact(&mut bytes)?;
    Ok(Some(serde_json::from_slice(&bytes)?))
}

/// The worker's side (`starling template-worker`): limits itself, says hello, then renders
/// each job from stdin to stdout until stdin ends.
pub fn run_worker(limits: Limits) -> anyhow::Result<()> {
    limit_self(&limits)?;
    let mut input = BufReader::new(io::stdin().lock());
    let mut output = BufWriter::new(io::stdout().lock());
    write_frame(&mut output, &Reply::Hello { protocol: PROTOCOL })?;
    while let Some(job) = read_frame::<RenderJob>(&mut input)? {
        alarm(limits.timeout)?;
        let reply = match job.render_here() {
            Ok(text) => Reply::Text(text),
            Err(e) => Reply::Failed(e),
        };
        alarm(Duration::ZERO)?;
        write_frame(&mut output, &reply)?;
    }
    Ok(())
}

/// Caps the address space, turns core dumps off (a worker ended by its limits is expected,
/// not a crash to keep) and makes `SIGALRM` end the process whatever the parent ignored.
#[allow(unsafe_code)]
fn limit_self(limits: &Limits) -> io::Result<()> {
    for (resource, bytes) in [(libc::RLIMIT_AS, limits.memory_bytes), (libc::RLIMIT_CORE, 0)] {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `getrlimit` writes only the struct it is given.
        if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max.min(bytes as libc::rlim_t);
        // SAFETY: `setrlimit` reads the struct it is given and nothing else.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: restoring a signal's default action installs no handler of ours.
    if unsafe { libc::signal(libc::SIGALRM, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    // Below the engine threads for the CPU, and first for the OOM killer if the machine
    // runs out of memory anyway (both only lower this process's standing, and neither is
    // needed for the limits above, so a refusal is ignored).
    // SAFETY: `setpriority` changes this process's nice value and touches no memory.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    Ok(())
}

/// Arms (or with zero, disarms) the one-shot real-time timer whose `SIGALRM` ends the process.
#[allow(unsafe_code)]
fn alarm(after: Duration) -> io::Result<()> {
    let value =
        libc::timeval { tv_sec: after.as_secs() as libc::time_t, tv_usec: after.subsec_micros() as libc::suseconds_t };
    let timer = libc::itimerval { it_interval: libc::timeval { tv_sec: 0, tv_usec: 0 }, it_value: value };
    // SAFETY: `setitimer` reads `timer` and, given a null pointer, writes no old value.
    if unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
