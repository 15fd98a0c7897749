//! A bounded pool for CPU-heavy request work (tokenizing prompts, detokenizing, rendering
//! chat templates), so it never runs on the async workers that serve every connection,
//! nor on an engine's thread. Jobs past the queue bound get 429 `cpu_busy`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

use crate::error::{ApiError, ErrorKind};

/// `workers` jobs at once on blocking threads; at most `queue` more waiting.
pub struct CpuPool {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue: usize,
}

impl CpuPool {
    pub fn new(workers: usize, queue: usize) -> Self {
        CpuPool { permits: Arc::new(Semaphore::new(workers.max(1))), waiting: AtomicUsize::new(0), queue }
    }

    /// Runs `job` on a pool thread and returns its result; 429 `cpu_busy` when the queue
    /// is full.
    pub async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(ApiError::new(
                        ErrorKind::RateLimited,
                        "the server's CPU work queue is full; retry shortly",
                    )
                    .with_code("cpu_busy")
                    .with_retry_after(1));
                }
                let acquired = self.permits.clone().acquire_owned().await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                acquired.map_err(|_| ApiError::new(ErrorKind::Unavailable, "the CPU pool is closed"))?
            }
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("a CPU job failed: {e}")))
    }
}
