//! AVX-512 VNNI kernels: Q4_1 and Q8_0 weights against activations quantized to 16 bits
//! ([`super::quant_acts`]).
//!
//! `vpdpwssd` multiplies 32 pairs of 16-bit integers into 16 lanes of 32-bit sums: two
//! multiply-adds per lane and instruction where an f32 FMA does one. Each lane holds one
//! weight row: a tile is 16 weight rows, and for every block the tile's nibbles are
//! transposed once into 16 registers (register `p`, lane `j`: values `2p` and `2p+1` of row
//! `j`'s block, as 16-bit integers). Every x row of the call then takes 16 `vpdpwssd`, its
//! pairs broadcast from memory, for the exact integer dot products of the 16 rows' blocks,
//! and applies the scales once per block for all 16 rows. No horizontal sums: lane `j` of
//! the accumulator is the result for row `j`.
//!
//! A lane's arithmetic does not depend on the other lanes, on how many x rows share the
//! call, or on the tile a row lands in (lanes past the last row repeat the tile's first
//! row and are dropped): [`super::quant_acts::dot_q4_1`] gives the same bits.

use std::arch::x86_64::*;

use super::quant_acts::{QK, QRow};
use super::simd_rows::{Q4_1_BYTES, Q8_0_BYTES};

/// Weight rows per tile: one per lane.
const TILE: usize = 16;
/// Indices for `vpermt2d` that turn four zmm of four rows × 16 nibble bytes into four zmm of
/// one dword (four bytes) of every row: dwords `u ∈ {0,1}` (`LO`) or `{2,3}` (`HI`) of the
/// first two inputs' eight rows, then of all 16 rows (`FIRST`, `SECOND`).
const PAIR_LO: [i32; 16] = [0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29];
const PAIR_HI: [i32; 16] = [2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31];
const FIRST: [i32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23];
const SECOND: [i32; 16] = [8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31];

/// `vpshufb` controls: bytes 0,1 (`EVEN`) or 2,3 (`ODD`) of every dword spread into the low
/// bytes of its two 16-bit halves, the high bytes zeroed.
const EVEN: [i8; 16] = [0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1];
const ODD: [i8; 16] = [2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1];
/// The same bytes into the high halves (Q8_0: then shifted down with their sign).
const EVEN_HIGH: [i8; 16] = [-1, 0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13];
const ODD_HIGH: [i8; 16] = [-1, 2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15];

/// `acc + Σ pairs a·b` in 16-bit pairs (`vpdpwssd`). In `asm!` because LLVM otherwise
/// emits `vpmaddwd` and `vpaddd`, two instructions for one.
#[target_feature(enable = "avx512f,avx512vnni")]
#[inline]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; the enclosing function requires avx512vnni.
    unsafe {
        std::arch::asm!("vpdpwssd {acc}, {a}, {b}", acc = inout(zmm_reg) acc, a = in(zmm_reg) a, b = in(zmm_reg) b,
            options(pure, nomem, nostack));
    }
    acc
}

#[target_feature(enable = "avx512f")]
#[inline]
fn ints(v: &[i32; 16]) -> __m512i {
    // SAFETY: `v` is 64 readable bytes; the load is unaligned.
    unsafe { _mm512_loadu_si512(v.as_ptr().cast()) }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn bytes4(v: &[i8; 16]) -> __m512i {
    // SAFETY: `v` is 16 readable bytes; the load is unaligned.
    _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(v.as_ptr().cast()) })
}

/// The transposition's constant registers.
#[derive(Clone, Copy)]
struct Perms {
    pair_lo: __m512i,
    pair_hi: __m512i,
    first: __m512i,
    second: __m512i,
}

#[target_feature(enable = "avx512f")]
#[inline]
fn perms() -> Perms {
    Perms { pair_lo: ints(&PAIR_LO), pair_hi: ints(&PAIR_HI), first: ints(&FIRST), second: ints(&SECOND) }
}

/// The 32 bits at `blk + offsets[j]` in lane j: a masked broadcast per row (a gather here
/// stalled single-row decode on its cache misses).
///
/// # Safety
/// Every `blk + offsets[j]` must have 4 readable bytes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn lanes32(blk: *const u8, offsets: &[usize; TILE]) -> __m512i {
    let mut v = _mm512_setzero_si512();
    for (j, &off) in offsets.iter().enumerate() {
        // SAFETY: the caller guarantees 4 readable bytes; the read is unaligned.
        v = _mm512_mask_set1_epi32(v, 1 << j, unsafe { blk.add(off).cast::<i32>().read_unaligned() });
    }
    v
}

