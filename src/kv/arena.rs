//! The KV block arena: one allocation per model, cut into fixed blocks of positions.
//!
//! A block holds K and V for `block_tokens` positions of every layer, laid out as
//! `[layer][k|v]`, each part one contiguous run. V is `[slot][kv_dim]`: one position's row is
//! contiguous, as the weighted sum of values reads it. K in f32 and f16 is
//! `[kv_dim][slot]` (by dimension): one dimension of consecutive positions is contiguous, so
//! the attention kernel loads sixteen positions' values of a dimension as one vector and
//! scores sixteen positions with one FMA per dimension, without a transpose (see
//! `model::kernels::attention`). q8_0 K stays `[slot][kv_dim]`, since its 32-value blocks
//! run along a row. [`KvArena::read_key`] reads a K row in any layout. Nothing outside the
//! arena allocates K/V memory; sequences own block ids through a [`BlockTable`].
//!
//! Elements are f32, f16 or q8_0 blocks (`kv_cache.dtype`). Either way the storage is one
//! `Vec<f32>` of 4-byte words and every block is whole words, so a block's raw contents
//! move through the spill file as the same opaque words; f32 views start on 4-byte and f16
//! views on 2-byte offsets. Readers get a typed view ([`KvRows`]) and convert as they read.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use half::f16;

use crate::config::KvDtype;

/// Index of a block in the arena.
pub type BlockId = u32;

/// Geometry of the cache, fixed per model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layer: usize,
    /// K (and V) values per position per layer: `n_head_kv * head_dim`.
    pub kv_dim: usize,
    pub block_tokens: usize,
}

impl KvLayout {
    /// Bytes of one block stored as f32.
    pub fn block_bytes(&self) -> usize {
        self.block_bytes_as(KvDtype::F32)
    }

    /// Bytes of one block stored as `dtype`: whole 4-byte words for every type (a q8_0
    /// row is an even number of 34-byte blocks per K and V pair).
    pub fn block_bytes_as(&self, dtype: KvDtype) -> usize {
        let bytes = self.n_layer * 2 * self.block_tokens * self.row_bytes(dtype);
        debug_assert!(bytes.is_multiple_of(4), "{bytes} bytes per block");
        bytes
    }

    /// Bytes of one position's K (or V) row of one layer stored as `dtype`.
    pub fn row_bytes(&self, dtype: KvDtype) -> usize {
        dtype.bytes(self.kv_dim)
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_tokens)
    }
}

/// What a block holds and who may touch it: the arena's record of each block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockMeta {
    /// Bumped every time the block is handed out, so stale handles are caught.
    pub generation: u32,
    /// Owner tag (the cache stores a tenant key); `0` = unowned.
    pub owner: u64,
}

/// A checked reference to one block: what the borrower believes the block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHandle {
    pub id: BlockId,
    pub generation: u32,
    pub shape: KvLayout,
    pub dtype: KvDtype,
}

/// Errors of the KV arena and cache.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("block {id}: stale handle (generation {expected}, block is at {found})")]
    StaleGeneration { id: BlockId, expected: u32, found: u32 },
    #[error("block {id}: handle shape {expected:?} does not match the arena's {found:?}")]
    ShapeMismatch { id: BlockId, expected: KvLayout, found: KvLayout },
    #[error("block {id}: handle dtype {expected:?} does not match the arena's {found:?}")]
    DtypeMismatch { id: BlockId, expected: KvDtype, found: KvDtype },
    #[error("spill file: {0}")]
    Spill(String),
    #[error("KV cache cap of {max_bytes} bytes holds no block of {block_bytes} bytes")]
    CapTooSmall { max_bytes: u64, block_bytes: usize },
    #[error("KV cache is full: {needed} more blocks needed, {free} free of {total}")]
    OutOfBlocks { needed: usize, free: usize, total: usize },
    #[error("block {0} is not allocated")]
    NotAllocated(BlockId),
    #[error("kv_cache.dtype q8_0 stores K/V rows in blocks of 32 values; this model's rows hold {kv_dim}")]
    RowWidth { kv_dim: usize },
}

