//! `sample`: one token per sequence whose chunk reached its last known token.

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::FinishReason;
use crate::sampler::{Sampled, TokenFinish};

type SampleQuery<'w, 's> = Query<
    'w,
    's,
    (
        &'static mut Tokens,
        &'static mut Sampling,
        &'static mut Phase,
        &'static mut Outbox,
        &'static mut KvHandle,
        Option<&'static mut Constrained>,
        Option<&'static mut Drafting>,
    ),
>;

/// Draws the next token from each sampling sequence's logits row, appends it, and decides
/// whether the sequence is finished (`stop` on an end token, `length` at `max_tokens` or
/// the context end).
///
/// A speculating sequence has one row per position of its step: after its last token and
/// after each draft token. Its rows are sampled in order, exactly as plain decoding would
/// sample them one step at a time (same logits, same history for penalties, the next
/// random draw), and the next row is used only while the token just sampled equals the
/// draft token its row was computed after. So the output is the same with or without
/// speculation; the draft tokens it kept have their K/V in the cache already, and blocks
/// only rejected positions reached are freed.
pub fn sample_next_tokens(
    plan: Res<BatchPlan>,
    mut logits: ResMut<Logits>,
    tokenizer: Res<TokenizerRes>,
    limits: Res<EngineLimits>,
    mut spec: ResMut<SpecStats>,
    mut kv: ResMut<Kv>,
    mut seqs: SampleQuery,
) {
    let vocab = tokenizer.0.vocab_size();
    let eog = tokenizer.0.eog_ids();
    for (item, rows) in plan.sampled_rows(&mut logits.0, vocab) {
        let Ok((mut tokens, mut sampling, mut phase, mut outbox, mut handle, mut constrained, mut drafting)) =
            seqs.get_mut(item.entity)
        else {
            continue;
        };
        if matches!(*phase, Phase::Finished(_)) {
            continue;
        }
        let draft = drafting.as_ref().map_or(&[][..], |d| &d.0.draft()[..item.draft]);
        let mut accepted = 0;
        for (r, row) in rows.chunks_exact_mut(vocab).enumerate() {
            let n_generated = tokens.n_generated();
            let s = sampling.0.sample(row, &tokens.ids, n_generated, eog);
            let mut complete = false;
            if let Some(c) = constrained.as_mut() {
                match advance(c, &s, n_generated, sampling.0.config().min_tokens) {
                    Ok(done) => complete = done,
                    Err(e) => {
                        fail(&mut phase, &mut outbox, e);
                        break;
                    }
                }
            }
            tokens.ids.push(s.token);
            *phase = match sampling.0.finish_after(&s, tokens.n_generated()) {
                Some(TokenFinish::Stop) => Phase::Finished(FinishReason::Stop),
                // A grammar that can take no more tokens ends its output with `stop`.
                _ if complete => Phase::Finished(FinishReason::Stop),
                Some(TokenFinish::Length) => Phase::Finished(FinishReason::Length),
                None if tokens.ids.len() >= limits.n_ctx => Phase::Finished(FinishReason::Length),
                None => Phase::Decode,
            };
            // The next row was computed after draft token `r`: it counts only if that is
            // the token just sampled.
            let keep = *phase == Phase::Decode && draft.get(r) == Some(&s.token);
            outbox.fresh.push(FreshToken {
                id: s.token,
                logprob: s.logprob,
                top_logprobs: s.top_logprobs,
                is_stop: s.is_stop_token,
            });
            if !keep {
                break;
            }
            accepted += 1;
        }
        if let Some(d) = drafting.as_mut() {
            spec.drafted += item.draft as u64;
            spec.accepted += accepted as u64;
            handle.0.len += accepted;
            // Blocks that only rejected positions reached go back at once.
            kv.0.truncate(&mut handle.0);
            d.0.record(accepted);
        }
    }
}

/// Moves a constrained sequence's grammar past the sampled token; returns whether the
/// grammar is complete. A draw from an empty mask (every token forbidden by the grammar,
/// bans and `min_tokens` together) is an error, never a silent token 0.
fn advance(c: &mut Constrained, s: &Sampled, n_generated: usize, min_tokens: u32) -> Result<bool, ApiError> {
    let refuse = |msg: String| ApiError::new(ErrorKind::InvalidRequest, msg).with_code("constraint_failed");
    if s.logprob == f32::NEG_INFINITY {
        return Err(refuse(format!(
            "no token is allowed after {n_generated} generated tokens: the output constraint, logit bias and \
             min_tokens together forbid every token"
        )));
    }
    if s.is_stop_token {
        return Ok(false);
    }
    c.0.0.advance(s.token).map_err(|e| refuse(format!("the output constraint rejected token {}: {e}", s.token)))?;
    let complete = c.0.0.is_complete();
    if complete && n_generated + 1 < min_tokens as usize {
        return Err(refuse(format!(
            "the constrained output is complete after {} tokens, before min_tokens = {min_tokens}",
            n_generated + 1
        )));
    }
    Ok(complete)
}
