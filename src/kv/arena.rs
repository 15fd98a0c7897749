//! The KV block arena: one allocation per model, cut into fixed blocks of positions.
//!
//! A block holds K and V for `block_tokens` positions of every layer, laid out as
//! `[layer][k|v][slot][kv_dim]`, so one position's K (or V) row for one layer is contiguous
//! and a block's K rows for one layer are one contiguous run. Nothing outside the arena
//! allocates K/V memory; sequences own block ids through a [`BlockTable`].

use std::fmt;

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
    /// f32 values in one block (K and V, all layers).
    pub fn block_floats(&self) -> usize {
        self.n_layer * 2 * self.block_tokens * self.kv_dim
    }

    pub fn block_bytes(&self) -> usize {
        self.block_floats() * size_of::<f32>()
    }

    /// Bytes of K/V one position needs (all layers).
    pub fn bytes_per_token(&self) -> usize {
        self.n_layer * 2 * self.kv_dim * size_of::<f32>()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_tokens)
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("KV cache cap of {max_bytes} bytes holds no block of {block_bytes} bytes")]
    CapTooSmall { max_bytes: u64, block_bytes: usize },
    #[error("KV cache is full: {needed} more blocks needed, {free} free of {total}")]
    OutOfBlocks { needed: usize, free: usize, total: usize },
    #[error("block {0} is not allocated")]
    NotAllocated(BlockId),
}

/// The arena: K/V storage plus the free list.
pub struct KvArena {
    layout: KvLayout,
    data: Vec<f32>,
    free: Vec<BlockId>,
    allocated: Vec<bool>,
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

impl KvArena {
    /// An arena of as many whole blocks as fit in `max_bytes`. The memory is reserved
    /// zeroed (pages are committed by the OS only as blocks are first written).
    pub fn new(layout: KvLayout, max_bytes: u64) -> Result<Self, KvError> {
        let n_blocks = (max_bytes / layout.block_bytes() as u64) as usize;
        if n_blocks == 0 {
            return Err(KvError::CapTooSmall { max_bytes, block_bytes: layout.block_bytes() });
        }
        let n_blocks = n_blocks.min(BlockId::MAX as usize);
        Ok(KvArena {
            layout,
            data: vec![0.0; n_blocks * layout.block_floats()],
            free: (0..n_blocks as BlockId).rev().collect(),
            allocated: vec![false; n_blocks],
        })
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
        self.n_blocks() * self.layout.block_bytes()
    }

    pub fn allocate(&mut self) -> Result<BlockId, KvError> {
        let b = self.free.pop().ok_or(KvError::OutOfBlocks { needed: 1, free: 0, total: self.n_blocks() })?;
        self.allocated[b as usize] = true;
        Ok(b)
    }

    pub fn release(&mut self, b: BlockId) -> Result<(), KvError> {
        match self.allocated.get_mut(b as usize) {
            Some(live) if *live => {
                *live = false;
                self.free.push(b);
                Ok(())
            }
            _ => Err(KvError::NotAllocated(b)),
        }
    }

    fn offset(&self, b: BlockId, layer: usize, v: bool) -> usize {
        let l = &self.layout;
        b as usize * l.block_floats() + (layer * 2 + v as usize) * l.block_tokens * l.kv_dim
    }

    /// K rows of one layer in one block: `block_tokens * kv_dim` values.
    pub fn keys(&self, b: BlockId, layer: usize) -> &[f32] {
        let o = self.offset(b, layer, false);
        &self.data[o..o + self.layout.block_tokens * self.layout.kv_dim]
    }

    /// V rows of one layer in one block.
    pub fn values(&self, b: BlockId, layer: usize) -> &[f32] {
        let o = self.offset(b, layer, true);
        &self.data[o..o + self.layout.block_tokens * self.layout.kv_dim]
    }

    /// Writes one position's K and V rows for one layer.
    pub fn write(&mut self, b: BlockId, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let d = self.layout.kv_dim;
        debug_assert!(self.allocated[b as usize], "write to free block {b}");
        let ko = self.offset(b, layer, false) + slot * d;
        self.data[ko..ko + d].copy_from_slice(k);
        let vo = self.offset(b, layer, true) + slot * d;
        self.data[vo..vo + d].copy_from_slice(v);
    }
}

/// The blocks one sequence owns, in position order, and how many positions hold K/V.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<BlockId>,
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
            self.blocks.push(arena.allocate()?);
        }
        Ok(())
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
        assert_eq!(&a.keys(b1, 1)[8..12], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(&a.values(b1, 1)[8..12], &[5.0, 6.0, 7.0, 8.0]);
        assert!(a.keys(b0, 1).iter().chain(a.keys(b1, 0)).all(|&x| x == 0.0));
    }
}