/// The 16 bytes at `blk + offsets[j]` of the 16 rows, transposed: register u holds bytes
/// `4u..4u+4` of row j in lane j.
///
/// # Safety
/// Every `blk + offsets[j]` must have 16 readable bytes.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn columns(blk: *const u8, offsets: &[usize; TILE], p: Perms) -> [__m512i; 4] {
    // SAFETY: the caller guarantees 16 readable bytes at each; the loads are unaligned.
    let row = |j: usize| unsafe { _mm_loadu_si128(blk.add(offsets[j]).cast()) };
    let quad = |v: usize| {
        let z = _mm512_castsi128_si512(row(4 * v));
        let z = _mm512_inserti32x4::<1>(z, row(4 * v + 1));
        let z = _mm512_inserti32x4::<2>(z, row(4 * v + 2));
        _mm512_inserti32x4::<3>(z, row(4 * v + 3))
    };
    let quads = [quad(0), quad(1), quad(2), quad(3)];
    let lo01 = _mm512_permutex2var_epi32(quads[0], p.pair_lo, quads[1]);
    let lo23 = _mm512_permutex2var_epi32(quads[2], p.pair_lo, quads[3]);
    let hi01 = _mm512_permutex2var_epi32(quads[0], p.pair_hi, quads[1]);
    let hi23 = _mm512_permutex2var_epi32(quads[2], p.pair_hi, quads[3]);
    [
        _mm512_permutex2var_epi32(lo01, p.first, lo23),
        _mm512_permutex2var_epi32(lo01, p.second, lo23),
        _mm512_permutex2var_epi32(hi01, p.first, hi23),
        _mm512_permutex2var_epi32(hi01, p.second, hi23),
    ]
}

/// One block of a tile, decoded: register p holds values `2p, 2p+1` of row j in lane j as
/// 16-bit integers; `d` the rows' scales, `m` their minimums where the format has them.
struct Block {
    w: [__m512i; 16],
    d: __m512,
    m: Option<__m512>,
}

/// Q4_1 rows · `NX` quantized x rows, for each of the `count` rows of `row_bytes` in `rows`,
/// handed to `emit` with the row's index.
///
/// # Panics
/// If `rows` is shorter than `count` rows, a row is not whole Q4_1 blocks, or an x row is
/// shorter than a weight row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx,avx2,fma,f16c")]
pub(crate) fn q4_1<const NX: usize>(
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[QRow; NX],
    emit: impl FnMut(usize, &[f32]),
) {
    let p = perms();
    let (even, odd, nibble) = (bytes4(&EVEN), bytes4(&ODD), _mm512_set1_epi32(0x000F_000F));
    let decode = |blk: *const u8, offsets: &[usize; TILE]| {
        // SAFETY: `tiles` points `blk + offsets[j]` at a whole Q4_1 block of 20 bytes:
        // `d, m` at 0, 16 nibble bytes at 4.
        let (dm, cols) = unsafe { (lanes32(blk, offsets), columns(blk.add(4), offsets, p)) };
        // Byte k of a row holds values k (low nibble) and k + 16 (high nibble).
        let mut w = [_mm512_setzero_si512(); 16];
        for t in 0..8 {
            let v = _mm512_shuffle_epi8(cols[t / 2], if t % 2 == 0 { even } else { odd });
            w[t] = _mm512_and_si512(v, nibble);
            w[t + 8] = _mm512_srli_epi16::<4>(v);
        }
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
        let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm)));
        Block { w, d, m: Some(m) }
    };
    tiles(rows, row_bytes, Q4_1_BYTES, count, xs, decode, emit);
}

/// Q8_0 rows · `NX` quantized x rows, as [`q4_1`].
///
/// # Panics
/// As [`q4_1`], for Q8_0 blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx,avx2,fma,f16c")]
pub(crate) fn q8_0<const NX: usize>(
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[QRow; NX],
    emit: impl FnMut(usize, &[f32]),
) {
    let p = perms();
    let (even, odd) = (bytes4(&EVEN_HIGH), bytes4(&ODD_HIGH));
    let decode = |blk: *const u8, offsets: &[usize; TILE]| {
        // SAFETY: `tiles` points `blk + offsets[j]` at a whole Q8_0 block of 34 bytes: `d`
        // at 0 (the 4-byte read takes two value bytes too), 32 signed bytes at 2.
        let (dq, lo, hi) =
            unsafe { (lanes32(blk, offsets), columns(blk.add(2), offsets, p), columns(blk.add(18), offsets, p)) };
        // Each byte into the high half of a 16-bit word, then shifted down with its sign.
        let w = std::array::from_fn(|t| {
            let cols = if t < 8 { &lo } else { &hi };
            let v = _mm512_shuffle_epi8(cols[(t % 8) / 2], if t % 2 == 0 { even } else { odd });
            _mm512_srai_epi16::<8>(v)
        });
        Block { w, d: _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dq)), m: None }
    };
    tiles(rows, row_bytes, Q8_0_BYTES, count, xs, decode, emit);
}

