//! The KV cache manager: the arena plus block reference counts, the prefix index, idle
//! sessions in LRU order, the optional spill file and the counters.
//!
//! A block is *writable* by a table only when that table is its sole holder and the block
//! is not in the prefix index (indexed blocks are immutable: their hash names their content).
//! [`KvCache::prepare`] makes the positions a sequence is about to compute writable, copying
//! a shared block on write. Full blocks are published under a hash chained over the tenant
//! and every token before them, so sharing never crosses tenants.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use super::arena::{BlockId, BlockTable, KvArena, KvError, KvLayout};
use super::spill::{SpillFile, SpillPage};
use crate::config::KvCacheConfig;
use crate::types::{Timestamp, TokenId};

/// Identifies a session to the cache (the engine uses the session entity's bits).
pub type SessionKey = u64;

/// Why a session's blocks were freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvictReason {
    /// Least recently used, to make room.
    Lru,
    /// Idle past the session TTL.
    Ttl,
    /// The client closed the session.
    Close,
}

/// Cache counters and gauges, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    pub blocks_total: usize,
    /// Blocks held by at least one sequence or session.
    pub blocks_used: usize,
    /// Blocks held by more than one holder.
    pub blocks_shared: usize,
    /// Unreferenced prefix blocks kept for reuse (freed first under pressure).
    pub blocks_cached: usize,
    pub bytes_used: u64,
    pub bytes_cached: u64,
    pub bytes_free: u64,
    pub allocations: u64,
    pub frees: u64,
    pub evictions_lru: u64,
    pub evictions_ttl: u64,
    pub evictions_close: u64,
    pub prefix_lookups: u64,
    /// Lookups that reused at least one block.
    pub prefix_hits: u64,
    pub prefix_hit_tokens: u64,
    pub cow_copies: u64,
    pub integrity_errors: u64,
    pub spill_writes: u64,
    pub spill_reads: u64,
    pub spill_checksum_failures: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct BlockState {
    refs: u32,
    /// Prefix hash, when the block is in the index.
    hash: Option<u64>,
    /// LRU stamp, refreshed on every use.
    stamp: u64,
}

#[derive(Debug)]
struct PrefixEntry {
    block: BlockId,
    parent: u64,
    tenant: String,
    tokens: Vec<TokenId>,
}

#[derive(Debug)]
enum Stored {
    Resident(BlockTable),
    Spilled { pages: Vec<SpillPage>, len: usize },
}

#[derive(Debug)]
struct Parked {
    tenant: String,
    tokens: Vec<TokenId>,
    stored: Stored,
    last_used: Timestamp,
    stamp: u64,
}

/// The KV cache of one model. The single owner of K/V memory.
#[derive(Debug)]
pub struct KvCache {
    arena: KvArena,
    blocks: Vec<BlockState>,
    prefix: HashMap<u64, PrefixEntry>,
    idle: HashMap<SessionKey, Parked>,
    spill: Option<SpillFile>,
    clock: u64,
    counters: KvStats,
}

impl KvCache {
    /// Wraps an arena; `spill` receives evicted session blocks when given.
    pub fn new(arena: KvArena, spill: Option<SpillFile>) -> Self {
        let blocks = vec![BlockState::default(); arena.n_blocks()];
        KvCache {
            arena,
            blocks,
            prefix: HashMap::new(),
            idle: HashMap::new(),
            spill,
            clock: 0,
            counters: KvStats::default(),
        }
    }

    /// Forgets everything: sequences, sessions and cached prefixes (after an engine restart,
    /// when no block table from before can be trusted). Counters are kept.
    pub fn reset(&mut self) {
        self.arena.reset();
        self.blocks.iter_mut().for_each(|b| *b = BlockState::default());
        self.prefix.clear();
        self.idle.clear();
        if let Some(spill) = self.spill.as_mut() {
            spill.reset();
        }
    }

    /// Builds the arena (and spill file) a model's `kv_cache` config asks for.
    pub fn from_config(layout: KvLayout, config: &KvCacheConfig) -> Result<Self, KvError> {
        let arena = KvArena::with_dtype(layout, config.max_bytes, config.dtype)?;
        // A spill file that cannot be had (full disk, file-size limit, unwritable directory)
        // turns spilling off rather than stopping the model: evicted blocks are dropped, as
        // without spill.
        let spill =
            config.spill.as_ref().and_then(|s| match SpillFile::create(&s.dir, s.max_bytes, arena.block_bytes()) {
                Ok(file) => Some(file),
                Err(e) => {
                    tracing::warn!(error = %e, "KV spill off: evicted blocks will be dropped");
                    None
                }
            });
        Ok(Self::new(arena, spill))
    }

