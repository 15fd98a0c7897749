//! Attention of query rows over the KV arena, in chunks of [`CHUNK`] positions.
//!
//! A chunk gives, per head, its largest score `m`, the sum `s` of `exp(score − m)` and the
//! unnormalised weighted sum of values `Σ exp(score − m)·v`. `Kernels::merge_strided`
//! combines a row's chunks in position order into the softmax-weighted output (the same
//! bits from every kernel set's build of the merge). Chunk boundaries are fixed
//! multiples of [`CHUNK`] from position 0, so what a row computes depends only on its own
//! query and cache, never on how chunks were spread over threads or what else is in the
//! batch; the chunks of one long row can run on both cores.
//!
//! One body is compiled three times: for AVX-512, for AVX2 (both with FMA, so LLVM
//! vectorizes the 16-lane loops to full width) and portable (separate multiply and add).
//! For heads of 64, 128 or 256 values the AVX-512 build swaps in intrinsics for the inner
//! loops (`Zmm`). There scores are a small GEMM: the arena stores f32/f16 K by
//! dimension ([`KvArena::keys_by_dimension`]), so one vector holds one dimension of sixteen
//! positions, and four such vectors (a chunk's 64 positions, across blocks) meet up to six
//! (row, head) queries with 24 FMAs per dimension (q8_0 rows are dequantized and
//! transposed once per chunk instead). Each score is one running sum over the dimensions
//! in order, as `gemm`'s microkernels sum: no sum across lanes, and the same bits whether
//! K came by dimension or by row, alone or in a tile. The weighted sum of values loads
//! each V row once for up to three heads of a group and two rows of a tile that see the
//! same positions (up to 24 vectors of running sums, as the scores keep). f16 is read
//! as stored (`vcvtph2ps` in the load). A head's softmax over its chunk runs sixteen
//! lanes at a time (`vscalefps` applies the exponent). The other builds read K by
//! dimension too, with positions in the lanes and each score summed as the row-by-row dot
//! product sums it (q8_0 rows keep that dot product). `exp` is a polynomial the vectorizer
//! can inline (relative error under 5e-7).
//!
//! A long context's decode step streams every cached K and V row from memory once (190 MB
//! of f32 at 4,096 positions of SmolLM2), in runs of one block's rows. The body prefetches
//! the next run while it computes the current one, a few cache lines per head or row, so
//! the misses overlap the arithmetic without a burst that stalls it.

use std::ops::Range;

use super::portable::{LANES, sum_lanes};
use crate::kv::arena::{BlockId, KvArena, KvRows};

/// Positions per chunk.
pub const CHUNK: usize = 64;

/// The attention geometry of a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Multiplies every score `q·k` before the softmax (usually `1/sqrt(head_dim)`).
    pub scale: f32,
}

impl AttnShape {
    /// The usual shape: scores scaled by `1/sqrt(head_dim)`.
    pub fn new(n_head: usize, n_head_kv: usize, head_dim: usize) -> Self {
        AttnShape { n_head, n_head_kv, head_dim, scale: 1.0 / (head_dim as f32).sqrt() }
    }

    /// Floats of one chunk's partial result: per head `[m, s, acc[head_dim]]`.
    pub fn partial_len(&self) -> usize {
        self.n_head * (self.head_dim + 2)
    }
}

/// What a query row at position `pos` attends to: `lo..=pos`, where `lo` is 0, or for a
/// sliding-window layer the first of the last `window` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub lo: usize,
    pub pos: usize,
}

impl Span {
    /// The positions a row at `pos` sees with an optional sliding window (itself included).
    pub fn new(pos: usize, window: Option<usize>) -> Self {
        let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w.max(1)));
        Span { lo, pos }
    }

    /// How many chunks the span touches. Chunk `c` covers positions
    /// `c·CHUNK..(c+1)·CHUNK`, so boundaries depend only on positions.
    pub fn chunks(self) -> usize {
        self.pos / CHUNK - self.lo / CHUNK + 1
    }

    /// The positions of the span's `i`th chunk.
    pub fn chunk(self, i: usize) -> Range<usize> {
        let c = self.lo / CHUNK + i;
        (c * CHUNK).max(self.lo)..((c + 1) * CHUNK).min(self.pos + 1)
    }
}

/// One chunk of attention for one or more query rows of one sequence: what
/// `Kernels::attend_tile` computes. Each row's partial is the one a tile of that row alone
/// gives, bit for bit.
#[derive(Clone, Debug)]
pub struct TileJob<'a> {
    pub shape: AttnShape,
    pub layer: usize,
    /// The rows' queries, `n_head × head_dim` values each, one per range.
    pub q: &'a [f32],
    /// Each row's positions in the chunk, all inside one `c·CHUNK..(c+1)·CHUNK` and none
    /// empty (see [`Span::chunk`]).
    pub ranges: &'a [Range<usize>],
    /// The sequence's blocks, covering every range.
    pub blocks: &'a [BlockId],
    pub kv: &'a KvArena,
}

/// Per-thread buffers of a chunk: scores, and K or V widened to f32 (q8_0 rows, or f16 for
/// arithmetic that does not read it as stored).
#[derive(Default)]
pub struct ChunkScratch {
    scores: Vec<f32>,
    rows: Vec<f32>,
    /// A chunk's q8_0 K dequantized and transposed to `[kv_dim][CHUNK]` (AVX-512).
    kt: Vec<f32>,
}

/// Which arithmetic the body uses: fused multiply-add or a separate multiply and add, and
/// how a block's run of K rows becomes scores and its V rows join the weighted sums.
trait Arith: Sized {
    /// Whether `scores` and `values` read f16 rows themselves; otherwise [`tile_body`]
    /// widens them to f32 first.
    const READS_F16: bool = false;

    fn mul_add(a: f32, b: f32, c: f32) -> f32;

    /// `out` = the q8_0 blocks `blocks` as f32 (exact: each value is its scale times a
    /// small integer).
    #[inline(always)]
    fn widen_q8_0(blocks: &[u8], out: &mut [f32]) {
        KvRows::Q8_0(blocks).read_f32(0, out)
    }

    /// Every row's scores over the chunk's positions `start..end` (see [`Arith::scores_rows`]):
    /// by default one block's run of K at a time, each prefetching the next (and the last
    /// the chunk's first V rows). `rows` and `kt` are scratch.
    #[inline(always)]
    fn chunk_scores(
        job: &TileJob,
        (start, end): (usize, usize),
        rows: &mut Vec<f32>,
        _kt: &mut Vec<f32>,
        scores: &mut [f32],
    ) {
        let TileJob { shape, layer, q, ranges, blocks, kv } = *job;
        let mut j = start;
        while j < end {
            let (keys, take) = key_segment::<Self>(kv, blocks, layer, j..end, rows);
            let ahead = match j + take < end {
                true => upcoming(kv, blocks, layer, j + take, false),
                false => upcoming(kv, blocks, layer, start, true),
            };
            Self::scores_rows(shape, q, ranges, keys, j, shape.scale, scores, ahead);
            j += take;
        }
    }

