//! `forward`: one forward pass over the whole planned batch.

use std::panic::{AssertUnwindSafe, catch_unwind};

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::kv::arena::KvArena;
use crate::model::runtime::ModelRuntime;
use crate::model::transformer::{LogitsWanted, SeqChunk};

/// Runs the model on every planned chunk, appending K/V and leaving one logits row per
/// sampling sequence in [`Logits`].
///
/// If the pass fails (an error, or a panic in the model), each chunk is run again alone,
/// so only the sequences that fail by themselves end with an error; the others go on with
/// the same logits they would have had (a row does not depend on its batch).
pub fn run_forward(
    plan: Res<BatchPlan>,
    model: Res<Model>,
    mut kv: ResMut<Kv>,
    mut logits: ResMut<Logits>,
    mut report: ResMut<TickReport>,
    mut seqs: Query<(&Tokens, &mut KvHandle, &mut Phase, &mut Outbox, Option<&Drafting>)>,
) {
    report.planned_tokens = plan.total_tokens();
    if plan.items.is_empty() {
        return;
    }
    let span = tracing::info_span!("forward", batch_size = plan.items.len(), batch_tokens = plan.total_tokens());
    let _g = span.enter();
    // The chunks of the batch, and beside them the plan index of each. A speculating
    // sequence's chunk ends with its draft, each position asking for logits.
    let (indices, chunks): (Vec<usize>, Vec<SeqChunk>) = plan
        .items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            let (tokens, handle, _, _, drafting) = seqs.get(item.entity).ok()?;
            let known = item.n_tokens - item.draft;
            let mut ids = tokens.ids[item.start_pos..item.start_pos + known].to_vec();
            if item.draft > 0 {
                ids.extend_from_slice(&drafting?.0.draft()[..item.draft]);
            }
            let chunk = SeqChunk {
                tokens: ids,
                start_pos: item.start_pos,
                blocks: handle.0.blocks.clone(),
                logits: match (item.samples, item.draft) {
                    (false, _) => LogitsWanted::None,
                    (true, 0) => LogitsWanted::Last,
                    (true, _) => LogitsWanted::All,
                },
            };
            Some((i, chunk))
        })
        .collect();
    report.forward_calls += 1;
    let arena = kv.0.arena_mut();
    let failed: Vec<(usize, String)> = match guarded(&*model.0, &chunks, arena, &mut logits.0) {
        Ok(()) => Vec::new(),
        Err(e) => {
            tracing::error!(error = %e, sequences = chunks.len(), "forward pass failed; running each sequence alone");
            retry_alone(&*model.0, &indices, &chunks, arena, &mut logits.0)
        }
    };
    for (i, item) in plan.items.iter().enumerate() {
        let Ok((_, mut handle, mut phase, mut outbox, _)) = seqs.get_mut(item.entity) else { continue };
        match failed.iter().find(|(f, _)| *f == i) {
            // Draft positions count once `sample` has verified them.
            None => handle.0.len = item.start_pos + item.n_tokens - item.draft,
            Some((_, e)) => {
                let error = ApiError::new(ErrorKind::Internal, format!("forward pass failed: {e}"));
                fail(&mut phase, &mut outbox, error);
            }
        }
    }
}

/// One forward call; a panic inside the model becomes an error.
fn guarded(model: &dyn ModelRuntime, batch: &[SeqChunk], kv: &mut KvArena, out: &mut Vec<f32>) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| model.forward(batch, kv, out))) {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(panic) => Err(panic_message(&panic)),
    }
}

/// Runs each chunk alone; returns the plan indices (`indices[k]` is chunk `k`'s) of those
/// that failed, with their errors. `logits` gets each chunk's rows in plan order (zeros
/// for a failed one, whose sequence ends before it samples).
fn retry_alone(
    model: &dyn ModelRuntime,
    indices: &[usize],
    chunks: &[SeqChunk],
    kv: &mut KvArena,
    logits: &mut Vec<f32>,
) -> Vec<(usize, String)> {
    let n_vocab = model.n_vocab();
    let (mut failed, mut row) = (Vec::new(), Vec::new());
    logits.clear();
    for (i, chunk) in indices.iter().zip(chunks) {
        let rows = chunk.logit_rows().len();
        match guarded(model, std::slice::from_ref(chunk), kv, &mut row) {
            Ok(()) => logits.extend_from_slice(&row),
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed for one sequence");
                failed.push((*i, e));
                logits.resize(logits.len() + rows * n_vocab, 0.0);
            }
        }
    }
    failed
}

/// The text of a panic's payload.
fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
    format!("the model panicked: {}", text.unwrap_or_else(|| "(no message)".into()))
}
