//! Quantized kernels: dequantize a row, and `y = x · Wᵀ` over weights kept in their ggml
//! block layout (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
//! IQ4_NL, IQ4_XS).
//!
//! Each block format is described once ([`formats`]): its block, its values as small integers
//! with scales, the same decoding on a tile of rows in SIMD lanes, and a quantizer for tests.
//! Each instruction set supplies only what differs ([`tiles`]): the lane width (16 rows for
//! AVX-512, 8 for AVX2) and the product. The VNNI sets (`avx512-vnni`, `avx-vnni`) round
//! activations to 16 bits per 32-value block ([`quant_acts`]) and multiply bytes in exact
//! integers; the f32 sets (`avx512-f32`, `avx2-f32`) dequantize each block in registers and
//! multiply it into f32 activations, so a matmul matches an f32 dot product to float
//! rounding. The best set this CPU runs is picked at run time by [`Kernels::detect`]. Float
//! weights, and every type on the `portable` set, run the portable kernels, which AVX2 and
//! AVX-512 CPUs run compiled wide for the float types (the same operations, so the same
//! bits). [`attention`] holds attention over the KV cache.
//!
//! **Batch invariance.** Every output `y[i][r]` is computed by the same per-row dot code,
//! whose float operations depend only on `W[r]` and x row `i`: tiling x rows, runs of weight
//! rows per call, chunking over threads and batch size change which code runs where, never
//! what it computes for one `(r, i)`.
#![allow(unsafe_code)]

mod act;
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod dense;
mod formats;
mod lanes;
#[cfg(target_arch = "x86_64")]
mod lanes_avx2;
#[cfg(target_arch = "x86_64")]
mod lanes_avx512;
mod portable;
pub mod quant_acts;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod tiles;

use rayon::prelude::*;

use crate::model::ggml_type::GgmlType;
use attention::{CHUNK, ChunkScratch, TileJob};
use quant_acts::{QRow, QuantActs};

/// A shape or type problem in a kernel call, naming what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The tensor type has no kernels (Q8_1, Q8_K).
    #[error("no kernels for tensor type {0}")]
    Unsupported(GgmlType),
    /// A row length is not a whole number of blocks.
    #[error("{cols} values is not a whole number of {ggml_type} blocks of {block}")]
    RaggedColumns { ggml_type: GgmlType, cols: usize, block: usize },
    /// The bytes given do not match the shape.
    #[error("{ggml_type} data for {rows}x{cols} needs {expected} bytes, got {actual}")]
    DataLength { ggml_type: GgmlType, rows: usize, cols: usize, expected: usize, actual: usize },
    /// The matmul input is not `n * cols` values.
    #[error("matmul input has {actual} values, expected {expected} ({n} rows of {cols})")]
    InputLength { n: usize, cols: usize, expected: usize, actual: usize },
    /// The matmul output is not `n * rows` values.
    #[error("matmul output has {actual} values, expected {expected} ({n} rows of {rows})")]
    OutputLength { n: usize, rows: usize, expected: usize, actual: usize },
    /// `STARLING_KERNELS` names a kernel set this CPU does not run.
    #[error("STARLING_KERNELS={name:?}: this CPU runs {available}")]
    UnknownKernels { name: String, available: String },
}

/// A row-major matrix of `rows` rows, each `cols` values stored in `ggml_type` (ggml's [cols, rows]).
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ggml_type: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Checks the type has kernels, `cols` is a whole number of blocks and
    /// `data.len() == rows * row_bytes`.
    pub fn new(ggml_type: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, KernelError> {
        let row_bytes = row_bytes(ggml_type, cols)?;
        let expected = rows.saturating_mul(row_bytes);
        if data.len() != expected {
            let actual = data.len();
            return Err(KernelError::DataLength { ggml_type, rows, cols, expected, actual });
        }
        Ok(QMatrix { ggml_type, rows, cols, data })
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ggml_type.block_elems() * self.ggml_type.block_bytes()
    }

    /// The stored bytes of row `r` (panics if `r >= rows`).
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }
}

