//! The seams between Starling's parts, as small traits.
//!
//! Each names the few operations the engine needs from one part, so a test (or another
//! implementation) can drive one part without the others. The engine holds the model as
//! `Arc<dyn ModelRuntime>`; the other traits are implemented by the concrete types and used
//! where a caller should not depend on the concrete type.

use crate::engine::scheduler::FairShare;
use crate::kv::arena::{BlockTable, KvArena, KvError, KvLayout};
use crate::model::llama::{LlamaModel, ModelError, SeqChunk};
use crate::sampler::{Sampled, SamplerState};
use crate::tokenizer::{GgufTokenizer, TokenizerError};
use crate::types::{TenantId, TokenId};

/// Turns a batch of sequence chunks into logits, reading and appending K/V in `kv`.
pub trait ModelRuntime: Send + Sync {
    fn n_vocab(&self) -> usize;
    /// The context length the model was trained for.
    fn n_ctx(&self) -> usize;
    /// The KV geometry the model needs, for a block size.
    fn kv_layout(&self, block_tokens: usize) -> KvLayout;
    /// One `n_vocab` row per position that asks for logits, in batch order.
    fn forward(&self, batch: &[SeqChunk], kv: &mut KvArena, logits: &mut Vec<f32>) -> Result<(), ModelError>;
}

impl ModelRuntime for LlamaModel {
    fn n_vocab(&self) -> usize {
        self.hparams.n_vocab
    }

    fn n_ctx(&self) -> usize {
        self.hparams.n_ctx_train
    }

    fn kv_layout(&self, block_tokens: usize) -> KvLayout {
        LlamaModel::kv_layout(self, block_tokens)
    }

    fn forward(&self, batch: &[SeqChunk], kv: &mut KvArena, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        LlamaModel::forward(self, batch, kv, logits)
    }
}

/// Text to ids and back.
pub trait Tokenizer: Send + Sync {
    fn vocab_size(&self) -> usize;
    /// Ids for a prompt, with BOS/EOS where the model asks for them.
    fn encode_prompt(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>, TokenizerError>;
    fn decode(&self, ids: &[TokenId], skip_special: bool) -> Result<String, TokenizerError>;
    /// Ids that end a generation.
    fn eog_ids(&self) -> &[TokenId];
}

impl Tokenizer for GgufTokenizer {
    fn vocab_size(&self) -> usize {
        GgufTokenizer::vocab_size(self)
    }

    fn encode_prompt(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>, TokenizerError> {
        GgufTokenizer::encode_prompt(self, text, parse_special)
    }

    fn decode(&self, ids: &[TokenId], skip_special: bool) -> Result<String, TokenizerError> {
        GgufTokenizer::decode(self, ids, skip_special)
    }

    fn eog_ids(&self) -> &[TokenId] {
        GgufTokenizer::eog_ids(self)
    }
}

/// Picks one token from a logits row, reproducibly for its seed.
pub trait Sampler {
    fn seed(&self) -> u64;
    fn sample(&mut self, logits: &mut [f32], history: &[TokenId], n_generated: usize, eog_ids: &[TokenId]) -> Sampled;
}

impl Sampler for SamplerState {
    fn seed(&self) -> u64 {
        SamplerState::seed(self)
    }

    fn sample(&mut self, logits: &mut [f32], history: &[TokenId], n_generated: usize, eog_ids: &[TokenId]) -> Sampled {
        SamplerState::sample(self, logits, history, n_generated, eog_ids)
    }
}

/// Bounded K/V storage handed out in blocks, shared by prefix within a tenant.
pub trait KvCache {
    /// Makes `table` hold positions `..end` writable, all or nothing (evicting idle
    /// sessions and unreferenced prefix blocks if needed).
    fn prepare(&mut self, table: &mut BlockTable, tenant: &str, end: usize) -> Result<(), KvError>;
    /// Gives back a finished sequence's blocks; full blocks of `tokens` may stay cached.
    fn release(&mut self, table: &mut BlockTable, tenant: &str, tokens: &[TokenId]);
    /// Blocks that no sequence holds.
    fn blocks_free(&self) -> usize;
}

impl KvCache for crate::kv::cache::KvCache {
    fn prepare(&mut self, table: &mut BlockTable, tenant: &str, end: usize) -> Result<(), KvError> {
        crate::kv::cache::KvCache::prepare(self, table, tenant, end)
    }

    fn release(&mut self, table: &mut BlockTable, tenant: &str, tokens: &[TokenId]) {
        crate::kv::cache::KvCache::release(self, table, tenant, tokens)
    }

    fn blocks_free(&self) -> usize {
        self.n_blocks() - self.n_used()
    }
}

/// Decides whose work goes next when tenants compete for the batch.
pub trait Scheduler {
    /// The tenant to serve next among those with waiting work.
    fn pick<'a>(&self, waiting: &[&'a TenantId]) -> Option<&'a TenantId>;
    /// Records that `tenant` (with `weight`) received `tokens` of batch budget.
    fn charge(&mut self, tenant: &TenantId, weight: u32, tokens: usize);
}

impl Scheduler for FairShare {
    fn pick<'a>(&self, waiting: &[&'a TenantId]) -> Option<&'a TenantId> {
        FairShare::pick(self, waiting.iter().copied())
    }

    fn charge(&mut self, tenant: &TenantId, weight: u32, tokens: usize) {
        FairShare::charge(self, tenant, weight, tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fair_share_scheduler_serves_by_weighted_virtual_time() {
        let (a, b) = (TenantId::from("a"), TenantId::from("b"));
        let mut s: Box<dyn Scheduler> = Box::new(FairShare::default());
        let mut served = std::collections::HashMap::new();
        for _ in 0..400 {
            let t = s.pick(&[&a, &b]).unwrap().clone();
            let weight = if t == a { 1 } else { 3 };
            s.charge(&t, weight, 1);
            *served.entry(t).or_insert(0) += 1;
        }
        assert_eq!((served[&a], served[&b]), (100, 300));
    }
}
