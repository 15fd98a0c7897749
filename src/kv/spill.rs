//! The spill file: evicted session blocks written to a memory-mapped, size-capped file, one
//! page per block, each page with a CRC-32C so a damaged page is detected and never used.
//!
//! The file is created at its full capped size and mapped once (`memmap2::MmapMut`, a
//! shared mapping): writing a page is a copy into the map, and the kernel writes it back to
//! disk and may reclaim it under memory pressure, which is the point of spilling. Reads copy a
//! page out of the map and check its checksum before anyone uses it.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::Pod;
use memmap2::MmapMut;

use super::arena::KvError;

/// The file name prefix; the rest is `{pid}-{n}.bin`.
const FILE_PREFIX: &str = "kv-spill-";

/// Where one spilled block lives and the checksum of what was written there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpillPage {
    pub index: u32,
    pub crc: u32,
}

/// A size-capped spill file cut into pages of one block each, with a free list. The file
/// belongs to this value: it is created under a fresh name and removed on drop.
#[derive(Debug)]
pub struct SpillFile {
    /// `None` when the cap holds no page (a zero-length file cannot be mapped).
    map: Option<MmapMut>,
    /// Kept open for as long as the map lives.
    _file: File,
    path: PathBuf,
    page_bytes: usize,
    free: Vec<u32>,
    n_pages: usize,
}

impl SpillFile {
    /// Creates a new file `dir/kv-spill-{pid}-{n}.bin` holding as many pages of `page_bytes`
    /// as fit in `max_bytes`, and maps it. The directory is created if missing; files left
    /// there by processes that no longer run are removed first.
    pub fn create(dir: &Path, max_bytes: u64, page_bytes: usize) -> Result<Self, KvError> {
        let io = |e: std::io::Error| KvError::Spill(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        crate::stale::remove_stale_files(dir, FILE_PREFIX);
        let (file, path) = create_private(dir).map_err(io)?;
        let n_pages = (max_bytes / page_bytes.max(1) as u64).min(u32::MAX as u64) as usize;
        let len = (n_pages * page_bytes) as u64;
        let sized = file.set_len(len).and_then(|()| reserve(&file, len));
        let map = sized.and_then(|()| if n_pages == 0 { Ok(None) } else { map_private_file(&file).map(Some) });
        let map = map.map_err(|e| {
            // Nothing of a file that could not be had stays behind.
            let _ = std::fs::remove_file(&path);
            KvError::Spill(format!("{}: cannot reserve {len} bytes on disk: {e}", path.display()))
        })?;
        Ok(SpillFile { map, _file: file, path, page_bytes, free: (0..n_pages as u32).rev().collect(), n_pages })
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

    fn page_range(&self, index: u32) -> std::ops::Range<usize> {
        let start = index as usize * self.page_bytes;
        start..start + self.page_bytes
    }

    fn check_size(&self, n_bytes: usize) -> Result<(), KvError> {
        if n_bytes == self.page_bytes {
            Ok(())
        } else {
            Err(KvError::Spill(format!("page of {n_bytes} bytes, expected {}", self.page_bytes)))
        }
    }

    /// Writes one block of values to a free page; `None` when the file is full.
    pub fn write<T: Pod>(&mut self, values: &[T]) -> Result<Option<SpillPage>, KvError> {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        self.check_size(bytes.len())?;
        let Some(index) = self.free.pop() else { return Ok(None) };
        let range = self.page_range(index);
        let Some(map) = self.map.as_mut() else { return Ok(None) };
        map[range.clone()].copy_from_slice(bytes);
        // Start write-back now so the page is clean (reclaimable) sooner; a failure here
        // only delays that, the data is in the map either way.
        let _ = map.flush_async_range(range.start, range.len());
        Ok(Some(SpillPage { index, crc: crc32c(bytes) }))
    }

    /// Reads a page into `out` and frees it. `Ok(false)` means the checksum failed: `out`
    /// holds garbage and must not be used.
    pub fn read<T: Pod>(&mut self, page: SpillPage, out: &mut [T]) -> Result<bool, KvError> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
        self.check_size(bytes.len())?;
        let map = match self.map.as_ref() {
            Some(map) if (page.index as usize) < self.n_pages => map,
            _ => return Err(KvError::Spill(format!("no page {} in {}", page.index, self.path.display()))),
        };
        bytes.copy_from_slice(&map[self.page_range(page.index)]);
        self.release(page);
        Ok(crc32c(bytes) == page.crc)
    }

    /// Frees every page.
    pub fn reset(&mut self) {
        self.free = (0..self.n_pages as u32).rev().collect();
    }

    /// Returns a page to the free list without reading it.
    pub fn release(&mut self, page: SpillPage) {
        if (page.index as usize) < self.n_pages && !self.free.contains(&page.index) {
            self.free.push(page.index);
        }
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        drop(self.map.take());
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the spill file");
        }
    }
}

