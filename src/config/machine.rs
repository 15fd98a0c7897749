//! What the machine offers: memory for KV caps, cores for the default thread count.

use std::num::NonZeroUsize;

/// Facts about the host that validation checks limits against. Tests build their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Total memory in bytes (`MemTotal` of `/proc/meminfo`); `None` skips the memory checks.
    pub mem_total: Option<u64>,
    /// Cores available to this process: the default `models[].threads`.
    pub parallelism: NonZeroUsize,
    /// The soft limit on open files (`Max open files` of `/proc/self/limits`); sizes the
    /// default `server.max_connections`. `None` when unknown or unlimited.
    pub open_files: Option<u64>,
}

impl Machine {
    /// Reads the host: `/proc/meminfo` and `std::thread::available_parallelism`.
    pub fn detect() -> Self {
        let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| mem_total_from_meminfo(&text));
        let parallelism = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        let open_files = std::fs::read_to_string("/proc/self/limits").ok().and_then(|t| open_files_from_limits(&t));
        Machine { mem_total, parallelism, open_files }
    }
}

/// The soft `Max open files` limit of a `/proc/self/limits` text (`None` if unlimited).
pub fn open_files_from_limits(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// Parses the `MemTotal:  24684096 kB` line of a `/proc/meminfo` text into bytes.
pub fn mem_total_from_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let amount: u64 = words.next()?.parse().ok()?;
    let scale = match words.next() {
        None | Some("B") => 1,
        Some("kB") => 1024,
        Some("MB") => 1024 * 1024,
        Some(_) => return None,
    };
    amount.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_files_come_from_the_soft_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\n\
                    Max cpu time              unlimited            unlimited            seconds\n\
                    Max open files            1024                 524288               files\n";
        assert_eq!(open_files_from_limits(text), Some(1024));
        assert_eq!(open_files_from_limits("Max open files unlimited unlimited files"), None);
    }

    #[test]
    fn reads_mem_total_in_kib() {
        let text = "MemFree: 100 kB\nMemTotal:       24684096 kB\nSwap: 0 kB\n";
        assert_eq!(mem_total_from_meminfo(text), Some(24_684_096 * 1024));
    }

    #[test]
    fn missing_or_garbled_mem_total_is_none() {
        assert_eq!(mem_total_from_meminfo("MemFree: 100 kB\n"), None);
        assert_eq!(mem_total_from_meminfo("MemTotal: lots kB\n"), None);
        assert_eq!(mem_total_from_meminfo("MemTotal: 5 furlongs\n"), None);
    }
}
