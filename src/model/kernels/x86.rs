//! AVX-512 kernels for the hot types (Q4_1, Q8_0) against f32 activations.
//!
//! Each weight block is dequantized exactly in registers (`q·d + m` by one FMA per 16
//! values) and multiplied into f32 activations. Every (weight row, x row) pair owns two
//! 16-lane accumulators (values 0..16 and 16..32 of every block), so a call holds up to
//! eight x rows in registers and decodes each weight block once for all of them. (Four
//! accumulators per pair, even and odd blocks apart, hid FMA latency better for one row but
//! left room for only four x rows; eight rows measured faster for batches, the same for
//! one row.) The operations applied to x row `j` are the same whatever `NX` is, so results
//! do not depend on how x rows are tiled.

use std::arch::x86_64::*;

use super::simd_rows::{Q4_1_BYTES, Q8_0_BYTES, QK, check_rows};

/// Sums two accumulators and then their 16 lanes, always in the same order.
#[target_feature(enable = "avx512f,avx,sse3")]
#[inline]
fn reduce(a: __m512, b: __m512) -> f32 {
    let v = _mm512_add_ps(a, b);
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let s = _mm256_add_ps(lo, hi);
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Q4_1 block `b` of `row` dequantized: values 0..16 and 16..32 (`q·d + m`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c,sse3")]
#[inline]
fn q4_1_block(row: &[u8], b: usize) -> (__m512, __m512) {
    let blk = &row[b * Q4_1_BYTES..(b + 1) * Q4_1_BYTES];
    let dm = u32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm as i32));
    let d = _mm512_broadcastss_ps(dm);
    let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
    let qs: &[u8; 16] = blk[4..20].try_into().expect("16 bytes of nibbles");
    // SAFETY: `qs` is exactly 16 readable bytes; the load is unaligned.
    let v = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(qs.as_ptr().cast()) });
    let mask = _mm512_set1_epi32(0xF);
    let lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, mask)), d, m);
    let hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v)), d, m);
    (lo, hi)
}

/// Q8_0 block `b` of `row` dequantized: values 0..16 and 16..32 (`q·d`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c,sse3")]
#[inline]
fn q8_0_block(row: &[u8], b: usize) -> (__m512, __m512) {
    let blk = &row[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
    let d = u16::from_le_bytes([blk[0], blk[1]]);
    let d = _mm512_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)));
    let qs: &[u8; 32] = blk[2..34].try_into().expect("32 quantized bytes");
    // SAFETY: `qs` is exactly 32 readable bytes; both 16-byte loads are unaligned.
    let (v0, v1) = unsafe {
        let p = qs.as_ptr();
        (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(16).cast()))
    };
    let lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v0)), d);
    let hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v1)), d);
    (lo, hi)
}

/// The shared loop: each block's values 0..16 into accumulator `lo` and 16..32 into `hi`,
/// then one reduction per x row. Two accumulators per (weight row, x row) let a call hold
/// eight x rows in registers, so each decoded block is reused eight times. A macro so each
/// kernel inlines its own block decoder.
macro_rules! dot_rows {
    ($row:ident, $xs:ident, $bytes:expr, $decode:ident) => {{
        let blocks = $row.len() / $bytes;
        check_rows($xs, blocks);
        let mut lo = [_mm512_setzero_ps(); NX];
        let mut hi = [_mm512_setzero_ps(); NX];
        for b in 0..blocks {
            let (w0, w1) = $decode($row, b);
            for j in 0..NX {
                // SAFETY: `check_rows` asserted every x row holds `blocks * QK` values and
                // `b < blocks`, so both 16-value loads are in bounds.
                let (x0, x1) = unsafe {
                    let p = $xs[j].as_ptr().add(b * QK);
                    (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
                };
                lo[j] = _mm512_fmadd_ps(w0, x0, lo[j]);
                hi[j] = _mm512_fmadd_ps(w1, x1, hi[j]);
            }
        }
        let mut out = [0.0f32; NX];
        for j in 0..NX {
            out[j] = reduce(lo[j], hi[j]);
        }
        out
    }};
}

/// Q4_1 rows · `NX` x rows: `Σ_c (q_c·d + m)·x_c` for each of the `count` rows of `row_bytes` in `rows`
/// and each x row, handed to `emit` with the row's index. The row loop lives here so that
/// `emit` (the caller's store) inlines into the kernel.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c,sse3")]
pub(crate) fn q4_1<const NX: usize>(
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[&[f32]; NX],
    mut emit: impl FnMut(usize, &[f32]),
) {
    for k in 0..count {
        let row = &rows[k * row_bytes..(k + 1) * row_bytes];
        emit(k, &dot_rows!(row, xs, Q4_1_BYTES, q4_1_block));
    }
}

/// Q8_0 rows · `NX` x rows: `Σ_c (q_c·d)·x_c` for each of the `count` rows of `row_bytes` in `rows`
/// and each x row, handed to `emit` with the row's index. The row loop lives here so that
/// `emit` (the caller's store) inlines into the kernel.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c,sse3")]
pub(crate) fn q8_0<const NX: usize>(
    rows: &[u8],
    row_bytes: usize,
    count: usize,
    xs: &[&[f32]; NX],
    mut emit: impl FnMut(usize, &[f32]),
) {
    for k in 0..count {
        let row = &rows[k * row_bytes..(k + 1) * row_bytes];
        emit(k, &dot_rows!(row, xs, Q8_0_BYTES, q8_0_block));
    }
}