/// One layer's K (or V) of one block, in the arena's element type: V by position, K by
/// position or by dimension (see [`KvArena::keys_by_dimension`]).
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// Blocks of 34 bytes: an f16 scale `d`, then 32 signed bytes `q`; value `i` is `d·q[i]`.
    Q8_0(&'a [u8]),
}

impl<'a> KvRows<'a> {
    /// Elements in the view.
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(r) => r.len(),
            KvRows::F16(r) => r.len(),
            KvRows::Q8_0(r) => r.len() / Q8_BYTES * 32,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `r` of the view (for q8_0, whole blocks of 32).
    pub fn slice(&self, r: std::ops::Range<usize>) -> KvRows<'a> {
        match self {
            KvRows::F32(x) => KvRows::F32(&x[r]),
            KvRows::F16(x) => KvRows::F16(&x[r]),
            KvRows::Q8_0(x) => {
                assert!(r.start.is_multiple_of(32) && r.end.is_multiple_of(32), "q8_0 view {r:?}");
                KvRows::Q8_0(&x[r.start / 32 * Q8_BYTES..r.end / 32 * Q8_BYTES])
            }
        }
    }

    /// The view's storage as bytes (for prefetching).
    pub fn bytes(&self) -> &'a [u8] {
        match self {
            KvRows::F32(r) => bytemuck::cast_slice(r),
            KvRows::F16(r) => bytemuck::cast_slice(r),
            KvRows::Q8_0(r) => r,
        }
    }

    /// Copies `len` elements starting at `start` into `out` as f32 (exact for every type;
    /// for q8_0, `start` and `out.len()` are whole blocks of 32).
    #[inline(always)]
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        match self {
            KvRows::F32(r) => out.copy_from_slice(&r[start..start + out.len()]),
            KvRows::F16(r) => r[start..start + out.len()].convert_to_f32_slice(out),
            KvRows::Q8_0(r) => {
                let blocks = &r[start / 32 * Q8_BYTES..(start + out.len()) / 32 * Q8_BYTES];
                for (block, o) in blocks.chunks_exact(Q8_BYTES).zip(out.chunks_exact_mut(32)) {
                    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    for (o, &q) in o.iter_mut().zip(&block[2..]) {
                        *o = d * f32::from(q as i8);
                    }
                }
            }
        }
    }
}

/// The arena: K/V storage, per-block metadata and the free list.
pub struct KvArena {
    layout: KvLayout,
    dtype: KvDtype,
    /// Raw 4-byte words: one element each (f32) or two (f16).
    data: Vec<f32>,
    free: Vec<BlockId>,
    allocated: Vec<bool>,
    meta: Vec<BlockMeta>,
    /// Handle checks that failed (stale generation, wrong shape or dtype).
    integrity_errors: AtomicU64,
}

impl fmt::Debug for KvArena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvArena")
            .field("layout", &self.layout)
            .field("blocks", &self.n_blocks())
            .field("free", &self.free.len())
            .finish()
    }
}

/// Bytes of one q8_0 block of 32 values.
const Q8_BYTES: usize = 34;

/// ggml's `quantize_row_q8_0`: per 32 values, `d = max|x| / 127` (as f16) and
/// `q = round(x / d)`; an all-zero block stores `d = 0`. The kernels' Q8_0 format has the
/// same rule, but `kv` sits below `model` in the stack and cannot call it;
/// `kernels::kv_q8_0_is_the_kernels_q8_0` holds the two to the same bytes.
fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    for (xs, block) in x.chunks_exact(32).zip(out.chunks_exact_mut(Q8_BYTES)) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &v) in block[2..].iter_mut().zip(xs) {
            *q = (v * id).round() as i8 as u8;
        }
    }
}

