//! The forward pass over a batch of sequences, for every family: what differs between
//! architectures comes from the [`ArchDesc`] (norm placement, biases, Q/K norms, RoPE style
//! and bases, activation, sliding windows, embedding scale, fused tensors), never from a
//! family name.
//!
//! Weights stay in the memory-mapped GGUF file in their stored (quantized) form; fused
//! tensors are used as row views of their parts. Only the small vectors (norms, biases,
//! RoPE factors) are copied. K/V live outside the model, in the [`KvArena`] the caller
//! passes in. One call runs any mix of sequences: some prefilling many tokens, some decoding
//! one. Every per-row computation (norms, RoPE, attention, and the kernels' matmul) is done
//! the same way whatever else is in the batch, so a sequence's logits are bit-identical
//! alone or batched.

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::arch::describe;
use super::desc::{Activation, ArchDesc, RopeFactors};
use super::ggml_type::GgmlType;
use super::gguf::{GgufError, GgufFile, TensorInfo};
use super::kernels::attention::{AttnShape, CHUNK, ChunkScratch, Span, TileJob};
use super::kernels::{Kernels, MatmulScratch, QMatrix};
use super::ops::{AttnScratch, attend_row, rms_norm, rms_norm_in_place, rms_norm_rows, rope, rope_angles};
use crate::kv::arena::{BlockId, KvArena, KvLayout};
use crate::types::TokenId;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Arch(#[from] super::desc::ArchError),
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
/// SmolLM2's 9 heads of 64, 17 MB for Gemma 3's 4 heads of 256).
const MAX_ATTN_CHUNKS: usize = 4096;

/// Most consecutive rows of one sequence whose attention shares each chunk's pass over
/// K/V (a prefill's rows otherwise each stream their whole context from L3).
const TILE_ROWS: usize = 16;

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

impl SeqChunk {
    /// The rows (positions within the chunk) whose logits the caller wants.
    pub fn logit_rows(&self) -> Range<usize> {
        let len = self.tokens.len();
        match self.logits {
            LogitsWanted::None => 0..0,
            LogitsWanted::Last => len.saturating_sub(1)..len,
            LogitsWanted::All => 0..len,
        }
    }
}

/// Where a weight matrix lives in the file: rows `first_row..first_row + rows` of a
/// tensor (all of them, or one part of a fused tensor).
#[derive(Clone, Debug)]
struct MatrixRef {
    info: TensorInfo,
    first_row: usize,
    rows: usize,
    cols: usize,
}

impl MatrixRef {
    /// Rows `first..first + rows` of this matrix.
    fn rows(&self, first: usize, rows: usize) -> MatrixRef {
        MatrixRef { info: self.info.clone(), first_row: self.first_row + first, rows, cols: self.cols }
    }
}

struct LayerWeights {
    attn_norm: Vec<f32>,
    wq: MatrixRef,
    wk: MatrixRef,
    wv: MatrixRef,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    wo: MatrixRef,
    bo: Option<Vec<f32>>,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    w_gate: MatrixRef,
    w_up: MatrixRef,
    w_down: MatrixRef,
    post_ffn_norm: Option<Vec<f32>>,
    /// Which of the model's RoPE tables this layer uses.
    rope: usize,
    /// The layer's sliding window, if it has one.
    window: Option<usize>,
}

/// Fewest rows for which a pooled call spreads its row-wise steps over the pool
/// ([`Transformer::row_runs`]).
const PAR_ROWS: usize = 32;

/// Rows of a forward call up to which its scratch buffers are kept for the next call.
const KEEP_SCRATCH_ROWS: usize = 64;

/// Reusable buffers for one forward call: grown as a call needs, and dropped after a call
/// of more than [`KEEP_SCRATCH_ROWS`] rows (see [`Transformer::forward`]).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    /// Attention tiles: runs of at most [`TILE_ROWS`] consecutive rows of one sequence,
    /// each with its first chunk.
    attn_tiles: Vec<(Range<usize>, usize)>,
    /// Attention work items: `(tile, chunk, where its partials start in attn_parts)`.
    attn_items: Vec<(usize, usize, usize)>,
    attn_parts: Vec<f32>,
    /// Where each row's first partial starts in `attn_parts`, and the step to its next.
    attn_first: Vec<(usize, usize)>,
    gate: Vec<f32>,
    up: Vec<f32>,
    rows: Vec<RowInfo>,
    /// Per RoPE table, the cosines and sines of each row's position (`rope_dim / 2` per
    /// row), shared by every head and by the layers using that table.
    rope_cos: Vec<Vec<f32>>,
    rope_sin: Vec<Vec<f32>>,
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

/// A loaded model: its architecture description, weight locations, kernels, thread pool.
pub struct Transformer {
    pub desc: ArchDesc,
    file: GgufFile,
    embeddings: MatrixRef,
    output: MatrixRef,
    output_bias: Option<Vec<f32>>,
    output_norm: Vec<f32>,
    layers: Vec<LayerWeights>,
    /// RoPE inverse frequencies (one per rotated pair), one table per distinct base and
    /// scale among the layers.
    rope_tables: Vec<Vec<f64>>,
    kernels: Kernels,
    pool: rayon::ThreadPool,
    scratch: Mutex<Scratch>,
    /// What the pooled pass's attention partials held at the end of the last call, in bytes
    /// (see [`Self::attention_scratch_bytes`]).
    attn_parts_bytes: AtomicUsize,
}

impl Transformer {
    /// Maps, validates and prepares a GGUF model; `threads` sizes the model's own pool. The
    /// kernels are [`Kernels::from_env`]'s: the CPU's default set, or `STARLING_KERNELS`.
    pub fn load(path: &Path, threads: usize) -> Result<Self, ModelError> {
        let kernels = Kernels::from_env()?;
        let file = GgufFile::open(path)?;
        Self::from_file(file, threads, kernels)
    }

    /// Builds the model over an opened file with the given kernels (tests pass `portable`).
    pub fn from_file(file: GgufFile, threads: usize, kernels: Kernels) -> Result<Self, ModelError> {
        let desc = describe(&file.header)?;
        let matrix = |name: &str| matrix_ref(&file, name);
        let vector = |name: &str| f32_vector(&file, name);
        let optional = |name: &str| file.header.tensor(name).map(|_| f32_vector(&file, name)).transpose();
        let factors = match &desc.rope_factors {
            RopeFactors::None => None,
            RopeFactors::Tensor(name) => Some(vector(name)?),
        };
        let mut rope_tables: Vec<Vec<f64>> = Vec::new();
        let mut rope_keys: Vec<(u32, u32)> = Vec::new();
        let (q, kv, ff) = (desc.q_dim(), desc.kv_dim(), desc.n_ff);
        let mut layers = Vec::with_capacity(desc.n_layer);
        for (i, ld) in desc.layers.iter().enumerate() {
            let blk = |part: &str| format!("blk.{i}.{part}");
            let ((wq, wk, wv), (bq, bk, bv)) = if ld.fused_qkv {
                let w = matrix(&blk("attn_qkv.weight"))?;
                let b = optional(&blk("attn_qkv.bias"))?;
                let split = |b: &Vec<f32>| (b[..q].to_vec(), b[q..q + kv].to_vec(), b[q + kv..].to_vec());
                let (bq, bk, bv) = match b.as_ref().map(split) {
                    Some((bq, bk, bv)) => (Some(bq), Some(bk), Some(bv)),
                    None => (None, None, None),
                };
                ((w.rows(0, q), w.rows(q, kv), w.rows(q + kv, kv)), (bq, bk, bv))
            } else {
                (
                    (matrix(&blk("attn_q.weight"))?, matrix(&blk("attn_k.weight"))?, matrix(&blk("attn_v.weight"))?),
                    (optional(&blk("attn_q.bias"))?, optional(&blk("attn_k.bias"))?, optional(&blk("attn_v.bias"))?),
                )
            };
            let (w_gate, w_up) = if ld.fused_gate_up {
                let fused = matrix(&blk("ffn_up.weight"))?;
                (fused.rows(0, ff), fused.rows(ff, ff))
            } else {
                (matrix(&blk("ffn_gate.weight"))?, matrix(&blk("ffn_up.weight"))?)
            };
            let key = (ld.rope.freq_base.to_bits(), ld.rope.freq_scale.to_bits());
            let rope = match rope_keys.iter().position(|k| *k == key) {
                Some(r) => r,
                None => {
                    rope_keys.push(key);
                    rope_tables.push(inv_freq(&desc, ld.rope.freq_base, ld.rope.freq_scale, factors.as_deref()));
                    rope_tables.len() - 1
                }
            };
            let post = |part: &str| if desc.post_norms { vector(&blk(part)).map(Some) } else { Ok(None) };
            let qk = |part: &str| if desc.qk_norm { vector(&blk(part)).map(Some) } else { Ok(None) };
            layers.push(LayerWeights {
                attn_norm: vector(&blk("attn_norm.weight"))?,
                wq,
                wk,
                wv,
                bq,
                bk,
                bv,
                q_norm: qk("attn_q_norm.weight")?,
                k_norm: qk("attn_k_norm.weight")?,
                wo: matrix(&blk("attn_output.weight"))?,
                bo: optional(&blk("attn_output.bias"))?,
                post_attn_norm: post("post_attention_norm.weight")?,
                ffn_norm: vector(&blk("ffn_norm.weight"))?,
                w_gate,
                w_up,
                w_down: matrix(&blk("ffn_down.weight"))?,
                post_ffn_norm: post("post_ffw_norm.weight")?,
                rope,
                window: if ld.sliding { desc.sliding_window } else { None },
            });
        }
        let embeddings = matrix("token_embd.weight")?;
        let output = if desc.tied_output { embeddings.clone() } else { matrix("output.weight")? };
        let output_bias = optional("output.bias")?;
        let output_norm = vector("output_norm.weight")?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("starling-model-{i}"))
            .build()
            .map_err(|e| ModelError::ThreadPool(e.to_string()))?;
        Ok(Transformer {
            desc,
            file,
            embeddings,
            output,
            output_bias,
            output_norm,
            layers,
            rope_tables,
            kernels,
            pool,
            scratch: Mutex::new(Scratch::default()),
            attn_parts_bytes: AtomicUsize::new(0),
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

    /// `f` on each run of rows of `a` (`a.len() / t` values a row) with the same rows of `b`:
    /// runs spread over the pool for a pooled call of at least [`PAR_ROWS`] rows, else one
    /// run here. Each row's values come from the same code wherever it runs, so the same
    /// bits; a prompt's norms, activations and residual adds then no longer run on one thread
    /// while the other waits (about 8% of a Q4_0 prefill profile together with activation
    /// quantization).
    fn row_runs<A: Send, B: Sync>(&self, ex: Exec, t: usize, a: &mut [A], b: &[B], f: impl Fn(&mut [A], &[B]) + Sync) {
        match self.run_rows(ex, t) {
            None => f(a, b),
            Some(per) => {
                let (a_run, b_run) = (per * (a.len() / t), per * (b.len() / t));
                a.par_chunks_mut(a_run.max(1)).zip(b.par_chunks(b_run.max(1))).for_each(|(a, b)| f(a, b));
            }
        }
    }

    /// [`Self::row_runs`] over `a` alone.
    fn rows_in_place<A: Send>(&self, ex: Exec, t: usize, a: &mut [A], f: impl Fn(&mut [A]) + Sync) {
        match self.run_rows(ex, t) {
            None => f(a),
            Some(per) => a.par_chunks_mut((per * (a.len() / t)).max(1)).for_each(&f),
        }
    }

    /// Rows a run of [`Self::row_runs`] takes, or `None` to run all `t` here.
    fn run_rows(&self, ex: Exec, t: usize) -> Option<usize> {
        let threads = self.threads();
        (ex == Exec::Pool && t >= PAR_ROWS && threads >= 2).then(|| t.div_ceil(threads))
    }

    /// Bytes the attention partials of the pooled forward pass held (their capacity) when
    /// the last call ended: at most `MAX_ATTN_CHUNKS` (4,096) chunks' worth however long the
    /// batch's rows are. (A batch split by sequence holds one row's partials per thread
    /// instead.)
    pub fn attention_scratch_bytes(&self) -> usize {
        self.attn_parts_bytes.load(Ordering::Relaxed)
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
        let d = &self.desc;
        AttnShape { n_head: d.n_head, n_head_kv: d.n_head_kv, head_dim: d.head_dim, scale: d.attn_scale }
    }

    /// The KV geometry this model needs, with the given block size.
    pub fn kv_layout(&self, block_tokens: usize) -> KvLayout {
        KvLayout { n_layer: self.desc.n_layer, kv_dim: self.desc.kv_dim(), block_tokens }
    }

    fn qmatrix(&self, m: &MatrixRef) -> QMatrix<'_> {
        let row_bytes = m.cols / m.info.ggml_type.block_elems() * m.info.ggml_type.block_bytes();
        let data = &self.file.tensor_data(&m.info)[m.first_row * row_bytes..(m.first_row + m.rows) * row_bytes];
        QMatrix::new(m.info.ggml_type, m.rows, m.cols, data).expect("shape checked at load")
    }

    /// Runs the batch, appending K/V for every token, and writes logits into `logits`:
    /// one `n_vocab` row per position asked for, in batch order.
    pub fn forward(&self, batch: &[SeqChunk], kv: &mut KvArena, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        self.check_batch(batch, kv)?;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        // One pool entry for the whole pass, its other threads kept polling for work: the
        // forks inside (per matmul and attention, or per layer for a batch split by
        // sequence) start from a pool thread and are picked up by an awake one.
        let s: &mut Scratch = &mut guard;
        hot_install(&self.pool, &PASSES, || self.run(batch, kv, s, logits));
        self.attn_parts_bytes.store(s.attn_parts.capacity() * std::mem::size_of::<f32>(), Ordering::Relaxed);
        // A prompt's buffers are tens of KB per row (Gemma 3 270M: about 35 KB): kept, a
        // 512-row prefill would hold 18 MB for the decode steps after it, and beside the
        // split path's per-group buffers, twice that. Decode-sized calls keep theirs.
        if batch.iter().map(|c| c.tokens.len()).sum::<usize>() > KEEP_SCRATCH_ROWS {
            *s = Scratch::default();
        }
        Ok(())
    }

    fn run(&self, batch: &[SeqChunk], kv: &mut KvArena, s: &mut Scratch, logits: &mut Vec<f32>) {
        let wanted: usize = batch.iter().map(|c| c.logit_rows().len()).sum();
        logits.clear();
        logits.resize(wanted * self.desc.n_vocab, 0.0);
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
        self.output_logits(batch, s, logits);
    }

    /// The batch split by sequence (`groups`): each pool thread runs its sequences through
    /// every layer on its own, with serial matmuls and attention, so a step has one fork and
    /// join per layer (around the K/V writes) instead of one per matmul. Each row's
    /// attention is a tile of that row alone, whose bits a row in any tile of the pooled
    /// path also gets, so the results are the same.
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
        // `run` sized `logits` for every wanted row.
        resize(&mut s.h, logits.len() / self.desc.n_vocab * self.desc.n_embd);
        let mut n = 0;
        for (g, seqs) in gs.iter().zip(groups) {
            n += self.final_rows(&batch[seqs.clone()], &g.x, &mut s.h[n * self.desc.n_embd..]);
        }
        self.head(&s.h[..n * self.desc.n_embd], n, logits, &mut s.matmul);
    }

    /// Runs `f` on every group's scratch and sequence range, one pool task per group.
    fn each_group(&self, gs: &mut [Scratch], groups: &[Range<usize>], f: impl Fn(&mut Scratch, Range<usize>) + Sync) {
        self.pool.install(|| gs.par_iter_mut().zip(groups.par_iter()).for_each(|(g, seqs)| f(g, seqs.clone())));
    }

    /// Fills `s` for the rows of sequences `seqs`: row positions, RoPE angles and the
    /// token embeddings.
    fn prepare(&self, batch: &[SeqChunk], seqs: Range<usize>, s: &mut Scratch) {
        let d = self.desc.n_embd;
        s.rows.clear();
        for seq in seqs.clone() {
            let c = &batch[seq];
            s.rows.extend((0..c.tokens.len()).map(|i| RowInfo { seq, pos: c.start_pos + i }));
        }
        let t = s.rows.len();
        let pairs = self.desc.rope_dim / 2;
        let magnitude = f64::from(self.desc.rope_magnitude);
        s.rope_cos.resize_with(self.rope_tables.len(), Vec::new);
        s.rope_sin.resize_with(self.rope_tables.len(), Vec::new);
        for ((table, cos), sin) in self.rope_tables.iter().zip(&mut s.rope_cos).zip(&mut s.rope_sin) {
            resize(cos, t * pairs);
            resize(sin, t * pairs);
            for ((info, c), sn) in s.rows.iter().zip(cos.chunks_exact_mut(pairs)).zip(sin.chunks_exact_mut(pairs)) {
                rope_angles(info.pos, table, magnitude, c, sn);
            }
        }
        resize(&mut s.x, t * d);
        let emb = self.qmatrix(&self.embeddings);
        for (row, tok) in s.x.chunks_exact_mut(d).zip(batch[seqs].iter().flat_map(|c| c.tokens.iter())) {
            self.kernels.dequantize_row(emb.ggml_type, emb.row(*tok as usize), row);
            if let Some(scale) = self.desc.embed_scale {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
    }

    fn check_batch(&self, batch: &[SeqChunk], kv: &KvArena) -> Result<(), ModelError> {
        let expected = self.kv_layout(kv.layout().block_tokens);
        if kv.layout() != expected {
            return Err(ModelError::KvLayoutMismatch { expected, found: kv.layout() });
        }
        for (seq, c) in batch.iter().enumerate() {
            if let Some(&id) = c.tokens.iter().find(|&&id| id as usize >= self.desc.n_vocab) {
                return Err(ModelError::TokenOutOfRange { id, vocab: self.desc.n_vocab });
            }
            let end = c.start_pos.saturating_add(c.tokens.len());
            if end > self.desc.n_ctx_train {
                return Err(ModelError::ContextOverflow { pos: end - 1, n_ctx: self.desc.n_ctx_train });
            }
            let capacity = c.blocks.len() * expected.block_tokens;
            if capacity < end {
                return Err(ModelError::KvTooSmall { seq, capacity, needed: end });
            }
        }
        Ok(())
    }

    /// Attention norm, the Q/K/V projections (with biases), the per-head Q/K norms and
    /// RoPE of every row of `s`.
    fn qkv(&self, layer: &LayerWeights, s: &mut Scratch, ex: Exec) {
        let t = s.rows.len();
        let desc = &self.desc;
        let (d, qd, kvd, hd) = (desc.n_embd, desc.q_dim(), desc.kv_dim(), desc.head_dim);
        resize(&mut s.h, t * d);
        let eps = desc.rms_eps;
        self.row_runs(ex, t, &mut s.h, &s.x, |h, x| rms_norm_rows(x, &layer.attn_norm, eps, h));
        resize(&mut s.q, t * qd);
        resize(&mut s.k, t * kvd);
        resize(&mut s.v, t * kvd);
        self.matmuls([&layer.wq, &layer.wk, &layer.wv], &s.h, t, [&mut s.q, &mut s.k, &mut s.v], &mut s.matmul, ex);
        add_bias(&mut s.q, layer.bq.as_deref());
        add_bias(&mut s.k, layer.bk.as_deref());
        add_bias(&mut s.v, layer.bv.as_deref());
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            self.rows_in_place(ex, t, &mut s.q, |q| rms_norm_in_place(q, qn, eps));
            self.rows_in_place(ex, t, &mut s.k, |k| rms_norm_in_place(k, kn, eps));
        }
        let pairs = desc.rope_dim / 2;
        let (cos, sin) = (&s.rope_cos[layer.rope], &s.rope_sin[layer.rope]);
        // Rows `r0..` of q and k, rotated.
        let rotate = |r0: usize, q: &mut [f32], k: &mut [f32]| {
            for (i, (q, k)) in q.chunks_exact_mut(qd).zip(k.chunks_exact_mut(kvd)).enumerate() {
                let r = r0 + i;
                let (cos, sin) = (&cos[r * pairs..(r + 1) * pairs], &sin[r * pairs..(r + 1) * pairs]);
                for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                    rope(desc.rope_style, head, cos, sin);
                }
            }
        };
        match self.run_rows(ex, t) {
            None => rotate(0, &mut s.q, &mut s.k),
            Some(per) => {
                s.q.par_chunks_mut(per * qd)
                    .zip(s.k.par_chunks_mut(per * kvd))
                    .enumerate()
                    .for_each(|(c, (q, k))| rotate(c * per, q, k))
            }
        }
    }

    /// Stores every row's K and V of layer `li` at its position.
    fn write_kv(&self, li: usize, batch: &[SeqChunk], kv: &mut KvArena, s: &Scratch) {
        let kvd = self.desc.kv_dim();
        let bt = kv.layout().block_tokens;
        for (r, info) in s.rows.iter().enumerate() {
            let block = batch[info.seq].blocks[info.pos / bt];
            kv.write(block, li, info.pos % bt, &s.k[r * kvd..(r + 1) * kvd], &s.v[r * kvd..(r + 1) * kvd]);
        }
    }

    /// Attention over the cache, the output projection (with its bias and post-norm) and
    /// the residual add.
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
        let (d, qd) = (self.desc.n_embd, self.desc.q_dim());
        match ex {
            Exec::Pool => self.attention(li, layer.window, batch, kv, s),
            Exec::Serial => {
                let shape = self.attn_shape();
                resize(&mut s.attn, t * qd);
                for ((r, info), out) in s.rows.iter().enumerate().zip(s.attn.chunks_exact_mut(qd)) {
                    let q = &s.q[r * qd..(r + 1) * qd];
                    let blocks = &batch[info.seq].blocks;
                    let span = Span::new(info.pos, layer.window);
                    attend_row(self.kernels, shape, li, q, span, blocks, kv, &mut s.attn_row, out);
                }
            }
        }
        resize(&mut s.h, t * d);
        self.matmul(&layer.wo, &s.attn, t, &mut s.h, &mut s.matmul, ex);
        add_bias(&mut s.h, layer.bo.as_deref());
        if let Some(w) = &layer.post_attn_norm {
            let eps = self.desc.rms_eps;
            self.rows_in_place(ex, t, &mut s.h, |h| rms_norm_in_place(h, w, eps));
        }
        self.row_runs(ex, t, &mut s.x, &s.h, add_rows);
    }

    /// Every row's attention: its chunks of positions spread over the pool as one list (so
    /// one long row keeps both cores busy), then each row's chunks merged in order. A run of
    /// consecutive rows of one sequence (a prefill) goes through each chunk together
    /// ([`TILE_ROWS`] at a time). Rows go in groups of at most [`MAX_ATTN_CHUNKS`] chunks,
    /// which bounds the partials' memory (a deep prefill would otherwise hold every row's
    /// chunks at once); a row counts two more chunks than its own, for its tile's.
    fn attention(&self, li: usize, window: Option<usize>, batch: &[SeqChunk], kv: &KvArena, s: &mut Scratch) {
        resize(&mut s.attn, s.rows.len() * self.desc.q_dim());
        let mut r0 = 0;
        while r0 < s.rows.len() {
            let (mut r1, mut chunks) = (r0, 0);
            let chunks_of = |r: usize| Span::new(s.rows[r].pos, window).chunks() + 2;
            while r1 < s.rows.len() && (r1 == r0 || chunks + chunks_of(r1) <= MAX_ATTN_CHUNKS) {
                chunks += chunks_of(r1);
                r1 += 1;
            }
            self.attention_rows(li, window, batch, kv, s, r0..r1);
            r0 = r1;
        }
    }

    /// [`Self::attention`] for rows `rows` of the batch.
    fn attention_rows(
        &self,
        li: usize,
        window: Option<usize>,
        batch: &[SeqChunk],
        kv: &KvArena,
        s: &mut Scratch,
        rows: Range<usize>,
    ) {
        let shape = self.attn_shape();
        let (d, plen) = (self.desc.q_dim(), shape.partial_len());
        let infos = &s.rows[rows.clone()];
        let span = |r: usize| Span::new(infos[r].pos, window);
        s.attn_tiles.clear();
        for r in 0..infos.len() {
            let joins = r > 0 && {
                let (prev, tile) = (infos[r - 1], &s.attn_tiles[s.attn_tiles.len() - 1].0);
                prev.seq == infos[r].seq && prev.pos + 1 == infos[r].pos && tile.len() < TILE_ROWS
            };
            match s.attn_tiles.last_mut() {
                Some((tile, _)) if joins => tile.end = r + 1,
                _ => s.attn_tiles.push((r..r + 1, span(r).lo / CHUNK)),
            }
        }
        s.attn_items.clear();
        s.attn_first.clear();
        let mut at = 0;
        for (t, (tile, c0)) in s.attn_tiles.iter().enumerate() {
            let step = tile.len() * plen;
            for r in tile.clone() {
                s.attn_first.push((at + (span(r).lo / CHUNK - c0) * step + (r - tile.start) * plen, step));
            }
            for c in *c0..=infos[tile.end - 1].pos / CHUNK {
                s.attn_items.push((t, c, at));
                at += step;
            }
        }
        // Exactly what this group needs: amortized growth could double past the cap.
        s.attn_parts.reserve_exact(at.saturating_sub(s.attn_parts.len()));
        resize(&mut s.attn_parts, at);
        let q = &s.q[rows.start * d..rows.end * d];
        let (tiles, kernels) = (&s.attn_tiles, self.kernels);
        let item = |&(t, c, _): &(usize, usize, usize), parts: &mut [f32]| {
            let (tile, c0) = &tiles[t];
            // The tile's rows that see chunk `c`: a contiguous run (positions rise, and so
            // do window starts).
            let mut ranges: [Range<usize>; TILE_ROWS] = std::array::from_fn(|_| 0..0);
            let (mut first, mut n) = (None, 0);
            for r in tile.clone() {
                let sp = span(r);
                if (sp.lo / CHUNK..=sp.pos / CHUNK).contains(&c) {
                    first.get_or_insert(r);
                    ranges[n] = sp.chunk(c - sp.lo / CHUNK);
                    n += 1;
                }
            }
            let Some(first) = first else { return };
            debug_assert!(*c0 <= c, "chunk before the tile's first");
            let job = TileJob {
                shape,
                layer: li,
                q: &q[first * d..(first + n) * d],
                ranges: &ranges[..n],
                blocks: &batch[infos[first].seq].blocks,
                kv,
            };
            let parts = &mut parts[(first - tile.start) * plen..(first - tile.start + n) * plen];
            ATTN_SCRATCH.with_borrow_mut(|scratch| kernels.attend_tile(&job, scratch, parts));
        };
        self.pool.install(|| each_item(&s.attn_items, &mut s.attn_parts, 0, &item));
        let (parts, firsts) = (&s.attn_parts, &s.attn_first);
        self.pool.install(|| {
            s.attn[rows.start * d..rows.end * d].par_chunks_mut(d).enumerate().for_each(|(r, out)| {
                let ((first, step), n) = (firsts[r], span(r).chunks());
                kernels.merge_strided(shape, &parts[first..first + (n - 1) * step + plen], step, out);
            });
        });
    }

    /// The FFN norm, the gated FFN, its post-norm and the residual add.
    fn ffn_block(&self, layer: &LayerWeights, s: &mut Scratch, ex: Exec) {
        let t = s.rows.len();
        let (ff, eps) = (self.desc.n_ff, self.desc.rms_eps);
        self.row_runs(ex, t, &mut s.h, &s.x, |h, x| rms_norm_rows(x, &layer.ffn_norm, eps, h));
        resize(&mut s.gate, t * ff);
        resize(&mut s.up, t * ff);
        self.matmuls([&layer.w_gate, &layer.w_up], &s.h, t, [&mut s.gate, &mut s.up], &mut s.matmul, ex);
        match self.desc.activation {
            Activation::Silu => self.row_runs(ex, t, &mut s.gate, &s.up, |gate, up| self.kernels.silu_mul(gate, up)),
            Activation::GeluTanh => {
                self.row_runs(ex, t, &mut s.gate, &s.up, |gate, up| self.kernels.gelu_tanh_mul(gate, up))
            }
        }
        self.matmul(&layer.w_down, &s.gate, t, &mut s.h, &mut s.matmul, ex);
        if let Some(w) = &layer.post_ffn_norm {
            self.rows_in_place(ex, t, &mut s.h, |h| rms_norm_in_place(h, w, eps));
        }
        self.row_runs(ex, t, &mut s.x, &s.h, add_rows);
    }

    /// Final norm and output head for the rows of `batch` (the sequences whose rows `s`
    /// holds) that want logits, in batch order, into `out`.
    fn output_logits(&self, batch: &[SeqChunk], s: &mut Scratch, out: &mut [f32]) {
        let n = self.final_rows(batch, &s.x, &mut s.h);
        self.head(&s.h[..n * self.desc.n_embd], n, out, &mut s.matmul);
    }

    /// The output norm of each row of `x` that `batch` wants logits for, into the rows of
    /// `h` in order; returns how many.
    fn final_rows(&self, batch: &[SeqChunk], x: &[f32], h: &mut [f32]) -> usize {
        let d = self.desc.n_embd;
        let (mut n, mut r) = (0, 0);
        for c in batch {
            for i in c.logit_rows() {
                let row = &x[(r + i) * d..(r + i + 1) * d];
                rms_norm(row, &self.output_norm, self.desc.rms_eps, &mut h[n * d..(n + 1) * d]);
                n += 1;
            }
            r += c.tokens.len();
        }
        n
    }

    /// Logits of the `n` normed rows `h` into `out`, over the pool: one pass over the output
    /// matrix for every row of the step, also when the layers ran split by sequence (there
    /// each group's own pass streamed the whole matrix again, and Gemma 3's is 178 MB).
    fn head(&self, h: &[f32], n: usize, out: &mut [f32], scratch: &mut MatmulScratch) {
        if n == 0 {
            return;
        }
        self.matmul(&self.output, h, n, out, scratch, Exec::Pool);
        let out = &mut out[..n * self.desc.n_vocab];
        add_bias(out, self.output_bias.as_deref());
        if let Some(cap) = self.desc.logit_softcap {
            out.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
    }

    /// `y_i = x · W_iᵀ` for matrices that read the same `n` x rows, in the pool or on this
    /// thread (`ex`): the kernels prepare (quantize) the rows once for all.
    fn matmuls<const N: usize>(
        &self,
        ms: [&MatrixRef; N],
        x: &[f32],
        n: usize,
        ys: [&mut [f32]; N],
        scratch: &mut MatmulScratch,
        ex: Exec,
    ) {
        let ws = ms.map(|m| self.qmatrix(m));
        let mut rows = ms.iter().map(|m| m.rows);
        let mut ys = ys.map(|y| &mut y[..n * rows.next().expect("one per matrix")]);
        let x = &x[..n * ms[0].cols];
        let pool = match ex {
            Exec::Pool => Some(&self.pool),
            Exec::Serial => None,
        };
        if let Err(e) = self.kernels.try_matmul_shared(&ws, x, n, &mut ys, scratch, pool) {
            panic!("matmul: {e}");
        }
    }

    fn matmul(&self, m: &MatrixRef, x: &[f32], n: usize, y: &mut [f32], scratch: &mut MatmulScratch, ex: Exec) {
        self.matmuls([m], x, n, [y], scratch, ex);
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

/// How long a hot pool thread spins without finding work before it yields its core on
/// each further poll: longer than a forward pass's gaps between forks, short enough that
/// another process that wants the core still gets it.
const SPIN: Duration = Duration::from_micros(200);

/// Forward passes running in this process, over every model's pool (see [`hot_install`]).
static PASSES: AtomicUsize = AtomicUsize::new(0);

/// `pool.install(f)` with the pool's other threads kept hot while `f` runs: each polls for
/// the jobs `f` forks (`rayon::yield_now`) instead of going to sleep between them. A
/// rayon thread that finds no work for a few tens of microseconds parks, and on this
/// class of machine (virtual CPUs) a fork then cost about 18 µs against 2–3 µs for one
/// it picks up while awake; a decode step forks in every layer (each matmul above the
/// serial threshold, the attention), so parked threads cost 7–14% of a short-context
/// step (paired runs). The pollers stop when `f` returns or unwinds, and as soon as
/// another pass is counted in `passes` (another model's, on the same cores): two passes'
/// pollers would spin on cores the other pass's threads need, so then the pools sleep
/// between forks as plain rayon pools do. Scheduling only: every job is the same
/// computation wherever it runs, so results keep their bits.
fn hot_install<R: Send>(pool: &rayon::ThreadPool, passes: &AtomicUsize, f: impl FnOnce() -> R + Send) -> R {
    let _counted = Counted::new(passes);
    let done = AtomicBool::new(false);
    pool.install(|| {
        let hot = Hot { done: &done, passes, owner: rayon::current_thread_index() };
        with_pollers(pool.current_num_threads() - 1, hot, f)
    })
}

/// What a pass's pollers watch: its end, the passes in flight, and the pool thread that
/// runs the pass itself.
#[derive(Clone, Copy)]
struct Hot<'a> {
    done: &'a AtomicBool,
    passes: &'a AtomicUsize,
    owner: Option<usize>,
}

/// Runs `f` on this pool thread beside `n` pollers, forked with `rayon::join` (no heap
/// job, so a decode step still allocates nothing); sets `done` however `f` ends, so a
/// panic unwinds through the joins instead of leaving them waiting on the pollers.
fn with_pollers<R: Send>(n: usize, hot: Hot, f: impl FnOnce() -> R + Send) -> R {
    if n == 0 {
        let _end = SetOnDrop(hot.done);
        return f();
    }
    rayon::join(|| with_pollers(n - 1, hot, f), || poll_until(hot)).0
}

/// A hot pool thread's loop (see [`hot_install`]): runs whatever job the pool has until
/// the pass is done or shares the machine with another pass. Returns at once on the
/// thread that runs the pass (`owner`), which can pick up a poller still queued while it
/// waits inside one of its own forks.
fn poll_until(hot: Hot) {
    if rayon::current_thread_index() == hot.owner {
        return;
    }
    let mut last = Instant::now();
    while !hot.done.load(Ordering::Acquire) && hot.passes.load(Ordering::Relaxed) <= 1 {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            last = Instant::now();
        } else if last.elapsed() < SPIN {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// One count in a pass counter while alive.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(passes: &'a AtomicUsize) -> Self {
        passes.fetch_add(1, Ordering::Relaxed);
        Counted(passes)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sets its flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `f` on every attention item and its run of `parts` (from its offset to the next
/// item's; `base` is the first item's offset), halving the list with `rayon::join`.
fn each_item<F>(items: &[(usize, usize, usize)], parts: &mut [f32], base: usize, f: &F)
where
    F: Fn(&(usize, usize, usize), &mut [f32]) + Sync,
{
    match items {
        [] => {}
        [one] => f(one, parts),
        _ => {
            let mid = items.len() / 2;
            let (a, b) = parts.split_at_mut(items[mid].2 - base);
            rayon::join(|| each_item(&items[..mid], a, base, f), || each_item(&items[mid..], b, items[mid].2, f));
        }
    }
}

/// `x += h`, value by value.
fn add_rows(x: &mut [f32], h: &[f32]) {
    for (x, o) in x.iter_mut().zip(h) {
        *x += o;
    }
}

/// Sets a scratch buffer to exactly `n` values (keeps its capacity when shrinking).
fn resize(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// Adds `bias` to every `bias.len()`-wide row of `rows`.
fn add_bias(rows: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in rows.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
}

/// RoPE inverse frequencies of one table: `scale · base^(-2i/n_rot) / factor_i` per pair
/// (the factors of Llama 3 or Phi-3 LongRoPE divide the frequency), in f64.
fn inv_freq(desc: &ArchDesc, base: f32, scale: f32, factors: Option<&[f32]>) -> Vec<f64> {
    (0..desc.rope_dim / 2)
        .map(|i| {
            let mut f = f64::from(base).powf(-2.0 * i as f64 / desc.rope_dim as f64);
            if let Some(ff) = factors {
                f /= f64::from(ff[i]);
            }
            f * f64::from(scale)
        })
        .collect()
}

fn matrix_ref(file: &GgufFile, name: &str) -> Result<MatrixRef, ModelError> {
    let info = tensor(file, name)?;
    if info.dims.len() != 2 {
        return Err(ModelError::Tensor {
            name: name.into(),
            message: format!("expected 2 dims, found {:?}", info.dims),
        });
    }
    let (cols, rows) = (info.dims[0] as usize, info.dims[1] as usize);
    QMatrix::new(info.ggml_type, rows, cols, file.tensor_data(info))
        .map_err(|e| ModelError::Tensor { name: name.into(), message: e.to_string() })?;
    Ok(MatrixRef { info: info.clone(), first_row: 0, cols, rows })
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
    use crate::kv::arena::BlockTable;
    use crate::model::gguf_writer::{TinyLlamaSpec, tiny_llama_f32};

    /// The default tiny llama (f32 weights) loaded with `threads` threads, once per count.
    fn tiny(name: &str, threads: &[usize]) -> Vec<Transformer> {
        let path = std::env::temp_dir().join(format!("starling-{name}-unit-{}.gguf", std::process::id()));
        std::fs::write(&path, tiny_llama_f32(&TinyLlamaSpec::default())).unwrap();
        let models: Vec<_> = threads.iter().map(|&t| Transformer::load(&path, t)).collect();
        std::fs::remove_file(&path).unwrap();
        models.into_iter().map(Result::unwrap).collect()
    }

    /// A prompt long enough for its row-wise steps to run in runs over the pool gives every
    /// row the logits it gets on one thread, and decoded one row per call.
    #[test]
    fn rows_in_runs_over_the_pool_give_the_bits_of_one_thread() {
        let mut models = tiny("row-runs", &[2, 1]);
        let (pooled, single) = (models.remove(0), models.remove(0));
        let n = PAR_ROWS + 9;
        let tokens: Vec<TokenId> = (0..n as TokenId).map(|i| (i * 11) % 200).collect();
        let logits = |model: &Transformer, step: usize| {
            let layout = model.kv_layout(16);
            let mut arena = KvArena::new(layout, (layout.block_bytes() * layout.blocks_for(n)) as u64).unwrap();
            let mut table = BlockTable::default();
            table.reserve(&mut arena, n).unwrap();
            let mut all = Vec::new();
            for start in (0..n).step_by(step) {
                let end = (start + step).min(n);
                let chunk = SeqChunk {
                    tokens: tokens[start..end].to_vec(),
                    start_pos: start,
                    blocks: table.blocks.clone(),
                    logits: LogitsWanted::All,
                };
                let mut out = Vec::new();
                model.forward(&[chunk], &mut arena, &mut out).unwrap();
                all.extend(out);
            }
            all
        };
        let want = logits(&single, n);
        assert!(logits(&pooled, n) == want, "a pooled prompt differs from one thread");
        assert!(logits(&pooled, 1) == want, "decoded rows differ from the prompt's");
    }

    /// A forward of more rows than [`KEEP_SCRATCH_ROWS`] drops its buffers when it ends, one
    /// of at most that many keeps them for the next call; the logits are the same bits either
    /// way.
    #[test]
    fn scratch_is_kept_after_decode_sized_calls_and_dropped_after_prompts() {
        let model = tiny("scratch", &[2]).remove(0);
        let layout = model.kv_layout(16);
        let mut arena = KvArena::new(layout, (layout.block_bytes() * 32) as u64).unwrap();
        let mut run = |n: usize| {
            let tokens: Vec<TokenId> = (0..n as TokenId).map(|i| (i * 7) % 200).collect();
            let mut table = BlockTable::default();
            table.reserve(&mut arena, n).unwrap();
            let chunk = SeqChunk { tokens, start_pos: 0, blocks: table.blocks, logits: LogitsWanted::Last };
            let mut logits = Vec::new();
            model.forward(&[chunk], &mut arena, &mut logits).unwrap();
            let held = model.scratch.lock().unwrap().x.capacity();
            (logits, held)
        };
        let (prompt, held) = run(KEEP_SCRATCH_ROWS + 1);
        assert_eq!(held, 0, "a prompt's buffers are dropped");
        let (_, held) = run(KEEP_SCRATCH_ROWS);
        assert!(held >= KEEP_SCRATCH_ROWS * model.desc.n_embd, "a decode-sized call keeps its buffers ({held})");
        let (again, held) = run(KEEP_SCRATCH_ROWS + 1);
        assert_eq!(held, 0);
        assert!(again == prompt, "the prompt's logits changed after a call that kept its scratch");
    }

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

    fn test_pool(name: &'static str) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(2).thread_name(move |i| format!("{name}-{i}")).build().unwrap()
    }

    /// Scheduler state (`R`, `S`, …) of each of this process's threads named `name-*`,
    /// by name, from `/proc/self/task/*/stat`.
    #[cfg(target_os = "linux")]
    fn thread_states(name: &str) -> Vec<(String, char)> {
        let mut states = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with(&format!("{name}-")) {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised name.
                if let Some(state) = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()) {
                    states.push((comm.trim_end().to_string(), state));
                }
            }
        }
        states.sort();
        states
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_hot_pool_keeps_its_other_thread_running_while_the_pass_runs_and_lets_it_sleep_after() {
        let pool = test_pool("hot-pool");
        let all_asleep = || {
            // A parked rayon thread sleeps in a futex; one in its last rounds before that
            // may still show as running on a busy machine, so allow it a few seconds.
            let deadline = Instant::now() + Duration::from_secs(5);
            while thread_states("hot-pool").iter().any(|(_, state)| *state != 'S') && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            thread_states("hot-pool")
        };
        let sleeping = [("hot-pool-0".to_string(), 'S'), ("hot-pool-1".to_string(), 'S')];
        pool.broadcast(|_| ());
        assert_eq!(all_asleep(), sleeping, "an idle pool sleeps");
        let (other, sum) = hot_install(&pool, &AtomicUsize::new(0), || {
            let me = format!("hot-pool-{}", rayon::current_thread_index().unwrap());
            let other = || thread_states("hot-pool").into_iter().find(|(name, _)| *name != me).map(|(_, s)| s);
            // Past the point where a plain pool thread would have parked, the other thread
            // still runs (checked for up to five seconds: the poller may start late).
            std::thread::sleep(Duration::from_millis(50));
            let deadline = Instant::now() + Duration::from_secs(5);
            while other() != Some('R') && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // Forks still run, and return their results.
            let (a, b) = rayon::join(|| 2, || 3);
            (other(), a + b)
        });
        assert_eq!(sum, 5);
        assert_eq!(other, Some('R'), "the other pool thread polls for work");
        assert_eq!(all_asleep(), sleeping, "the poller stops with the pass");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_hot_pass_lets_its_pollers_sleep_while_another_pass_shares_the_machine() {
        let (pool_a, pool_b, passes) = (test_pool("hot-two-a"), test_pool("hot-two-b"), AtomicUsize::new(0));
        let (go, go_rx) = std::sync::mpsc::channel();
        let (started, started_rx) = std::sync::mpsc::channel();
        let (finish, finish_rx) = std::sync::mpsc::channel::<()>();
        // The state the other thread of pool a reaches within five seconds, if it does.
        let other_reaches = |me: &str, want: char| {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let other = thread_states("hot-two-a").into_iter().find(|(name, _)| name != me).map(|(_, s)| s);
                if other == Some(want) || Instant::now() > deadline {
                    return other;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let passes = &passes;
        let (alone, shared, b) = std::thread::scope(|scope| {
            let b = scope.spawn(move || {
                go_rx.recv_timeout(Duration::from_secs(20)).expect("go");
                hot_install(&pool_b, passes, move || {
                    started.send(()).unwrap();
                    finish_rx.recv_timeout(Duration::from_secs(20)).expect("finish");
                    rayon::join(|| 1, || 2)
                })
            });
            let (alone, shared) = hot_install(&pool_a, passes, move || {
                let me = format!("hot-two-a-{}", rayon::current_thread_index().unwrap());
                std::thread::sleep(Duration::from_millis(50));
                let alone = other_reaches(&me, 'R');
                go.send(()).unwrap();
                started_rx.recv_timeout(Duration::from_secs(20)).expect("the second pass started");
                let shared = other_reaches(&me, 'S');
                finish.send(()).unwrap();
                (alone, shared)
            });
            (alone, shared, b.join().unwrap())
        });
        assert_eq!(alone, Some('R'), "alone, the pass keeps its other thread polling");
        assert_eq!(shared, Some('S'), "beside another pass, its other thread sleeps");
        assert_eq!(b, (1, 2));
        assert_eq!(passes.load(Ordering::Relaxed), 0, "both passes ended");
    }

    #[test]
    fn a_panic_in_a_hot_pass_reaches_the_caller_instead_of_leaving_the_pollers_waiting() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (pool, passes) = (test_pool("hot-panic"), AtomicUsize::new(0));
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                hot_install(&pool, &passes, || -> usize { panic!("inside the pass") })
            }));
            // The pool still works afterwards.
            let after = hot_install(&pool, &passes, || rayon::join(|| 1, || 2));
            tx.send((caught.is_err(), after, passes.load(Ordering::Relaxed))).unwrap();
        });
        let (panicked, after, left) = rx.recv_timeout(Duration::from_secs(20)).expect("hot_install returned");
        assert!(panicked, "the panic propagates");
        assert_eq!(after, (1, 2));
        assert_eq!(left, 0, "a pass that panicked is no longer counted");
    }
}