    /// Every row's scores against the K rows `keys` of positions `j..`: for row `r` and
    /// each position `p` of its range among them, `scores[r·n_head·CHUNK + h·CHUNK + p −
    /// range.start] = scale · q_h · k_p` for every head `h`; prefetches `ahead` along the
    /// way (see [`prefetch_part`]).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn scores_rows(
        shape: AttnShape,
        q: &[f32],
        ranges: &[Range<usize>],
        keys: Keys,
        j: usize,
        scale: f32,
        scores: &mut [f32],
        mut ahead: &[u8],
    ) {
        let (qd, per_row, kvd) =
            (shape.n_head * shape.head_dim, shape.n_head * CHUNK, shape.n_head_kv * shape.head_dim);
        let (take, cols) = match keys {
            Keys::Rows(rows) => (rows.len() / kvd, None),
            Keys::Columns { block: KvRows::F32(k), bt, slot, take } => (take, Some((k, bt, slot))),
            Keys::Columns { .. } => unreachable!("tile_body widens f16 K for this arithmetic"),
        };
        for (r, range) in ranges.iter().enumerate() {
            let (lo, hi) = (j.max(range.start), (j + take).min(range.end));
            if lo >= hi {
                continue;
            }
            let (qr, sc) = (&q[r * qd..(r + 1) * qd], &mut scores[r * per_row..(r + 1) * per_row]);
            match (keys, cols) {
                (_, Some((k, bt, slot))) => {
                    column_scores::<Self>(shape, qr, k, bt, slot + lo - j, hi - lo, scale, lo - range.start, sc, ahead)
                }
                (Keys::Rows(rows), None) => Self::scores(
                    shape,
                    qr,
                    rows.slice((lo - j) * kvd..(hi - j) * kvd),
                    scale,
                    lo - range.start,
                    sc,
                    ahead,
                ),
                _ => unreachable!(),
            }
            ahead = &[];
        }
    }

    /// One row's `scores[h·CHUNK + jj0 + i] = scale · q_h · k_i` for every head `h` and K
    /// row `i` of `keys` (a 16-lane dot product, then the portable kernels' fixed pairwise
    /// lane sum); prefetches `ahead` along the way.
    #[inline(always)]
    fn scores(shape: AttnShape, q: &[f32], keys: KvRows, scale: f32, jj0: usize, scores: &mut [f32], ahead: &[u8]) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        let (group, kvd) = (n_head / shape.n_head_kv, shape.n_head_kv * hd);
        let KvRows::F32(keys) = keys else { unreachable!("tile_body widens f16 rows") };
        let rows = keys.len() / kvd;
        for (i, k) in keys.chunks_exact(kvd).enumerate() {
            prefetch_part(ahead, i, rows);
            for h in 0..n_head {
                let kh = &k[(h / group) * hd..][..hd];
                scores[h * CHUNK + jj0 + i] = dot::<Self>(&q[h * hd..][..hd], kh) * scale;
            }
        }
    }

    /// Each head's `n` scores (at `h·CHUNK` of `scores`) become `exp(score − m)`, and its
    /// partial in `part` starts as `[m, Σ exp(score − m), 0…]`.
    #[inline(always)]
    fn softmax(shape: AttnShape, n: usize, scores: &mut [f32], part: &mut [f32]) {
        let stride = shape.head_dim + 2;
        for h in 0..shape.n_head {
            let sc = &mut scores[h * CHUNK..][..n];
            let m = max(sc);
            let s = exp_sub_sum::<Self>(sc, m);
            let p = &mut part[h * stride..][..stride];
            p[0] = m;
            p[1] = s;
            p[2..].fill(0.0);
        }
    }

    /// `acc_h += scores[h·CHUNK + jj0 + i] · v_i` for every head and V row `i` of `vals`,
    /// where `acc_h` is `part[h·(hd+2) + 2..][..hd]`; prefetches `ahead` along the way.
    #[inline(always)]
    fn values(shape: AttnShape, vals: KvRows, scores: &[f32], jj0: usize, part: &mut [f32], ahead: &[u8]) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        let (group, kvd, stride) = (n_head / shape.n_head_kv, shape.n_head_kv * hd, hd + 2);
        let KvRows::F32(vals) = vals else { unreachable!("tile_body widens f16 rows") };
        let rows = vals.len() / kvd;
        for (i, v) in vals.chunks_exact(kvd).enumerate() {
            prefetch_part(ahead, i, rows);
            for h in 0..n_head {
                let w = scores[h * CHUNK + jj0 + i];
                let vh = &v[(h / group) * hd..][..hd];
                for (a, &x) in part[h * stride + 2..(h + 1) * stride].iter_mut().zip(vh) {
                    *a = Self::mul_add(w, x, *a);
                }
            }
        }
    }

    /// [`Arith::values`] for two rows over the same V rows with the same score offset
    /// (`scores[i]`, `parts[i]` per row): by default one after the other. Each row's sums
    /// are exactly what it gets alone either way.
    #[inline(always)]
    fn values_pair(
        shape: AttnShape,
        vals: KvRows,
        scores: [&[f32]; 2],
        jj0: usize,
        parts: [&mut [f32]; 2],
        ahead: &[u8],
    ) {
        let [a, b] = parts;
        Self::values(shape, vals, scores[0], jj0, a, ahead);
        Self::values(shape, vals, scores[1], jj0, b, &[]);
    }
}

struct Fused;
struct Separate;

impl Arith for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Arith for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// AVX-512 with heads of `V` × 16 values, reading f32 or f16 as stored: scores a whole
/// chunk from K by dimension, 64 positions against six queries at a time (see
/// `zmm::chunk_scores`); up to three heads' running sums of values stay in registers while
/// a block's V rows pass.
#[cfg(target_arch = "x86_64")]
struct Zmm<const V: usize>;

#[cfg(target_arch = "x86_64")]
impl<const V: usize> Arith for Zmm<V> {
    const READS_F16: bool = true;

    #[inline(always)]
    fn widen_q8_0(blocks: &[u8], out: &mut [f32]) {
        // SAFETY: as for `scores` below.
        unsafe { zmm::widen_q8_0(blocks, out) }
    }

    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    #[inline(always)]
    fn chunk_scores(
        job: &TileJob,
        (start, end): (usize, usize),
        rows: &mut Vec<f32>,
        kt: &mut Vec<f32>,
        scores: &mut [f32],
    ) {
        let TileJob { shape, layer, q, ranges, blocks, kv } = *job;
        let (bt, kvd) = (kv.layout().block_tokens, kv.layout().kv_dim);
        assert!(end - start <= CHUNK, "one chunk");
        // The chunk's V rows come next: fetched while the scores are computed.
        let ahead = upcoming(kv, blocks, layer, start, true);
        let mut keys = [zmm::KeyVec::default(); CHUNK];
        let mut n = 0;
        let mut f16 = false;
        if kv.keys_by_dimension() {
            // Each block run as stored, sixteen positions per vector.
            for (j, b, slot, take) in block_runs(bt, start..end) {
                let block = kv.keys(blocks[b], layer);
                f16 = matches!(block, KvRows::F16(_));
                for i0 in (0..take).step_by(16) {
                    let (at, len) = (slot + i0, (take - i0).min(16));
                    keys[n] = zmm::KeyVec { bytes: block.bytes(), at, stride: bt, n: len, p0: j + i0 };
                    n += 1;
                }
            }
        } else {
            // q8_0 rows: each run dequantized, then transposed into `[kv_dim][CHUNK]`.
            kt.resize(kvd * CHUNK, 0.0);
            for (j, b, slot, take) in block_runs(bt, start..end) {
                let block = kv.keys(blocks[b], layer);
                rows.resize(take * kvd, 0.0);
                Self::widen_q8_0(block.slice(slot * kvd..(slot + take) * kvd).bytes(), rows);
                // SAFETY: as below.
                unsafe { zmm::transpose_rows(rows, kvd, kt, j - start) };
            }
            for i0 in (0..end - start).step_by(16) {
                let len = (end - start - i0).min(16);
                let bytes: &[u8] = bytemuck::cast_slice(kt);
                keys[n] = zmm::KeyVec { bytes, at: i0, stride: CHUNK, n: len, p0: start + i0 };
                n += 1;
            }
        }
        let args = (shape, q, ranges, &keys[..n], shape.scale);
        // SAFETY: `Zmm` is only used by `tile_avx512`, which runs only where `available()`
        // detected avx512f/bw/vl and f16c.
        unsafe {
            match f16 {
                false => zmm::chunk_scores::<false>(args, scores, ahead),
                true => zmm::chunk_scores::<true>(args, scores, ahead),
            }
        }
    }

