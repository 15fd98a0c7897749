//! `constrain`: masks the logits row of each constrained sequence to what its grammar allows.

use std::collections::HashMap;

use bevy_ecs::prelude::*;
use rayon::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::NextTokens;
use crate::types::TokenId;

/// For every sequence that samples this tick and carries a [`Constrained`] grammar, sets
/// the logits of tokens the grammar forbids to `-inf`. End-of-generation and stop token
/// ids stay open only where the grammar may end. The sampler then draws from what is left
/// (bias, penalties and truncation see only allowed tokens); `sample` advances the grammar.
///
/// Rows are independent, so their masks are computed in parallel (the model's threads are
/// idle during this stage); each row's mask is the same however many run beside it.
pub fn constrain_logits(
    plan: Res<BatchPlan>,
    mut logits: ResMut<Logits>,
    tokenizer: Res<TokenizerRes>,
    mut seqs: Query<(Entity, &mut Constrained, &Sampling, &mut Phase, &mut Outbox)>,
) {
    if seqs.is_empty() {
        return;
    }
    let vocab = tokenizer.0.vocab_size();
    let eog = tokenizer.0.eog_ids();
    // A constrained sequence never drafts: its row is the first (and only) of its item.
    let mut rows: HashMap<Entity, &mut [f32]> = plan
        .sampled_rows(&mut logits.0, vocab)
        .filter_map(|(item, rows)| Some((item.entity, rows.chunks_exact_mut(vocab).next()?)))
        .collect();
    let mut work: Vec<_> = seqs
        .iter_mut()
        .filter(|(_, _, _, phase, _)| !matches!(**phase, Phase::Finished(_)))
        .filter_map(|(entity, constrained, sampling, phase, outbox)| {
            rows.remove(&entity).map(|row| (constrained, sampling, phase, outbox, row))
        })
        .collect();
    work.par_iter_mut().for_each(|(constrained, sampling, phase, outbox, row)| match constrained.0.0.next_tokens() {
        Ok(next) if next.free => {}
        Ok(next) => {
            mask_row(row, &next, eog.iter().chain(&sampling.0.config().stop_token_ids));
        }
        Err(e) => {
            let msg = format!("the output constraint failed: {e}");
            fail(phase, outbox, ApiError::new(ErrorKind::InvalidRequest, msg).with_code("constraint_failed"));
        }
    });
}
/// Forbids every id whose bit is clear; an ending id (end-of-generation or stop) keeps its
/// logit iff the grammar may end here, whatever its bit says.
fn mask_row<'a>(row: &mut [f32], next: &NextTokens<'_>, ends: impl Iterator<Item = &'a TokenId> + Clone) {
    let kept: Vec<(usize, f32)> = ends.clone().filter_map(|&id| Some((id as usize, *row.get(id as usize)?))).collect();
    for (chunk, &word) in row.chunks_mut(32).zip(next.bits.iter().chain(std::iter::repeat(&0))) {
        if word == u32::MAX {
            continue;
        }
        for (bit, logit) in chunk.iter_mut().enumerate() {
            if word >> bit & 1 == 0 {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
    for (id, logit) in kept {
        row[id] = if next.may_end { logit } else { f32::NEG_INFINITY };
    }
}
