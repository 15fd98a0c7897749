//! `emit`: fresh tokens become text and stream events; events go out as far as each
//! client's channel allows.

use bevy_ecs::prelude::*;
use tokio::sync::mpsc::error::TrySendError;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::protocol::{FinishReason, StreamEvent, Timings, TokenLogprob, Usage};
use crate::sampler::GateEnd;

type EmitQuery<'w, 's> = Query<
    'w,
    's,
    (
        &'static mut Outbox,
        &'static mut TextOut,
        &'static mut Phase,
        &'static mut Timing,
        &'static StreamTx,
        &'static mut Tokens,
        &'static mut KvHandle,
        &'static Sampling,
        &'static CachedPrefix,
    ),
>;

/// Detokenizes incrementally (never splitting a UTF-8 character), holds back text that may
/// start a stop string or policy match, queues the final `done` event, and sends without
/// ever blocking: a full channel pauses that sequence, a closed one cancels it.
pub fn emit_events(
    mut seqs: EmitQuery,
    tokenizer: Res<TokenizerRes>,
    clock: Res<TickClock>,
    mut report: ResMut<TickReport>,
) {
    // Emit runs after the forward pass: tokens are stamped now, not at the tick's start, so
    // time to first token includes the prefill that produced it.
    let now = clock.read();
    for (mut outbox, mut text_out, mut phase, mut timing, tx, mut tokens, mut handle, sampling, cached) in &mut seqs {
        let outbox = &mut *outbox;
        let text_out = &mut *text_out;
        let mut gate_ended = false;
        let fresh = std::mem::take(&mut outbox.fresh);
        let n_fresh = fresh.len();
        for (i, tok) in fresh.into_iter().enumerate() {
            if outbox.closed {
                break;
            }
            timing.first_token.get_or_insert(now);
            let piece = if tok.is_stop {
                String::new()
            } else {
                text_out.decoder.push(&tokenizer.0, tok.id).unwrap_or_default()
            };
            let step = text_out.gate.push(&piece);
            let top_logprobs = tok.top_logprobs.iter().map(|&(id, logprob)| TokenLogprob { id, logprob }).collect();
            outbox.pending.push_back(StreamEvent::Token {
                id: tok.id,
                text: step.emit,
                logprob: Some(tok.logprob),
                top_logprobs,
            });
            if let Some(end) = step.end {
                *phase = Phase::Finished(match end {
                    GateEnd::Stop => FinishReason::Stop,
                    GateEnd::ContentFilter => FinishReason::ContentFilter,
                });
                gate_ended = true;
                // Tokens sampled after this one in the same step (a speculating sequence
                // samples several) were never generated as far as the client knows.
                unsample(&mut tokens, &mut handle, n_fresh - i - 1);
                break;
            }
        }
        if let Phase::Finished(reason) = *phase
            && !outbox.closed
        {
            // Held-back text is released at a normal end; after a stop-string or policy
            // match, whatever followed the match is dropped.
            let tail = if gate_ended {
                String::new()
            } else {
                let rest = text_out.decoder.finish();
                let mut tail = text_out.gate.push(&rest).emit;
                tail.push_str(&text_out.gate.finish());
                tail
            };
            let done = StreamEvent::Done {
                finish_reason: reason,
                usage: Usage {
                    prompt_tokens: tokens.n_prompt,
                    cached_tokens: cached.0,
                    completion_tokens: tokens.n_generated(),
                },
                timings: timings(&timing, now),
                seed: sampling.0.seed(),
                text: tail,
            };
            outbox.pending.push_back(done);
            outbox.closed = true;
        }
        report.events_sent += send_pending(outbox, tx, &mut phase);
        outbox.stalled_since = match (outbox.pending.is_empty(), outbox.stalled_since) {
            (true, _) => None,
            (false, since) => since.or(Some(clock.now)),
        };
    }
}

/// Forgets the last `n` sampled tokens: plain decoding would have stopped before them.
/// The KV cache keeps positions only for tokens before the last one, as after any step.
fn unsample(tokens: &mut Tokens, handle: &mut KvHandle, n: usize) {
    if n == 0 {
        return;
    }
    let keep = tokens.ids.len() - n;
    tokens.ids.truncate(keep);
    handle.0.len = handle.0.len.min(keep.saturating_sub(1));
}

fn timings(t: &Timing, now: crate::types::Timestamp) -> Timings {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    Timings {
        queue_ms: ms(t.admitted.saturating_since(t.received)),
        time_to_first_token_ms: t.first_token.map_or(0.0, |f| ms(f.saturating_since(t.received))),
        total_ms: ms(now.saturating_since(t.received)),
    }
}

/// Sends queued events in order until the channel is full; returns how many went out.
fn send_pending(outbox: &mut Outbox, tx: &StreamTx, phase: &mut Phase) -> usize {
    let mut sent = 0;
    while let Some(event) = outbox.pending.pop_front() {
        match tx.0.try_send(event) {
            Ok(()) => sent += 1,
            Err(TrySendError::Full(event)) => {
                outbox.pending.push_front(event);
                break;
            }
            Err(TrySendError::Closed(_)) => {
                if !matches!(*phase, Phase::Finished(_)) {
                    *phase = Phase::Finished(FinishReason::Cancelled);
                }
                outbox.pending.clear();
                outbox.closed = true;
                break;
            }
        }
    }
    sent
}
