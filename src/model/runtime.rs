//! What the engine needs from a model: its geometry and one batched forward pass.
//!
//! The engine holds the model as `Arc<dyn ModelRuntime>`, so it never names a model type.

use crate::kv::arena::{KvArena, KvLayout};
use crate::model::transformer::{ModelError, SeqChunk, Transformer};

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

impl ModelRuntime for Transformer {
    fn n_vocab(&self) -> usize {
        self.desc.n_vocab
    }

    fn n_ctx(&self) -> usize {
        self.desc.n_ctx_train
    }

    fn kv_layout(&self, block_tokens: usize) -> KvLayout {
        Transformer::kv_layout(self, block_tokens)
    }

    fn forward(&self, batch: &[SeqChunk], kv: &mut KvArena, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        Transformer::forward(self, batch, kv, logits)
    }
}