    #[inline(always)]
    fn softmax(shape: AttnShape, n: usize, scores: &mut [f32], part: &mut [f32]) {
        // SAFETY: as for `scores` below.
        unsafe { zmm::softmax(shape, n, scores, part) }
    }

    fn scores(_: AttnShape, _: &[f32], _: KvRows, _: f32, _: usize, _: &mut [f32], _: &[u8]) {
        unreachable!("Zmm scores whole chunks (chunk_scores)")
    }

    #[inline(always)]
    fn values(shape: AttnShape, vals: KvRows, scores: &[f32], jj0: usize, part: &mut [f32], ahead: &[u8]) {
        Self::values_rows::<1>(shape, vals, [scores], jj0, [part], ahead)
    }

    #[inline(always)]
    fn values_pair(
        shape: AttnShape,
        vals: KvRows,
        scores: [&[f32]; 2],
        jj0: usize,
        parts: [&mut [f32]; 2],
        ahead: &[u8],
    ) {
        Self::values_rows::<2>(shape, vals, scores, jj0, parts, ahead)
    }
}

#[cfg(target_arch = "x86_64")]
impl<const V: usize> Zmm<V> {
    /// [`Arith::values`] for `R` rows over the same V rows with the same score offset.
    #[inline(always)]
    fn values_rows<const R: usize>(
        shape: AttnShape,
        vals: KvRows,
        scores: [&[f32]; R],
        jj0: usize,
        parts: [&mut [f32]; R],
        ahead: &[u8],
    ) {
        // SAFETY: as for `chunk_scores` above.
        unsafe {
            match vals {
                KvRows::F32(v) => zmm::values::<V, false, R>(shape, bytemuck::cast_slice(v), scores, jj0, parts, ahead),
                KvRows::F16(v) => zmm::values::<V, true, R>(shape, bytemuck::cast_slice(v), scores, jj0, parts, ahead),
                KvRows::Q8_0(_) => unreachable!("tile_body widens q8_0 rows"),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod zmm {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{AttnShape, CHUNK};

    /// 16 values from `s[at..at + 16]` (bounds-checked, then an unaligned load).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load(s: &[f32], at: usize) -> __m512 {
        let v: &[f32; 16] = s[at..at + 16].try_into().expect("16 values");
        // SAFETY: `v` is 16 readable f32s; the load is unaligned.
        unsafe { _mm512_loadu_ps(v.as_ptr()) }
    }

    /// 16 stored elements from element `at` of `rows` (the bytes of f32 values, or of f16
    /// values when `F16`), widened to f32 (exact).
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    fn load_kv<const F16: bool>(rows: &[u8], at: usize) -> __m512 {
        let size = if F16 { 2 } else { 4 };
        let b: &[u8] = &rows[at * size..(at + 16) * size];
        // SAFETY: `b` holds 16 elements (checked just above); the loads are unaligned.
        unsafe {
            if F16 {
                _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().cast()))
            } else {
                _mm512_loadu_ps(b.as_ptr().cast())
            }
        }
    }

    /// See [`super::Arith::widen_q8_0`]: per 34-byte block, its f16 scale times its 32
    /// signed bytes, sixteen at a time.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) fn widen_q8_0(blocks: &[u8], out: &mut [f32]) {
        for (block, o) in blocks.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            let d = _mm512_set1_ps(half::f16::from_le_bytes([block[0], block[1]]).to_f32());
            for (q, o) in block[2..].chunks_exact(16).zip(o.chunks_exact_mut(16)) {
                // SAFETY: `q` holds 16 bytes and `o` 16 floats; loads and stores are unaligned.
                unsafe {
                    let ints = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.as_ptr().cast()));
                    _mm512_storeu_ps(o.as_mut_ptr(), _mm512_mul_ps(d, _mm512_cvtepi32_ps(ints)));
                }
            }
        }
    }

    /// The 16×16 transpose of `r`: lane `i` of output `c` is lane `c` of `r[i]` (interleaves
    /// of 32-bit, 64-bit and 128-bit pieces).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // `u[4g + c]`: rows 4g..4g+4 of columns c, c+4, c+8, c+12, one per 128-bit lane.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            for c in 0..4 {
                let (a, b) = (_mm512_castps_pd(t[4 * g + c / 2]), _mm512_castps_pd(t[4 * g + 2 + c / 2]));
                let x = if c % 2 == 0 { _mm512_unpacklo_pd(a, b) } else { _mm512_unpackhi_pd(a, b) };
                u[4 * g + c] = _mm512_castpd_ps(x);
            }
        }
        // `v[8h + c]` (c < 4): columns c, c+8 of rows 8h..8h+8; `v[8h + 4 + c]`: c+4, c+12.
        let mut v = [_mm512_setzero_ps(); 16];
        for h in 0..2 {
            for c in 0..4 {
                let (a, b) = (u[8 * h + c], u[8 * h + 4 + c]);
                v[8 * h + c] = _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b);
                v[8 * h + 4 + c] = _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b);
            }
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            // `v[k]` holds columns `k` and `k + 8` of rows 0..8, `v[8 + k]` of rows 8..16.
            out[k] = _mm512_shuffle_f32x4::<0b10_00_10_00>(v[k], v[8 + k]);
            out[k + 8] = _mm512_shuffle_f32x4::<0b11_01_11_01>(v[k], v[8 + k]);
        }
        out
    }

    /// Up to sixteen consecutive positions of K stored by dimension, from `p0`: dimension
    /// `d` of KV head `g` at element `at + (g·head_dim + d)·stride` of `bytes` (f32, or f16),
    /// the positions in the first `n` lanes.
    #[derive(Clone, Copy, Default)]
    pub(super) struct KeyVec<'a> {
        pub bytes: &'a [u8],
        pub at: usize,
        pub stride: usize,
        pub n: usize,
        pub p0: usize,
    }

    /// What [`chunk_scores`] scores: the shape, every row's query, their ranges, the chunk's
    /// K vectors in position order, the score scale.
    pub(super) type ChunkArgs<'a> = (AttnShape, &'a [f32], &'a [Range<usize>], &'a [KeyVec<'a>], f32);

    /// Most (row, head) queries scored together against four K vectors: 24 running sums,
    /// four K vectors and a broadcast query value fill 29 of the 32 registers.
    const QUERIES: usize = 6;

    /// See [`super::Arith::chunk_scores`]: a small GEMM. For each KV head, four K vectors
    /// (64 positions) at a time against up to [`QUERIES`] (row, head) queries of its group:
    /// per dimension, four loads, one broadcast per query and an FMA per query and vector.
    /// Each score is one running sum over the dimensions in order, starting from zero
    /// (the order of `gemm`'s microkernels), times `scale`: its bits depend only on its
    /// query and key, whichever rows share the tile, and how K is stored. Prefetches
    /// `ahead` along the way.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub(super) fn chunk_scores<const F16: bool>(
        (shape, q, ranges, keys, scale): ChunkArgs,
        scores: &mut [f32],
        ahead: &[u8],
    ) {
        let AttnShape { n_head, n_head_kv, head_dim: hd, .. } = shape;
        let (group, qd) = (n_head / n_head_kv, n_head * hd);
        let size = if F16 { 2 } else { 4 };
        assert!(q.len() >= ranges.len() * qd, "queries");
        assert!(scores.len() >= ranges.len() * n_head * CHUNK, "scores");
        for k in keys {
            // The loads below are unchecked: every vector's last element is in its bytes.
            assert!((1..=16).contains(&k.n), "lanes");
            assert!((k.at + (n_head_kv * hd - 1) * k.stride + k.n) * size <= k.bytes.len(), "K vector past its block");
        }
        let overlaps = |kg: &[KeyVec], r: &Range<usize>| {
            let (lo, hi) = (kg[0].p0, kg[kg.len() - 1].p0 + kg[kg.len() - 1].n);
            r.start < hi && r.end > lo
        };
        // Units of work (a KV head, four vectors, one tile of queries), over which the
        // prefetch of `ahead` is spread.
        let mut units = 0;
        for kg in keys.chunks(4) {
            units += (ranges.iter().filter(|r| overlaps(kg, r)).count() * group).div_ceil(QUERIES);
        }
        let units = units * n_head_kv;
        let mut unit = 0;
        let mut run = |kg: &[KeyVec], g: usize, tile: &[(usize, usize)], scores: &mut [f32]| {
            let fetch = (ahead, unit, units);
            let args = (kg, g, hd, q, qd, ranges, scale, fetch);
            match kg.len() {
                1 => scores_tiles::<1, F16>(args, tile, scores),
                2 => scores_tiles::<2, F16>(args, tile, scores),
                3 => scores_tiles::<3, F16>(args, tile, scores),
                _ => scores_tiles::<4, F16>(args, tile, scores),
            }
            unit += 1;
        };
        for g in 0..n_head_kv {
            for kg in keys.chunks(4) {
                let mut tile = [(0, 0); QUERIES];
                let mut nq = 0;
                for (r, range) in ranges.iter().enumerate() {
                    if !overlaps(kg, range) {
                        continue;
                    }
                    for h in g * group..(g + 1) * group {
                        tile[nq] = (r, h);
                        nq += 1;
                        if nq == QUERIES {
                            run(kg, g, &tile, scores);
                            nq = 0;
                        }
                    }
                }
                if nq > 0 {
                    run(kg, g, &tile[..nq], scores);
                }
            }
        }
    }

    /// What [`scores_tile`] needs besides its queries: up to four K vectors, their KV head,
    /// the head width, the queries, their stride, the rows' ranges, the scale, and the
    /// prefetch (`ahead`, this unit, units).
    type TileArgs<'a> =
        (&'a [KeyVec<'a>], usize, usize, &'a [f32], usize, &'a [Range<usize>], f32, (&'a [u8], usize, usize));

    /// [`scores_tile`] for `P` K vectors and however many queries `tile` holds.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    #[inline]
    fn scores_tiles<const P: usize, const F16: bool>(args: TileArgs, tile: &[(usize, usize)], scores: &mut [f32]) {
        match tile.len() {
            1 => scores_tile::<1, P, F16>(args, tile, scores),
            2 => scores_tile::<2, P, F16>(args, tile, scores),
            3 => scores_tile::<3, P, F16>(args, tile, scores),
            4 => scores_tile::<4, P, F16>(args, tile, scores),
            5 => scores_tile::<5, P, F16>(args, tile, scores),
            _ => scores_tile::<QUERIES, P, F16>(args, tile, scores),
        }
    }

    /// The scores of `Q` (row, head) queries against `P` (at most four) K vectors of KV
    /// head `g`, each stored over the row's range only (see [`chunk_scores`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    #[inline]
    fn scores_tile<const Q: usize, const P: usize, const F16: bool>(
        (kg, g, hd, q, qd, ranges, scale, (ahead, unit, units)): TileArgs,
        tile: &[(usize, usize)],
        scores: &mut [f32],
    ) {
        let size = if F16 { 2 } else { 4 };
        assert!(tile.len() == Q && kg.len() == P && P <= 4, "tile shape");
        let base: [*const u8; P] =
            std::array::from_fn(|p| kg[p].bytes[(kg[p].at + g * hd * kg[p].stride) * size..].as_ptr());
        let step: [usize; P] = std::array::from_fn(|p| kg[p].stride * size);
        let mask: [u16; P] = std::array::from_fn(|p| ((1u32 << kg[p].n) - 1) as u16);
        let qs: [*const f32; Q] = std::array::from_fn(|i| q[tile[i].0 * qd + tile[i].1 * hd..][..hd].as_ptr());
        // This unit's share of `ahead`'s lines, a few every eight dimensions.
        let lines = ahead.len().div_ceil(64);
        let (mut line, end) = (lines * unit / units.max(1), lines * (unit + 1) / units.max(1));
        let per_step = (end - line).div_ceil((hd / 8).max(1));
        let mut acc = [[_mm512_setzero_ps(); P]; Q];
        assert!(hd.is_multiple_of(8), "head width");
        for d0 in (0..hd).step_by(8) {
            for l in line..(line + per_step).min(end) {
                // `l < lines`: the address is in bounds (a prefetch never faults anyway).
                _mm_prefetch::<_MM_HINT_T0>(ahead[l * 64..].as_ptr().cast());
            }
            line += per_step;
            for d in d0..d0 + 8 {
                // SAFETY: `chunk_scores` checked that dimension `d < hd` of KV head `g` of
                // each vector (its first `n` lanes, the mask) lies inside its bytes, and
                // each query holds `hd` values.
                unsafe {
                    let k: [__m512; P] = std::array::from_fn(|p| {
                        let at = base[p].add(d * step[p]);
                        if F16 {
                            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask[p], at.cast()))
                        } else {
                            _mm512_maskz_loadu_ps(mask[p], at.cast())
                        }
                    });
                    for i in 0..Q {
                        let b = _mm512_set1_ps(*qs[i].add(d));
                        for p in 0..P {
                            acc[i][p] = _mm512_fmadd_ps(b, k[p], acc[i][p]);
                        }
                    }
                }
            }
        }
        let scale = _mm512_set1_ps(scale);
        for (acc, &(r, h)) in acc.iter().zip(tile) {
            let range = &ranges[r];
            for (a, k) in acc.iter().zip(kg) {
                // This vector's lanes `lo..hi` are positions of the row's range.
                let (lo, hi) = (range.start.saturating_sub(k.p0).min(16), range.end.saturating_sub(k.p0).min(k.n));
                if lo >= hi {
                    continue;
                }
                let s = _mm512_mul_ps(*a, scale);
                // Lane `lo` first; lanes past the range are masked off.
                let s = match lo {
                    0 => s,
                    _ => _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(lo as i32), iota()), s),
                };
                let dst = &mut scores[(r * qd / hd + h) * CHUNK + k.p0 + lo - range.start..][..hi - lo];
                // SAFETY: the mask writes only the first `hi - lo` lanes, which `dst` holds.
                unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), ((1u32 << (hi - lo)) - 1) as u16, s) };
            }
        }
    }

    /// Transposes `rows` (positions by `kvd` values) into `kt` (`[kvd][CHUNK]`) at column
    /// `col`, sixteen positions and dimensions at a time ([`transpose16`]).
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose_rows(rows: &[f32], kvd: usize, kt: &mut [f32], col: usize) {
        let take = rows.len() / kvd;
        assert!(kvd.is_multiple_of(16) && col + take <= CHUNK && kt.len() >= kvd * CHUNK, "transpose shape");
        for i0 in (0..take).step_by(16) {
            let n = (take - i0).min(16);
            for d0 in (0..kvd).step_by(16) {
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, r) in r.iter_mut().enumerate().take(n) {
                    *r = load(rows, (i0 + i) * kvd + d0);
                }
                for (c, v) in transpose16(&r).iter().enumerate() {
                    let dst = &mut kt[(d0 + c) * CHUNK + col + i0..][..n];
                    // SAFETY: the mask writes only the first `n` lanes, which `dst` holds.
                    unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), ((1u32 << n) - 1) as u16, *v) };
                }
            }
        }
    }

    /// `e^x` in each lane, for `x ≤ 0` (0 below −87), as [`super::exp`] computes it but
    /// with the power of two applied by `vscalefps`: `2^n · p(r)`, `x = n·ln 2 + r`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn exp16(x: __m512) -> __m512 {
        let xc = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            xc,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693_359_4), xc);
        let r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
        // Lanes below −87 (or −∞) give 0; NaN stays NaN.
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-87.0));
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(e, n))
    }

    /// See [`super::Arith::softmax`]: per head, the largest of its `n` scores (sixteen
    /// lanes at a time, lanes past `n` masked), `exp(score − m)` by [`exp16`], and their
    /// sum: the vectors added in order, then the lanes in `_mm512_reduce_add_ps`'s fixed
    /// order. The bits depend only on the head's scores.
    #[target_feature(enable = "avx512f")]
    pub(super) fn softmax(shape: AttnShape, n: usize, scores: &mut [f32], part: &mut [f32]) {
        let stride = shape.head_dim + 2;
        assert!((1..=CHUNK).contains(&n), "scores per head");
        assert!(scores.len() >= shape.n_head * CHUNK && part.len() >= shape.n_head * stride, "softmax buffers");
        const V: usize = CHUNK / 16;
        let masks: [u16; V] = std::array::from_fn(|i| ((1u32 << n.saturating_sub(16 * i).min(16)) - 1) as u16);
        let low = _mm512_set1_ps(f32::NEG_INFINITY);
        for h in 0..shape.n_head {
            let sc = &mut scores[h * CHUNK..][..CHUNK];
            // SAFETY: `sc` holds CHUNK values; the masked loads and stores touch only lanes
            // below `n ≤ CHUNK`.
            unsafe {
                let x: [__m512; V] =
                    std::array::from_fn(|i| _mm512_mask_loadu_ps(low, masks[i], sc.as_ptr().add(16 * i)));
                let top = _mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3]));
                let m = _mm512_reduce_max_ps(top);
                let mv = _mm512_set1_ps(m);
                let mut sum = _mm512_setzero_ps();
                for (i, &x) in x.iter().enumerate() {
                    if masks[i] != 0 {
                        let e = exp16(_mm512_sub_ps(x, mv));
                        _mm512_mask_storeu_ps(sc.as_mut_ptr().add(16 * i), masks[i], e);
                        sum = _mm512_add_ps(sum, e);
                    }
                }
                let p = &mut part[h * stride..][..stride];
                p[0] = m;
                p[1] = _mm512_reduce_add_ps(sum);
                p[2..].fill(0.0);
            }
        }
    }

    /// Lanes 0, 1, …, 15.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn iota() -> __m512i {
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)
    }

    /// See [`super::Arith::values`], for `R` rows (one, or two of a tile that see the same
    /// positions; `scores[r]`, `parts[r]` per row) over the rows `vals` (their bytes);
    /// `head_dim == V * 16`.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) fn values<const V: usize, const F16: bool, const R: usize>(
        shape: AttnShape,
        vals: &[u8],
        scores: [&[f32]; R],
        jj0: usize,
        mut parts: [&mut [f32]; R],
        ahead: &[u8],
    ) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        assert_eq!(hd, V * 16, "head width");
        // Heads of one group at a time, as many as keep the rows' running sums in 24 of the
        // 32 registers (at most three): three 64-wide heads of two rows, one 128-wide, …
        let most = (24 / (R * V)).min(3);
        if most == 0 {
            // Two rows of a 256-wide head would fill all 32 registers: one row at a time.
            for (r, (scores, part)) in scores.into_iter().zip(parts).enumerate() {
                values::<V, F16, 1>(shape, vals, [scores], jj0, [part], if r == 0 { ahead } else { &[] });
            }
            return;
        }
        let (group, kvd, stride) = (n_head / shape.n_head_kv, shape.n_head_kv * hd, hd + 2);
        let size = if F16 { 2 } else { 4 };
        let rows = vals.len() / size / kvd;
        let mut h = 0;
        while h < n_head {
            // Each V row is loaded once for all of them (each head's sums still add the rows
            // in order: the same bits as one head and one row at a time).
            let take = ((h / group + 1) * group - h).min(most);
            let at = (vals, kvd, (h / group) * hd, rows, h, stride, jj0);
            let parts = parts.each_mut().map(|p| &mut **p);
            match take {
                3 => values_heads::<V, F16, R, 3>(at, scores, parts, (ahead, n_head)),
                2 => values_heads::<V, F16, R, 2>(at, scores, parts, (ahead, n_head)),
                _ => values_heads::<V, F16, R, 1>(at, scores, parts, (ahead, n_head)),
            }
            h += take;
        }
    }

    /// [`values`] for the `H` heads from `h` (V rows at element `off` of each `kvd`-wide
    /// row, `rows` of them) and each of the `R` rows' scores and partials.
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    fn values_heads<const V: usize, const F16: bool, const R: usize, const H: usize>(
        (vals, kvd, off, rows, h, stride, jj0): (&[u8], usize, usize, usize, usize, usize, usize),
        scores: [&[f32]; R],
        parts: [&mut [f32]; R],
        (ahead, heads): (&[u8], usize),
    ) {
        let size = if F16 { 2 } else { 4 };
        let mut sums = parts.map(|p| &mut p[h * stride..(h + H) * stride]);
        // The heads' parts of the next run's lines (parts `h..h + H` of `heads`), spread
        // over the rows (no division in the loop).
        let lines = ahead.len().div_ceil(64);
        let (mut line, end) = (lines * h / heads.max(1), (lines * (h + H) / heads.max(1)).min(lines));
        let per_row = (end.saturating_sub(line)).div_ceil(rows.max(1));
        let mut acc = [[[_mm512_setzero_ps(); V]; H]; R];
        for (acc, sums) in acc.iter_mut().zip(&sums) {
            for (k, acc) in acc.iter_mut().enumerate() {
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = load(sums, k * stride + 2 + 16 * v);
                }
            }
        }
        let weights = scores.map(|s| &s[h * CHUNK + jj0..]);
        for w in weights {
            assert!(w.len() >= (H - 1) * CHUNK + rows, "scores of {H} heads");
        }
        let vals = &vals[..rows * kvd * size];
        for i in 0..rows {
            for l in line..(line + per_row).min(end) {
                // `l < lines`: the address is in bounds (a prefetch never faults anyway).
                _mm_prefetch::<_MM_HINT_T0>(ahead[l * 64..].as_ptr().cast());
            }
            line += per_row;
            let mut w = [[_mm512_setzero_ps(); H]; R];
            for (w, weights) in w.iter_mut().zip(&weights) {
                for (k, w) in w.iter_mut().enumerate() {
                    *w = _mm512_set1_ps(weights[k * CHUNK + i]);
                }
            }
            let at = (i * kvd + off) * size;
            let row = &vals[at..at + V * 16 * size];
            for v in 0..V {
                let x = load_kv::<F16>(row, 16 * v);
                for (acc, w) in acc.iter_mut().zip(&w) {
                    for (a, w) in acc.iter_mut().zip(w) {
                        a[v] = _mm512_fmadd_ps(*w, x, a[v]);
                    }
                }
            }
        }
        for (acc, sums) in acc.iter().zip(&mut sums) {
            for (k, a) in acc.iter().enumerate() {
                for (v, a) in a.iter().enumerate() {
                    let at = k * stride + 2 + 16 * v;
                    let dst: &mut [f32; 16] = (&mut sums[at..at + 16]).try_into().expect("16 values");
                    // SAFETY: `dst` is 16 writable f32s; the store is unaligned.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), *a) };
                }
            }
        }
    }
}

