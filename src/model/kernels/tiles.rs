//! The SIMD matmul kernels: one tile loop for every format and instruction set.
//!
//! A tile is [`Lanes::L`] weight rows, one per lane (16 for AVX-512, 8 for AVX2). For each
//! block, the format decodes the tile's rows into [`Unit`]s ([`Format::lanes`]): each 32
//! values as signed bytes, four per lane and register, with their scales and offsets. Each x
//! row of the call then takes its products from the decoded block, so a block is decoded
//! once for up to [`MAX_X`] x rows, and the tile's 16 (8) results come out as the lanes of
//! one accumulator: no horizontal sums.
//!
//! What differs per instruction set is the lane width ([`Lanes`]) and the product:
//! - [`IntDot`] (the VNNI sets) takes activations rounded to 16 bits per 32-value block
//!   ([`super::quant_acts`]) and multiplies bytes with `vpdpbusd` in exact integers; the
//!   scales apply once per block (or half block). [`super::quant_acts::dot`] gives its bits.
//! - [`F32Dot`] (the f32 sets) dequantizes each decoded block (`q·scale + offset`, one FMA)
//!   and multiplies it into f32 activations with FMAs.
//!
//! A lane's arithmetic does not depend on the other lanes, on how many x rows share the call,
//! or on the tile a row lands in, so results are the same bits whatever the batch.

use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};

use super::formats::{Format, QK};
use super::lanes::{Dpbusd, Floats, Lanes, Tile, Unit};
use super::lanes_avx2::{Avx2, Y};
use super::lanes_avx512::{Avx512, Vnni512, Z};
use super::quant_acts::QRow;

/// Most x rows per kernel call.
pub(crate) const MAX_X: usize = 16;