/// `n` floats with every page written (see [`KvArena::new`]), asking for transparent huge
/// pages first: attention streams the arena in runs of a few KB spread over hundreds of
/// MB, and with 4 KB pages nearly every run starts with a TLB miss.
fn committed(n: usize) -> Vec<f32> {
    let mut data: Vec<f32> = Vec::with_capacity(n);
    advise_huge_pages(data.as_ptr() as usize, n * size_of::<f32>());
    data.resize(n, -0.0f32);
    data
}

/// Huge pages come in aligned 2 MiB units, and `madvise` wants a page-aligned start
/// (`malloc` returns a large block 16 bytes into its mapping), so the advice covers the
/// whole 2 MiB units inside `[addr, addr + len)`. A refusal (an old kernel, THP off) only
/// costs speed: it is logged, not an error.
fn advise_huge_pages(addr: usize, len: usize) {
    const HUGE: usize = 2 << 20;
    let (start, end) = (addr.next_multiple_of(HUGE), (addr + len) / HUGE * HUGE);
    if end <= start {
        return;
    }
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: advice on whole pages of this process's own allocation (`start..end` lies
    // inside `addr..addr + len`); MADV_HUGEPAGE changes no contents.
    let refused = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) } != 0;
    #[cfg(not(target_os = "linux"))]
    let refused = false;
    if refused {
        tracing::debug!(error = %std::io::Error::last_os_error(), "KV arena: no transparent huge pages");
    }
}

impl KvArena {
    /// An arena of as many whole blocks as fit in `max_bytes`, allocated and committed
    /// once: every page is written here, so the process's resident memory includes the
    /// whole cap from the start and does not creep up as a long-running server touches new
    /// blocks. (The fill is `-0.0`, not `0.0`: an all-zero fill of fresh memory may be
    /// turned into a lazily mapped `calloc`.)
    pub fn new(layout: KvLayout, max_bytes: u64) -> Result<Self, KvError> {
        Self::with_dtype(layout, max_bytes, KvDtype::F32)
    }

