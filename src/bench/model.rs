//! Model-only figures, measured the way `llamacpp_bench.py` measures llama.cpp.

use crate::config::KvDtype;
use std::time::Instant;

use super::common::{BenchError, ContextFigure, Step, bench_text, median};
use crate::kv::arena::{BlockTable, KvArena};
use crate::model::eval::argmax;
use crate::model::transformer::{LogitsWanted, SeqChunk, Transformer};
use crate::tokenizer::GgufTokenizer;
use crate::types::TokenId;

/// Prompt length of the prefill and long-context decode figures.
pub(crate) const PROMPT_TOKENS: usize = 512;
/// Greedy tokens per decode figure.
const GEN_TOKENS: usize = 128;
/// Sequences of the batched decode figure.
pub(crate) const BATCH: usize = 16;
/// Prompt length and steps of the batched decode figure.
const BATCH_PROMPT: usize = 32;
const BATCH_STEPS: usize = 64;
const BLOCK_TOKENS: usize = 16;
/// Greedy steps per decode figure at a long context (fewer than [`GEN_TOKENS`]: a step at
/// 8k positions is slow, and the figure barely moves over 32 positions).
pub(crate) const CONTEXT_GEN_TOKENS: usize = 32;
/// Sequences of the batched figure at a long context.
pub(crate) const CONTEXT_BATCH: usize = 4;

/// The model-only medians.
pub(crate) struct ModelFigures {
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_ctx8: f64,
    pub decode_ctx512: f64,
    pub batched: f64,
    /// The element type of the arenas the figures ran on (what the report names).
    pub kv_dtype: KvDtype,
}

/// A private arena with one block table per sequence, each holding `positions`.
struct Kv {
    arena: KvArena,
    tables: Vec<BlockTable>,
}

impl Kv {
    fn new(model: &Transformer, dtype: KvDtype, seqs: usize, positions: usize) -> Result<Self, BenchError> {
        let layout = model.kv_layout(BLOCK_TOKENS);
        let bytes = (seqs * layout.blocks_for(positions) * layout.block_bytes_as(dtype)) as u64;
        let mut arena = KvArena::with_dtype(layout, bytes, dtype).map_err(|e| BenchError::Kv(e.to_string()))?;
        let mut tables = Vec::with_capacity(seqs);
        for _ in 0..seqs {
            let mut t = BlockTable::default();
            t.reserve(&mut arena, positions).map_err(|e| BenchError::Kv(e.to_string()))?;
            tables.push(t);
        }
        Ok(Kv { arena, tables })
    }

    /// Copies sequence `from`'s blocks into sequence `to`'s (same count), so `to` holds the
    /// same K/V at every position.
    fn copy_seq(&mut self, from: usize, to: usize) -> Result<(), BenchError> {
        for i in 0..self.tables[from].blocks.len() {
            let (src, dst) = (self.tables[from].handle(i, &self.arena), self.tables[to].handle(i, &self.arena));
            self.arena.copy_block(&src, &dst).map_err(|e| BenchError::Kv(e.to_string()))?;
        }
        Ok(())
    }

    fn chunk(&self, seq: usize, tokens: Vec<TokenId>, start_pos: usize) -> SeqChunk {
        SeqChunk { tokens, start_pos, blocks: self.tables[seq].blocks.clone(), logits: LogitsWanted::Last }
    }
}

/// Prefill, single-stream decode at two context lengths, and batched decode.
pub(crate) fn measure(
    model: &Transformer,
    dtype: KvDtype,
    reps: usize,
    observe: &mut dyn FnMut(Step),
) -> Result<ModelFigures, BenchError> {
    let tok = GgufTokenizer::from_gguf(&model.file().header).map_err(|e| BenchError::Tokenizer(e.to_string()))?;
    let mut ids = tok.encode(&bench_text(), false).map_err(|e| BenchError::Tokenizer(e.to_string()))?;
    ids.truncate(PROMPT_TOKENS);
    let mut kv = Kv::new(model, dtype, 1, ids.len() + GEN_TOKENS + 1)?;
    let kv_dtype = kv.arena.dtype();
    let mut logits = Vec::new();
    let (mut pre, mut short, mut long) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 1..=reps {
        observe(Step { phase: "prefill and decode", rep, reps });
        let t = Instant::now();
        model.forward(&[kv.chunk(0, ids.clone(), 0)], &mut kv.arena, &mut logits)?;
        pre.push(ids.len() as f64 / t.elapsed().as_secs_f64());
        long.push(decode(model, &mut kv, &mut logits, ids.len())?);
        model.forward(&[kv.chunk(0, ids[..8].to_vec(), 0)], &mut kv.arena, &mut logits)?;
        short.push(decode(model, &mut kv, &mut logits, 8)?);
    }
    let batched = median(
        (1..=reps)
            .map(|rep| {
                observe(Step { phase: "batched decode", rep, reps });
                batched_decode(model, dtype, &ids)
            })
            .collect::<Result<_, _>>()?,
    );
    Ok(ModelFigures {
        prefill_tokens: ids.len(),
        prefill_tok_s: median(pre),
        decode_ctx8: median(short),
        decode_ctx512: median(long),
        batched,
        kv_dtype,
    })
}

