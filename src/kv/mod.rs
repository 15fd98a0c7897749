//! The KV cache: a bounded block arena per model ([`arena`]), the cache manager that shares,
//! evicts and checks its blocks ([`cache`]), and the disk spill for evicted sessions ([`spill`]).

pub mod arena;
pub mod cache;
pub mod spill;

pub use arena::{BlockHandle, BlockId, BlockTable, KvArena, KvError, KvLayout};
pub use cache::{EvictReason, KvCache, KvStats, SessionKey};
