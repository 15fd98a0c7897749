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
//! loops (`Zmm`). `exp` is a polynomial the vectorizer can inline (relative error under
//! 5e-7).

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
    fn mul_add(a: f32, b: f32, c: f32) -> f32;

    /// `scores[h·CHUNK + jj0 + i] = scale · q_h · k_i` for every head and K row `i` of `keys`.
    #[inline(always)]
    fn scores(shape: AttnShape, q: &[f32], keys: &[f32], scale: f32, jj0: usize, scores: &mut [f32]) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        let (group, kvd) = (n_head / shape.n_head_kv, shape.n_head_kv * hd);
        for (i, k) in keys.chunks_exact(kvd).enumerate() {
            for h in 0..n_head {
                let kh = &k[(h / group) * hd..][..hd];
                scores[h * CHUNK + jj0 + i] = dot::<Self>(&q[h * hd..][..hd], kh) * scale;
            }
        }
    }

    /// `acc_h += scores[h·CHUNK + jj0 + i] · v_i` for every head and V row `i` of `vals`,
    /// where `acc_h` is `part[h·(hd+2) + 2..][..hd]`.
    #[inline(always)]
    fn values(shape: AttnShape, vals: &[f32], scores: &[f32], jj0: usize, part: &mut [f32]) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        let (group, kvd, stride) = (n_head / shape.n_head_kv, shape.n_head_kv * hd, hd + 2);
        for (i, v) in vals.chunks_exact(kvd).enumerate() {
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

/// AVX-512 with heads of `V` × 16 values: each head's query (for scores) or running sum
/// (for values) stays in `V` registers while the block's rows pass.
#[cfg(target_arch = "x86_64")]
struct Zmm<const V: usize>;

#[cfg(target_arch = "x86_64")]
impl<const V: usize> Arith for Zmm<V> {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    #[inline(always)]
    fn scores(shape: AttnShape, q: &[f32], keys: &[f32], scale: f32, jj0: usize, scores: &mut [f32]) {
        // SAFETY: `Zmm` is only used by `tile_avx512`, which runs only where `available()`
        // detected avx512f.
        unsafe { zmm::scores::<V>(shape, q, keys, scale, jj0, scores) }
    }

    #[inline(always)]
    fn values(shape: AttnShape, vals: &[f32], scores: &[f32], jj0: usize, part: &mut [f32]) {
        // SAFETY: as above.
        unsafe { zmm::values::<V>(shape, vals, scores, jj0, part) }
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

    /// See [`super::Arith::scores`]; `head_dim == V * 16`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn scores<const V: usize>(
        shape: AttnShape,
        q: &[f32],
        keys: &[f32],
        scale: f32,
        jj0: usize,
        scores: &mut [f32],
    ) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        assert_eq!(hd, V * 16, "head width");
        let (group, kvd) = (n_head / shape.n_head_kv, shape.n_head_kv * hd);
        for h in 0..n_head {
            let qh: [__m512; V] = std::array::from_fn(|v| load(q, h * hd + 16 * v));
            let off = (h / group) * hd;
            let out = &mut scores[h * CHUNK + jj0..];
            for (i, k) in keys.chunks_exact(kvd).enumerate() {
                let mut acc = _mm512_mul_ps(qh[0], load(k, off));
                for (v, qv) in qh.iter().enumerate().skip(1) {
                    acc = _mm512_fmadd_ps(*qv, load(k, off + 16 * v), acc);
                }
                out[i] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
    }

    /// See [`super::Arith::values`]; `head_dim == V * 16`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn values<const V: usize>(shape: AttnShape, vals: &[f32], scores: &[f32], jj0: usize, part: &mut [f32]) {
        let AttnShape { n_head, head_dim: hd, .. } = shape;
        assert_eq!(hd, V * 16, "head width");
        let (group, kvd, stride) = (n_head / shape.n_head_kv, shape.n_head_kv * hd, hd + 2);
        for h in 0..n_head {
            let sums = &mut part[h * stride + 2..(h + 1) * stride];
            let mut acc: [__m512; V] = std::array::from_fn(|v| load(sums, 16 * v));
            let off = (h / group) * hd;
            let weights = &scores[h * CHUNK + jj0..];
            for (i, row) in vals.chunks_exact(kvd).enumerate() {
                let w = _mm512_set1_ps(weights[i]);
                for (v, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(w, load(row, off + 16 * v), *a);
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
        let (keys, take) = segment(kv, blocks, layer, j..end, false, rows);
        for (r, range) in ranges.iter().enumerate() {
            let (lo, hi) = (j.max(range.start), (j + take).min(range.end));
            if lo < hi {
                let keys = &keys[(lo - j) * kv.layout().kv_dim..(hi - j) * kv.layout().kv_dim];
                let sc = &mut scores[r * per_row..(r + 1) * per_row];
                A::scores(shape, &q[r * qd..(r + 1) * qd], keys, scale, lo - range.start, sc);
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
        let (vals, take) = segment(kv, blocks, layer, j..end, true, rows);
        for (r, range) in ranges.iter().enumerate() {
            let (lo, hi) = (j.max(range.start), (j + take).min(range.end));
            if lo < hi {
                let vals = &vals[(lo - j) * kv.layout().kv_dim..(hi - j) * kv.layout().kv_dim];
                let sc = &scores[r * per_row..(r + 1) * per_row];
                A::values(shape, vals, sc, lo - range.start, &mut parts[r * plen..(r + 1) * plen]);
            }
        }
        j += take;
    }
}

/// The K (or V) rows of positions `range.start..` that share its block (at most to
/// `range.end`), and how many there are; f16 rows are widened into `buf`.
fn segment<'a>(
    kv: &'a KvArena,
    blocks: &[BlockId],
    layer: usize,
    range: Range<usize>,
    values: bool,
    buf: &'a mut Vec<f32>,
) -> (&'a [f32], usize) {
    let (bt, kvd) = (kv.layout().block_tokens, kv.layout().kv_dim);
    let (b, slot) = (range.start / bt, range.start % bt);
    let take = (bt - slot).min(range.len());
    let rows = if values { kv.values(blocks[b], layer) } else { kv.keys(blocks[b], layer) };
    let span = slot * kvd..(slot + take) * kvd;
    match rows {
        KvRows::F32(r) => (&r[span], take),
        KvRows::F16(_) => {
            buf.resize(take * kvd, 0.0);
            rows.read_f32(span.start, buf);
            (buf, take)
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
