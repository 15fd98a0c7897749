//! What several commands share.

/// Threads for the model's pool when the command line names none: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}
