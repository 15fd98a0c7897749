//! The spill file: evicted session blocks written to disk, one page per block, each page
//! with a CRC-32C so a damaged page is detected and never used.
//!
//! Pages are written and read with positioned I/O (`pwrite`/`pread`) rather than a memory
//! map: mapping a file needs `unsafe`, which the crate reserves for its kernels.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::arena::KvError;

/// Where one spilled block lives and the checksum of what was written there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpillPage {
    pub index: u32,
    pub crc: u32,
}

/// A size-capped spill file cut into pages of one block each, with a free list.
#[derive(Debug)]
pub struct SpillFile {
    file: File,
    path: PathBuf,
    page_bytes: usize,
    free: Vec<u32>,
    n_pages: usize,
}

impl SpillFile {
    /// Creates (or truncates) `dir/kv-spill.bin` holding as many pages of `page_bytes` as
    /// fit in `max_bytes`. The directory is created if missing.
    pub fn create(dir: &Path, max_bytes: u64, page_bytes: usize) -> Result<Self, KvError> {
        let io = |e: std::io::Error| KvError::Spill(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join("kv-spill.bin");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io)?;
        let n_pages = (max_bytes / page_bytes.max(1) as u64).min(u32::MAX as u64) as usize;
        file.set_len((n_pages * page_bytes) as u64).map_err(io)?;
        Ok(SpillFile { file, path, page_bytes, free: (0..n_pages as u32).rev().collect(), n_pages })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn n_pages(&self) -> usize {
        self.n_pages
    }

    pub fn n_free(&self) -> usize {
        self.free.len()
    }

    /// Byte offset of page `index` in the file.
    pub fn page_offset(&self, index: u32) -> u64 {
        index as u64 * self.page_bytes as u64
    }

    /// Writes one block of values to a free page; `None` when the file is full.
    pub fn write(&mut self, values: &[f32]) -> Result<Option<SpillPage>, KvError> {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        if bytes.len() != self.page_bytes {
            return Err(KvError::Spill(format!("page of {} bytes, expected {}", bytes.len(), self.page_bytes)));
        }
        let Some(index) = self.free.pop() else { return Ok(None) };
        if let Err(e) = self.file.write_all_at(bytes, self.page_offset(index)) {
            self.free.push(index);
            return Err(KvError::Spill(format!("{}: {e}", self.path.display())));
        }
        Ok(Some(SpillPage { index, crc: crc32c(bytes) }))
    }

    /// Reads a page into `out` and frees it. `Ok(false)` means the checksum failed: `out`
    /// holds garbage and must not be used.
    pub fn read(&mut self, page: SpillPage, out: &mut [f32]) -> Result<bool, KvError> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        if bytes.len() != self.page_bytes {
            return Err(KvError::Spill(format!("page of {} bytes, expected {}", bytes.len(), self.page_bytes)));
        }
        let read = self.file.read_exact_at(bytes, self.page_offset(page.index));
        self.release(page);
        read.map_err(|e| KvError::Spill(format!("{}: {e}", self.path.display())))?;
        Ok(crc32c(bytes) == page.crc)
    }

    /// Returns a page to the free list without reading it.
    pub fn release(&mut self, page: SpillPage) {
        if (page.index as usize) < self.n_pages && !self.free.contains(&page.index) {
            self.free.push(page.index);
        }
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise.
pub fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn pages_round_trip_and_the_cap_holds() {
        let dir = std::env::temp_dir().join(format!("starling-spill-unit-{}", std::process::id()));
        let mut f = SpillFile::create(&dir, 100, 32).unwrap();
        assert_eq!(f.n_pages(), 3);
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 96);
        let pages: Vec<SpillPage> =
            (0..3).map(|i| f.write(&[i as f32; 8]).unwrap().expect("room for three pages")).collect();
        assert_eq!(f.write(&[9.0; 8]).unwrap(), None, "a full file refuses more pages");
        let mut out = [0.0f32; 8];
        assert!(f.read(pages[1], &mut out).unwrap());
        assert_eq!(out, [1.0; 8]);
        assert_eq!(f.n_free(), 1);
        assert!(matches!(f.write(&[0.0; 3]), Err(KvError::Spill(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