/// The bench prompt's tokens, repeated to `n` tokens (the text holds about 4,400).
pub(crate) fn prompt_ids(model: &Transformer, n: usize) -> Result<Vec<TokenId>, BenchError> {
    let tok = GgufTokenizer::from_gguf(&model.file().header).map_err(|e| BenchError::Tokenizer(e.to_string()))?;
    let ids = tok.encode(&bench_text(), false).map_err(|e| BenchError::Tokenizer(e.to_string()))?;
    if ids.is_empty() {
        return Err(BenchError::Tokenizer("the bench text encodes to no tokens".into()));
    }
    Ok(ids.iter().copied().cycle().take(n).collect())
}

/// Figures at one context length `ctx`, each the median of `reps` runs: prefill of a
/// `ctx`-token prompt, single-stream decode after it, and [`CONTEXT_BATCH`] sequences
/// holding that prompt (copied block by block from the first) decoding together.
pub(crate) fn measure_context(
    model: &Transformer,
    dtype: KvDtype,
    ctx: usize,
    reps: usize,
    observe: &mut dyn FnMut(Step),
) -> Result<ContextFigure, BenchError> {
    let ids = prompt_ids(model, ctx)?;
    let mut kv = Kv::new(model, dtype, CONTEXT_BATCH, ctx + CONTEXT_GEN_TOKENS + 1)?;
    let (vocab, mut logits) = (model.desc.n_vocab, Vec::new());
    let (mut pre, mut single, mut batched) = (Vec::new(), Vec::new(), Vec::new());
    let phase = format!("context {ctx}");
    for rep in 1..=reps {
        observe(Step { phase: &phase, rep, reps });
        let t = Instant::now();
        model.forward(&[kv.chunk(0, ids.clone(), 0)], &mut kv.arena, &mut logits)?;
        pre.push(ids.len() as f64 / t.elapsed().as_secs_f64());
        let first = logits.clone();
        single.push(decode_steps(model, &mut kv, &mut logits, ctx, CONTEXT_GEN_TOKENS)?);
        for s in 1..CONTEXT_BATCH {
            kv.copy_seq(0, s)?;
        }
        let mut next: Vec<TokenId> = vec![argmax(&first) as TokenId; CONTEXT_BATCH];
        let t = Instant::now();
        for step in 0..CONTEXT_GEN_TOKENS {
            let chunks: Vec<SeqChunk> =
                next.iter().enumerate().map(|(s, &tok)| kv.chunk(s, vec![tok], ctx + step)).collect();
            model.forward(&chunks, &mut kv.arena, &mut logits)?;
            next = logits.chunks_exact(vocab).map(|row| argmax(row) as TokenId).collect();
        }
        batched.push((CONTEXT_BATCH * CONTEXT_GEN_TOKENS) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(ContextFigure {
        context: ctx,
        prefill_tok_s: median(pre),
        decode_tok_s: median(single),
        batch: CONTEXT_BATCH,
        batched_decode_tok_s: median(batched),
    })
}

/// Greedy tokens per second over `GEN_TOKENS` steps after a prompt of `ctx` positions
/// whose logits are in `logits`.
fn decode(model: &Transformer, kv: &mut Kv, logits: &mut Vec<f32>, ctx: usize) -> Result<f64, BenchError> {
    decode_steps(model, kv, logits, ctx, GEN_TOKENS)
}

/// Greedy tokens per second over `steps` steps of sequence 0 after a prompt of `ctx`
/// positions whose logits are in `logits`.
fn decode_steps(
    model: &Transformer,
    kv: &mut Kv,
    logits: &mut Vec<f32>,
    ctx: usize,
    steps: usize,
) -> Result<f64, BenchError> {
    let t = Instant::now();
    for step in 0..steps {
        let next = argmax(logits) as TokenId;
        model.forward(&[kv.chunk(0, vec![next], ctx + step)], &mut kv.arena, logits)?;
    }
    Ok(steps as f64 / t.elapsed().as_secs_f64())
}

/// `BATCH` sequences with `BATCH_PROMPT`-token prompts (shifted windows of `ids`), prefilled
/// together, then `BATCH_STEPS` greedy steps of one token each: generated tokens per second.
fn batched_decode(model: &Transformer, dtype: KvDtype, ids: &[TokenId]) -> Result<f64, BenchError> {
    let vocab = model.desc.n_vocab;
    let mut kv = Kv::new(model, dtype, BATCH, BATCH_PROMPT + BATCH_STEPS)?;
    let prompts: Vec<SeqChunk> = (0..BATCH).map(|s| kv.chunk(s, ids[s..s + BATCH_PROMPT].to_vec(), 0)).collect();
    let mut logits = Vec::new();
    model.forward(&prompts, &mut kv.arena, &mut logits)?;
    let t = Instant::now();
    for step in 0..BATCH_STEPS {
        let next: Vec<TokenId> = logits.chunks_exact(vocab).map(|row| argmax(row) as TokenId).collect();
        let chunks: Vec<SeqChunk> =
            next.iter().enumerate().map(|(s, &tok)| kv.chunk(s, vec![tok], BATCH_PROMPT + step)).collect();
        model.forward(&chunks, &mut kv.arena, &mut logits)?;
    }
    Ok((BATCH * BATCH_STEPS) as f64 / t.elapsed().as_secs_f64())
}
