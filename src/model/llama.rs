//! The llama-family forward pass over a batch of sequences.
//!
//! Weights stay in the memory-mapped GGUF file in their stored (quantized) form; only the
//! small norm vectors are copied. K/V live outside the model, in the [`KvArena`] the caller
//! passes in. One call runs any mix of sequences: some prefilling many tokens, some decoding
//! one. Every per-row computation (norms, RoPE, attention, and the kernels' matmul) is done
//! the same way whatever else is in the batch, so a sequence's logits are bit-identical
//! alone or batched.

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use rayon::prelude::*;

use super::arch::{LlamaHparams, validate_llama};
use super::ggml_type::GgmlType;
use super::gguf::{GgufError, GgufFile, TensorInfo};
use super::kernels::attention::{AttnShape, CHUNK, ChunkJob, ChunkScratch, merge};
use super::kernels::{Kernels, MatmulScratch, QMatrix};
use super::ops::{AttnScratch, attend_row, rms_norm, rms_norm_rows, rope, rope_angles, silu};
use crate::kv::arena::{BlockId, KvArena, KvLayout};
use crate::types::TokenId;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Arch(#[from] super::arch::ArchError),
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error("token id {id} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { id: TokenId, vocab: usize },
    #[error("position {pos} is past the context length {n_ctx}")]
    ContextOverflow { pos: usize, n_ctx: usize },
    #[error("sequence {seq}: block table holds {capacity} positions, {needed} needed")]
    KvTooSmall { seq: usize, capacity: usize, needed: usize },
    #[error("KV layout {found:?} does not match the model's {expected:?}")]
    KvLayoutMismatch { expected: KvLayout, found: KvLayout },
    #[error("cannot start the model thread pool: {0}")]
    ThreadPool(String),
    #[error(transparent)]
    Kernels(#[from] super::kernels::KernelError),
}

/// Most attention chunks whose partial results are held at once (about 10 MB for
/// SmolLM2's 9 heads of 64).
const MAX_ATTN_CHUNKS: usize = 4096;

/// Fewest rows per pool thread for a batch to be split by sequence (one full x tile of
/// the AVX-512 kernels each).
const SPLIT_MIN_ROWS: usize = 8;

/// How a step's matmuls and attention use the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exec {
    /// Each matmul, and the attention chunks, spread over the pool.
    Pool,
    /// All on the calling thread: one group of a batch split by sequence.
    Serial,
}

thread_local! {
    /// Attention chunk buffers of each model pool thread (grown once, then reused).
    static ATTN_SCRATCH: std::cell::RefCell<ChunkScratch> = std::cell::RefCell::new(ChunkScratch::default());
}

/// Which logits a sequence wants back from a forward call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsWanted {
    None,
    /// Only after the last token of the chunk (generation).
    Last,
    /// After every token of the chunk (perplexity, prompt logprobs).
    All,
}

/// One sequence's share of a forward call.
#[derive(Clone, Debug)]
pub struct SeqChunk {
    /// Tokens to run, at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: Vec<TokenId>,
    pub start_pos: usize,
    /// The sequence's blocks; must already hold `start_pos + tokens.len()` positions.
    pub blocks: Vec<BlockId>,
    pub logits: LogitsWanted,
}

/// Where a weight matrix lives in the file.
#[derive(Clone, Debug)]
struct MatrixRef {
    info: TensorInfo,
    rows: usize,
    cols: usize,
}

struct LayerWeights {
    attn_norm: Vec<f32>,
    wq: MatrixRef,
    wk: MatrixRef,
    wv: MatrixRef,
    wo: MatrixRef,
    ffn_norm: Vec<f32>,
    w_gate: MatrixRef,
    w_up: MatrixRef,
    w_down: MatrixRef,
}

