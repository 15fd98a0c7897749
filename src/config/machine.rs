//! What the machine offers: memory for KV caps, cores for the default thread count.

use std::num::NonZeroUsize;

/// Facts about the host that validation checks limits against. Tests build their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Machine {
    /// Total memory in bytes (`MemTotal` of `/proc/meminfo`); `None` skips the memory checks.
    pub mem_total: Option<u64>,
    /// Cores available to this process: the default `models[].threads`.
    pub parallelism: NonZeroUsize,
}

impl Machine {
    /// Reads the host: `/proc/meminfo` and `std::thread::available_parallelism`.
    pub fn detect() -> Self {
        let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| mem_total_from_meminfo(&text));
        let parallelism = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        Machine { mem_total, parallelism }
    }
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
