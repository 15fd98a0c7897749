//! Clean-up of scratch files that a crashed process left behind. Scratch files carry the
//! writer's pid right after a fixed prefix (`{prefix}{pid}-...`), so a file whose process no
//! longer runs can be removed while files of live processes (another server, a concurrent
//! `starling models pull`) are left alone.

use std::path::Path;

/// Removes files in `dir` named `{prefix}{pid}-…` whose process is gone. Does nothing where
/// `/proc` is unavailable (no way to tell live processes from dead ones). Returns how many
/// files were removed.
pub fn remove_stale_files(dir: &Path, prefix: &str) -> usize {
    if !Path::new("/proc/self").exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)?.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_of_dead_processes_are_removed() {
        let dir = std::env::temp_dir().join(format!("starling-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dead = dir.join(format!(".x-{}-0.part", u32::MAX));
        let live = dir.join(format!(".x-{}-0.part", std::process::id()));
        let other = dir.join("keep.gguf");
        for f in [&dead, &live, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        assert_eq!(remove_stale_files(&dir, ".x-"), 1);
        assert!(!dead.exists() && live.exists() && other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