/// How a decoded block meets the x rows (see the module doc).
pub(crate) trait Dot<V: Lanes>: Copy {
    /// One x row as the kernel reads it.
    type Row<'a>: Copy;
    /// Whether [`tiles`] decodes each unit one step ahead of its products (see there).
    const DECODE_AHEAD: bool = false;
    /// Values in `x`.
    fn values(x: &Self::Row<'_>) -> usize;
    /// Adds block `k` of `unit` times 32-value block `b` of each x row into `acc`.
    fn block<F: Format>(self, isa: V::Isa, unit: &Unit<V>, k: usize, b: usize, xs: &[Self::Row<'_>], acc: &mut [V::F]);
}

/// Integer products against 16-bit activations (see the module doc).
#[derive(Clone, Copy)]
pub(crate) struct IntDot<D>(pub D);

impl<V: Lanes, D: Dpbusd<V>> Dot<V> for IntDot<D> {
    type Row<'a> = QRow<'a>;
    /// On 16 lanes: 5–8% faster on Q4_0, Q4_1 and Q8_0 at 8 x rows, the K-quants unchanged
    /// (one thread, 1,536 rows). On 8 lanes 4–7% slower (16 registers), so not there; nor
    /// for the f32 products, which it did not speed up.
    const DECODE_AHEAD: bool = V::L >= 16;

    fn values(x: &QRow) -> usize {
        x.q.len().min(x.planes.len() / 2).min(x.d.len() * QK).min(x.s.len() * QK).min(x.s16.len() * 16)
    }

    /// With `u = q + 32768 = 256·hi + lo`: `Σ w·q = 256·Σ w·hi + Σ w·lo − 32768·Σ w` per
    /// half block, every sum exact in 32 bits (`|Σ w·q| ≤ 16·128·32767`).
    #[inline(always)]
    fn block<F: Format>(self, isa: V::Isa, unit: &Unit<V>, k: usize, b: usize, xs: &[QRow], acc: &mut [V::F]) {
        let (w, dp) = (&unit.q[k], self.0);
        let zero = V::splat(isa, 0);
        let ones = V::splat(isa, 0x0101_0101);
        // 32768·Σ w per half block. (Every loop here keeps its sums in locals: an array
        // indexed by a loop counter lives on the stack when the loop is not unrolled.)
        let (mut b0, mut b1) = (zero, zero);
        for u in 0..4 {
            b0 = dp.dpbusd(b0, ones, w[u]);
            b1 = dp.dpbusd(b1, ones, w[u + 4]);
        }
        let bias = [b0.shl32(15), b1.shl32(15)];
        let bias32 = bias[0].add32(bias[1]);
        for (x, acc) in xs.iter().zip(acc.iter_mut()) {
            let planes: &[u8; 2 * QK] = x.planes[2 * QK * b..2 * QK * (b + 1)].try_into().expect("64 bytes");
            // High and low bytes of each half: four chains of four in flight.
            let (mut hi0, mut lo0, mut hi1, mut lo1) = (zero, zero, zero, zero);
            for u in 0..4 {
                hi0 = dp.dpbusd(hi0, V::splat(isa, quad(planes, u)), w[u]);
                lo0 = dp.dpbusd(lo0, V::splat(isa, quad(planes, 8 + u)), w[u]);
                hi1 = dp.dpbusd(hi1, V::splat(isa, quad(planes, 4 + u)), w[4 + u]);
                lo1 = dp.dpbusd(lo1, V::splat(isa, quad(planes, 12 + u)), w[4 + u]);
            }
            let d = V::fsplat(isa, x.d[b]);
            let mut a = *acc;
            if F::PER_16 {
                let i0 = hi0.shl32(8).add32(lo0).sub32(bias[0]);
                let i1 = hi1.shl32(8).add32(lo1).sub32(bias[1]);
                a = i0.to_f32().fma(unit.scale[k][0].mul(d), a);
                if F::HAS_OFFSET {
                    a = unit.offset[k][0].fma(V::fsplat(isa, x.s16[2 * b]), a);
                }
                a = i1.to_f32().fma(unit.scale[k][1].mul(d), a);
                if F::HAS_OFFSET {
                    a = unit.offset[k][1].fma(V::fsplat(isa, x.s16[2 * b + 1]), a);
                }
            } else {
                let i = hi0.add32(hi1).shl32(8).add32(lo0.add32(lo1)).sub32(bias32);
                a = i.to_f32().fma(unit.scale[k][0].mul(d), a);
                if F::HAS_OFFSET {
                    a = unit.offset[k][0].fma(V::fsplat(isa, x.s[b]), a);
                }
            }
            *acc = a;
        }
    }
}

/// The little-endian u32 at 4-byte slot `p` of `planes`.
#[inline(always)]
fn quad(planes: &[u8; 2 * QK], p: usize) -> u32 {
    u32::from_le_bytes([planes[4 * p], planes[4 * p + 1], planes[4 * p + 2], planes[4 * p + 3]])
}

/// Dequantized weights against f32 activations (see the module doc).
#[derive(Clone, Copy)]
pub(crate) struct F32Dot;

impl<V: Lanes> Dot<V> for F32Dot {
    type Row<'a> = &'a [f32];

    fn values(x: &&[f32]) -> usize {
        x.len()
    }

    /// Each x row's 32 products in four partial sums (value `c` into sum `c % 4`), added as
    /// `(p0 + p1) + (p2 + p3)` to its accumulator.
    #[inline(always)]
    fn block<F: Format>(self, isa: V::Isa, unit: &Unit<V>, k: usize, b: usize, xs: &[&[f32]], acc: &mut [V::F]) {
        let zero = V::fsplat(isa, 0.0);
        if let ([x], [acc]) = (xs, &mut *acc) {
            // One x row (decode): the same operations, each value used as it is dequantized
            // rather than kept for more rows (1.7x faster on both f32 sets, one thread).
            let x: &[f32; QK] = x[QK * b..QK * (b + 1)].try_into().expect("32 values");
            let (mut p0, mut p1, mut p2, mut p3) = (zero, zero, zero, zero);
            for (u, x) in x.chunks_exact(4).enumerate() {
                let w = dequantize4::<V, F>(unit, k, u);
                p0 = w[0].fma(V::fsplat(isa, x[0]), p0);
                p1 = w[1].fma(V::fsplat(isa, x[1]), p1);
                p2 = w[2].fma(V::fsplat(isa, x[2]), p2);
                p3 = w[3].fma(V::fsplat(isa, x[3]), p3);
            }
            *acc = acc.add(p0.add(p1).add(p2.add(p3)));
            return;
        }
        // (Sums live in locals, as in `IntDot`.)
        let mut wf = [[zero; 4]; 8];
        for (u, wf) in wf.iter_mut().enumerate() {
            *wf = dequantize4::<V, F>(unit, k, u);
        }
        for (x, acc) in xs.iter().zip(acc.iter_mut()) {
            let x: &[f32; QK] = x[QK * b..QK * (b + 1)].try_into().expect("32 values");
            let (mut p0, mut p1, mut p2, mut p3) = (zero, zero, zero, zero);
            for (w, x) in wf.iter().zip(x.chunks_exact(4)) {
                p0 = w[0].fma(V::fsplat(isa, x[0]), p0);
                p1 = w[1].fma(V::fsplat(isa, x[1]), p1);
                p2 = w[2].fma(V::fsplat(isa, x[2]), p2);
                p3 = w[3].fma(V::fsplat(isa, x[3]), p3);
            }
            *acc = acc.add(p0.add(p1).add(p2.add(p3)));
        }
    }
}

/// Values `4u..4u + 4` of block `k` of `unit`, each `q·scale + offset` (one FMA): the same four
/// calls every time, so every shift is a constant.
#[inline(always)]
fn dequantize4<V: Lanes, F: Format>(unit: &Unit<V>, k: usize, u: usize) -> [V::F; 4] {
    let w = unit.q[k][u];
    let h = if F::PER_16 { u / 4 } else { 0 };
    let (scale, offset) = (unit.scale[k][h], unit.offset[k][h]);
    let mut q = [w.byte_f32(0), w.byte_f32(1), w.byte_f32(2), w.byte_f32(3)];
    for q in &mut q {
        *q = if F::HAS_OFFSET { q.fma(scale, offset) } else { q.mul(scale) };
    }
    q
}

/// `W[r] · x` for each of the `count` rows of `row_bytes` in `rows` (format `F`) and each x
/// row in `xs` (at most [`MAX_X`]), a tile at a time: `emit(r0, live, out)` with `out[i][j]`
/// the result of row `r0 + j` (`j < live`) and x row `i`, so that each x row's results of a
/// tile are one contiguous run.
///
/// # Panics
/// If `rows` is shorter than `count` rows, a row is not whole blocks, there are more than
/// [`MAX_X`] x rows, or an x row is shorter than a weight row.
#[inline(always)]
pub(crate) fn tiles<V: Lanes, D: Dot<V>, F: Format>(
    isa: V::Isa,
    dot: D,
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[D::Row<'_>],
    emit: impl FnMut(usize, usize, &[[f32; 16]]),
) {
    // Accumulators for up to 8 rows, or for 16: one x row (decode) measured 7% slower with
    // room for 16.
    if xs.len() <= 8 {
        tiles_n::<V, D, F, 8>(isa, dot, rows, row_bytes, count, xs, emit)
    } else {
        tiles_n::<V, D, F, MAX_X>(isa, dot, rows, row_bytes, count, xs, emit)
    }
}

/// [`tiles`] with room for `N` x rows.
#[inline(always)]
fn tiles_n<V: Lanes, D: Dot<V>, F: Format, const N: usize>(
    isa: V::Isa,
    dot: D,
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[D::Row<'_>],
    mut emit: impl FnMut(usize, usize, &[[f32; 16]]),
) {
    let blocks = row_bytes / F::BYTES;
    assert_eq!(blocks * F::BYTES, row_bytes, "a row of {row_bytes} bytes is not whole {} blocks", F::TYPE);
    assert!(rows.len() >= count * row_bytes, "{} bytes for {count} rows", rows.len());
    assert!(xs.len() <= N, "{} x rows", xs.len());
    for x in xs {
        assert!(D::values(x) >= blocks * F::ELEMS, "an x row of {} values for {blocks} blocks", D::values(x));
    }
    let mut pair = [Unit::new(isa), Unit::new(isa)];
    let units = F::ELEMS / F::UNIT;
    for t0 in (0..count).step_by(V::L) {
        let live = (count - t0).min(V::L);
        let mut tile = Tile::new(isa, &rows[t0 * row_bytes..(t0 + live) * row_bytes], live, row_bytes, F::BYTES);
        let mut acc = [V::fsplat(isa, 0.0); N];
        // The next tile, in address order over the first half of this tile's blocks: the
        // strided row streams defeat the hardware prefetcher, and a lone x row (decode)
        // would wait on memory. Into L2, not L1: with one x row, requests for a whole tile
        // into L1 queued behind each other (perf-log, "The VNNI kernel set").
        let next_rows = &rows[(t0 + live) * row_bytes..(t0 + live + V::L).min(count) * row_bytes];
        let lines = next_rows.len().div_ceil(64);
        let prefetch = Prefetch { rows: next_rows, lines, per_block: lines.div_ceil(blocks.div_ceil(2).max(1)) };
        let total = blocks * units;
        if D::DECODE_AHEAD {
            // Each unit is decoded one step ahead of its products, so its loads and
            // shuffles overlap the previous unit's products rather than wait in front of
            // them. Units are numbered along the row (`units` per block); the two buffers
            // alternate, two units per turn so that each keeps its place on the stack.
            let [a, b] = &mut pair;
            tile.seek(0);
            F::lanes(&tile, 0, a);
            for j in (0..total).step_by(2) {
                unit_step::<V, D, F, N>(isa, dot, &mut tile, j, total, prefetch, a, b, xs, &mut acc);
                if j + 1 < total {
                    unit_step::<V, D, F, N>(isa, dot, &mut tile, j + 1, total, prefetch, b, a, xs, &mut acc);
                }
            }
        } else {
            let unit = &mut pair[0];
            for j in 0..total {
                let (blk, u) = (j / units, j % units);
                if u == 0 {
                    prefetch.block(blk);
                    tile.seek(blk * F::BYTES);
                }
                F::lanes(&tile, u, unit);
                products::<V, D, F, N>(isa, dot, unit, j, xs, &mut acc);
            }
        }
        let mut out = [[0.0f32; 16]; N];
        for (o, a) in out.iter_mut().zip(&acc).take(xs.len()) {
            a.store(o);
        }
        emit(t0, live, &out[..xs.len()]);
    }
}

/// The next tile's rows, prefetched a share per block (see [`tiles`]).
#[derive(Clone, Copy)]
struct Prefetch<'a> {
    rows: &'a [u8],
    lines: usize,
    per_block: usize,
}

impl Prefetch<'_> {
    /// Block `blk`'s share of the lines.
    #[inline(always)]
    fn block(self, blk: usize) {
        let Prefetch { rows, lines, per_block } = self;
        for line in (blk * per_block).min(lines)..((blk + 1) * per_block).min(lines) {
            // SAFETY: `line * 64 < rows.len()`, so the address is inside `rows`.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(rows.as_ptr().add(line * 64).cast()) };
        }
    }
}

/// Unit `j`'s products (`F::ELEMS / F::UNIT` units per block) for every x row into `acc`.
#[inline(always)]
fn products<V: Lanes, D: Dot<V>, F: Format, const N: usize>(
    isa: V::Isa,
    dot: D,
    unit: &Unit<V>,
    j: usize,
    xs: &[D::Row<'_>],
    acc: &mut [V::F; N],
) {
    for k in 0..F::UNIT / QK {
        let b = j * F::UNIT / QK + k;
        dot.block::<F>(isa, unit, k, b, xs, &mut acc[..xs.len()]);
    }
}

/// Unit `j` of the tile's row (`F::ELEMS / F::UNIT` per block, `total` in all): decodes
/// unit `j + 1` into `next`, then adds unit `j`'s products (`cur`) for every x row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn unit_step<V: Lanes, D: Dot<V>, F: Format, const N: usize>(
    isa: V::Isa,
    dot: D,
    tile: &mut Tile<V>,
    j: usize,
    total: usize,
    prefetch: Prefetch,
    cur: &Unit<V>,
    next: &mut Unit<V>,
    xs: &[D::Row<'_>],
    acc: &mut [V::F; N],
) {
    let units = F::ELEMS / F::UNIT;
    if j.is_multiple_of(units) {
        prefetch.block(j / units);
    }
    if j + 1 < total {
        tile.seek((j + 1) / units * F::BYTES);
        F::lanes(tile, (j + 1) % units, next);
    }
    products::<V, D, F, N>(isa, dot, cur, j, xs, acc);
}

/// The `avx512-vnni` kernels.
///
/// # Panics
/// As [`tiles`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx,avx2,fma,f16c")]
pub(crate) fn avx512_vnni<F: Format>(
    isa: Avx512,
    vnni: Vnni512,
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[QRow],
    emit: impl FnMut(usize, usize, &[[f32; 16]]),
) {
    tiles::<Z, _, F>(isa, IntDot(vnni), rows, row_bytes, count, xs, emit);
}

/// The `avx-vnni` kernels, with `vpdpbusd` in either encoding.
///
/// # Panics
/// As [`tiles`].
#[target_feature(enable = "avx,avx2,fma,f16c")]
pub(crate) fn avx_vnni<F: Format, D: Dpbusd<Y>>(
    isa: Avx2,
    vnni: D,
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[QRow],
    emit: impl FnMut(usize, usize, &[[f32; 16]]),
) {
    tiles::<Y, _, F>(isa, IntDot(vnni), rows, row_bytes, count, xs, emit);
}

/// The `avx512-f32` kernels.
///
/// # Panics
/// As [`tiles`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c")]
pub(crate) fn avx512_f32<F: Format>(
    isa: Avx512,
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[&[f32]],
    emit: impl FnMut(usize, usize, &[[f32; 16]]),
) {
    tiles::<Z, _, F>(isa, F32Dot, rows, row_bytes, count, xs, emit);
}

/// The `avx2-f32` kernels.
///
/// # Panics
/// As [`tiles`].
#[target_feature(enable = "avx,avx2,fma,f16c")]
pub(crate) fn avx2_f32<F: Format>(
    isa: Avx2,
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[&[f32]],
    emit: impl FnMut(usize, usize, &[[f32; 16]]),
) {
    tiles::<Y, _, F>(isa, F32Dot, rows, row_bytes, count, xs, emit);
}
