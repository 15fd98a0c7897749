//! Chrome traces: one `tracing-chrome` layer per process, switched on for a startup trace
//! file or for an on-demand capture of the live server (the admin endpoint).
//!
//! `tracing-chrome` keeps a per-thread sender in a thread-local shared by every layer, so a
//! process must never build a second layer: captures reuse the one layer and redirect its
//! output with `FlushGuard::start_new`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Whether the chrome layer records spans now (a trace file or a capture is open).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The one trace writer, once `telemetry::init` installed it.
static CONTROL: OnceLock<TraceControl> = OnceLock::new();

/// Longest capture the admin endpoint takes.
pub const MAX_CAPTURE: Duration = Duration::from_secs(60);

/// Why a live capture could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("tracing is not initialised in this process, so no trace can be captured")]
    NotInstalled,
    #[error("a trace is already being written to {0}; captures are off while it runs")]
    StartupTrace(String),
    #[error("another trace capture is running; retry when it ends")]
    Busy,
    #[error("cannot write the trace file {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the trace writer did not finish {0} in time")]
    Unfinished(String),
}

struct TraceControl {
    guard: Mutex<Option<tracing_chrome::FlushGuard>>,
    startup_file: Option<PathBuf>,
    capturing: AtomicBool,
}

/// Whether spans are being recorded into a Chrome trace right now.
pub fn capturing() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Called by `init` with the layer's guard; `startup_file` is the configured trace file.
pub(crate) fn install(guard: tracing_chrome::FlushGuard, startup_file: Option<PathBuf>) {
    ACTIVE.store(startup_file.is_some(), Ordering::Relaxed);
    let control = TraceControl { guard: Mutex::new(Some(guard)), startup_file, capturing: AtomicBool::new(false) };
    let _ = CONTROL.set(control);
}

/// Drops the trace writer (the open trace becomes a complete JSON file).
pub(crate) fn finish() {
    ACTIVE.store(false, Ordering::Relaxed);
    if let Some(c) = CONTROL.get() {
        let guard = c.guard.lock().map(|mut g| g.take());
        drop(guard);
    }
}

/// A file that reports when the trace writer lets go of it (the trace is then complete).
struct SignalOnDrop {
    file: std::fs::File,
    done: Option<std::sync::mpsc::Sender<()>>,
}

impl Write for SignalOnDrop {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for SignalOnDrop {
    fn drop(&mut self) {
        let _ = self.file.flush();
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

/// Clears the capture flags however the capture ends.
struct CaptureReset<'a>(&'a AtomicBool);

impl Drop for CaptureReset<'_> {
    fn drop(&mut self) {
        ACTIVE.store(false, Ordering::Relaxed);
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Records every span of the live process for `duration` into a new file under `dir`
/// (`capture-<unix ms>.json`) and returns the file's path once the JSON is complete.
pub async fn capture(dir: &Path, duration: Duration) -> Result<PathBuf, TraceError> {
    let control = CONTROL.get().ok_or(TraceError::NotInstalled)?;
    if let Some(file) = &control.startup_file {
        return Err(TraceError::StartupTrace(file.display().to_string()));
    }
    if control.capturing.swap(true, Ordering::AcqRel) {
        return Err(TraceError::Busy);
    }
    let _reset = CaptureReset(&control.capturing);
    let stamp = std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_millis());
    let path = dir.join(format!("capture-{stamp}.json"));
    let io = |source| TraceError::Io { path: path.display().to_string(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::File::create(&path).map_err(io)?;
    let (tx, rx) = std::sync::mpsc::channel();
    redirect(control, Box::new(SignalOnDrop { file, done: Some(tx) }))?;
    ACTIVE.store(true, Ordering::Relaxed);
    tokio::time::sleep(duration.min(MAX_CAPTURE)).await;
    ACTIVE.store(false, Ordering::Relaxed);
    redirect(control, Box::new(std::io::sink()))?;
    let finished =
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)).is_ok()).await.unwrap_or(false);
    if !finished {
        return Err(TraceError::Unfinished(path.display().to_string()));
    }
    Ok(path)
}

fn redirect(control: &TraceControl, writer: Box<dyn Write + Send>) -> Result<(), TraceError> {
    let guard = control.guard.lock().map_err(|_| TraceError::NotInstalled)?;
    match guard.as_ref() {
        Some(g) => {
            g.start_new(Some(writer));
            Ok(())
        }
        None => Err(TraceError::NotInstalled),
    }
}
