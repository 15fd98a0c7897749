//! `constrain`: masks the logits row of each constrained sequence to what its grammar allows.

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::NextTokens;

/// For every sequence that samples this tick and carries a [`Constrained`] grammar, sets
/// the logits of tokens the grammar forbids to `-inf`. End-of-generation and stop token
/// ids stay open only where the grammar may end. The sampler then draws from what is left
/// (bias, penalties and truncation see only allowed tokens); `sample` advances the grammar.
pub fn constrain_logits(
    plan: Res<BatchPlan>,
    mut logits: ResMut<Logits>,
    tokenizer: Res<TokenizerRes>,
    mut seqs: Query<(&mut Constrained, &Sampling, &mut Phase, &mut Outbox)>,
) {
    let vocab = tokenizer.0.vocab_size();
    let eog = tokenizer.0.eog_ids();
    let mut rows = logits.0.chunks_exact_mut(vocab);
    for item in plan.items.iter().filter(|i| i.samples) {
        let Some(row) = rows.next() else { break };
        let Ok((mut constrained, sampling, mut phase, mut outbox)) = seqs.get_mut(item.entity) else { continue };
        if matches!(*phase, Phase::Finished(_)) {
            continue;
        }
        match constrained.0.0.next_tokens() {
            Ok(next) if next.free => {}
            Ok(next) => {
                let stops = &sampling.0.config().stop_token_ids;
                mask_row(row, &next, |id| eog.contains(&id) || stops.contains(&id));
            }
            Err(e) => {
                let msg = format!("the output constraint failed: {e}");
                fail(
                    &mut phase,
                    &mut outbox,
                    ApiError::new(ErrorKind::InvalidRequest, msg).with_code("constraint_failed"),
                );
            }
        }
    }
}

/// Forbids every id whose bit is clear; an ending id (`is_end`) is allowed iff the
/// grammar may end here.
fn mask_row(row: &mut [f32], next: &NextTokens<'_>, is_end: impl Fn(u32) -> bool) {
    for (id, logit) in row.iter_mut().enumerate() {
        let id = id as u32;
        let allowed = if is_end(id) {
            next.may_end
        } else {
            next.bits.get(id as usize / 32).is_some_and(|w| (w >> (id % 32)) & 1 == 1)
        };
        if !allowed {
            *logit = f32::NEG_INFINITY;
        }
    }
}