    pub fn arena(&self) -> &KvArena {
        &self.arena
    }

    /// The arena, for the forward pass to write K/V into blocks `prepare` made writable.
    pub fn arena_mut(&mut self) -> &mut KvArena {
        &mut self.arena
    }

    pub fn layout(&self) -> KvLayout {
        self.arena.layout()
    }

    pub fn n_blocks(&self) -> usize {
        self.arena.n_blocks()
    }

    /// Blocks taken from the arena (held, or cached for prefix reuse).
    pub fn n_used(&self) -> usize {
        self.arena.n_used()
    }

    /// Blocks held by a sequence or session (excludes unreferenced cached prefix blocks).
    pub fn n_referenced(&self) -> usize {
        self.blocks.iter().filter(|b| b.refs > 0).count()
    }

    /// Reference count of block `b` (tests and diagnostics).
    pub fn refs(&self, b: BlockId) -> u32 {
        self.blocks.get(b as usize).map_or(0, |s| s.refs)
    }

    pub fn spill_file(&self) -> Option<&SpillFile> {
        self.spill.as_ref()
    }

    /// Whether an idle session is parked (resident or spilled).
    pub fn has_session(&self, key: SessionKey) -> bool {
        self.idle.contains_key(&key)
    }

    /// Counters plus current gauges.
    pub fn stats(&self) -> KvStats {
        let bytes = self.arena.block_bytes() as u64;
        let used = self.n_referenced();
        let cached = self.blocks.iter().filter(|b| b.refs == 0 && b.hash.is_some()).count();
        KvStats {
            blocks_total: self.n_blocks(),
            blocks_used: used,
            blocks_shared: self.blocks.iter().filter(|b| b.refs > 1).count(),
            blocks_cached: cached,
            bytes_used: used as u64 * bytes,
            bytes_cached: cached as u64 * bytes,
            bytes_free: self.arena.n_free() as u64 * bytes,
            integrity_errors: self.arena.integrity_errors(),
            ..self.counters.clone()
        }
    }

