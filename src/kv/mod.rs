//! The KV cache: a bounded block arena per model and the block tables sequences own.

pub mod arena;