/// Bytes of a row of `cols` values of `t`, or why there is no such row.
fn row_bytes(t: GgmlType, cols: usize) -> Result<usize, KernelError> {
    if !t.has_kernels() {
        return Err(KernelError::Unsupported(t));
    }
    let block = t.block_elems();
    if !cols.is_multiple_of(block) {
        return Err(KernelError::RaggedColumns { ggml_type: t, cols, block });
    }
    Ok(cols / block * t.block_bytes())
}

/// Reusable buffers for [`Kernels::matmul`]: a transposed output for small batches, and
/// the quantized activations of the VNNI kernels. Grows to the largest call, then never
/// allocates.
#[derive(Default, Debug)]
pub struct MatmulScratch {
    out: Vec<f32>,
    acts: QuantActs,
}

/// A matmul's x rows: f32, and quantized where the kernels read them so.
#[derive(Clone, Copy)]
struct Acts<'a> {
    f32: &'a [f32],
    quantized: Option<&'a QuantActs>,
}

/// The instruction set a [`Kernels`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    Avx2,
    /// AVX2 with 256-bit `vpdpbusd`: block formats against 16-bit activations
    /// ([`quant_acts`]). `evex`: in AVX-512 VNNI's encoding, on a CPU without AVX-VNNI.
    AvxVnni {
        evex: bool,
    },
    Avx512,
    /// AVX-512 with VNNI: block formats against 16-bit activations.
    Avx512Vnni,
}

/// Kernels chosen once at run time for this CPU (`is_x86_feature_detected!`), with a
/// portable fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels {
    isa: Isa,
}

/// Where a block of outputs goes: `out[(r - r0) * row_stride + (i - i0) * x_stride]`.
#[derive(Clone, Copy)]
struct Layout {
    row_stride: usize,
    x_stride: usize,
}

/// Below this many weight bytes × x rows, a matmul runs on the calling thread.
const SERIAL_BYTES: usize = 32 * 1024;
/// Most x rows per kernel call (each weight block is decoded once for this many rows): 16
/// for the 16-lane (AVX-512) tile kernels, 8 for the 8-lane ones, and for the float types
/// [`DENSE_X_TILE`] on AVX-512 (four elsewhere). Against 8, 16 rows a call made one-thread
/// 1,536-row matmuls of 16 to 128 x rows 8–22% faster on both AVX-512 sets (Q4_0, Q5_0,
/// Q4_K, Q6_K, Q8_0), one and eight x rows unchanged (docs/perf-log.md). The 8-lane sets
/// keep 8: `avx-vnni` was within 3% either way at 128 rows, and their 16 registers cannot
/// hold 16 accumulators.
const X_TILE: usize = 16;
/// [`X_TILE`] for the float kernels on AVX-512: their x tile stays in L1 (16 rows measured
/// 3–5% slower on F16).
const DENSE_X_TILE: usize = 8;
/// L1 bytes a pass over a group of weight rows may fill: the x tile plus the group.
const ROW_GROUP_BYTES: usize = 28 * 1024;

/// Whether a pooled matmul of `n` x rows gives each of `threads` threads its own x rows (a
/// prompt) rather than its own weight rows.
fn splits_by_x_rows(n: usize, threads: usize) -> bool {
    n >= 8 * threads
}

/// Index of the largest value of `row`: the first on ties, NaN never chosen, 0 when no value
/// is above −∞. Compiled for AVX-512 where the CPU has it; it only compares, so every CPU
/// gives the same answer.
pub fn argmax(row: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, the one feature the function is compiled for.
        return unsafe { act::argmax_avx512(row) };
    }
    act::argmax_lanes(row)
}

impl Kernels {
    /// The default kernels for this CPU: the best set it runs (`avx512-vnni` where present).
    /// Another set is chosen with `STARLING_KERNELS` ([`Kernels::from_env`]).
    pub fn detect() -> Self {
        Self::available().pop().unwrap_or_else(Self::portable)
    }