    /// Like [`KvArena::new`], storing elements as `dtype` (f16 holds twice the positions
    /// in the same bytes).
    pub fn with_dtype(layout: KvLayout, max_bytes: u64, dtype: KvDtype) -> Result<Self, KvError> {
        if dtype == KvDtype::Q8_0 && !layout.kv_dim.is_multiple_of(32) {
            return Err(KvError::RowWidth { kv_dim: layout.kv_dim });
        }
        let block_bytes = layout.block_bytes_as(dtype);
        let n_blocks = (max_bytes / block_bytes as u64) as usize;
        if n_blocks == 0 {
            return Err(KvError::CapTooSmall { max_bytes, block_bytes });
        }
        let n_blocks = n_blocks.min(BlockId::MAX as usize);
        Ok(KvArena {
            layout,
            dtype,
            data: committed(n_blocks * block_bytes / size_of::<f32>()),
            free: (0..n_blocks as BlockId).rev().collect(),
            allocated: vec![false; n_blocks],
            meta: vec![BlockMeta { generation: 0, owner: 0 }; n_blocks],
            integrity_errors: AtomicU64::new(0),
        })
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Frees every block (their generations move on, so old handles fail their checks);
    /// the memory stays committed.
    pub fn reset(&mut self) {
        for (b, allocated) in self.allocated.iter_mut().enumerate() {
            if *allocated {
                self.meta[b].generation = self.meta[b].generation.wrapping_add(1);
                *allocated = false;
            }
            self.meta[b].owner = 0;
        }
        self.free = (0..self.allocated.len() as BlockId).rev().collect();
    }

    /// The record of block `b` (generation and owner).
    pub fn meta(&self, b: BlockId) -> Option<BlockMeta> {
        self.meta.get(b as usize).copied()
    }

    /// A handle to allocated block `b` at its current generation.
    pub fn handle(&self, b: BlockId) -> Result<BlockHandle, KvError> {
        if !self.is_allocated(b) {
            return Err(KvError::NotAllocated(b));
        }
        let generation = self.meta[b as usize].generation;
        Ok(BlockHandle { id: b, generation, shape: self.layout, dtype: self.dtype })
    }

    pub fn is_allocated(&self, b: BlockId) -> bool {
        self.allocated.get(b as usize).copied().unwrap_or(false)
    }

    /// Checks a handle against the block: allocated, same generation, shape and dtype.
    /// A mismatch is counted in [`KvArena::integrity_errors`].
    pub fn check(&self, h: &BlockHandle) -> Result<(), KvError> {
        let result = if !self.is_allocated(h.id) {
            Err(KvError::NotAllocated(h.id))
        } else if h.shape != self.layout {
            Err(KvError::ShapeMismatch { id: h.id, expected: h.shape, found: self.layout })
        } else if h.dtype != self.dtype {
            Err(KvError::DtypeMismatch { id: h.id, expected: h.dtype, found: self.dtype })
        } else if h.generation != self.meta[h.id as usize].generation {
            let found = self.meta[h.id as usize].generation;
            Err(KvError::StaleGeneration { id: h.id, expected: h.generation, found })
        } else {
            Ok(())
        };
        if result.is_err() {
            self.integrity_errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Failed handle checks so far.
    pub fn integrity_errors(&self) -> u64 {
        self.integrity_errors.load(Ordering::Relaxed)
    }

    /// 4-byte words of storage in one block (its raw contents, see [`KvArena::block_data`]).
    pub fn block_words(&self) -> usize {
        self.block_bytes() / size_of::<f32>()
    }

    /// Bytes of one block in this arena's element type.
    pub fn block_bytes(&self) -> usize {
        self.layout.block_bytes_as(self.dtype)
    }

    /// Checked read of a whole block's raw words (every layer's K and V, in the arena's
    /// element type): what the spill file stores.
    pub fn block_data(&self, h: &BlockHandle) -> Result<&[f32], KvError> {
        self.check(h)?;
        let n = self.block_words();
        Ok(&self.data[h.id as usize * n..(h.id as usize + 1) * n])
    }

    /// Checked overwrite of a whole block; `src` must be one block of raw words.
    pub fn write_block(&mut self, h: &BlockHandle, src: &[f32]) -> Result<(), KvError> {
        self.check(h)?;
        let n = self.block_words();
        if src.len() != n {
            let per_token = n / self.layout.block_tokens;
            let found = KvLayout { block_tokens: src.len() / per_token.max(1), ..self.layout };
            return Err(KvError::ShapeMismatch { id: h.id, expected: self.layout, found });
        }
        self.data[h.id as usize * n..(h.id as usize + 1) * n].copy_from_slice(src);
        Ok(())
    }

    /// Copies block `src`'s contents into block `dst` (copy-on-write).
    pub fn copy_block(&mut self, src: &BlockHandle, dst: &BlockHandle) -> Result<(), KvError> {
        self.check(src)?;
        self.check(dst)?;
        let n = self.block_words();
        self.data.copy_within(src.id as usize * n..(src.id as usize + 1) * n, dst.id as usize * n);
        Ok(())
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    pub fn n_blocks(&self) -> usize {
        self.allocated.len()
    }

    pub fn n_free(&self) -> usize {
        self.free.len()
    }

    pub fn n_used(&self) -> usize {
        self.n_blocks() - self.n_free()
    }

    /// Bytes the arena reserves (the configured cap rounded down to whole blocks).
    pub fn capacity_bytes(&self) -> usize {
        self.n_blocks() * self.block_bytes()
    }

    pub fn allocate(&mut self) -> Result<BlockId, KvError> {
        self.allocate_for(0)
    }

    /// Takes a free block for `owner`, bumping its generation.
    pub fn allocate_for(&mut self, owner: u64) -> Result<BlockId, KvError> {
        let b = self.free.pop().ok_or(KvError::OutOfBlocks { needed: 1, free: 0, total: self.n_blocks() })?;
        self.allocated[b as usize] = true;
        let m = &mut self.meta[b as usize];
        m.generation = m.generation.wrapping_add(1);
        m.owner = owner;
        Ok(b)
    }

    pub fn release(&mut self, b: BlockId) -> Result<(), KvError> {
        match self.allocated.get_mut(b as usize) {
            Some(live) if *live => {
                *live = false;
                self.meta[b as usize].owner = 0;
                self.free.push(b);
                Ok(())
            }
            _ => Err(KvError::NotAllocated(b)),
        }
    }

    /// Byte offset of one layer's K (or V) rows in block `b`: a multiple of the element
    /// size for f32 and f16 (blocks are whole words), so the typed views below are aligned.
    fn offset(&self, b: BlockId, layer: usize, v: bool) -> usize {
        let l = &self.layout;
        b as usize * self.block_bytes() + (layer * 2 + v as usize) * l.block_tokens * l.row_bytes(self.dtype)
    }

    fn rows(&self, o: usize) -> KvRows<'_> {
        let n = self.layout.block_tokens * self.layout.row_bytes(self.dtype);
        let bytes = &bytemuck::cast_slice::<f32, u8>(&self.data)[o..o + n];
        match self.dtype {
            KvDtype::F32 => KvRows::F32(bytemuck::cast_slice(bytes)),
            KvDtype::F16 => KvRows::F16(bytemuck::cast_slice(bytes)),
            KvDtype::Q8_0 => KvRows::Q8_0(bytes),
        }
    }

    /// K of one layer in one block: `block_tokens * kv_dim` values, by dimension
    /// (`[kv_dim][block_tokens]`) when [`Self::keys_by_dimension`], else by position.
    pub fn keys(&self, b: BlockId, layer: usize) -> KvRows<'_> {
        self.rows(self.offset(b, layer, false))
    }

    /// Whether K is stored by dimension (f32 and f16) rather than by position (q8_0).
    pub fn keys_by_dimension(&self) -> bool {
        self.dtype != KvDtype::Q8_0
    }

    /// Position `slot`'s K row of one layer in block `b`, as f32 (exact), whatever the layout.
    pub fn read_key(&self, b: BlockId, layer: usize, slot: usize, out: &mut [f32]) {
        let (bt, kvd) = (self.layout.block_tokens, self.layout.kv_dim);
        assert_eq!(out.len(), kvd, "K row width");
        let keys = self.keys(b, layer);
        match keys {
            KvRows::F32(k) => out.iter_mut().enumerate().for_each(|(d, o)| *o = k[d * bt + slot]),
            KvRows::F16(k) => out.iter_mut().enumerate().for_each(|(d, o)| *o = k[d * bt + slot].to_f32()),
            KvRows::Q8_0(_) => keys.read_f32(slot * kvd, out),
        }
    }

    /// Position `slot`'s V row of one layer in block `b`, as f32 (exact).
    pub fn read_value(&self, b: BlockId, layer: usize, slot: usize, out: &mut [f32]) {
        self.values(b, layer).read_f32(slot * self.layout.kv_dim, out)
    }

    /// V rows of one layer in one block.
    pub fn values(&self, b: BlockId, layer: usize) -> KvRows<'_> {
        self.rows(self.offset(b, layer, true))
    }

    /// Writes one position's K and V rows for one layer (rounded to f16 in an f16 arena,
    /// quantized in a q8_0 one).
    pub fn write(&mut self, b: BlockId, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        let rb = self.layout.row_bytes(self.dtype);
        debug_assert!(self.allocated[b as usize], "write to free block {b}");
        assert!(k.len() == self.layout.kv_dim && v.len() == self.layout.kv_dim, "K/V rows of {} values", k.len());
        let (ko, vo) = (self.offset(b, layer, false), self.offset(b, layer, true) + slot * rb);
        let (dtype, bt) = (self.dtype, self.layout.block_tokens);
        let bytes = bytemuck::cast_slice_mut::<f32, u8>(&mut self.data);
        // K by dimension: value `d` of the row goes to `d·block_tokens + slot`.
        match dtype {
            KvDtype::F32 => {
                let col = bytemuck::cast_slice_mut::<u8, f32>(&mut bytes[ko..ko + bt * rb]);
                k.iter().enumerate().for_each(|(d, &x)| col[d * bt + slot] = x);
            }
            KvDtype::F16 => {
                let col = bytemuck::cast_slice_mut::<u8, f16>(&mut bytes[ko..ko + bt * rb]);
                k.iter().enumerate().for_each(|(d, &x)| col[d * bt + slot] = f16::from_f32(x));
            }
            KvDtype::Q8_0 => quantize_q8_0(k, &mut bytes[ko + slot * rb..ko + (slot + 1) * rb]),
        }
        let row = &mut bytes[vo..vo + rb];
        match dtype {
            KvDtype::F32 => row.copy_from_slice(bytemuck::cast_slice(v)),
            KvDtype::F16 => bytemuck::cast_slice_mut::<u8, f16>(row).convert_from_f32_slice(v),
            KvDtype::Q8_0 => quantize_q8_0(v, row),
        }
    }
}

/// The blocks one sequence owns, in position order, and how many positions hold K/V.
/// `gens[i]` is the generation `blocks[i]` had when the table took it, so a block that
/// was freed and handed to someone else is caught on the next checked borrow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<BlockId>,
    pub gens: Vec<u32>,
    /// Positions whose K/V are written.
    pub len: usize,
}