/// `job`'s rows over one chunk, each row's partial written to its `partial_len` run of
/// `parts`. Each block's run of K (then V) rows is read once for all the rows while it is
/// in L1; each row's arithmetic is exactly what it gets alone (same scores, same order of
/// positions), so tiling never changes a bit. Each row's partial is per head
/// `[m, s, Σ exp(score − m)·v]`.
#[inline(always)]
fn tile_body<A: Arith>(job: &TileJob, scratch: &mut ChunkScratch, parts: &mut [f32]) {
    let TileJob { shape, layer, ranges, blocks, kv, .. } = *job;
    let n_head = shape.n_head;
    let (plen, per_row) = (shape.partial_len(), n_head * CHUNK);
    let start = ranges.iter().map(|r| r.start).min().unwrap_or(0);
    let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
    let ChunkScratch { scores, rows, kt } = scratch;
    scores.resize(ranges.len() * per_row, 0.0);
    A::chunk_scores(job, (start, end), rows, kt, scores);
    for (r, range) in ranges.iter().enumerate() {
        let (sc, p) = (&mut scores[r * per_row..][..per_row], &mut parts[r * plen..][..plen]);
        A::softmax(shape, range.len(), sc, p);
    }
    let mut j = start;
    while j < end {
        let (vals, take) = segment::<A>(kv, blocks, layer, j..end, rows);
        let mut ahead = if j + take < end {
            upcoming(kv, blocks, layer, j + take, true)
        } else if end < blocks.len() * kv.layout().block_tokens {
            upcoming(kv, blocks, layer, end, false)
        } else {
            &[]
        };
        let seen = |r: usize| (j.max(ranges[r].start), (j + take).min(ranges[r].end));
        let mut r = 0;
        while r < ranges.len() {
            let (lo, hi) = seen(r);
            if lo >= hi {
                r += 1;
                continue;
            }
            let vals = vals.slice((lo - j) * kv.layout().kv_dim..(hi - j) * kv.layout().kv_dim);
            let jj0 = lo - ranges[r].start;
            // Two rows that see the same V rows with the same score offset share each load.
            if r + 1 < ranges.len() && seen(r + 1) == (lo, hi) && ranges[r + 1].start == ranges[r].start {
                let sc = [&scores[r * per_row..(r + 1) * per_row], &scores[(r + 1) * per_row..(r + 2) * per_row]];
                let (a, b) = parts[r * plen..(r + 2) * plen].split_at_mut(plen);
                A::values_pair(shape, vals, sc, jj0, [a, b], ahead);
                r += 2;
            } else {
                A::values(
                    shape,
                    vals,
                    &scores[r * per_row..(r + 1) * per_row],
                    jj0,
                    &mut parts[r * plen..(r + 1) * plen],
                    ahead,
                );
                r += 1;
            }
            ahead = &[];
        }
        j += take;
    }
}