    fn touch(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Whether block `b` may be written: one holder and not in the prefix index.
    pub fn writable(&self, b: BlockId) -> bool {
        self.blocks.get(b as usize).is_some_and(|s| s.refs == 1 && s.hash.is_none())
    }

    /// Takes a fresh block (room must already have been made).
    fn allocate(&mut self, tenant: &str) -> Result<(BlockId, u32), KvError> {
        let b = self.arena.allocate_for(tenant_key(tenant))?;
        let stamp = self.touch();
        self.blocks[b as usize] = BlockState { refs: 1, hash: None, stamp };
        self.counters.allocations += 1;
        Ok((b, self.arena.meta(b).map_or(0, |m| m.generation)))
    }

    /// Drops one reference; an unreferenced block is freed unless the prefix index keeps it.
    fn unref(&mut self, b: BlockId) {
        let stamp = self.touch();
        let s = &mut self.blocks[b as usize];
        s.refs = s.refs.saturating_sub(1);
        s.stamp = stamp;
        if s.refs == 0 && s.hash.is_none() {
            self.free_block(b);
        }
    }

    fn free_block(&mut self, b: BlockId) {
        if let Some(h) = self.blocks[b as usize].hash.take() {
            self.prefix.remove(&h);
        }
        self.blocks[b as usize] = BlockState::default();
        if self.arena.release(b).is_ok() {
            self.counters.frees += 1;
        }
    }

    /// Checks every block of `table` against the arena (generation, shape, dtype).
    pub fn verify(&self, table: &BlockTable) -> Result<(), KvError> {
        (0..table.blocks.len()).try_for_each(|i| self.arena.check(&table.handle(i, &self.arena)))
    }

    /// Makes positions `table.len..end` writable and present: blocks past `end` are dropped,
    /// a shared or indexed block holding live positions is copied, missing blocks are
    /// allocated (evicting LRU cached blocks and idle sessions if needed). All or nothing:
    /// on error the table is unchanged.
    pub fn prepare(&mut self, table: &mut BlockTable, tenant: &str, end: usize) -> Result<(), KvError> {
        self.prepare_with(table, tenant, end, true)
    }

    /// [`KvCache::prepare`] from free blocks only: nothing cached or parked is evicted, so
    /// optional work (a speculative draft) never costs another request its cache.
    pub fn prepare_from_free(&mut self, table: &mut BlockTable, tenant: &str, end: usize) -> Result<(), KvError> {
        self.prepare_with(table, tenant, end, false)
    }

    /// Drops the table's blocks past its length (positions computed and then given up,
    /// such as rejected draft tokens), so it holds what a table grown step by step holds.
    pub fn truncate(&mut self, table: &mut BlockTable) {
        let keep = self.layout().blocks_for(table.len);
        if table.blocks.len() <= keep {
            return;
        }
        for i in keep..table.blocks.len() {
            // A stale entry is another holder's block now: never touch it.
            if self.arena.check(&table.handle(i, &self.arena)).is_ok() {
                self.unref(table.blocks[i]);
            }
        }
        table.blocks.truncate(keep);
        table.gens.truncate(keep);
    }

    fn prepare_with(&mut self, table: &mut BlockTable, tenant: &str, end: usize, evict: bool) -> Result<(), KvError> {
        self.verify(table)?;
        let bt = self.layout().block_tokens;
        let (want, first) = (self.layout().blocks_for(end.max(table.len)), table.len / bt);
        let kept = table.blocks.len().min(want);
        let replace = (first..kept).filter(|&i| !self.writable(table.blocks[i])).count();
        let needed = replace + want.saturating_sub(table.blocks.len());
        if evict {
            self.make_room(needed)?;
        } else if self.arena.n_free() < needed {
            let (free, total) = (self.arena.n_free(), self.n_blocks());
            return Err(KvError::OutOfBlocks { needed: needed - free, free, total });
        }
        for b in table.blocks.drain(kept..).collect::<Vec<_>>() {
            self.unref(b);
        }
        table.gens.truncate(kept);
        for i in first..kept {
            if !self.writable(table.blocks[i]) {
                self.copy_on_write(table, i, tenant, i == first && !table.len.is_multiple_of(bt))?;
            }
        }
        while table.blocks.len() < want {
            let (b, g) = self.allocate(tenant)?;
            table.push(b, g);
        }
        Ok(())
    }

    fn copy_on_write(&mut self, table: &mut BlockTable, i: usize, tenant: &str, copy: bool) -> Result<(), KvError> {
        let old = table.handle(i, &self.arena);
        let (b, g) = self.allocate(tenant)?;
        table.blocks[i] = b;
        table.gens[i] = g;
        if copy {
            self.arena.copy_block(&old, &table.handle(i, &self.arena))?;
            self.counters.cow_copies += 1;
        }
        self.unref(old.id);
        Ok(())
    }

    /// Frees LRU cached blocks and idle sessions until `n` blocks are free. Referenced
    /// blocks are never candidates, so a running sequence's blocks are safe.
    fn make_room(&mut self, n: usize) -> Result<(), KvError> {
        while self.arena.n_free() < n {
            let block = (0..self.blocks.len())
                .filter(|&b| self.blocks[b].refs == 0 && self.blocks[b].hash.is_some())
                .min_by_key(|&b| self.blocks[b].stamp);
            let session = self
                .idle
                .iter()
                .filter(|(_, p)| matches!(p.stored, Stored::Resident(_)))
                .min_by_key(|(_, p)| p.stamp)
                .map(|(k, p)| (*k, p.stamp));
            match (block, session) {
                (Some(b), Some((_, st))) if self.blocks[b].stamp < st => self.evict_block(b as BlockId),
                (Some(b), None) => self.evict_block(b as BlockId),
                (_, Some((key, _))) => self.evict_session_lru(key)?,
                (None, None) => {
                    let (free, total) = (self.arena.n_free(), self.n_blocks());
                    return Err(KvError::OutOfBlocks { needed: n - free, free, total });
                }
            }
        }
        Ok(())
    }

    fn evict_block(&mut self, b: BlockId) {
        self.free_block(b);
        self.counters.evictions_lru += 1;
    }

    /// Evicts an idle session's blocks: spilled to disk when a spill file has room,
    /// otherwise dropped (its tokens stay, so its next request recomputes them).
    fn evict_session_lru(&mut self, key: SessionKey) -> Result<(), KvError> {
        let Some(mut parked) = self.idle.remove(&key) else { return Ok(()) };
        self.counters.evictions_lru += 1;
        if let Stored::Resident(table) =
            std::mem::replace(&mut parked.stored, Stored::Spilled { pages: vec![], len: 0 })
        {
            let pages = self.spill_table(&table)?;
            let len = pages.len().saturating_mul(self.layout().block_tokens).min(table.len);
            for &b in &table.blocks {
                self.unref(b);
            }
            parked.stored = Stored::Spilled { pages, len };
        }
        self.idle.insert(key, parked);
        Ok(())
    }

    /// Writes the table's blocks to spill pages in order, stopping when the file is full.
    fn spill_table(&mut self, table: &BlockTable) -> Result<Vec<SpillPage>, KvError> {
        let mut pages = Vec::new();
        let Some(spill) = self.spill.as_mut() else { return Ok(pages) };
        for i in 0..self.arena.layout().blocks_for(table.len).min(table.blocks.len()) {
            let data = self.arena.block_data(&table.handle(i, &self.arena))?;
            match spill.write(data)? {
                Some(page) => pages.push(page),
                None => break,
            }
            self.counters.spill_writes += 1;
        }
        Ok(pages)
    }

    /// Shares the longest run of this tenant's published full blocks that prefixes
    /// `prompt`. The returned table's `len` stops before the last prompt token, whose
    /// logits must be computed.
    pub fn lookup_prefix(&mut self, tenant: &str, prompt: &[TokenId]) -> BlockTable {
        self.counters.prefix_lookups += 1;
        let bt = self.layout().block_tokens;
        let mut table = BlockTable::default();
        let mut parent = root_hash(tenant);
        for chunk in prompt.chunks_exact(bt) {
            let h = chain_hash(parent, chunk);
            let Some(e) = self.prefix.get(&h) else { break };
            if e.parent != parent || e.tenant != tenant || e.tokens != chunk {
                break;
            }
            let b = e.block;
            let stamp = self.touch();
            let s = &mut self.blocks[b as usize];
            s.refs += 1;
            s.stamp = stamp;
            table.push(b, self.arena.meta(b).map_or(0, |m| m.generation));
            parent = h;
        }
        table.len = (table.blocks.len() * bt).min(prompt.len().saturating_sub(1));
        if table.len > 0 {
            self.counters.prefix_hits += 1;
            self.counters.prefix_hit_tokens += table.len as u64;
        }
        table
    }

    /// Publishes the table's full blocks (their tokens are `tokens[..table.len]`) in the
    /// prefix index. A block whose prefix is already indexed elsewhere stays private.
    pub fn publish(&mut self, table: &BlockTable, tenant: &str, tokens: &[TokenId]) {
        let bt = self.layout().block_tokens;
        let known = table.len.min(tokens.len());
        let mut parent = root_hash(tenant);
        for (i, chunk) in tokens[..known].chunks_exact(bt).enumerate() {
            let h = chain_hash(parent, chunk);
            let b = table.blocks[i];
            if self.arena.check(&table.handle(i, &self.arena)).is_err() {
                return;
            }
            if self.blocks[b as usize].hash.is_none() && !self.prefix.contains_key(&h) {
                self.blocks[b as usize].hash = Some(h);
                let entry = PrefixEntry { block: b, parent, tenant: tenant.to_owned(), tokens: chunk.to_vec() };
                self.prefix.insert(h, entry);
            }
            parent = h;
        }
    }

    /// Ends a sequence: publishes its full blocks, then drops its references.
    pub fn release(&mut self, table: &mut BlockTable, tenant: &str, tokens: &[TokenId]) {
        self.publish(table, tenant, tokens);
        for i in 0..table.blocks.len() {
            // A stale entry is another holder's block now: never touch it.
            if self.arena.check(&table.handle(i, &self.arena)).is_ok() {
                self.unref(table.blocks[i]);
            }
        }
        *table = BlockTable::default();
    }

    /// Parks a session's table while no request holds it (it becomes evictable). An
    /// empty table never replaces a parked one (the request never took it).
    pub fn park_session(
        &mut self,
        key: SessionKey,
        tenant: &str,
        mut table: BlockTable,
        tokens: &[TokenId],
        now: Timestamp,
    ) {
        let stamp = self.touch();
        if table.blocks.is_empty()
            && let Some(p) = self.idle.get_mut(&key)
        {
            p.last_used = now;
            p.stamp = stamp;
            return;
        }
        self.drop_parked(key);
        self.publish(&table, tenant, tokens);
        table.len = table.len.min(tokens.len());
        // Blocks past the kept positions (computed, then given up) are not the session's.
        self.truncate(&mut table);
        let tokens = tokens[..table.len].to_vec();
        let stored = Stored::Resident(table);
        self.idle.insert(key, Parked { tenant: tenant.to_owned(), tokens, stored, last_used: now, stamp });
    }

    /// Takes a parked session for a request (it can no longer be evicted): its tokens and
    /// a table covering them. Spilled blocks are read back; a page failing its checksum is
    /// discarded and the positions from it on are left to be recomputed.
    pub fn take_session(&mut self, key: SessionKey) -> Option<(Vec<TokenId>, BlockTable)> {
        let parked = self.idle.remove(&key)?;
        let table = match parked.stored {
            Stored::Resident(t) => t,
            Stored::Spilled { pages, len } => self.restore(&parked.tenant, pages, len),
        };
        Some((parked.tokens, table))
    }

    fn restore(&mut self, tenant: &str, pages: Vec<SpillPage>, len: usize) -> BlockTable {
        let mut table = BlockTable::default();
        let mut buf = vec![0.0f32; self.arena.block_words()];
        let mut pages = pages.into_iter();
        if self.make_room(pages.len()).is_ok() {
            for page in pages.by_ref() {
                let Some(spill) = self.spill.as_mut() else { break };
                self.counters.spill_reads += 1;
                if !spill.read(page, &mut buf).unwrap_or(false) {
                    self.counters.spill_checksum_failures += 1;
                    break;
                }
                let Ok((b, g)) = self.allocate(tenant) else { break };
                table.push(b, g);
                // The handle was just made; the write cannot fail its check.
                let _ = self.arena.write_block(&table.handle(table.blocks.len() - 1, &self.arena), &buf);
            }
        }
        if let Some(spill) = self.spill.as_mut() {
            pages.for_each(|p| spill.release(p));
        }
        table.len = len.min(table.blocks.len() * self.layout().block_tokens);
        table
    }

    fn drop_parked(&mut self, key: SessionKey) -> bool {
        let Some(parked) = self.idle.remove(&key) else { return false };
        match parked.stored {
            Stored::Resident(mut t) => {
                let tokens = parked.tokens;
                self.release(&mut t, &parked.tenant, &tokens);
            }
            Stored::Spilled { pages, .. } => {
                if let Some(spill) = self.spill.as_mut() {
                    pages.into_iter().for_each(|p| spill.release(p));
                }
            }
        }
        true
    }

    /// Frees an idle session (close or TTL). Returns whether it was parked.
    pub fn drop_session(&mut self, key: SessionKey, reason: EvictReason) -> bool {
        let dropped = self.drop_parked(key);
        if dropped {
            match reason {
                EvictReason::Lru => self.counters.evictions_lru += 1,
                EvictReason::Ttl => self.counters.evictions_ttl += 1,
                EvictReason::Close => self.counters.evictions_close += 1,
            }
        }
        dropped
    }

    /// Frees idle sessions unused for at least `ttl`; returns their keys.
    pub fn expire_idle(&mut self, now: Timestamp, ttl: Duration) -> Vec<SessionKey> {
        let mut expired: Vec<SessionKey> =
            self.idle.iter().filter(|(_, p)| now.saturating_since(p.last_used) >= ttl).map(|(k, _)| *k).collect();
        expired.sort_unstable();
        for &key in &expired {
            self.drop_session(key, EvictReason::Ttl);
        }
        expired
    }

    /// Frees every unreferenced cached prefix block.
    pub fn purge_prefix_cache(&mut self) {
        for b in 0..self.blocks.len() {
            if self.blocks[b].refs == 0 && self.blocks[b].hash.is_some() {
                self.free_block(b as BlockId);
            }
        }
    }
}

fn tenant_key(tenant: &str) -> u64 {
    let mut h = DefaultHasher::new();
    ("starling-kv-tenant", tenant).hash(&mut h);
    h.finish().max(1)
}

fn root_hash(tenant: &str) -> u64 {
    let mut h = DefaultHasher::new();
    ("starling-kv-root", tenant).hash(&mut h);
    h.finish()
}

fn chain_hash(parent: u64, tokens: &[TokenId]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}
