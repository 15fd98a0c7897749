//! Attention of query rows over the KV arena, in chunks of [`CHUNK`] positions.
//!
//! A chunk gives, per head, its largest score `m`, the sum `s` of `exp(score − m)` and the
//! unnormalised weighted sum of values `Σ exp(score − m)·v`. [`merge`] combines a row's
//! chunks in position order into the softmax-weighted output. Chunk boundaries are fixed
//! multiples of [`CHUNK`] from position 0, so what a row computes depends only on its own
//! query and cache, never on how chunks were spread over threads or what else is in the
//! batch; the chunks of one long row can run on both cores.
//!
//! One body is compiled three times: for AVX-512, for AVX2 (both with FMA, so LLVM
//! vectorizes the 16-lane loops to full width) and portable (separate multiply and add).
//! For heads of 64 or 128 values the AVX-512 build swaps in intrinsics for the two inner
//! loops (`Zmm`): they read f16 rows as stored (`vcvtph2ps` in the load) instead of
//! widening them into a buffer first, and sum sixteen positions' dot products across
//! lanes together instead of one at a time. `exp` is a polynomial the vectorizer can
//! inline (relative error under 5e-7).
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

/// Per-thread buffers of a chunk: scores and f16 rows widened to f32.
#[derive(Default)]
pub struct ChunkScratch {
    scores: Vec<f32>,
    rows: Vec<f32>,
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

    /// `scores[h·CHUNK + jj0 + i] = scale · q_h · k_i` for every head and K row `i` of `keys`;
    /// prefetches `ahead` along the way (see [`prefetch_part`]).
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

/// AVX-512 with heads of `V` × 16 values, reading f32 or f16 rows as they are stored: a
/// head's query stays in `V` registers while sixteen K rows pass, whose sixteen dot
/// products are summed across lanes together; a head's running sum of values stays in
/// registers while a block's V rows pass.
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
    fn scores(shape: AttnShape, q: &[f32], keys: KvRows, scale: f32, jj0: usize, scores: &mut [f32], ahead: &[u8]) {
        // SAFETY: `Zmm` is only used by `tile_avx512`, which runs only where `available()`
        // detected avx512f and f16c.
        unsafe {
            match keys {
                KvRows::F32(k) => zmm::scores::<V, false>(shape, q, bytemuck::cast_slice(k), scale, jj0, scores, ahead),
                KvRows::F16(k) => zmm::scores::<V, true>(shape, q, bytemuck::cast_slice(k), scale, jj0, scores, ahead),
                KvRows::Q8_0(_) => unreachable!("tile_body widens q8_0 rows"),
            }
        }
    }