impl BlockTable {
    /// Allocates blocks until `positions` positions fit; all or nothing.
    pub fn reserve(&mut self, arena: &mut KvArena, positions: usize) -> Result<(), KvError> {
        let needed = arena.layout().blocks_for(positions).saturating_sub(self.blocks.len());
        if needed > arena.n_free() {
            return Err(KvError::OutOfBlocks { needed, free: arena.n_free(), total: arena.n_blocks() });
        }
        for _ in 0..needed {
            let b = arena.allocate()?;
            self.push(b, arena.meta(b).map_or(0, |m| m.generation));
        }
        Ok(())
    }

    /// Appends block `b` taken at generation `generation`.
    pub fn push(&mut self, b: BlockId, generation: u32) {
        self.blocks.push(b);
        self.gens.push(generation);
    }

    /// The checked handle of the table's `i`-th block.
    pub fn handle(&self, i: usize, arena: &KvArena) -> BlockHandle {
        BlockHandle {
            id: self.blocks[i],
            generation: self.gens.get(i).copied().unwrap_or(0),
            shape: arena.layout(),
            dtype: arena.dtype(),
        }
    }

    /// Positions the table can hold without allocating.
    pub fn capacity(&self, layout: &KvLayout) -> usize {
        self.blocks.len() * layout.block_tokens
    }

