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

/// Where the outputs of a [`Kernels::compute`] over `rows × xs` go: `(r, i)` at
/// `out[first + (r - rows.start) + (i - xs.start) * x_stride]`, each x row's results one
/// contiguous run.
#[derive(Clone, Copy)]
struct Layout {
    first: usize,
    x_stride: usize,
}

/// A matmul's output, written by the pool threads of a split at once, each at its own
/// indices (a split by weight rows interleaves them: `y[i · rows + r]`).
#[derive(Clone, Copy)]
struct Out<'a> {
    ptr: *mut f32,
    len: usize,
    _y: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: `Out` only writes, through `Out::write`, whose callers keep threads' indices apart.
unsafe impl Send for Out<'_> {}
// SAFETY: as above.
unsafe impl Sync for Out<'_> {}

impl<'a> Out<'a> {
    fn new(y: &'a mut [f32]) -> Self {
        Out { ptr: y.as_mut_ptr(), len: y.len(), _y: std::marker::PhantomData }
    }

    /// `out[i] = v`.
    ///
    /// # Safety
    /// `i` is in bounds, and no other thread reads or writes it meanwhile.
    #[inline(always)]
    unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: in bounds (the caller's word) of the slice `new` borrowed for `'a`; the
        // caller keeps other threads off index `i`.
        unsafe { self.ptr.add(i).write(v) }
    }
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

/// Chunks of a split of `n` x rows: a multiple of `threads` (up to four each, each at least
/// an `x_tile` of rows), so the threads get even shares. (Whole `x_tile`s per chunk gave 48
/// rows on two threads as 32 and 16, and 16 rows as one chunk.)
fn x_chunks(n: usize, x_tile: usize, threads: usize) -> usize {
    (n / (x_tile * threads)).clamp(1, 4) * threads
}

/// X rows of chunk `c` of `chunks` over `n` rows: even runs, in order.
fn x_chunk(c: usize, chunks: usize, n: usize) -> std::ops::Range<usize> {
    c * n / chunks..(c + 1) * n / chunks
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

    /// `gate_i ← silu(gate_i) · up_i` (the SwiGLU of Llama-style FFNs): the same bits on
    /// every kernel set.
    ///
    /// # Panics
    /// If `gate` and `up` differ in length.
    pub fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len(), "gate and up lengths");
        #[cfg(target_arch = "x86_64")]
        match self.isa {
            // SAFETY: as in `gelu_tanh_mul`.
            Isa::Avx512 | Isa::Avx512Vnni => return unsafe { act::silu_mul_avx512(gate, up) },
            // SAFETY: as in `gelu_tanh_mul`.
            Isa::Avx2 | Isa::AvxVnni { .. } => return unsafe { act::silu_mul_avx2(gate, up) },
            Isa::Portable => {}
        }
        act::silu_mul(gate, up)
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
                    Some(pool) if threads > 1 && self.splits_by_x_rows(w, x.len() / w.cols, threads) => {
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
        let (MatmulScratch { acts }, mut held) = (scratch, false);
        for (w, y) in ws.iter().zip(ys.iter_mut()).filter(|(w, _)| w.rows > 0) {
            let x = self.acts(w, x, acts, &mut held, pool);
            match pool {
                Some(pool) => self.split(w, x, n, y, pool),
                // SAFETY: one thread writes `y`.
                None => unsafe {
                    self.compute(w, x, 0..w.rows, 0..n, Out::new(y), Layout { first: 0, x_stride: w.rows })
                },
            }
        }
        Ok(())
    }

    /// One matmul's work on the pool once `x` is prepared (lengths checked).
    fn split(&self, w: &QMatrix, x: Acts, n: usize, y: &mut [f32], pool: &rayon::ThreadPool) {
        let threads = pool.current_num_threads().max(1);
        if self.splits_by_x_rows(w, n, threads) {
            self.split_x_rows(w, x, n, y, threads, pool);
        } else {
            self.split_w_rows(w, x, n, y, threads, pool);
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
        let chunks = x_chunks(n, self.x_tile(w), threads);
        let out = Out::new(y);
        pool.install(|| {
            (0..chunks).into_par_iter().for_each(|c| {
                let xs = x_chunk(c, chunks, n);
                let layout = Layout { first: xs.start * w.rows, x_stride: w.rows };
                // SAFETY: chunk `c` writes the rows of `y` of its own x rows only.
                unsafe { self.compute(w, acts, 0..w.rows, xs, out, layout) };
            });
        });
    }

    /// Parallel over chunks of weight rows, each writing its own rows' outputs of every x
    /// row straight into `y` (`y[i · rows + r]`; writing into a row-major buffer and
    /// transposing it after was 14% of a pooled 16-sequence Gemma 3 step, mostly the
    /// output head's 262,144 rows).
    fn split_w_rows(&self, w: &QMatrix, acts: Acts, n: usize, y: &mut [f32], threads: usize, pool: &rayon::ThreadPool) {
        let work = w.rows * w.row_bytes() * n;
        let chunks = if work < (1 << 20) { threads } else { 4 * threads };
        let chunk_rows = w.rows.div_ceil(chunks.min(w.rows)).next_multiple_of(self.row_tile(w.ggml_type));
        let out = Out::new(y);
        if work < SERIAL_BYTES {
            // Too little work to pay for waking another thread: same kernel, this thread.
            // SAFETY: one thread writes `y`.
            unsafe { self.compute(w, acts, 0..w.rows, 0..n, out, Layout { first: 0, x_stride: w.rows }) };
            return;
        }
        pool.install(|| {
            (0..w.rows.div_ceil(chunk_rows)).into_par_iter().for_each(|c| {
                let rows = c * chunk_rows..((c + 1) * chunk_rows).min(w.rows);
                let layout = Layout { first: rows.start, x_stride: w.rows };
                // SAFETY: chunk `c` writes indices `i · rows + r` for its own `r` only.
                unsafe { self.compute(w, acts, rows, 0..n, out, layout) };
            });
        });
    }

    /// Whether a pooled matmul of `w` by `n` x rows gives each of `threads` threads its own x
    /// rows (a prompt) rather than its own weight rows: when each thread gets at least one
    /// full x tile. With fewer rows an x-row split would leave threads idle (16 rows on
    /// two threads made one chunk) or stream every weight once per thread for part tiles.
    fn splits_by_x_rows(&self, w: &QMatrix, n: usize, threads: usize) -> bool {
        n >= self.x_tile(w) * threads
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

    /// Computes every `(r, i)` of `rows × xs` into `out` (at `at`), in row groups that stay
    /// in L1 (beside one x tile, at least 4 KB of them) while tiles of x rows pass over them.
    ///
    /// # Safety
    /// No other thread reads or writes the indices of `out` this writes meanwhile.
    unsafe fn compute(
        &self,
        w: &QMatrix,
        acts: Acts,
        rows: std::ops::Range<usize>,
        xs: std::ops::Range<usize>,
        out: Out,
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
                // Index of `(r, i0)`.
                let at_row = |r: usize| at.first + (r - rows.start) + (i0 - xs.start) * at.x_stride;
                let mut emit = |r: usize, vals: &[f32]| {
                    // One bounds check per weight row instead of one per value.
                    let base = at_row(r);
                    let last = base + vals.len().saturating_sub(1) * at.x_stride;
                    assert!(vals.is_empty() || last < out.len, "output index {last} past {}", out.len);
                    for (j, &v) in vals.iter().enumerate() {
                        // SAFETY: `base + j * x_stride <= last < out.len` for every `j < vals.len()`;
                        // the caller keeps other threads off the indices this writes.
                        unsafe { out.write(base + j * at.x_stride, v) };
                    }
                };
                // A tile's results, a contiguous run per x row: written a value at a time
                // down the x rows (as `emit`), the runs of x rows `4 KB · k` apart (Gemma 3's
                // 1,024-, 2,048- and 262,144-row matrices) fell in one L1 set and evicted
                // each other: 16,384-row matmuls of 16 x rows ran at 52–54 GMAC/s against
                // 69–73 for 16,400.
                let mut emit_tile = |r0: usize, live: usize, outs: &[[f32; 16]]| {
                    let base = at_row(r0);
                    let last = base + outs.len().saturating_sub(1) * at.x_stride + live;
                    assert!(outs.is_empty() || last <= out.len, "output index {last} past {}", out.len);
                    for (j, vals) in outs.iter().enumerate() {
                        for (k, &v) in vals[..live].iter().enumerate() {
                            // SAFETY: `base + j * x_stride + k < last <= out.len`; the caller
                            // keeps other threads off the indices this writes.
                            unsafe { out.write(base + j * at.x_stride + k, v) };
                        }
                    }
                };
                let xr = i0..(i0 + tile).min(xs.end);
                self.tile(w, acts, g0..g1, xr, xs.len() <= tile, &mut emit, &mut emit_tile);
            }
        }
    }

    /// `W[r] · x[i]` for every `r` of `rows` and `i` of `xs` (at most [`X_TILE`]), handed to
    /// `emit(r, values)` row by row, or by the tile kernels to `emit_tile(r0, live, outs)` a
    /// tile at a time (see [`tiles::tiles`]). `one_pass`: these x rows are the only ones to
    /// meet these weight rows, so the weights come from memory rather than from cache.
    #[allow(clippy::too_many_arguments)]
    fn tile<E: FnMut(usize, &[f32]), T: FnMut(usize, usize, &[[f32; 16]])>(
        &self,
        w: &QMatrix,
        acts: Acts,
        rows: std::ops::Range<usize>,
        xs: std::ops::Range<usize>,
        one_pass: bool,
        emit: &mut E,
        emit_tile: &mut T,
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
                emit: |k: usize, live: usize, outs: &[[f32; 16]]| emit_tile(start + k, live, outs),
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
impl<E: FnMut(usize, usize, &[[f32; 16]])> formats::FormatFn for Tiles<'_, E> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled matmul splits by x rows only once every thread gets a full x tile: with
    /// 16-row tiles, 16 rows on two threads split by weight rows (an x-row split made them
    /// one chunk, on one thread); the 8-lane sets' 8-row tiles split them by x rows.
    #[test]
    fn a_split_by_x_rows_gives_every_thread_a_full_x_tile() {
        let data = vec![0u8; 64 * 18 * 2];
        let w = QMatrix::new(GgmlType::Q4_0, 64, 64, &data).unwrap();
        for k in Kernels::available() {
            let tile = k.x_tile(&w);
            assert!(!k.splits_by_x_rows(&w, 2 * tile - 1, 2), "{}: {} rows", k.name(), 2 * tile - 1);
            assert!(k.splits_by_x_rows(&w, 2 * tile, 2), "{}: {} rows", k.name(), 2 * tile);
        }
        let wide = Kernels::available().into_iter().find(|k| k.x_tile(&w) == 16);
        if let Some(k) = wide {
            assert!(!k.splits_by_x_rows(&w, 16, 2), "16 rows on two threads split by weight rows");
        }
    }

    /// Chunks of a split by x rows cover every row once, in order, in a multiple of the
    /// threads' count, each at least an x tile, differing by at most one row.
    #[test]
    fn x_row_chunks_are_even_across_the_threads() {
        for (tile, threads) in [(16, 2), (8, 2), (16, 4), (4, 3)] {
            for n in tile * threads..700 {
                let chunks = x_chunks(n, tile, threads);
                assert_eq!(chunks % threads, 0, "{n} rows on {threads} threads: {chunks} chunks");
                let runs: Vec<_> = (0..chunks).map(|c| x_chunk(c, chunks, n)).collect();
                assert!(runs.windows(2).all(|r| r[0].end == r[1].start), "{n} rows: {runs:?}");
                assert_eq!((runs[0].start, runs[chunks - 1].end), (0, n), "{n} rows: {runs:?}");
                let (lo, hi) = runs.iter().fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r.len()), hi.max(r.len())));
                assert!(hi - lo <= 1 && lo >= tile, "{n} rows on {threads} threads: {runs:?}");
            }
            assert_eq!(x_chunks(512, tile, threads), 4 * threads, "a prompt: four chunks a thread");
        }
        assert_eq!(x_chunk(1, x_chunks(48, 16, 2), 48), 24..48, "48 rows on two threads: 24 each");
        assert_eq!(x_chunks(16, 16, 2), 2, "16 rows: a chunk per thread");
    }
}