/// Reusable buffers for one forward call (grown, never shrunk).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    /// Attention work items `(row, first position)`, and each one's partial result.
    attn_items: Vec<(usize, usize)>,
    attn_parts: Vec<f32>,
    /// Where each row's partials start in `attn_parts`.
    attn_first: Vec<usize>,
    gate: Vec<f32>,
    up: Vec<f32>,
    rows: Vec<RowInfo>,
    /// RoPE cosines and sines of each row's position (`rope_dim / 2` per row), shared by
    /// every head and layer.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    matmul: MatmulScratch,
    /// Attention buffers of one row at a time (serial groups).
    attn_row: AttnScratch,
    /// One scratch per sequence group when a batch is split over the threads.
    groups: Vec<Scratch>,
    /// The sequence groups of the current batch when it is split, else empty (see
    /// [`sequence_groups`]); kept to reuse its allocation.
    seq_groups: Vec<Range<usize>>,
}

#[derive(Clone, Copy)]
struct RowInfo {
    seq: usize,
    pos: usize,
}

/// A loaded llama-family model: hyper-parameters, weight locations, kernels, thread pool.
pub struct LlamaModel {
    pub hparams: LlamaHparams,
    file: GgufFile,
    embeddings: MatrixRef,
    output: MatrixRef,
    output_norm: Vec<f32>,
    layers: Vec<LayerWeights>,
    /// RoPE inverse frequencies, one per rotated pair.
    inv_freq: Vec<f64>,
    kernels: Kernels,
    pool: rayon::ThreadPool,
    scratch: Mutex<Scratch>,
}

impl LlamaModel {
    /// Maps, validates and prepares a GGUF model; `threads` sizes the model's own pool. The
    /// kernels are [`Kernels::from_env`]'s: the CPU's default set, or `STARLING_KERNELS`.
    pub fn load(path: &Path, threads: usize) -> Result<Self, ModelError> {
        let kernels = Kernels::from_env()?;
        let file = GgufFile::open(path)?;
        Self::from_file(file, threads, kernels)
    }