/// Most partial sums per x row (see [`ways`]).
const MAX_WAYS: usize = 4;

/// Partial sums per x row in a call with `NX` x rows: at least four chains in flight.
const fn ways<const NX: usize>() -> usize {
    MAX_WAYS.div_ceil(NX)
}

/// The shared tile loop over blocks of `block_bytes` (32 values each), `decode` reading
/// block `b` of the tile's rows at `blk + offsets[j]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx,avx2,fma,f16c")]
#[inline]
fn tiles<const NX: usize>(
    rows: &[u8],
    row_bytes: usize,
    block_bytes: usize,
    count: usize,
    xs: &[QRow; NX],
    decode: impl Fn(*const u8, &[usize; TILE]) -> Block,
    mut emit: impl FnMut(usize, &[f32]),
) {
    let blocks = row_bytes / block_bytes;
    assert_eq!(blocks * block_bytes, row_bytes, "row of {row_bytes} bytes");
    assert!(rows.len() >= count * row_bytes, "{} bytes for {count} rows", rows.len());
    for x in xs {
        assert!(x.q.len() >= blocks * QK && x.d.len() >= blocks && x.s.len() >= blocks, "x row too short");
    }
    for t0 in (0..count).step_by(TILE) {
        let live = (count - t0).min(TILE);
        // Lanes past the last row re-read the tile's first row; their results are dropped.
        let offsets: [usize; TILE] = std::array::from_fn(|j| if j < live { j * row_bytes } else { 0 });
        let tile = rows[t0 * row_bytes..(t0 + live) * row_bytes].as_ptr();
        let mut acc = [_mm512_setzero_ps(); NX];
        // The next tile, in address order over the first half of this tile's blocks: the 16
        // strided row streams defeat the hardware prefetcher, and a lone x row (decode)
        // would wait on memory. (Spread over all blocks, the rows at the end of the next tile
        // arrive late for its first block.) Into L2, not L1: with one x row, requests for a
        // whole tile into L1 queued behind each other, and the Q8_0 output head ran at 0.75×
        // the f32 kernel's speed against 1.0× into L2 (criterion `matmul`, n1).
        let next = &rows[(t0 + live) * row_bytes..(t0 + live + TILE).min(count) * row_bytes];
        let lines = next.len().div_ceil(64);
        let per_block = lines.div_ceil(blocks.div_ceil(2));
        for b in 0..blocks {
            for line in (b * per_block).min(lines)..((b + 1) * per_block).min(lines) {
                // SAFETY: `line * 64 < next.len()`, so the address is inside `next`.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(next.as_ptr().add(line * 64).cast()) };
            }
            // Every offset is that of a row among the tile's `live` rows and `b` is one of
            // its blocks: `decode` reads inside `rows[t0 * row_bytes..(t0 + live) * row_bytes]`.
            let blk = decode(tile.wrapping_add(b * block_bytes), &offsets);
            // Register p of every x row before register p + 1, and register p into sum
            // p % `ways`: at least four independent chains of `vpdpwssd` in flight, even for
            // one x row, whose 16 would otherwise each wait on the last one's latency.
            // Integer sums are exact, so the split does not change the result.
            let mut dots = [[_mm512_setzero_si512(); MAX_WAYS]; NX];
            for (p, w) in blk.w.iter().enumerate() {
                for (dot, x) in dots.iter_mut().zip(xs) {
                    // SAFETY: the x row holds `blocks * QK` values (asserted), so pair `p` of
                    // block `b` is in bounds; the 4-byte read is unaligned.
                    let pair = unsafe { x.q.as_ptr().add(b * QK + 2 * p).cast::<i32>().read_unaligned() };
                    let k = p % ways::<NX>();
                    dot[k] = dpwssd(dot[k], *w, _mm512_set1_epi32(pair));
                }
            }
            for ((acc, dot), x) in acc.iter_mut().zip(dots).zip(xs) {
                let dot = dot[..ways::<NX>()].iter().fold(_mm512_setzero_si512(), |s, &d| _mm512_add_epi32(s, d));
                let dot = _mm512_cvtepi32_ps(dot);
                *acc = _mm512_fmadd_ps(dot, _mm512_mul_ps(blk.d, _mm512_set1_ps(x.d[b])), *acc);
                if let Some(m) = blk.m {
                    *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(x.s[b]), *acc);
                }
            }
        }
        let mut out = [[0.0f32; TILE]; NX];
        for (o, a) in out.iter_mut().zip(&acc) {
            // SAFETY: `o` is 16 writable floats; the store is unaligned.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *a) };
        }
        let by_row: [[f32; NX]; TILE] = std::array::from_fn(|lane| std::array::from_fn(|j| out[j][lane]));
        for (lane, vals) in by_row.iter().take(live).enumerate() {
            emit(t0 + lane, vals);
        }
    }
}