    /// Returns every block to the arena.
    pub fn release_all(&mut self, arena: &mut KvArena) {
        for b in self.blocks.drain(..) {
            // A table only ever holds blocks it allocated, so release cannot fail.
            let _ = arena.release(b);
        }
        self.gens.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout { n_layer: 2, kv_dim: 4, block_tokens: 3 }
    }

    #[test]
    fn q8_0_rows_hold_ggml_blocks_and_refuse_ragged_widths() {
        let l = KvLayout { n_layer: 2, kv_dim: 64, block_tokens: 3 };
        assert_eq!(l.block_bytes_as(KvDtype::Q8_0), 2 * 2 * 3 * 2 * 34);
        let mut a = KvArena::with_dtype(l, l.block_bytes_as(KvDtype::Q8_0) as u64 * 2, KvDtype::Q8_0).unwrap();
        assert_eq!(a.n_blocks(), 2);
        let b = a.allocate().unwrap();
        let k: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 31.5) * 0.1).collect();
        let v: Vec<f32> = (0..64).map(|i| if i < 32 { 0.0 } else { i as f32 }).collect();
        a.write(b, 1, 2, &k, &v);
        let mut got = vec![0.0; 64];
        a.read_key(b, 1, 2, &mut got);
        for (block, want) in got.chunks(32).zip(k.chunks(32)) {
            let d = want.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0;
            for (g, w) in block.iter().zip(want) {
                // Half a step, plus the f16 rounding of the step times up to 127 steps.
                assert!((g - w).abs() <= d * (0.5 + 127.0 / 2048.0), "{g} vs {w} (step {d})");
            }
        }
        a.read_value(b, 1, 2, &mut got);
        assert!(got[..32].iter().all(|&x| x == 0.0), "an all-zero block reads back as zeros");
        assert!((got[63] - 63.0).abs() <= 63.0 / 2048.0, "the largest value is off by the scale's f16 rounding only");
        // Raw words move a q8_0 block whole (what the spill file and copy-on-write do).
        let c = a.allocate().unwrap();
        let (hb, hc) = (a.handle(b).unwrap(), a.handle(c).unwrap());
        let words = a.block_data(&hb).unwrap().to_vec();
        a.write_block(&hc, &words).unwrap();
        let mut moved = vec![0.0; 64];
        a.read_value(c, 1, 2, &mut moved);
        assert_eq!(moved, got, "a block's raw words carry its q8_0 rows");
        let ragged = KvLayout { kv_dim: 48, ..l };
        assert_eq!(KvArena::with_dtype(ragged, 1 << 20, KvDtype::Q8_0).unwrap_err(), KvError::RowWidth { kv_dim: 48 });
    }

    /// The arena's whole 2 MiB units are advised for huge pages: their mapping carries
    /// the `hg` flag in /proc/self/smaps.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_arena_asks_for_huge_pages() {
        let l = KvLayout { n_layer: 4, kv_dim: 64, block_tokens: 16 };
        let a = KvArena::new(l, 16 << 20).unwrap();
        let inside = (a.data.as_ptr() as usize).next_multiple_of(2 << 20) + 4096;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_range = false;
        let mut flags = None;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                in_range = (lo..hi).contains(&inside);
            } else if in_range && let Some(f) = line.strip_prefix("VmFlags:") {
                flags = Some(f.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
            }
        }
        let flags = flags.expect("the arena's mapping is in smaps");
        assert!(flags.iter().any(|f| f == "hg"), "VmFlags {flags:?}");
    }

    #[test]
    fn arena_holds_whole_blocks_under_the_cap() {
        let l = layout();
        let a = KvArena::new(l, (l.block_bytes() * 5 + 7) as u64).unwrap();
        assert_eq!(a.n_blocks(), 5);
        assert!(a.capacity_bytes() as u64 <= (l.block_bytes() * 5 + 7) as u64);
        assert_eq!(
            KvArena::new(l, 10).unwrap_err(),
            KvError::CapTooSmall { max_bytes: 10, block_bytes: l.block_bytes() }
        );
    }

    #[test]
    fn reserve_is_all_or_nothing_and_release_returns_blocks() {
        let l = layout();
        let mut a = KvArena::new(l, (l.block_bytes() * 3) as u64).unwrap();
        let mut t = BlockTable::default();
        t.reserve(&mut a, 7).unwrap(); // 3 blocks of 3
        assert_eq!(a.n_free(), 0);
        let mut u = BlockTable::default();
        assert_eq!(u.reserve(&mut a, 1).unwrap_err(), KvError::OutOfBlocks { needed: 1, free: 0, total: 3 });
        assert!(u.blocks.is_empty());
        t.release_all(&mut a);
        assert_eq!(a.n_free(), 3);
        assert_eq!(a.release(0).unwrap_err(), KvError::NotAllocated(0));
    }

    #[test]
    fn writes_land_in_their_own_rows() {
        let l = layout();
        let mut a = KvArena::new(l, (l.block_bytes() * 2) as u64).unwrap();
        let b0 = a.allocate().unwrap();
        let b1 = a.allocate().unwrap();
        a.write(b1, 1, 2, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        assert_eq!(key(&a, b1, 1, 2), [1.0, 2.0, 3.0, 4.0]);
        // K by dimension: dimension `d` of slot 2 is element `3·d + 2` of the block's K.
        assert_eq!(read(a.keys(b1, 1), 0, 12), [0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 4.0]);
        assert_eq!(read(a.values(b1, 1), 8, 4), [5.0, 6.0, 7.0, 8.0]);
        assert!(read(a.keys(b0, 1), 0, 12).iter().chain(&read(a.keys(b1, 0), 0, 12)).all(|&x| x == 0.0));
    }

    fn key(a: &KvArena, b: BlockId, layer: usize, slot: usize) -> Vec<f32> {
        let mut out = vec![0.0; a.layout().kv_dim];
        a.read_key(b, layer, slot, &mut out);
        out
    }

    fn read(rows: KvRows, start: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n];
        rows.read_f32(start, &mut out);
        out
    }

    #[test]
    fn f16_arena_holds_twice_the_blocks_and_rounds_to_half() {
        let l = layout();
        let cap = (l.block_bytes() * 2) as u64;
        let mut a = KvArena::with_dtype(l, cap, KvDtype::F16).unwrap();
        assert_eq!(a.n_blocks(), 4);
        assert_eq!(a.block_bytes(), l.block_bytes() / 2);
        assert!(a.capacity_bytes() as u64 <= cap);
        let blocks: Vec<BlockId> = (0..4).map(|_| a.allocate().unwrap()).collect();
        let k = [1.0, -2.5, 1.0e-3, 70000.0];
        a.write(blocks[3], 1, 2, &k, &[0.1, 0.2, 0.3, 0.4]);
        let want: Vec<f32> = k.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        assert_eq!(key(&a, blocks[3], 1, 2), want);
        assert_eq!(read(a.values(blocks[3], 1), 8, 4)[0], f16::from_f32(0.1).to_f32());
        assert!(matches!(a.keys(blocks[3], 1), KvRows::F16(_)));
        // The other blocks and layers are untouched.
        assert!(blocks[..3].iter().all(|&b| read(a.keys(b, 1), 0, 12).iter().all(|&x| x == 0.0)));
        assert!(read(a.keys(blocks[3], 0), 0, 12).iter().all(|&x| x == 0.0));
        // Raw words round-trip (what spill and copy-on-write move).
        let h = a.handle(blocks[3]).unwrap();
        let words = a.block_data(&h).unwrap().to_vec();
        assert_eq!(words.len(), a.block_words());
        let h0 = a.handle(blocks[0]).unwrap();
        a.write_block(&h0, &words).unwrap();
        assert_eq!(key(&a, blocks[0], 1, 2), want);
        assert!(matches!(a.write_block(&h0, &words[1..]), Err(KvError::ShapeMismatch { .. })));
    }

    #[test]
    fn handles_catch_stale_generation_shape_and_dtype() {
        let l = layout();
        let mut a = KvArena::new(l, (l.block_bytes() * 2) as u64).unwrap();
        let b = a.allocate().unwrap();
        let h = a.handle(b).unwrap();
        assert_eq!(a.check(&h), Ok(()));
        a.release(b).unwrap();
        assert_eq!(a.check(&h), Err(KvError::NotAllocated(b)));
        // The same block handed out again: the old handle is stale, never silently reused.
        let again = a.allocate_for(7).unwrap();
        assert_eq!(again, b);
        assert_eq!(a.meta(b).unwrap().owner, 7);
        let err = a.check(&h).unwrap_err();
        assert_eq!(err, KvError::StaleGeneration { id: b, expected: h.generation, found: h.generation + 1 });
        let fresh = a.handle(b).unwrap();
        let wide = BlockHandle { shape: KvLayout { kv_dim: 8, ..l }, ..fresh };
        assert!(matches!(a.check(&wide), Err(KvError::ShapeMismatch { .. })));
        let half = BlockHandle { dtype: KvDtype::F16, ..fresh };
        assert!(matches!(a.check(&half), Err(KvError::DtypeMismatch { .. })));
        assert!(matches!(a.block_data(&h), Err(KvError::StaleGeneration { .. })));
        assert_eq!(a.integrity_errors(), 5);
    }
}