    /// The set named `name` (as [`Kernels::name`] gives it), if this CPU runs it.
    pub fn named(name: &str) -> Result<Self, KernelError> {
        let all = Self::available();
        all.iter().copied().find(|k| k.name() == name).ok_or_else(|| KernelError::UnknownKernels {
            name: name.to_owned(),
            available: all.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The set `STARLING_KERNELS` names, or [`Kernels::detect`]'s when it is unset or empty.
    pub fn from_env() -> Result<Self, KernelError> {
        match std::env::var("STARLING_KERNELS") {
            Ok(name) if !name.is_empty() => Self::named(&name),
            Err(std::env::VarError::NotUnicode(name)) => Self::named(&name.to_string_lossy()),
            _ => Ok(Self::detect()),
        }
    }

    /// Kernels with no SIMD intrinsics (for comparison tests and other CPUs).
    pub fn portable() -> Self {
        Kernels { isa: Isa::Portable }
    }

    /// Every variant this CPU runs, portable first, best last.
    pub fn available() -> Vec<Self> {
        let mut all = vec![Self::portable()];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            let vnni512 = avx512 && is_x86_feature_detected!("avx512vnni");
            if avx2 {
                all.push(Kernels { isa: Isa::Avx2 });
            }
            if avx2 && is_x86_feature_detected!("avxvnni") {
                all.push(Kernels { isa: Isa::AvxVnni { evex: false } });
            } else if vnni512 {
                all.push(Kernels { isa: Isa::AvxVnni { evex: true } });
            }
            if avx512 {
                all.push(Kernels { isa: Isa::Avx512 });
            }
            if vnni512 {
                all.push(Kernels { isa: Isa::Avx512Vnni });
            }
        }
        all
    }

    /// A short name: "avx512-vnni", "avx512-f32", "avx-vnni", "avx2-f32" or "portable".
    pub fn name(&self) -> &'static str {
        match self.isa {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2-f32",
            Isa::AvxVnni { .. } => "avx-vnni",
            Isa::Avx512 => "avx512-f32",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether matmuls over `t` quantize their activations to 16 bits ([`quant_acts`]) on
    /// these kernels, instead of keeping them f32: on the VNNI sets, for every block format.
    pub fn quantizes_activations(&self, t: GgmlType) -> bool {
        matches!(self.isa, Isa::AvxVnni { .. } | Isa::Avx512Vnni) && t.block_elems() > 1 && t.has_kernels()
    }

    /// `gate_i ← gelu_tanh(gate_i) · up_i` (GELU's tanh approximation, as Gemma's FFN
    /// uses it): the same bits on every kernel set.
    ///
    /// # Panics
    /// If `gate` and `up` differ in length.
    pub fn gelu_tanh_mul(&self, gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len(), "gate and up lengths");
        #[cfg(target_arch = "x86_64")]
        match self.isa {
            // SAFETY: `available()` builds these sets only after detecting the features the
            // wide builds enable (avx512f/bw/vl, avx2, fma, f16c; or avx2, fma, f16c).
            Isa::Avx512 | Isa::Avx512Vnni => return unsafe { act::gelu_tanh_mul_avx512(gate, up) },
            // SAFETY: as above.
            Isa::Avx2 | Isa::AvxVnni { .. } => return unsafe { act::gelu_tanh_mul_avx2(gate, up) },
            Isa::Portable => {}
        }
        act::gelu_tanh_mul(gate, up)
    }

    /// Weight rows one kernel call handles together (a tile, one per lane), so row ranges are
    /// cut at multiples of it.
    fn row_tile(&self, t: GgmlType) -> usize {
        match self.isa {
            _ if t.block_elems() == 1 => 1,
            Isa::Avx512 | Isa::Avx512Vnni => 16,
            Isa::Avx2 | Isa::AvxVnni { .. } => 8,
            Isa::Portable => 1,
        }
    }

    /// The x rows as the kernels for `w` read them, quantizing into `acts` where they must,
    /// unless `acts` already holds them (`held`, which this sets once it has quantized them).
    /// With a pool and rows enough to split the matmul by x rows (a prompt), the rows are
    /// quantized in runs across the pool rather than on this thread while the others wait
    /// (5% of a Q4_0 prefill profile).
    fn acts<'a>(
        &self,
        w: &QMatrix,
        x: &'a [f32],
        acts: &'a mut QuantActs,
        held: &mut bool,
        pool: Option<&rayon::ThreadPool>,
    ) -> Acts<'a> {
        let quantized = (self.quantizes_activations(w.ggml_type) && w.cols > 0).then(|| {
            if !*held {
                let avx512 = cfg!(target_arch = "x86_64") && self.isa == Isa::Avx512Vnni;
                let threads = pool.map_or(1, |p| p.current_num_threads());
                match pool {
                    // SAFETY: `available()` builds `Avx512Vnni` only after detecting avx512f.
                    Some(pool) if threads > 1 && splits_by_x_rows(x.len() / w.cols, threads) => {
                        pool.install(|| unsafe { acts.quantize_par(x, w.cols, avx512, threads) })
                    }
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above.
                    _ if avx512 => unsafe { acts.quantize_avx512(x, w.cols) },
                    _ => acts.quantize(x, w.cols),
                }
                *held = true;
            }
            &*acts
        });
        Acts { f32: x, quantized }
    }