    #[inline(always)]
    fn values(shape: AttnShape, vals: KvRows, scores: &[f32], jj0: usize, part: &mut [f32], ahead: &[u8]) {
        // SAFETY: as above.
        unsafe {
            match vals {
                KvRows::F32(v) => zmm::values::<V, false>(shape, bytemuck::cast_slice(v), scores, jj0, part, ahead),
                KvRows::F16(v) => zmm::values::<V, true>(shape, bytemuck::cast_slice(v), scores, jj0, part, ahead),
                KvRows::Q8_0(_) => unreachable!("tile_body widens q8_0 rows"),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod zmm {
    use std::arch::x86_64::*;

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

    /// `out[i]` = the sum of `v[i]`'s sixteen lanes, for all sixteen at once: pairs of
    /// vectors are interleaved and added, then pairs of those, down to one vector (a fixed
    /// order, so a score's bits depend only on its own dot product).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sum_across(v: &[__m512; 16]) -> __m512 {
        let pair = |a: __m512, b: __m512| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let p: [__m512; 8] = std::array::from_fn(|i| pair(v[2 * i], v[2 * i + 1]));
        let quad = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
        };
        let q: [__m512; 4] = std::array::from_fn(|i| quad(p[2 * i], p[2 * i + 1]));
        let lanes = |a: __m512, b: __m512| {
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
        };
        lanes(lanes(q[0], q[1]), lanes(q[2], q[3]))
    }

    /// See [`super::Arith::scores`]; `head_dim == V * 16`, `keys` the bytes of the rows.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) fn scores<const V: usize, const F16: bool>(
        shape: AttnShape,
        q: &[f32],
        keys: &[u8],
        scale: f32,
        jj0: usize,
        scores: &mut [f32],
        ahead: &[u8],
    ) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        assert_eq!(hd, V * 16, "head width");
        let (group, kvd) = (n_head / shape.n_head_kv, shape.n_head_kv * hd);
        let size = if F16 { 2 } else { 4 };
        let rows = keys.len() / size / kvd;
        let scale = _mm512_set1_ps(scale);
        for h in 0..n_head {
            super::prefetch_part(ahead, h, n_head);
            let qh: [__m512; V] = std::array::from_fn(|v| load(q, h * hd + 16 * v));
            let off = (h / group) * hd;
            let out = &mut scores[h * CHUNK + jj0..];
            for i0 in (0..rows).step_by(16) {
                let n = (rows - i0).min(16);
                let dot = |i: usize| {
                    if i >= n {
                        return _mm512_setzero_ps();
                    }
                    let at = ((i0 + i) * kvd + off) * size;
                    let row = &keys[at..at + V * 16 * size];
                    let mut acc = _mm512_mul_ps(qh[0], load_kv::<F16>(row, 0));
                    for (v, qv) in qh.iter().enumerate().skip(1) {
                        acc = _mm512_fmadd_ps(*qv, load_kv::<F16>(row, 16 * v), acc);
                    }
                    acc
                };
                #[rustfmt::skip]
                let dots = [
                    dot(0), dot(1), dot(2), dot(3), dot(4), dot(5), dot(6), dot(7),
                    dot(8), dot(9), dot(10), dot(11), dot(12), dot(13), dot(14), dot(15),
                ];
                let s = _mm512_mul_ps(sum_across(&dots), scale);
                let dst = &mut out[i0..i0 + n];
                // SAFETY: the mask writes only the first `n` lanes, which `dst` holds.
                unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), ((1u32 << n) - 1) as u16, s) };
            }
        }
    }

    /// See [`super::Arith::values`]; `head_dim == V * 16`, `vals` the bytes of the rows.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) fn values<const V: usize, const F16: bool>(
        shape: AttnShape,
        vals: &[u8],
        scores: &[f32],
        jj0: usize,
        part: &mut [f32],
        ahead: &[u8],
    ) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        assert_eq!(hd, V * 16, "head width");
        let (group, kvd, stride) = (n_head / shape.n_head_kv, shape.n_head_kv * hd, hd + 2);
        let size = if F16 { 2 } else { 4 };
        let rows = vals.len() / size / kvd;
        for h in 0..n_head {
            super::prefetch_part(ahead, h, n_head);
            let sums = &mut part[h * stride + 2..(h + 1) * stride];
            let mut acc: [__m512; V] = std::array::from_fn(|v| load(sums, 16 * v));
            let off = (h / group) * hd;
            let weights = &scores[h * CHUNK + jj0..][..rows];
            for (i, &w) in weights.iter().enumerate() {
                let w = _mm512_set1_ps(w);
                let at = (i * kvd + off) * size;
                let row = &vals[at..at + V * 16 * size];
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(w, load_kv::<F16>(row, 16 * v), *a);
                }
            }
            for (v, a) in acc.iter().enumerate() {
                let dst: &mut [f32; 16] = (&mut sums[16 * v..16 * v + 16]).try_into().expect("16 values");
                // SAFETY: `dst` is 16 writable f32s; the store is unaligned.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), *a) };
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
    let TileJob { shape, layer, q, ranges, blocks, kv } = *job;
    let AttnShape { n_head, head_dim: hd, .. } = shape;
    let (qd, plen, per_row) = (n_head * hd, shape.partial_len(), n_head * CHUNK);
    let scale = shape.scale;
    let start = ranges.iter().map(|r| r.start).min().unwrap_or(0);
    let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
    let ChunkScratch { scores, rows } = scratch;
    scores.resize(ranges.len() * per_row, 0.0);
    let mut j = start;
    while j < end {
        let (keys, take) = segment::<A>(kv, blocks, layer, j..end, false, rows);
        let mut ahead = match j + take < end {
            true => upcoming(kv, blocks, layer, j + take, false),
            false => upcoming(kv, blocks, layer, start, true),
        };
        for (r, range) in ranges.iter().enumerate() {
            let (lo, hi) = (j.max(range.start), (j + take).min(range.end));
            if lo < hi {
                let keys = keys.slice((lo - j) * kv.layout().kv_dim..(hi - j) * kv.layout().kv_dim);
                let sc = &mut scores[r * per_row..(r + 1) * per_row];
                A::scores(shape, &q[r * qd..(r + 1) * qd], keys, scale, lo - range.start, sc, ahead);
                ahead = &[];
            }
        }
        j += take;
    }
    let stride = hd + 2;
    for (r, range) in ranges.iter().enumerate() {
        let n = range.len();
        for h in 0..n_head {
            let sc = &mut scores[r * per_row + h * CHUNK..][..n];
            let m = max(sc);
            let s = exp_sub_sum::<A>(sc, m);
            let p = &mut parts[r * plen + h * stride..][..stride];
            p[0] = m;
            p[1] = s;
            p[2..].fill(0.0);
        }
    }
    let mut j = start;
    while j < end {
        let (vals, take) = segment::<A>(kv, blocks, layer, j..end, true, rows);
        let mut ahead = if j + take < end {
            upcoming(kv, blocks, layer, j + take, true)
        } else if end < blocks.len() * kv.layout().block_tokens {
            upcoming(kv, blocks, layer, end, false)
        } else {
            &[]
        };
        for (r, range) in ranges.iter().enumerate() {
            let (lo, hi) = (j.max(range.start), (j + take).min(range.end));
            if lo < hi {
                let vals = vals.slice((lo - j) * kv.layout().kv_dim..(hi - j) * kv.layout().kv_dim);
                let sc = &scores[r * per_row..(r + 1) * per_row];
                A::values(shape, vals, sc, lo - range.start, &mut parts[r * plen..(r + 1) * plen], ahead);
                ahead = &[];
            }
        }
        j += take;
    }
}

