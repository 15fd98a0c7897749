//! Whole-sequence evaluation helpers over a private KV arena: last-position logits and
//! perplexity. Used by the CLI and the correctness tests against the golden references.

use super::kernels;
use super::transformer::{LogitsWanted, ModelError, SeqChunk, Transformer};
use crate::kv::arena::{BlockTable, KvArena};
use crate::types::TokenId;

const BLOCK_TOKENS: usize = 16;
/// Positions computed per forward call.
const CHUNK: usize = 256;

fn arena_for(model: &Transformer, positions: usize) -> Result<(KvArena, BlockTable), ModelError> {
    let layout = model.kv_layout(BLOCK_TOKENS);
    let bytes = (layout.blocks_for(positions) * layout.block_bytes()) as u64;
    let mut arena =
        KvArena::new(layout, bytes).map_err(|e| ModelError::Tensor { name: "kv".into(), message: e.to_string() })?;
    let mut table = BlockTable::default();
    table
        .reserve(&mut arena, positions)
        .map_err(|e| ModelError::Tensor { name: "kv".into(), message: e.to_string() })?;
    Ok((arena, table))
}

/// Runs `ids` in chunks and calls `each` with (position, logits row) for every position
/// whose logits `wanted` asks for.
fn run(model: &Transformer, ids: &[TokenId], all: bool, mut each: impl FnMut(usize, &[f32])) -> Result<(), ModelError> {
    let (mut arena, table) = arena_for(model, ids.len())?;
    let vocab = model.desc.n_vocab;
    let mut logits = Vec::new();
    for start in (0..ids.len()).step_by(CHUNK) {
        let end = (start + CHUNK).min(ids.len());
        let last = end == ids.len();
        let wanted = if all {
            LogitsWanted::All
        } else if last {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        let chunk = SeqChunk {
            tokens: ids[start..end].to_vec(),
            start_pos: start,
            blocks: table.blocks.clone(),
            logits: wanted,
        };
        model.forward(std::slice::from_ref(&chunk), &mut arena, &mut logits)?;
        let first = if all { start } else { end - 1 };
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            each(first + i, row);
        }
    }
    Ok(())
}

/// Logits after the whole prompt (the next-token distribution).
pub fn last_logits(model: &Transformer, ids: &[TokenId]) -> Result<Vec<f32>, ModelError> {
    let mut out = Vec::new();
    run(model, ids, false, |_, row| out = row.to_vec())?;
    Ok(out)
}

/// exp(mean negative log-likelihood) of each token given the ones before it.
pub fn perplexity(model: &Transformer, ids: &[TokenId]) -> Result<f64, ModelError> {
    let mut nll = 0.0f64;
    let mut n = 0usize;
    run(model, ids, true, |pos, row| {
        if let Some(&next) = ids.get(pos + 1) {
            nll -= log_softmax_at(row, next as usize);
            n += 1;
        }
    })?;
    Ok((nll / n.max(1) as f64).exp())
}

/// log p(index) under softmax(row), computed in f64.
pub fn log_softmax_at(row: &[f32], index: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row[index] as f64 - max - sum.ln()
}

/// Greedy (argmax) continuation of `ids` for up to `n_new` tokens, stopping after `stop`.
/// Prefills the prompt in one call, then decodes one token per call.
pub fn greedy(
    model: &Transformer,
    ids: &[TokenId],
    n_new: usize,
    stop: Option<TokenId>,
) -> Result<Vec<TokenId>, ModelError> {
    let (mut arena, table) = arena_for(model, ids.len() + n_new)?;
    let mut logits = Vec::new();
    let mut out = Vec::with_capacity(n_new);
    let mut chunk =
        SeqChunk { tokens: ids.to_vec(), start_pos: 0, blocks: table.blocks.clone(), logits: LogitsWanted::Last };
    while out.len() < n_new {
        model.forward(std::slice::from_ref(&chunk), &mut arena, &mut logits)?;
        let next = argmax(&logits) as TokenId;
        out.push(next);
        if Some(next) == stop {
            break;
        }
        chunk.start_pos += chunk.tokens.len();
        chunk.tokens = vec![next];
    }
    Ok(out)
}

/// Index of the largest value (the first one on ties); see [`kernels::argmax`].
pub fn argmax(row: &[f32]) -> usize {
    kernels::argmax(row)
}