/// Creates a fresh file only this process (and user) can open: a name no other live
/// instance uses, `O_EXCL` so an existing file is never reused, mode 0600.
fn create_private(dir: &Path) -> std::io::Result<(File, PathBuf)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{FILE_PREFIX}{}-{n}.bin", std::process::id()));
        match OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path) {
            Ok(file) => return Ok((file, path)),
            // A file of a dead process that reused our pid: take the next name.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Allocates the file's `len` bytes on disk now, so that writing a page through the map can
/// never find the disk full: a sparse file would take its blocks at the first write, and a
/// write through a mapping that finds no space is a SIGBUS, not an error.
#[allow(unsafe_code)]
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let len = libc::off_t::try_from(len).map_err(|_| std::io::Error::from(ErrorKind::FileTooLarge))?;
    // SAFETY: `posix_fallocate` only reads its integer arguments and acts on the descriptor,
    // which `file` keeps open for the duration of the call.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// The other unsafe step of the spill file.
#[allow(unsafe_code)]
fn map_private_file(file: &File) -> std::io::Result<MmapMut> {
    // SAFETY: mapping is sound because nothing else changes the file's size or bytes
    // behind our back. `create_private` made it just now under a name unique to this
    // process (pid + counter), with O_EXCL and mode 0600, so no other instance or user
    // holds it; `SpillFile` owns the only handle and the map, never calls `set_len` after
    // mapping, and removes the file only after the map is gone. Page bytes are copied out
    // of the map and checked against their CRC-32C before use, so even a write through
    // another handle can only fail a checksum, never be used as K/V.
    unsafe { MmapMut::map_mut(file) }
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

    fn dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("starling-spill-unit-{name}-{}", std::process::id()))
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// The file's blocks are allocated when it is made, not at the first write through the
    /// map (a sparse file would have none yet).
    #[test]
    fn the_whole_file_is_allocated_up_front() {
        use std::os::unix::fs::MetadataExt;
        let dir = dir("reserve");
        let f = SpillFile::create(&dir, 1 << 20, 4096).unwrap();
        let meta = std::fs::metadata(f.path()).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        assert!(meta.blocks() * 512 >= meta.len(), "{} of {} bytes allocated", meta.blocks() * 512, meta.len());
    }

    #[test]
    fn pages_round_trip_and_the_cap_holds() {
        let dir = dir("roundtrip");
        let mut f = SpillFile::create(&dir, 100, 32).unwrap();
        assert_eq!(f.n_pages(), 3);
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 96);
        let pages: Vec<SpillPage> =
            (0..3).map(|i| f.write(&[i as f32; 8]).unwrap().expect("room for three pages")).collect();
        assert_eq!(f.write(&[9.0f32; 8]).unwrap(), None, "a full file refuses more pages");
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 96, "the file never grows");
        let mut out = [0.0f32; 8];
        assert!(f.read(pages[1], &mut out).unwrap());
        assert_eq!(out, [1.0; 8]);
        assert_eq!(f.n_free(), 1);
        assert!(matches!(f.write(&[0.0f32; 3]), Err(KvError::Spill(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pages_live_in_the_file_and_a_changed_byte_fails_the_checksum() {
        use std::os::unix::fs::FileExt;
        let dir = dir("mapped");
        let mut f = SpillFile::create(&dir, 64, 32).unwrap();
        let page = f.write(&[7.5f32; 8]).unwrap().unwrap();
        let on_disk = std::fs::read(f.path()).unwrap();
        let offset = f.page_offset(page.index) as usize;
        assert_eq!(
            &on_disk[offset..offset + 32],
            bytemuck::cast_slice::<f32, u8>(&[7.5; 8]),
            "written through the map"
        );
        std::fs::OpenOptions::new().write(true).open(f.path()).unwrap().write_all_at(&[0], offset as u64 + 3).unwrap();
        let mut out = [0.0f32; 8];
        assert!(!f.read(page, &mut out).unwrap(), "the damaged page is refused");
        assert_eq!(f.n_free(), 2, "and its page freed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_file_is_new_private_and_removed_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let dir = dir("owned");
        let (a, b) = (SpillFile::create(&dir, 64, 32).unwrap(), SpillFile::create(&dir, 64, 32).unwrap());
        assert_ne!(a.path(), b.path(), "two caches never share a file");
        assert_eq!(std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777, 0o600);
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists(), "the file goes with its owner");
        // A file left by a process that is gone is swept; ours is kept.
        let stale = dir.join(format!("{FILE_PREFIX}{}-0.bin", u32::MAX));
        std::fs::write(&stale, b"old").unwrap();
        let c = SpillFile::create(&dir, 0, 32).unwrap();
        assert!(!stale.exists() && b.path().exists());
        assert_eq!((c.n_pages(), c.n_free()), (0, 0), "a cap below one page holds nothing");
        drop((b, c));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
