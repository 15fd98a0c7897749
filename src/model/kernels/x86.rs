//! x86-64 SIMD kernels for the hot types (Q4_1, Q8_0) against 8-bit activations.
//!
//! Two instantiations of the same code: `avx2` (integer dot by `maddubs` + `madd`) and
//! `vnni` (one `vpdpbusd`). Each kernel dots one weight row with `NX` activation rows,
//! decoding every weight block once; the float operations applied to row `j` are the
//! same whatever `NX` is, so results do not depend on how x rows are tiled.

use std::arch::x86_64::*;

use super::portable::ActRow;

/// Loads 16 bytes.
#[inline(always)]
fn load128(b: &[u8]) -> __m128i {
    assert!(b.len() >= 16);
    // SAFETY: `b` holds at least 16 readable bytes (checked above); the load is unaligned.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// Loads 32 bytes.
#[target_feature(enable = "avx")]
#[inline]
fn load256(b: &[u8]) -> __m256i {
    assert!(b.len() >= 32);
    // SAFETY: `b` holds at least 32 readable bytes (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// Loads 32 signed bytes.
#[target_feature(enable = "avx")]
#[inline]
fn load256_i8(b: &[i8]) -> __m256i {
    assert!(b.len() >= 32);
    // SAFETY: `b` holds at least 32 readable bytes (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// Converts the f16 stored at `b[0..2]` to f32 with F16C.
#[target_feature(enable = "f16c")]
#[inline]
fn f16_at(b: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([b[0], b[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Sums the 8 lanes in a fixed order.
#[target_feature(enable = "avx,sse3")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Σ u8 × i8 over groups of 4 bytes into 8 i32 lanes (AVX2).
#[target_feature(enable = "avx2")]
#[inline]
fn dot_maddubs(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// Σ u8 × i8 over groups of 4 bytes into 8 i32 lanes (AVX-512 VNNI on 256 bits).
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
#[inline]
fn dot_vnni(w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
}

macro_rules! simd_kernels {
    ($name:ident, $features:literal, $dot:ident) => {
        /// Q4_1 and Q8_0 kernels built for one instruction set.
        pub(crate) mod $name {
            use super::*;

            /// Q4_1 row · `NX` activation rows: `Σ_b d·dx·Σ(q·qx) + m·sx`.
            #[target_feature(enable = $features)]
            pub(crate) fn q4_1<const NX: usize>(row: &[u8], xs: &[ActRow<'_>; NX]) -> [f32; NX] {
                let mask = _mm256_set1_epi8(0x0F);
                let mut acc = [_mm256_setzero_ps(); NX];
                let mut mins = [0.0f32; NX];
                for (b, blk) in row.chunks_exact(20).enumerate() {
                    let (d, m) = (f16_at(&blk[0..2]), f16_at(&blk[2..4]));
                    let qs = load128(&blk[4..20]);
                    let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs), mask);
                    for j in 0..NX {
                        let x = load256_i8(&xs[j].q[32 * b..32 * b + 32]);
                        let p = _mm256_cvtepi32_ps($dot(w, x));
                        acc[j] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * xs[j].d[b]), acc[j]);
                        mins[j] += m * xs[j].s[b];
                    }
                }
                let mut out = [0.0f32; NX];
                for j in 0..NX {
                    out[j] = hsum(acc[j]) + mins[j];
                }
                out
            }

            /// Q8_0 row · `NX` activation rows: `Σ_b d·dx·Σ(q·qx)` (signs moved onto x).
            #[target_feature(enable = $features)]
            pub(crate) fn q8_0<const NX: usize>(row: &[u8], xs: &[ActRow<'_>; NX]) -> [f32; NX] {
                let mut acc = [_mm256_setzero_ps(); NX];
                for (b, blk) in row.chunks_exact(34).enumerate() {
                    let d = f16_at(&blk[0..2]);
                    let w = load256(&blk[2..34]);
                    let w_abs = _mm256_abs_epi8(w);
                    for j in 0..NX {
                        let x = load256_i8(&xs[j].q[32 * b..32 * b + 32]);
                        let p = _mm256_cvtepi32_ps($dot(w_abs, _mm256_sign_epi8(x, w)));
                        acc[j] = _mm256_fmadd_ps(p, _mm256_set1_ps(d * xs[j].d[b]), acc[j]);
                    }
                }
                let mut out = [0.0f32; NX];
                for j in 0..NX {
                    out[j] = hsum(acc[j]);
                }
                out
            }
        }
    };
}

simd_kernels!(avx2, "avx,avx2,fma,f16c,sse3", dot_maddubs);
simd_kernels!(vnni, "avx,avx2,fma,f16c,sse3,avx512f,avx512bw,avx512vl,avx512vnni", dot_vnni);