    /// Dequantizes one row (`dst.len()` values) stored in `t`.
    ///
    /// # Panics
    /// If [`Kernels::try_dequantize_row`] would return an error.
    pub fn dequantize_row(&self, t: GgmlType, src: &[u8], dst: &mut [f32]) {
        if let Err(e) = self.try_dequantize_row(t, src, dst) {
            panic!("dequantize_row: {e}");
        }
    }

    /// Dequantizes one row, or says why `src` and `dst` do not fit `t`.
    pub fn try_dequantize_row(&self, t: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
        let expected = row_bytes(t, dst.len())?;
        if src.len() != expected {
            let (cols, actual) = (dst.len(), src.len());
            return Err(KernelError::DataLength { ggml_type: t, rows: 1, cols, expected, actual });
        }
        portable::dequantize_row(t, src, dst);
        Ok(())
    }

    /// One chunk for one or more query rows of one sequence ([`TileJob`]): each row's
    /// partial ([`attention::AttnShape::partial_len`] floats) into its own run of `parts`,
    /// the same bits whatever else is in the tile. See [`attention`].
    ///
    /// # Panics
    /// If the queries, `parts` or a range do not fit the shape and [`CHUNK`], or the block
    /// table does not cover a range.
    pub fn attend_tile(&self, job: &TileJob, scratch: &mut ChunkScratch, parts: &mut [f32]) {
        let (shape, kv) = (job.shape, job.kv);
        let rows = job.ranges.len();
        assert_eq!(job.q.len(), rows * shape.n_head * shape.head_dim, "query length");
        assert_eq!(parts.len(), rows * shape.partial_len(), "partial length");
        assert!(shape.n_head_kv > 0 && shape.n_head.is_multiple_of(shape.n_head_kv), "head groups");
        assert_eq!(kv.layout().kv_dim, shape.n_head_kv * shape.head_dim, "KV row width");
        let chunk = job.ranges.first().map_or(0, |r| r.start / CHUNK);
        for range in job.ranges {
            assert!(!range.is_empty() && range.start / CHUNK == chunk && (range.end - 1) / CHUNK == chunk, "{range:?}");
            assert!(range.end <= job.blocks.len() * kv.layout().block_tokens, "block table too short for {range:?}");
        }
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx512` is only built by `available()` after detecting avx512f/bw/vl,
            // avx2, fma and f16c, the features `tile_avx512` enables.
            Isa::Avx512 | Isa::Avx512Vnni => unsafe { attention::tile_avx512(job, scratch, parts) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` and `AvxVnni` are only built by `available()` after detecting
            // avx2, fma and f16c.
            Isa::Avx2 | Isa::AvxVnni { .. } => unsafe { attention::tile_avx2(job, scratch, parts) },
            _ => attention::tile_portable(job, scratch, parts),
        }
    }

    /// A row's attention output `out` (`n_head × head_dim`) from its chunk partials, in
    /// position order, each [`attention::AttnShape::partial_len`] floats and `step` floats
    /// after the one before (a row of a tile has its chunks one tile's width apart). Every
    /// set computes the same bits; the wider ones only run the lane loops wider.
    ///
    /// # Panics
    /// If `parts` or `out` do not fit the shape.
    pub fn merge_strided(&self, shape: attention::AttnShape, parts: &[f32], step: usize, out: &mut [f32]) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available()` builds the AVX-512 sets only after detecting avx512f.
            Isa::Avx512 | Isa::Avx512Vnni => unsafe { attention::merge_avx512(shape, parts, step, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available()` builds `Avx2` and `AvxVnni` only after detecting avx2.
            Isa::Avx2 | Isa::AvxVnni { .. } => unsafe { attention::merge_avx2(shape, parts, step, out) },
            _ => attention::merge_portable(shape, parts, step, out),
        }
    }

    /// `y[i*rows + r] = Σ_c x[i*cols + c] · W[r][c]` for `i in 0..n` (`y = x · Wᵀ`), on `pool`.
    /// Uses and grows `scratch` (no allocation once warmed up).
    ///
    /// # Panics
    /// If [`Kernels::try_matmul`] would return an error (`x` or `y` of the wrong length).
    pub fn matmul(
        &self,
        w: &QMatrix,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        scratch: &mut MatmulScratch,
        pool: &rayon::ThreadPool,
    ) {
        if let Err(e) = self.try_matmul(w, x, n, y, scratch, pool) {
            panic!("matmul: {e}");
        }
    }

    /// [`Kernels::matmul`], returning an error instead of panicking on bad lengths.
    pub fn try_matmul(
        &self,
        w: &QMatrix,
        x: &[f32],
        n: usize,
        y: &mut [f32],
        scratch: &mut MatmulScratch,
        pool: &rayon::ThreadPool,
    ) -> Result<(), KernelError> {
        self.try_matmul_shared(std::slice::from_ref(w), x, n, &mut [y], scratch, Some(pool))
    }

    /// `y_i = x · W_iᵀ` for each matrix of `ws` (in the pool when `pool` is given, else on
    /// this thread): the same bits as one [`Kernels::try_matmul`] per matrix, but the x rows
    /// are quantized once for all the matrices whose kernels read them quantized (q, k and v;
    /// gate and up), not again for each. (Every matrix is `x.len() / n` wide, so one
    /// quantization fits them all.)
    pub fn try_matmul_shared(
        &self,
        ws: &[QMatrix],
        x: &[f32],
        n: usize,
        ys: &mut [&mut [f32]],
        scratch: &mut MatmulScratch,
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<(), KernelError> {
        assert_eq!(ws.len(), ys.len(), "one output per matrix");
        for (w, y) in ws.iter().zip(ys.iter()) {
            check_lengths(w, x.len(), n, y.len())?;
        }
        if n == 0 {
            return Ok(());
        }
        let (MatmulScratch { out, acts }, mut held) = (scratch, false);
        for (w, y) in ws.iter().zip(ys.iter_mut()).filter(|(w, _)| w.rows > 0) {
            let x = self.acts(w, x, acts, &mut held, pool);
            match pool {
                Some(pool) => self.split(w, x, n, y, out, pool),
                None => self.compute(w, x, 0..w.rows, 0..n, y, Layout { row_stride: 1, x_stride: w.rows }),
            }
        }
        Ok(())
    }

    /// One matmul's work on the pool once `x` is prepared (lengths checked).
    fn split(&self, w: &QMatrix, x: Acts, n: usize, y: &mut [f32], out: &mut Vec<f32>, pool: &rayon::ThreadPool) {
        let threads = pool.current_num_threads().max(1);
        if splits_by_x_rows(n, threads) {
            self.split_x_rows(w, x, n, y, threads, pool);
        } else if n == 1 {
            self.split_w_rows(w, x, n, y, threads, pool);
        } else {
            out.resize(w.rows * n, 0.0);
            self.split_w_rows(w, x, n, out, threads, pool);
            for (r, outs) in out.chunks_exact(n).enumerate() {
                for (i, &v) in outs.iter().enumerate() {
                    y[i * w.rows + r] = v;
                }
            }
        }
    }

    /// [`Kernels::matmul`] on the calling thread alone: for callers that already keep every
    /// thread busy (the model's batch split by sequence). Same kernel calls, same bits.
    ///
    /// # Panics
    /// If `x` or `y` have the wrong length, as [`Kernels::matmul`].
    pub fn matmul_serial(&self, w: &QMatrix, x: &[f32], n: usize, y: &mut [f32], scratch: &mut MatmulScratch) {
        if let Err(e) = self.try_matmul_shared(std::slice::from_ref(w), x, n, &mut [y], scratch, None) {
            panic!("matmul: {e}");
        }
    }

    /// Parallel over chunks of x rows; each chunk writes its own rows of `y`.
    fn split_x_rows(&self, w: &QMatrix, acts: Acts, n: usize, y: &mut [f32], threads: usize, pool: &rayon::ThreadPool) {
        let tile = self.x_tile(w);
        let tiles = n.div_ceil(tile);
        let chunks = tiles.min(4 * threads);
        let chunk_x = tiles.div_ceil(chunks) * tile;
        let layout = Layout { row_stride: 1, x_stride: w.rows };
        pool.install(|| {
            y.par_chunks_mut(chunk_x * w.rows).enumerate().for_each(|(c, out)| {
                let xs = c * chunk_x..c * chunk_x + out.len() / w.rows;
                self.compute(w, acts, 0..w.rows, xs, out, layout);
            });
        });
    }

    /// Parallel over chunks of weight rows; `out` is row-major over weight rows (`out[r*n + i]`).
    fn split_w_rows(
        &self,
        w: &QMatrix,
        acts: Acts,
        n: usize,
        out: &mut [f32],
        threads: usize,
        pool: &rayon::ThreadPool,
    ) {
        let work = w.rows * w.row_bytes() * n;
        let chunks = if work < (1 << 20) { threads } else { 4 * threads };
        let chunk_rows = w.rows.div_ceil(chunks.min(w.rows)).next_multiple_of(self.row_tile(w.ggml_type));
        let layout = Layout { row_stride: n, x_stride: 1 };
        if work < SERIAL_BYTES {
            // Too little work to pay for waking another thread: same kernel, this thread.
            self.compute(w, acts, 0..w.rows, 0..n, out, layout);
            return;
        }
        pool.install(|| {
            out.par_chunks_mut(chunk_rows * n).enumerate().for_each(|(c, out)| {
                let rows = c * chunk_rows..c * chunk_rows + out.len() / n;
                self.compute(w, acts, rows, 0..n, out, layout);
            });
        });
    }

    /// X rows per kernel call for `w`: [`X_TILE`] for the 16-lane tile kernels and eight for
    /// the 8-lane ones (every block format on a SIMD set; eight f32 rows measured 40% faster
    /// than four on both f32 sets, 1,024-wide rows, one thread); for float weights,
    /// [`DENSE_X_TILE`] f32 rows on AVX-512 while they take at most 20 KB, else four.
    fn x_tile(&self, w: &QMatrix) -> usize {
        match self.isa {
            _ if self.row_tile(w.ggml_type) >= 16 => X_TILE,
            _ if self.row_tile(w.ggml_type) > 1 => 8,
            Isa::Avx512 | Isa::Avx512Vnni if DENSE_X_TILE * w.cols * 4 <= 20 * 1024 => DENSE_X_TILE,
            _ => 4,
        }
    }

    /// Computes every `(r, i)` of `rows × xs` into `out`, in row groups that stay in L1
    /// (beside one x tile, at least 4 KB of them) while tiles of x rows pass over them.
    fn compute(
        &self,
        w: &QMatrix,
        acts: Acts,
        rows: std::ops::Range<usize>,
        xs: std::ops::Range<usize>,
        out: &mut [f32],
        at: Layout,
    ) {
        let tile = self.x_tile(w);
        let x_bytes = if self.quantizes_activations(w.ggml_type) { 2 } else { 4 };
        let tile_bytes = tile * w.cols * x_bytes;
        let group = (ROW_GROUP_BYTES.saturating_sub(tile_bytes).max(4096) / w.row_bytes().max(1)).max(1);
        // One pass of x rows reuses nothing from L1: then the whole range is one call, so the
        // VNNI kernel's prefetch of its next tile runs across it. Float rows are always one
        // group: their kernel reuses the x tile, not the weights, and L1 groups of about
        // eight rows measured a third slower at 16 x rows (perf-log, "floats").
        let group = if xs.len() <= tile || w.ggml_type.block_elems() == 1 {
            rows.len().max(1)
        } else {
            group.next_multiple_of(self.row_tile(w.ggml_type))
        };
        for g0 in rows.clone().step_by(group) {
            let g1 = (g0 + group).min(rows.end);
            for i0 in xs.clone().step_by(tile) {
                let mut emit = |r: usize, vals: &[f32]| {
                    // One bounds check per weight row instead of one per value.
                    let base = (r - rows.start) * at.row_stride + (i0 - xs.start) * at.x_stride;
                    let last = base + vals.len().saturating_sub(1) * at.x_stride;
                    assert!(vals.is_empty() || last < out.len(), "output index {last} past {}", out.len());
                    for (j, &v) in vals.iter().enumerate() {
                        // SAFETY: `base + j * x_stride <= last < out.len()` for every `j < vals.len()`.
                        unsafe { *out.get_unchecked_mut(base + j * at.x_stride) = v };
                    }
                };
                self.tile(w, acts, g0..g1, i0..(i0 + tile).min(xs.end), xs.len() <= tile, &mut emit);
            }
        }
    }

    /// `W[r] · x[i]` for every `r` of `rows` and `i` of `xs` (at most [`X_TILE`]), handed row by
    /// row to `emit(r, values)`. `one_pass`: these x rows are the only ones to meet these
    /// weight rows, so the weights come from memory rather than from cache.
    fn tile<E: FnMut(usize, &[f32])>(
        &self,
        w: &QMatrix,
        acts: Acts,
        rows: std::ops::Range<usize>,
        xs: std::ops::Range<usize>,
        one_pass: bool,
        emit: &mut E,
    ) {
        let (t, cols, nx) = (w.ggml_type, w.cols, xs.len());
        let x: [&[f32]; X_TILE] =
            std::array::from_fn(|j| if j < nx { &acts.f32[(xs.start + j) * cols..][..cols] } else { &[] });
        #[cfg(target_arch = "x86_64")]
        if self.isa != Isa::Portable && t.block_elems() > 1 && cols > 0 {
            let (start, rb) = (rows.start, w.row_bytes());
            let run = Tiles {
                isa: self.isa,
                data: &w.data[start * rb..rows.end * rb],
                row_bytes: rb,
                count: rows.len(),
                x: &x[..nx],
                q: acts.quantized.map(|q| std::array::from_fn(|j| q.row(xs.start + j.min(nx - 1)))),
                emit: |k: usize, v: &[f32]| emit(start + k, v),
            };
            if formats::with_format(t, run).is_some() {
                return;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa != Isa::Portable && t.block_elems() == 1 && cols > 0 {
            use formats::{BF16, F16, F32};
            let (start, rb) = (rows.start, w.row_bytes());
            let (data, count, xs) = (&w.data[start * rb..rows.end * rb], rows.len(), &x[..nx]);
            let emit = |k: usize, v: &[f32]| emit(start + k, v);
            let wide = matches!(self.isa, Isa::Avx512 | Isa::Avx512Vnni);
            // SAFETY: `available()` builds `Avx512` and `Avx512Vnni` only after detecting
            // avx512f/bw/vl, avx2, fma and f16c, and every other SIMD set after avx2, fma and
            // f16c: the features of `dense::avx512` and `dense::avx2`.
            unsafe {
                match (t, wide) {
                    (GgmlType::F32, true) => dense::avx512::<F32>(data, cols, count, xs, one_pass, emit),
                    (GgmlType::F16, true) => dense::avx512::<F16>(data, cols, count, xs, one_pass, emit),
                    (GgmlType::BF16, true) => dense::avx512::<BF16>(data, cols, count, xs, one_pass, emit),
                    (GgmlType::F32, false) => dense::avx2::<F32>(data, cols, count, xs, one_pass, emit),
                    (GgmlType::F16, false) => dense::avx2::<F16>(data, cols, count, xs, one_pass, emit),
                    (GgmlType::BF16, false) => dense::avx2::<BF16>(data, cols, count, xs, one_pass, emit),
                    _ => unreachable!("{t} has one value a block"),
                }
            }
            return;
        }
        // The portable set, and rows of no values on any set.
        let mut out = [0.0f32; X_TILE];
        for r in rows {
            portable::tile(t, w.row(r), &x[..nx], &mut out[..nx]);
            emit(r, &out[..nx]);
        }
    }
}

/// One call of a kernel set's SIMD kernels over the format of a type ([`tiles`]).
#[cfg(target_arch = "x86_64")]
struct Tiles<'a, E> {
    isa: Isa,
    data: &'a [u8],
    row_bytes: usize,
    count: usize,
    /// The f32 x rows.
    x: &'a [&'a [f32]],
    /// The same rows quantized, on the VNNI sets (past `x.len()`, repeats of the last).
    q: Option<[QRow<'a>; X_TILE]>,
    emit: E,
}

#[cfg(target_arch = "x86_64")]
impl<E: FnMut(usize, &[f32])> formats::FormatFn for Tiles<'_, E> {
    type Out = ();

    fn call<F: formats::Format>(self) {
        use lanes_avx2::{Avx2, AvxVnni, Vnni256Evex};
        use lanes_avx512::{Avx512, Vnni512};
        let Tiles { isa, data, row_bytes: rb, count, x, q, emit } = self;
        let q = q.as_ref().map(|q| &q[..x.len()]);
        let vnni = || q.expect("quantized activations on a VNNI set");
        // SAFETY (every arm): `available()` builds each `Isa` only after detecting the
        // features its kernels enable and its tokens stand for: avx2, fma and f16c for all;
        // avx512f/bw/vl for `Avx512` and `Avx512Vnni`; avx512vnni for `Avx512Vnni`; avxvnni
        // for `AvxVnni { evex: false }`, avx512f/bw/vl and avx512vnni for `{ evex: true }`.
        unsafe {
            match isa {
                Isa::Avx512Vnni => {
                    tiles::avx512_vnni::<F>(Avx512::new(), Vnni512::new(), data, rb, count, vnni(), emit)
                }
                Isa::AvxVnni { evex: true } => {
                    tiles::avx_vnni::<F, _>(Avx2::new(), Vnni256Evex::new(), data, rb, count, vnni(), emit)
                }
                Isa::AvxVnni { evex: false } => {
                    tiles::avx_vnni::<F, _>(Avx2::new(), AvxVnni::new(), data, rb, count, vnni(), emit)
                }
                Isa::Avx512 => tiles::avx512_f32::<F>(Avx512::new(), data, rb, count, x, emit),
                Isa::Avx2 => tiles::avx2_f32::<F>(Avx2::new(), data, rb, count, x, emit),
                Isa::Portable => unreachable!("the portable set has no tiles"),
            }
        }
    }
}

/// Checks `x` is `n * cols` values and `y` is `n * rows` values.
fn check_lengths(w: &QMatrix, x_len: usize, n: usize, y_len: usize) -> Result<(), KernelError> {
    let expected = n.saturating_mul(w.cols);
    if x_len != expected {
        return Err(KernelError::InputLength { n, cols: w.cols, expected, actual: x_len });
    }
    let expected = n.saturating_mul(w.rows);
    if y_len != expected {
        return Err(KernelError::OutputLength { n, rows: w.rows, expected, actual: y_len });
    }
    Ok(())
}
