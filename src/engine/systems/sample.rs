//! `sample`: one token per sequence whose chunk reached its last known token.

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::protocol::FinishReason;
use crate::sampler::TokenFinish;

/// Draws the next token from each sampling sequence's logits row, appends it, and decides
/// whether the sequence is finished (`stop` on an end token, `length` at `max_tokens` or
/// the context end).
pub fn sample_next_tokens(
    plan: Res<BatchPlan>,
    mut logits: ResMut<Logits>,
    tokenizer: Res<TokenizerRes>,
    limits: Res<EngineLimits>,
    mut seqs: Query<(&mut Tokens, &mut Sampling, &mut Phase, &mut Outbox)>,
) {
    let vocab = tokenizer.0.vocab_size();
    let eog = tokenizer.0.eog_ids();
    let mut rows = logits.0.chunks_exact_mut(vocab);
    for item in plan.items.iter().filter(|i| i.samples) {
        let Some(row) = rows.next() else { break };
        let Ok((mut tokens, mut sampling, mut phase, mut outbox)) = seqs.get_mut(item.entity) else { continue };
        if matches!(*phase, Phase::Finished(_)) {
            continue;
        }
        let n_generated = tokens.n_generated();
        let s = sampling.0.sample(row, &tokens.ids, n_generated, eog);
        tokens.ids.push(s.token);
        *phase = match sampling.0.finish_after(&s, tokens.n_generated()) {
            Some(TokenFinish::Stop) => Phase::Finished(FinishReason::Stop),
            Some(TokenFinish::Length) => Phase::Finished(FinishReason::Length),
            None if tokens.ids.len() >= limits.n_ctx => Phase::Finished(FinishReason::Length),
            None => Phase::Decode,
        };
        outbox.fresh.push(FreshToken {
            id: s.token,
            logprob: s.logprob,
            top_logprobs: s.top_logprobs,
            is_stop: s.is_stop_token,
        });
    }
}