/// The V rows of positions `range.start..` that share its block (at most to `range.end`),
/// and how many there are; f16 rows are widened into `buf` unless `A` reads them itself,
/// q8_0 rows always (dequantized once per block run, then read by every head and row).
#[inline(always)]
fn segment<'a, A: Arith>(
    kv: &'a KvArena,
    blocks: &[BlockId],
    layer: usize,
    range: Range<usize>,
    buf: &'a mut Vec<f32>,
) -> (KvRows<'a>, usize) {
    let (bt, kvd) = (kv.layout().block_tokens, kv.layout().kv_dim);
    let (b, slot) = (range.start / bt, range.start % bt);
    let take = (bt - slot).min(range.len());
    let rows = kv.values(blocks[b], layer);
    let span = slot * kvd..(slot + take) * kvd;
    match rows {
        KvRows::Q8_0(_) => {
            buf.resize(take * kvd, 0.0);
            A::widen_q8_0(rows.slice(span).bytes(), buf);
            (KvRows::F32(buf), take)
        }
        KvRows::F16(_) if !A::READS_F16 => {
            buf.resize(take * kvd, 0.0);
            rows.read_f32(span.start, buf);
            (KvRows::F32(buf), take)
        }
        _ => (rows.slice(span), take),
    }
}

/// A run of K rows as a kernel reads them.
#[derive(Clone, Copy, Debug)]
enum Keys<'a> {
    /// By position: `take × kv_dim` values.
    Rows(KvRows<'a>),
    /// By dimension (see [`KvArena::keys_by_dimension`]): a block's whole K,
    /// `[kv_dim][bt]`, of which the run is positions `slot..slot + take`.
    Columns { block: KvRows<'a>, bt: usize, slot: usize, take: usize },
}

/// [`segment`] for K: by dimension as stored (f16 widened into `buf` unless `A` reads it
/// itself), or q8_0 rows by position dequantized into `buf`.
#[inline(always)]
fn key_segment<'a, A: Arith>(
    kv: &'a KvArena,
    blocks: &[BlockId],
    layer: usize,
    range: Range<usize>,
    buf: &'a mut Vec<f32>,
) -> (Keys<'a>, usize) {
    let (bt, kvd) = (kv.layout().block_tokens, kv.layout().kv_dim);
    let (b, slot) = (range.start / bt, range.start % bt);
    let take = (bt - slot).min(range.len());
    let block = kv.keys(blocks[b], layer);
    match block {
        KvRows::Q8_0(_) => {
            buf.resize(take * kvd, 0.0);
            A::widen_q8_0(block.slice(slot * kvd..(slot + take) * kvd).bytes(), buf);
            (Keys::Rows(KvRows::F32(buf)), take)
        }
        KvRows::F16(k) if !A::READS_F16 => {
            // The run's positions of each dimension, widened (the bulk conversion uses F16C
            // where present): `[kv_dim][take]`.
            use half::slice::HalfFloatSliceExt;
            buf.resize(take * kvd, 0.0);
            for (d, out) in buf.chunks_exact_mut(take).enumerate() {
                k[d * bt + slot..d * bt + slot + take].convert_to_f32_slice(out);
            }
            (Keys::Columns { block: KvRows::F32(buf), bt: take, slot: 0, take }, take)
        }
        _ => (Keys::Columns { block, bt, slot, take }, take),
    }
}