/// The K (or V) rows of positions `range.start..` that share its block (at most to
/// `range.end`), and how many there are; f16 rows are widened into `buf` unless `A` reads
/// them itself, q8_0 rows always (dequantized once per block run, then read by every head
/// and row).
#[inline(always)]
fn segment<'a, A: Arith>(
    kv: &'a KvArena,
    blocks: &[BlockId],
    layer: usize,
    range: Range<usize>,
    values: bool,
    buf: &'a mut Vec<f32>,
) -> (KvRows<'a>, usize) {
    let (bt, kvd) = (kv.layout().block_tokens, kv.layout().kv_dim);
    let (b, slot) = (range.start / bt, range.start % bt);
    let take = (bt - slot).min(range.len());
    let rows = if values { kv.values(blocks[b], layer) } else { kv.keys(blocks[b], layer) };
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

/// The stored K (or V) rows of `pos`'s block from `pos` on, as bytes: what the next
/// segment will read, fetched into cache ahead of it by [`prefetch_part`].
fn upcoming<'a>(kv: &'a KvArena, blocks: &[BlockId], layer: usize, pos: usize, values: bool) -> &'a [u8] {
    let bt = kv.layout().block_tokens;
    let b = blocks[pos / bt];
    let bytes = if values { kv.values(b, layer) } else { kv.keys(b, layer) }.bytes();
    &bytes[(pos % bt) * (bytes.len() / bt)..]
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

/// [`tile_body`] for AVX-512; heads of 64 or 128 values keep a head's query or running
/// sum in registers across a block of rows (`Zmm`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c")]
pub(super) fn tile_avx512(job: &TileJob, scratch: &mut ChunkScratch, parts: &mut [f32]) {
    match job.shape.head_dim {
        64 => tile_body::<Zmm<4>>(job, scratch, parts),
        128 => tile_body::<Zmm<8>>(job, scratch, parts),
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
/// [`AttnShape::partial_len`] floats) into the attention output `out` (`n_head × head_dim`).
pub fn merge(shape: AttnShape, parts: &[f32], out: &mut [f32]) {
    merge_strided(shape, parts, shape.partial_len(), out)
}

/// [`merge`] of partials that lie `step` floats apart in `parts` (a row of a tile: its
/// chunks are one tile's width apart), the first at 0.
pub fn merge_strided(shape: AttnShape, parts: &[f32], step: usize, out: &mut [f32]) {
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
            let w = (m - top).exp();
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

    #[test]
    fn pairwise_reduce_and_max_cover_every_lane_and_the_tail() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 37) as f32).collect();
        assert_eq!(max(&x), 36.0);
        let ones = [1.0f32; 37];
        assert_eq!(dot::<Separate>(&x, &ones), (0..37).sum::<i32>() as f32);
    }
}