    /// Builds the model over an opened file with the given kernels (tests pass `portable`).
    pub fn from_file(file: GgufFile, threads: usize, kernels: Kernels) -> Result<Self, ModelError> {
        let hp = validate_llama(&file.header)?;
        let matrix = |name: &str| matrix_ref(&file, name);
        let vector = |name: &str| f32_vector(&file, name);
        let mut layers = Vec::with_capacity(hp.n_layer);
        for i in 0..hp.n_layer {
            layers.push(LayerWeights {
                attn_norm: vector(&format!("blk.{i}.attn_norm.weight"))?,
                wq: matrix(&format!("blk.{i}.attn_q.weight"))?,
                wk: matrix(&format!("blk.{i}.attn_k.weight"))?,
                wv: matrix(&format!("blk.{i}.attn_v.weight"))?,
                wo: matrix(&format!("blk.{i}.attn_output.weight"))?,
                ffn_norm: vector(&format!("blk.{i}.ffn_norm.weight"))?,
                w_gate: matrix(&format!("blk.{i}.ffn_gate.weight"))?,
                w_up: matrix(&format!("blk.{i}.ffn_up.weight"))?,
                w_down: matrix(&format!("blk.{i}.ffn_down.weight"))?,
            });
        }
        let embeddings = matrix("token_embd.weight")?;
        let output = if hp.tied_output { embeddings.clone() } else { matrix("output.weight")? };
        let output_norm = vector("output_norm.weight")?;
        let inv_freq = (0..hp.rope_dim / 2)
            .map(|i| (hp.rope_freq_base as f64).powf(-2.0 * i as f64 / hp.rope_dim as f64))
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("starling-model-{i}"))
            .build()
            .map_err(|e| ModelError::ThreadPool(e.to_string()))?;
        Ok(LlamaModel {
            hparams: hp,
            file,
            embeddings,
            output,
            output_norm,
            layers,
            inv_freq,
            kernels,
            pool,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Bytes the attention partials of the pooled forward pass hold (their capacity): at
    /// most `MAX_ATTN_CHUNKS` (4,096) chunks' worth however long the batch's rows are. (A
    /// batch split by sequence holds one row's partials per thread instead.)
    pub fn attention_scratch_bytes(&self) -> usize {
        let s = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        s.attn_parts.capacity() * std::mem::size_of::<f32>()
    }

    /// The largest [`Self::attention_scratch_bytes`] can grow to.
    pub fn attention_scratch_cap(&self) -> usize {
        MAX_ATTN_CHUNKS * self.attn_shape().partial_len() * std::mem::size_of::<f32>()
    }

    /// The runs of sequences `batch` would be split into, one per pool thread, or `None`
    /// when it runs with each matmul spread over the pool instead.
    pub fn sequence_groups(&self, batch: &[SeqChunk]) -> Option<Vec<Range<usize>>> {
        let mut groups = Vec::new();
        sequence_groups(batch, self.threads(), &mut groups).then_some(groups)
    }

    fn attn_shape(&self) -> AttnShape {
        let hp = &self.hparams;
        AttnShape { n_head: hp.n_head, n_head_kv: hp.n_head_kv, head_dim: hp.head_dim }
    }

    /// The KV geometry this model needs, with the given block size.
    pub fn kv_layout(&self, block_tokens: usize) -> KvLayout {
        KvLayout { n_layer: self.hparams.n_layer, kv_dim: self.hparams.n_head_kv * self.hparams.head_dim, block_tokens }
    }

    fn qmatrix(&self, m: &MatrixRef) -> QMatrix<'_> {
        QMatrix::new(m.info.ggml_type, m.rows, m.cols, self.file.tensor_data(&m.info)).expect("shape checked at load")
    }

    /// Runs the batch, appending K/V for every token, and writes logits into `logits`:
    /// one `n_vocab` row per position asked for, in batch order.
    pub fn forward(&self, batch: &[SeqChunk], kv: &mut KvArena, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        self.check_batch(batch, kv)?;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        // One pool entry for the whole pass: the forks inside (per matmul, or per layer for a
        // batch split by sequence) start from a pool thread.
        let s: &mut Scratch = &mut guard;
        self.pool.install(|| self.run(batch, kv, s, logits));
        Ok(())
    }

    fn run(&self, batch: &[SeqChunk], kv: &mut KvArena, s: &mut Scratch, logits: &mut Vec<f32>) {
        let wanted: usize = batch.iter().map(|c| logit_rows(c).len()).sum();
        logits.clear();
        logits.resize(wanted * self.hparams.n_vocab, 0.0);
        let mut groups = std::mem::take(&mut s.seq_groups);
        if sequence_groups(batch, self.threads(), &mut groups) {
            self.run_split(batch, kv, s, &groups, logits);
            s.seq_groups = groups;
            return;
        }
        s.seq_groups = groups;
        self.prepare(batch, 0..batch.len(), s);
        if s.rows.is_empty() {
            return;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            self.qkv(layer, s, Exec::Pool);
            self.write_kv(li, batch, kv, s);
            self.attention_out(li, layer, batch, kv, s, Exec::Pool);
            self.ffn_block(layer, s, Exec::Pool);
        }
        self.output_logits(batch, s, logits, Exec::Pool);
    }

    /// The batch split by sequence (`groups`): each pool thread runs its sequences through
    /// every layer on its own, with serial matmuls and attention, so a step has one fork and
    /// join per layer (around the K/V writes) instead of one per matmul. Each row goes
    /// through the same kernel calls as in the pooled path, so the bits are the same.
    fn run_split(
        &self,
        batch: &[SeqChunk],
        kv: &mut KvArena,
        s: &mut Scratch,
        groups: &[Range<usize>],
        logits: &mut [f32],
    ) {
        if s.groups.len() < groups.len() {
            s.groups.resize_with(groups.len(), Scratch::default);
        }
        let gs = &mut s.groups[..groups.len()];
        let layers = &self.layers;
        self.each_group(gs, groups, |g, seqs| {
            self.prepare(batch, seqs, g);
            self.qkv(&layers[0], g, Exec::Serial);
        });
        for (li, layer) in layers.iter().enumerate() {
            for g in gs.iter() {
                self.write_kv(li, batch, kv, g);
            }
            let kv = &*kv;
            self.each_group(gs, groups, |g, _| {
                self.attention_out(li, layer, batch, kv, g, Exec::Serial);
                self.ffn_block(layer, g, Exec::Serial);
                if let Some(next) = layers.get(li + 1) {
                    self.qkv(next, g, Exec::Serial);
                }
            });
        }
        self.pool.install(|| self.group_logits(batch, gs, groups, logits));
    }

    /// Each group's output logits into its own run of `logits`, the groups in parallel: the
    /// slice is halved with the groups (one `join` per level), so nothing is allocated.
    fn group_logits(&self, batch: &[SeqChunk], gs: &mut [Scratch], groups: &[Range<usize>], logits: &mut [f32]) {
        debug_assert_eq!(gs.len(), groups.len(), "one scratch per group");
        if groups.is_empty() {
            return;
        }
        if let ([g], [seqs]) = (&mut *gs, groups) {
            return self.output_logits(&batch[seqs.clone()], g, logits, Exec::Serial);
        }
        let mid = groups.len() / 2;
        let rows: usize = groups[..mid].iter().flat_map(|seqs| &batch[seqs.clone()]).map(|c| logit_rows(c).len()).sum();
        let (out_a, out_b) = logits.split_at_mut(rows * self.hparams.n_vocab);
        let (gs_a, gs_b) = gs.split_at_mut(mid);
        rayon::join(
            || self.group_logits(batch, gs_a, &groups[..mid], out_a),
            || self.group_logits(batch, gs_b, &groups[mid..], out_b),
        );
    }

    /// Runs `f` on every group's scratch and sequence range, one pool task per group.
    fn each_group(&self, gs: &mut [Scratch], groups: &[Range<usize>], f: impl Fn(&mut Scratch, Range<usize>) + Sync) {
        self.pool.install(|| gs.par_iter_mut().zip(groups.par_iter()).for_each(|(g, seqs)| f(g, seqs.clone())));
    }

    /// Fills `s` for the rows of sequences `seqs`: row positions, RoPE angles and the
    /// token embeddings.
    fn prepare(&self, batch: &[SeqChunk], seqs: Range<usize>, s: &mut Scratch) {
        let d = self.hparams.n_embd;
        s.rows.clear();
        for seq in seqs.clone() {
            let c = &batch[seq];
            s.rows.extend((0..c.tokens.len()).map(|i| RowInfo { seq, pos: c.start_pos + i }));
        }
        let t = s.rows.len();
        let pairs = self.inv_freq.len();
        resize(&mut s.rope_cos, t * pairs);
        resize(&mut s.rope_sin, t * pairs);
        for ((info, cos), sin) in
            s.rows.iter().zip(s.rope_cos.chunks_exact_mut(pairs)).zip(s.rope_sin.chunks_exact_mut(pairs))
        {
            rope_angles(info.pos, &self.inv_freq, cos, sin);
        }
        resize(&mut s.x, t * d);
        let emb = self.qmatrix(&self.embeddings);
        for (row, tok) in s.x.chunks_exact_mut(d).zip(batch[seqs].iter().flat_map(|c| c.tokens.iter())) {
            self.kernels.dequantize_row(emb.ggml_type, emb.row(*tok as usize), row);
        }
    }

    fn check_batch(&self, batch: &[SeqChunk], kv: &KvArena) -> Result<(), ModelError> {
        let expected = self.kv_layout(kv.layout().block_tokens);
        if kv.layout() != expected {
            return Err(ModelError::KvLayoutMismatch { expected, found: kv.layout() });
        }
        for (seq, c) in batch.iter().enumerate() {
            if let Some(&id) = c.tokens.iter().find(|&&id| id as usize >= self.hparams.n_vocab) {
                return Err(ModelError::TokenOutOfRange { id, vocab: self.hparams.n_vocab });
            }
            let end = c.start_pos.saturating_add(c.tokens.len());
            if end > self.hparams.n_ctx_train {
                return Err(ModelError::ContextOverflow { pos: end - 1, n_ctx: self.hparams.n_ctx_train });
            }
            let capacity = c.blocks.len() * expected.block_tokens;
            if capacity < end {
                return Err(ModelError::KvTooSmall { seq, capacity, needed: end });
            }
        }
        Ok(())
    }

    /// Attention norm, the Q/K/V projections and RoPE of every row of `s`.
    fn qkv(&self, layer: &LayerWeights, s: &mut Scratch, ex: Exec) {
        let t = s.rows.len();
        let hp = &self.hparams;
        let (d, kvd) = (hp.n_embd, hp.n_head_kv * hp.head_dim);
        resize(&mut s.h, t * d);
        rms_norm_rows(&s.x, &layer.attn_norm, hp.rms_eps, &mut s.h);
        resize(&mut s.q, t * d);
        resize(&mut s.k, t * kvd);
        resize(&mut s.v, t * kvd);
        self.matmul(&layer.wq, &s.h, t, &mut s.q, &mut s.matmul, ex);
        self.matmul(&layer.wk, &s.h, t, &mut s.k, &mut s.matmul, ex);
        self.matmul(&layer.wv, &s.h, t, &mut s.v, &mut s.matmul, ex);
        let hd = hp.head_dim;
        let pairs = self.inv_freq.len();
        for r in 0..t {
            let (cos, sin) = (&s.rope_cos[r * pairs..(r + 1) * pairs], &s.rope_sin[r * pairs..(r + 1) * pairs]);
            for head in
                s.q[r * d..(r + 1) * d].chunks_exact_mut(hd).chain(s.k[r * kvd..(r + 1) * kvd].chunks_exact_mut(hd))
            {
                rope(head, cos, sin);
            }
        }
    }

    /// Stores every row's K and V of layer `li` at its position.
    fn write_kv(&self, li: usize, batch: &[SeqChunk], kv: &mut KvArena, s: &Scratch) {
        let kvd = self.hparams.n_head_kv * self.hparams.head_dim;
        let bt = kv.layout().block_tokens;
        for (r, info) in s.rows.iter().enumerate() {
            let block = batch[info.seq].blocks[info.pos / bt];
            kv.write(block, li, info.pos % bt, &s.k[r * kvd..(r + 1) * kvd], &s.v[r * kvd..(r + 1) * kvd]);
        }
    }

    /// Attention over the cache, the output projection and the residual add.
    fn attention_out(
        &self,
        li: usize,
        layer: &LayerWeights,
        batch: &[SeqChunk],
        kv: &KvArena,
        s: &mut Scratch,
        ex: Exec,
    ) {
        let t = s.rows.len();
        match ex {
            Exec::Pool => self.attention(li, batch, kv, s),
            Exec::Serial => {
                let (d, shape) = (self.hparams.n_embd, self.attn_shape());
                resize(&mut s.attn, t * d);
                for ((r, info), out) in s.rows.iter().enumerate().zip(s.attn.chunks_exact_mut(d)) {
                    let q = &s.q[r * d..(r + 1) * d];
                    let blocks = &batch[info.seq].blocks;
                    attend_row(self.kernels, shape, li, q, info.pos, blocks, kv, &mut s.attn_row, out);
                }
            }
        }
        self.matmul(&layer.wo, &s.attn, t, &mut s.h, &mut s.matmul, ex);
        for (x, o) in s.x.iter_mut().zip(&s.h) {
            *x += o;
        }
    }

    /// Every row's attention: its chunks of positions spread over the pool as one list (so
    /// one long row keeps both cores busy), then each row's chunks merged in order. Rows go
    /// in groups of at most [`MAX_ATTN_CHUNKS`] chunks, which bounds the partials' memory
    /// (a deep prefill would otherwise hold every row's chunks at once).
    fn attention(&self, li: usize, batch: &[SeqChunk], kv: &KvArena, s: &mut Scratch) {
        let d = self.hparams.n_embd;
        resize(&mut s.attn, s.rows.len() * d);
        let mut r0 = 0;
        while r0 < s.rows.len() {
            let (mut r1, mut chunks) = (r0, 0);
            while r1 < s.rows.len() && (r1 == r0 || chunks + AttnShape::chunks(s.rows[r1].pos) <= MAX_ATTN_CHUNKS) {
                chunks += AttnShape::chunks(s.rows[r1].pos);
                r1 += 1;
            }
            self.attention_rows(li, batch, kv, s, r0..r1);
            r0 = r1;
        }
    }

    /// [`Self::attention`] for rows `rows` of the batch.
    fn attention_rows(&self, li: usize, batch: &[SeqChunk], kv: &KvArena, s: &mut Scratch, rows: Range<usize>) {
        let shape = self.attn_shape();
        let (d, plen) = (self.hparams.n_embd, shape.partial_len());
        let infos = &s.rows[rows.clone()];
        s.attn_items.clear();
        s.attn_first.clear();
        for (r, info) in infos.iter().enumerate() {
            s.attn_first.push(s.attn_items.len() * plen);
            s.attn_items.extend((0..AttnShape::chunks(info.pos)).map(|c| (r, c * CHUNK)));
        }
        resize(&mut s.attn_parts, s.attn_items.len() * plen);
        let q = &s.q[rows.start * d..rows.end * d];
        let (items, kernels) = (&s.attn_items, self.kernels);
        self.pool.install(|| {
            s.attn_parts.par_chunks_mut(plen).zip(items.par_iter()).for_each(|(part, &(r, first))| {
                let info = infos[r];
                let range = first..(first + CHUNK).min(info.pos + 1);
                let q = &q[r * d..(r + 1) * d];
                let job = ChunkJob { shape, layer: li, q, range, blocks: &batch[info.seq].blocks, kv };
                ATTN_SCRATCH.with_borrow_mut(|scratch| kernels.attend_chunk(&job, scratch, part));
            });
        });
        let (parts, firsts) = (&s.attn_parts, &s.attn_first);
        self.pool.install(|| {
            s.attn[rows.start * d..rows.end * d].par_chunks_mut(d).enumerate().for_each(|(r, out)| {
                let n = AttnShape::chunks(infos[r].pos) * plen;
                merge(shape, &parts[firsts[r]..firsts[r] + n], out);
            });
        });
    }

    fn ffn_block(&self, layer: &LayerWeights, s: &mut Scratch, ex: Exec) {
        let t = s.rows.len();
        let ff = self.hparams.n_ff;
        rms_norm_rows(&s.x, &layer.ffn_norm, self.hparams.rms_eps, &mut s.h);
        resize(&mut s.gate, t * ff);
        resize(&mut s.up, t * ff);
        self.matmul(&layer.w_gate, &s.h, t, &mut s.gate, &mut s.matmul, ex);
        self.matmul(&layer.w_up, &s.h, t, &mut s.up, &mut s.matmul, ex);
        for (g, u) in s.gate.iter_mut().zip(&s.up) {
            *g = silu(*g) * u;
        }
        self.matmul(&layer.w_down, &s.gate, t, &mut s.h, &mut s.matmul, ex);
        for (x, o) in s.x.iter_mut().zip(&s.h) {
            *x += o;
        }
    }

    /// Final norm and output head for the rows of `batch` (the sequences whose rows `s`
    /// holds) that want logits, in batch order, into `out`.
    fn output_logits(&self, batch: &[SeqChunk], s: &mut Scratch, out: &mut [f32], ex: Exec) {
        let d = self.hparams.n_embd;
        let (mut n, mut r) = (0, 0);
        for c in batch {
            for i in logit_rows(c) {
                let row = &s.x[(r + i) * d..(r + i + 1) * d];
                rms_norm(row, &self.output_norm, self.hparams.rms_eps, &mut s.h[n * d..(n + 1) * d]);
                n += 1;
            }
            r += c.tokens.len();
        }
        if n > 0 {
            let h = std::mem::take(&mut s.h);
            self.matmul(&self.output, &h[..n * d], n, out, &mut s.matmul, ex);
            s.h = h;
        }
    }

    fn matmul(&self, m: &MatrixRef, x: &[f32], n: usize, y: &mut [f32], scratch: &mut MatmulScratch, ex: Exec) {
        let w = self.qmatrix(m);
        let (x, y) = (&x[..n * m.cols], &mut y[..n * m.rows]);
        match ex {
            Exec::Pool => self.kernels.matmul(&w, x, n, y, scratch, &self.pool),
            Exec::Serial => self.kernels.matmul_serial(&w, x, n, y, scratch),
        }
    }
}

/// Splits a batch of many sequences into one contiguous run of sequences per pool
/// thread, written into `groups` (reused, so a decode step allocates nothing), when every
/// run gets at least [`SPLIT_MIN_ROWS`] rows and the largest is at most a quarter above an
/// even share; `false` otherwise (few rows, or one long prefill).
fn sequence_groups(batch: &[SeqChunk], threads: usize, groups: &mut Vec<Range<usize>>) -> bool {
    groups.clear();
    let total: usize = batch.iter().map(|c| c.tokens.len()).sum();
    if threads < 2 || batch.len() < threads || total < SPLIT_MIN_ROWS * threads {
        return false;
    }
    let (mut start, mut rows) = (0, 0);
    for (i, c) in batch.iter().enumerate() {
        rows += c.tokens.len();
        if groups.len() + 1 < threads && rows * threads >= total * (groups.len() + 1) {
            groups.push(start..i + 1);
            start = i + 1;
        }
    }
    groups.push(start..batch.len());
    let sizes = groups.iter().map(|g| batch[g.clone()].iter().map(|c| c.tokens.len()).sum::<usize>());
    let (least, most) = sizes.fold((usize::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
    let split = groups.len() == threads && least >= SPLIT_MIN_ROWS && most * threads * 4 <= total * 5;
    if !split {
        groups.clear();
    }
    split
}

/// The rows of `c` whose logits the caller wants.
fn logit_rows(c: &SeqChunk) -> Range<usize> {
    let len = c.tokens.len();
    match c.logits {
        LogitsWanted::None => 0..0,
        LogitsWanted::Last => len.saturating_sub(1)..len,
        LogitsWanted::All => 0..len,
    }
}

/// Sets a scratch buffer to exactly `n` values (keeps its capacity when shrinking).
fn resize(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

fn matrix_ref(file: &GgufFile, name: &str) -> Result<MatrixRef, ModelError> {
    let info = tensor(file, name)?;
    if info.dims.len() != 2 {
        return Err(ModelError::Tensor {
            name: name.into(),
            message: format!("expected 2 dims, found {:?}", info.dims),
        });
    }
    Ok(MatrixRef { info: info.clone(), cols: info.dims[0] as usize, rows: info.dims[1] as usize })
}

fn f32_vector(file: &GgufFile, name: &str) -> Result<Vec<f32>, ModelError> {
    let info = tensor(file, name)?;
    if info.ggml_type != GgmlType::F32 {
        return Err(ModelError::Tensor {
            name: name.into(),
            message: format!("expected F32, found {}", info.ggml_type),
        });
    }
    Ok(file.tensor_data(info).chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
}

fn tensor<'a>(file: &'a GgufFile, name: &str) -> Result<&'a TensorInfo, ModelError> {
    file.header
        .tensor(name)
        .ok_or_else(|| ModelError::Tensor { name: name.into(), message: "missing from the file".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(rows: &[usize]) -> Vec<SeqChunk> {
        let chunk =
            |&n: &usize| SeqChunk { tokens: vec![0; n], start_pos: 0, blocks: vec![], logits: LogitsWanted::Last };
        rows.iter().map(chunk).collect()
    }

    fn groups_of(batch: &[SeqChunk], threads: usize) -> Option<Vec<Range<usize>>> {
        let mut groups = vec![5..6, 7..9]; // stale entries are cleared
        sequence_groups(batch, threads, &mut groups).then_some(groups)
    }

    #[test]
    fn batches_split_by_sequence_only_when_every_thread_gets_a_full_even_share() {
        assert_eq!(groups_of(&batch(&[1; 16]), 2), Some(vec![0..8, 8..16]));
        assert_eq!(groups_of(&batch(&[1; 17]), 2), Some(vec![0..9, 9..17]));
        assert_eq!(groups_of(&batch(&[1; 32]), 4), Some(vec![0..8, 8..16, 16..24, 24..32]));
        assert_eq!(groups_of(&batch(&[10, 10, 10, 10]), 2), Some(vec![0..2, 2..4]));
        // Too few rows for a full tile per thread, or one thread.
        assert_eq!(groups_of(&batch(&[1; 15]), 2), None);
        assert_eq!(groups_of(&batch(&[1; 16]), 1), None);
        // One long prefill, or one that leaves the other thread a much smaller share.
        assert_eq!(groups_of(&batch(&[100]), 2), None);
        assert_eq!(groups_of(&batch(&[100, 1]), 2), None);
        let mut mixed = vec![30];
        mixed.extend([1; 15]);
        assert_eq!(groups_of(&batch(&mixed), 2), None);
    }
}