/// The runs of `range` that share a block of `bt` positions, in order: `(first position,
/// block index in the table, slot in the block, positions)`.
#[inline(always)]
fn block_runs(bt: usize, range: Range<usize>) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut j = range.start;
    std::iter::from_fn(move || {
        (j < range.end).then(|| {
            let (b, slot) = (j / bt, j % bt);
            let take = (bt - slot).min(range.end - j);
            j += take;
            (j - take, b, slot, take)
        })
    })
}

/// The stored K (or V) rows of `pos`'s block from `pos` on, as bytes: what the next
/// segment will read, fetched into cache ahead of it by [`prefetch_part`].
fn upcoming<'a>(kv: &'a KvArena, blocks: &[BlockId], layer: usize, pos: usize, values: bool) -> &'a [u8] {
    let bt = kv.layout().block_tokens;
    let b = blocks[pos / bt];
    let bytes = if values { kv.values(b, layer) } else { kv.keys(b, layer) }.bytes();
    match !values && kv.keys_by_dimension() {
        // Every dimension holds some of the positions from `pos` on: the whole block (as
        // many lines as a row layout's at the usual 16 positions per block).
        true => bytes,
        false => &bytes[(pos % bt) * (bytes.len() / bt)..],
    }
}

/// Prefetches part `i` of `n` of `bytes`' cache lines: spread over a loop's `n` steps, so
/// the next segment arrives while this one is computed without a burst of misses that
/// would stall the loop.
#[inline(always)]
fn prefetch_part(bytes: &[u8], i: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let lines = bytes.len().div_ceil(64);
        for l in lines * i / n..lines * (i + 1) / n {
            // SAFETY: a prefetch is a hint that never faults, and the address is in bounds.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes[l * 64..].as_ptr().cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, i, n);
}

/// [`Arith::scores`] from K stored by dimension (`k`: `[kv_dim][bt]`, positions
/// `first..first + n` of the block), sixteen positions at a time with the positions in the
/// lanes: each score's arithmetic is [`dot`]'s (16 partial sums over dimensions `d mod 16`,
/// then the same pairwise sum, then the remaining dimensions), so its bits are those of the
/// row-by-row path. Prefetches `ahead` along the way.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn column_scores<A: Arith>(
    shape: AttnShape,
    q: &[f32],
    k: &[f32],
    bt: usize,
    first: usize,
    n: usize,
    scale: f32,
    jj0: usize,
    scores: &mut [f32],
    ahead: &[u8],
) {
    let AttnShape { n_head, head_dim: hd, .. } = shape;
    let group = n_head / shape.n_head_kv;
    let full = hd / LANES * LANES;
    for i0 in (0..n).step_by(16) {
        let m = (n - i0).min(16);
        let at = first + i0;
        for h in 0..n_head {
            if i0 == 0 {
                prefetch_part(ahead, h, n_head);
            }
            let (qh, base) = (&q[h * hd..(h + 1) * hd], (h / group) * hd);
            let mut acc = [[0.0f32; 16]; LANES];
            for (l, acc) in acc.iter_mut().enumerate() {
                for d in (l..full).step_by(LANES) {
                    let col = &k[(base + d) * bt + at..][..m];
                    for (a, &x) in acc.iter_mut().zip(col) {
                        *a = A::mul_add(qh[d], x, *a);
                    }
                }
            }
            let mut w = LANES;
            while w > 1 {
                w /= 2;
                let (lo, hi) = acc.split_at_mut(w);
                for (a, b) in lo.iter_mut().zip(hi.iter()) {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                }
            }
            let mut s = acc[0];
            for d in full..hd {
                let col = &k[(base + d) * bt + at..][..m];
                for (a, &x) in s.iter_mut().zip(col) {
                    *a = A::mul_add(qh[d], x, *a);
                }
            }
            for (o, v) in scores[h * CHUNK + jj0 + i0..][..m].iter_mut().zip(&s) {
                *o = v * scale;
            }
        }
    }
}

