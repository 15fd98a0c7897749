//! AVX2 + FMA kernels for the hot types (Q4_1, Q8_0) against f32 activations, for x86
//! CPUs without AVX-512.
//!
//! The same scheme as the AVX-512 kernels with 8-lane vectors: each weight block is
//! dequantized exactly in registers (`q·d + m`, one FMA per 8 values) and multiplied into
//! f32 activations. Every (weight row, x row) pair owns two accumulators, one for values
//! `0..8` and `16..24` of each block and one for `8..16` and `24..32`, so 16 registers hold
//! the accumulators of 4 x rows plus the decoded block. The operations applied to x row `j`
//! do not depend on how many x rows a call takes.

use std::arch::x86_64::*;

use super::simd_rows::{Q4_1_BYTES, Q8_0_BYTES, QK, check_rows};

/// Sums two accumulators and then their 8 lanes, always in the same order.
#[target_feature(enable = "avx,sse3")]
#[inline]
fn reduce(a: __m256, b: __m256) -> f32 {
    let v = _mm256_add_ps(a, b);
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Q4_1 block `b` of `row` dequantized, in four runs of 8 values (`q·d + m`).
#[target_feature(enable = "avx,avx2,fma,f16c,sse3")]
#[inline]
fn q4_1_block(row: &[u8], b: usize) -> [__m256; 4] {
    let blk = &row[b * Q4_1_BYTES..(b + 1) * Q4_1_BYTES];
    let dm = u32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(dm as i32));
    let d = _mm256_broadcastss_ps(dm);
    let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
    let qs: &[u8; 16] = blk[4..20].try_into().expect("16 bytes of nibbles");
    // SAFETY: `qs` is exactly 16 readable bytes; the load is unaligned.
    let bytes = unsafe { _mm_loadu_si128(qs.as_ptr().cast()) };
    let (b0, b1) = (_mm256_cvtepu8_epi32(bytes), _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(bytes)));
    let mask = _mm256_set1_epi32(0xF);
    [
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, mask)), d, m),
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, mask)), d, m),
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b0)), d, m),
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b1)), d, m),
    ]
}

/// Q8_0 block `b` of `row` dequantized, in four runs of 8 values (`q·d`).
#[target_feature(enable = "avx,avx2,fma,f16c,sse3")]
#[inline]
fn q8_0_block(row: &[u8], b: usize) -> [__m256; 4] {
    let blk = &row[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
    let d = u16::from_le_bytes([blk[0], blk[1]]);
    let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)));
    let qs: &[u8; 32] = blk[2..34].try_into().expect("32 quantized bytes");
    // SAFETY: `qs` is exactly 32 readable bytes; the two 16-byte loads are unaligned.
    let (lo, hi) = unsafe {
        let p = qs.as_ptr();
        (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(16).cast()))
    };
    [scaled_i8(lo, d), scaled_i8(_mm_srli_si128::<8>(lo), d), scaled_i8(hi, d), scaled_i8(_mm_srli_si128::<8>(hi), d)]
}

/// The low 8 signed bytes of `q` times `d`.
#[target_feature(enable = "avx,avx2")]
#[inline]
fn scaled_i8(q: __m128i, d: __m256) -> __m256 {
    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
}

/// The shared loop over a row's blocks: runs 0 and 2 of each block into accumulator `a`,
/// runs 1 and 3 into `b`, then one reduction per x row. A macro so each kernel inlines its
/// own block decoder.
macro_rules! dot_rows {
    ($row:ident, $xs:ident, $bytes:expr, $decode:ident) => {{
        let blocks = $row.len() / $bytes;
        check_rows($xs, blocks);
        let mut a = [_mm256_setzero_ps(); NX];
        let mut b = [_mm256_setzero_ps(); NX];
        for blk in 0..blocks {
            let w = $decode($row, blk);
            for j in 0..NX {
                // SAFETY: `check_rows` asserted every x row holds `blocks * QK` values and
                // `blk < blocks`, so the four 8-value loads are in bounds.
                let x = unsafe {
                    let p = $xs[j].as_ptr().add(blk * QK);
                    [
                        _mm256_loadu_ps(p),
                        _mm256_loadu_ps(p.add(8)),
                        _mm256_loadu_ps(p.add(16)),
                        _mm256_loadu_ps(p.add(24)),
                    ]
                };
                a[j] = _mm256_fmadd_ps(w[0], x[0], a[j]);
                b[j] = _mm256_fmadd_ps(w[1], x[1], b[j]);
                a[j] = _mm256_fmadd_ps(w[2], x[2], a[j]);
                b[j] = _mm256_fmadd_ps(w[3], x[3], b[j]);
            }
        }
        let mut out = [0.0f32; NX];
        for j in 0..NX {
            out[j] = reduce(a[j], b[j]);
        }
        out
    }};
}

/// Q4_1 rows · `NX` x rows: `Σ_c (q_c·d + m)·x_c` for each of the `count` rows of `row_bytes` in `rows`
/// and each x row, handed to `emit` with the row's index. The row loop lives here so that
/// `emit` (the caller's store) inlines into the kernel.
#[target_feature(enable = "avx,avx2,fma,f16c,sse3")]
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
#[target_feature(enable = "avx,avx2,fma,f16c,sse3")]
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
