//! `forward`: one forward pass over the whole planned batch.

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::model::transformer::{LogitsWanted, SeqChunk};

/// Runs the model on every planned chunk, appending K/V and leaving one logits row per
/// sampling sequence in [`Logits`].
pub fn run_forward(
    plan: Res<BatchPlan>,
    model: Res<Model>,
    mut kv: ResMut<Kv>,
    mut logits: ResMut<Logits>,
    mut report: ResMut<TickReport>,
    mut seqs: Query<(&Tokens, &mut KvHandle, &mut Phase, &mut Outbox)>,
) {
    report.planned_tokens = plan.total_tokens();
    if plan.items.is_empty() {
        return;
    }
    let span = tracing::info_span!("forward", batch_size = plan.items.len(), batch_tokens = plan.total_tokens());
    let _g = span.enter();
    let chunks: Vec<SeqChunk> = plan
        .items
        .iter()
        .filter_map(|item| {
            let (tokens, handle, _, _) = seqs.get(item.entity).ok()?;
            Some(SeqChunk {
                tokens: tokens.ids[item.start_pos..item.start_pos + item.n_tokens].to_vec(),
                start_pos: item.start_pos,
                blocks: handle.0.blocks.clone(),
                logits: if item.samples { LogitsWanted::Last } else { LogitsWanted::None },
            })
        })
        .collect();
    report.forward_calls += 1;
    match model.0.forward(&chunks, kv.0.arena_mut(), &mut logits.0) {
        Ok(()) => {
            for item in &plan.items {
                if let Ok((_, mut handle, _, _)) = seqs.get_mut(item.entity) {
                    handle.0.len = item.start_pos + item.n_tokens;
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "forward pass failed");
            for item in &plan.items {
                if let Ok((_, _, mut phase, mut outbox)) = seqs.get_mut(item.entity) {
                    fail(
                        &mut phase,
                        &mut outbox,
                        ApiError::new(ErrorKind::Internal, format!("forward pass failed: {e}")),
                    );
                }
            }
        }
    }
}