/// `Σ a_i·b_i` in 16 partial sums, then the portable kernels' fixed pairwise lane sum.
#[inline(always)]
fn dot<A: Arith>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, ar) = a.split_at(a.len() / LANES * LANES);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(LANES).zip(bc.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] = A::mul_add(x[i], y[i], acc[i]);
        }
    }
    let mut s = sum_lanes(&acc);
    for (x, y) in ar.iter().zip(br) {
        s = A::mul_add(*x, *y, s);
    }
    s
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let (c, r) = x.split_at(x.len() / LANES * LANES);
    for v in c.chunks_exact(LANES) {
        for i in 0..LANES {
            m[i] = if v[i] > m[i] { v[i] } else { m[i] };
        }
    }
    let mut best = m.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for &v in r {
        best = if v > best { v } else { best };
    }
    best
}

/// `x_i ← exp(x_i − m)` in place; returns their sum.
#[inline(always)]
fn exp_sub_sum<A: Arith>(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (c, r) = x.split_at_mut(x.len() / LANES * LANES);
    for v in c.chunks_exact_mut(LANES) {
        for i in 0..LANES {
            v[i] = exp::<A>(v[i] - m);
            acc[i] += v[i];
        }
    }
    let mut s = sum_lanes(&acc);
    for v in r {
        *v = exp::<A>(*v - m);
        s += *v;
    }
    s
}

/// [`exp`] with separate multiplies and adds, so the same bits in every build (`x ≤ 0`).
#[inline(always)]
pub(super) fn exp_separate(x: f32) -> f32 {
    exp::<Separate>(x)
}

/// `e^x` for `x ≤ 0` (0 below −87, where f32 would go subnormal): `2^n · p(r)` with
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and Cephes' degree-6 polynomial for `p`.
#[inline(always)]
fn exp<A: Arith>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.max(-87.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // `n` as an integer without a float-to-int conversion (whose saturating semantics keep
    // LLVM from vectorizing it): `t`'s low mantissa bits hold it (|n| ≤ 126).
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = A::mul_add(n, -LN2_LO, A::mul_add(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4;
    p = A::mul_add(p, r, 1.398_199_9e-3);
    p = A::mul_add(p, r, 8.333_452e-3);
    p = A::mul_add(p, r, 4.166_579_6e-2);
    p = A::mul_add(p, r, 1.666_666_5e-1);
    p = A::mul_add(p, r, 0.5);
    let e = A::mul_add(p, r * r, r) + 1.0;
    let scaled = e * f32::from_bits(((ni + 127) << 23) as u32);
    if x < -87.0 { 0.0 } else { scaled }
}

/// [`tile_body`], portable.
pub(super) fn tile_portable(job: &TileJob, scratch: &mut ChunkScratch, parts: &mut [f32]) {
    tile_body::<Separate>(job, scratch, parts)
}

/// [`tile_body`] for AVX-512; heads of 64, 128 or 256 values score from K by dimension and
/// keep running sums in registers (`Zmm`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c")]
pub(super) fn tile_avx512(job: &TileJob, scratch: &mut ChunkScratch, parts: &mut [f32]) {
    match job.shape.head_dim {
        64 => tile_body::<Zmm<4>>(job, scratch, parts),
        128 => tile_body::<Zmm<8>>(job, scratch, parts),
        256 => tile_body::<Zmm<16>>(job, scratch, parts),
        _ => tile_body::<Fused>(job, scratch, parts),
    }
}

/// [`tile_body`] for AVX2 with FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,f16c")]
pub(super) fn tile_avx2(job: &TileJob, scratch: &mut ChunkScratch, parts: &mut [f32]) {
    tile_body::<Fused>(job, scratch, parts)
}

/// Combines a row's chunk partials (`parts`: chunks in position order, each
/// [`AttnShape::partial_len`] floats, the first at 0 and each `step` floats after the one
/// before: a row of a tile has its chunks one tile's width apart) into the attention output
/// `out` (`n_head × head_dim`): what `Kernels::merge_strided` computes, portable.
pub(super) fn merge_portable(shape: AttnShape, parts: &[f32], step: usize, out: &mut [f32]) {
    merge_body(shape, parts, step, out)
}

/// [`merge_portable`] with its loops sixteen lanes wide: the same operations (separate
/// multiplies and adds, the polynomial `exp`), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn merge_avx512(shape: AttnShape, parts: &[f32], step: usize, out: &mut [f32]) {
    merge_body(shape, parts, step, out)
}

/// [`merge_portable`] eight lanes wide (same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2")]
pub(super) fn merge_avx2(shape: AttnShape, parts: &[f32], step: usize, out: &mut [f32]) {
    merge_body(shape, parts, step, out)
}

/// See [`merge_portable`]: per head, the chunks' largest `m`, then each chunk weighted by
/// `exp(m_c − m)` in order.
#[inline(always)]
fn merge_body(shape: AttnShape, parts: &[f32], step: usize, out: &mut [f32]) {
    let (hd, stride) = (shape.head_dim, shape.head_dim + 2);
    let plen = shape.partial_len();
    let n = (parts.len() + step - plen) / step;
    let parts = || (0..n).map(|c| &parts[c * step..c * step + plen]);
    for (h, o) in out.chunks_exact_mut(hd).enumerate() {
        fn head(p: &[f32], h: usize, stride: usize) -> (f32, f32, &[f32]) {
            let p = &p[h * stride..(h + 1) * stride];
            (p[0], p[1], &p[2..])
        }
        let top = parts().map(|p| head(p, h, stride).0).fold(f32::NEG_INFINITY, f32::max);
        o.fill(0.0);
        let mut total = 0.0f32;
        for p in parts() {
            let (m, s, acc) = head(p, h, stride);
            let w = exp::<Separate>(m - top);
            total += s * w;
            for (oi, a) in o.iter_mut().zip(acc) {
                *oi += a * w;
            }
        }
        let inv = 1.0 / total;
        for oi in o.iter_mut() {
            *oi *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose16_moves_every_lane() {
        use std::arch::x86_64::*;
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: avx512f was detected above; loads and stores are unaligned and in bounds.
        let t = unsafe {
            let rows: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(m[16 * i..].as_ptr()));
            let cols = zmm::transpose16(&rows);
            let mut t = vec![0.0f32; 256];
            for (c, v) in cols.iter().enumerate() {
                _mm512_storeu_ps(t[16 * c..].as_mut_ptr(), *v);
            }
            t
        };
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(t[16 * c + r], m[16 * r + c], "row {r} column {c}");
            }
        }
    }

    #[test]
    fn polynomial_exp_is_within_a_few_ulp_of_std() {
        let mut worst = 0.0f64;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let want = (x as f64).exp();
            for got in [exp::<Fused>(x), exp::<Separate>(x)] {
                worst = worst.max(((got as f64 - want) / want).abs());
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert_eq!(exp::<Fused>(-200.0), 0.0);
        assert_eq!(exp::<Fused>(0.0), 1.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_lane_exp_is_within_a_few_ulp_of_std() {
        use std::arch::x86_64::*;
        if !std::is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (0..=87_007).map(|i| -(i as f32) / 1000.0).chain([-200.0, f32::NEG_INFINITY]).collect();
        let mut got = vec![f32::NAN; xs.len().next_multiple_of(16)];
        for (x, o) in xs.chunks(16).zip(got.chunks_mut(16)) {
            let mut lanes = [0.0f32; 16];
            lanes[..x.len()].copy_from_slice(x);
            // SAFETY: avx512f was detected above; loads and stores are of 16 floats.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), zmm::exp16(_mm512_loadu_ps(lanes.as_ptr()))) };
        }
        let mut worst = 0.0f64;
        for (&x, &g) in xs.iter().zip(&got) {
            match x >= -87.0 {
                true => worst = worst.max(((g as f64 - (x as f64).exp()) / (x as f64).exp()).abs()),
                false => assert_eq!(g, 0.0, "exp({x})"),
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert_eq!(got[0], 1.0);
    }

    /// The wider builds of the merge run the same operations: the same bits as portable.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_build_of_the_merge_gives_the_portable_bits() {
        let shape = AttnShape::new(9, 3, 64);
        let (plen, chunks, step) = (shape.partial_len(), 37, 3 * shape.partial_len());
        // Partials a tile row would hold: per head `[m, s, acc…]`, the row's chunks `step` apart.
        let mut x = 0x2545_f491u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as f32 / u32::MAX as f32 * 8.0 - 4.0
        };
        let mut parts = vec![0.0f32; (chunks - 1) * step + plen];
        for c in 0..chunks {
            for h in 0..shape.n_head {
                let p = &mut parts[c * step + h * (shape.head_dim + 2)..][..shape.head_dim + 2];
                p.iter_mut().for_each(|v| *v = next());
                p[1] = p[1].abs() + 1.0;
            }
        }
        let mut want = vec![f32::NAN; shape.n_head * shape.head_dim];
        merge_portable(shape, &parts, step, &mut want);
        assert!(want.iter().all(|v| v.is_finite()), "a finite output");
        type Build = unsafe fn(AttnShape, &[f32], usize, &mut [f32]);
        let builds: [(&str, bool, Build); 2] = [
            ("avx512", std::is_x86_feature_detected!("avx512f"), merge_avx512),
            ("avx2", std::is_x86_feature_detected!("avx2"), merge_avx2),
        ];
        for (name, present, build) in builds {
            if !present {
                continue;
            }
            let mut got = vec![f32::NAN; want.len()];
            // SAFETY: the build's features were detected just above.
            unsafe { build(shape, &parts, step, &mut got) };
            let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name} merge differs from portable");
        }
    }

    #[test]
    fn pairwise_reduce_and_max_cover_every_lane_and_the_tail() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 37) as f32).collect();
        assert_eq!(max(&x), 36.0);
        let ones = [1.0f32; 37];
        assert_eq!(dot::<Separate>(&x, &ones), (0..37).sum::<i32>() as f32);
    }
}
