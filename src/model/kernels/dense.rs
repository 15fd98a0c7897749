//! The SIMD kernels for float weights (F32, F16, BF16): weight rows against f32 x rows,
//! vectorised along the row.
//!
//! A call takes up to [`R`]-many weight rows at a time: each step loads [`Wide::L`] values
//! of each (F16 and BF16 widened to f32 exactly on load) and multiplies them into every x
//! row's running lanes with one FMA, so a loaded weight vector serves every x row of the
//! call. A row's lanes are summed in one fixed tree at the end. Each `(weight row, x row)`
//! pair has its own running lanes and sees the same operations in the same order whatever
//! else shares the call, so results are the same bits in any batch or split.
//!
//! Rows whose length is not a multiple of the lane count end with one more step over the
//! remaining values, zero-padded (zeros add nothing to a sum).

use std::arch::x86_64::*;

use super::formats::{BF16, F16, F32, FloatFormat};

/// Most weight rows per step (the kernel's register budget: running lanes for every
/// weight row and x row of a call, at most 24 of them, beside the loaded weights).
const R: usize = 8;

/// One float format's load of [`Wide::L`] values as f32.
pub(crate) trait DenseFormat: FloatFormat {
    /// # Safety
    /// `p` must have `W::L` values of this format readable; the CPU must run `W`'s set.
    unsafe fn load<W: Wide>(p: *const u8) -> W::V;
}

impl DenseFormat for F32 {
    #[inline(always)]
    unsafe fn load<W: Wide>(p: *const u8) -> W::V {
        // SAFETY: as the caller's contract.
        unsafe { W::load_f32(p.cast()) }
    }
}

impl DenseFormat for F16 {
    #[inline(always)]
    unsafe fn load<W: Wide>(p: *const u8) -> W::V {
        // SAFETY: as the caller's contract.
        unsafe { W::load_f16(p) }
    }
}

impl DenseFormat for BF16 {
    #[inline(always)]
    unsafe fn load<W: Wide>(p: *const u8) -> W::V {
        // SAFETY: as the caller's contract.
        unsafe { W::load_bf16(p) }
    }
}

/// A vector width: its f32 vector and the few operations the kernel needs.
///
/// Every function requires (safety) that the CPU runs the set the implementation is for,
/// and that pointers have `L` values readable.
pub(crate) trait Wide: Copy {
    type V: Copy;
    const L: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn load_f32(p: *const f32) -> Self::V;
    unsafe fn load_f16(p: *const u8) -> Self::V;
    unsafe fn load_bf16(p: *const u8) -> Self::V;
    /// `a · b + c`, rounded once.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The lanes' sum: halves added until one lane is left. The reference for
    /// [`Wide::trees`], which the kernel runs.
    #[cfg(test)]
    unsafe fn sum(v: Self::V) -> f32;
    /// [`Wide::sum`] of `L` vectors at once, their trees interleaved: each level adds the
    /// halves of two vectors' partial sums in one instruction, each lane pairing as in
    /// `sum`, so the bits are the same. Vector `i` is at `(L / 4)·(i mod 4) + i / 4` of `a`
    /// (slots past `L` unused) and its sum comes out at `i`: the trees' output order is that
    /// transpose.
    unsafe fn trees(a: [Self::V; 16]) -> [f32; 16];
    /// [`Wide::sum`] of each vector, `L` at a time through [`Wide::trees`]. (By value: a
    /// reference would keep a kernel's running lanes in memory.)
    #[inline(always)]
    unsafe fn sums<const J: usize, const RJ: usize>(v: [[Self::V; J]; RJ]) -> [[f32; J]; RJ] {
        let mut out = [[0.0f32; J]; RJ];
        for first in (0..J * RJ).step_by(Self::L) {
            // SAFETY: the trait's contract.
            let mut a = [unsafe { Self::zero() }; 16];
            // A constant bound (not `min(L, rest)`) lets the loop unroll: with the other, the
            // AVX-512 kernel ran at 28 GMAC/s instead of 45.
            for i in 0..Self::L {
                let m = first + i;
                if m < J * RJ {
                    a[Self::L / 4 * (i % 4) + i / 4] = v[m / J][m % J];
                }
            }
            // SAFETY: the trait's contract.
            let lanes = unsafe { Self::trees(a) };
            for (i, lane) in lanes.iter().enumerate().take(Self::L.min(J * RJ - first)) {
                let m = first + i;
                out[m / J][m % J] = *lane;
            }
        }
        out
    }
}

/// 16 lanes (AVX-512).
#[derive(Clone, Copy)]
pub(crate) struct W512;

impl Wide for W512 {
    type V = __m512;
    const L: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: the trait's contract.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> __m512 {
        // SAFETY: the trait's contract.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> __m512 {
        // SAFETY: the trait's contract (16 f16 values are 32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u8) -> __m512 {
        // SAFETY: the trait's contract. A bf16 is the high half of its f32.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: the trait's contract.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[cfg(test)]
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        // SAFETY: the trait's contract.
        unsafe {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            let v = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
            W256::sum(v)
        }
    }
    /// Levels of lanes `i` and `i + 8` (two vectors' eight partial sums in one), `+ 4` (four
    /// vectors', one a 128-bit quarter), `+ 2` and `+ 1` (within each quarter): 15 adds and
    /// 30 shuffles for sixteen sums, against 64 and 64 one at a time.
    #[inline(always)]
    unsafe fn trees(a: [__m512; 16]) -> [f32; 16] {
        // SAFETY: the trait's contract (avx512f).
        unsafe {
            let mut c = [_mm512_setzero_ps(); 8];
            for m in 0..8 {
                let (x, y) = (a[2 * m], a[2 * m + 1]);
                c[m] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y));
            }
            let mut e = [_mm512_setzero_ps(); 4];
            for p in 0..4 {
                let (x, y) = (c[2 * p], c[2 * p + 1]);
                e[p] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y));
            }
            let mut g = [_mm512_setzero_ps(); 2];
            for q in 0..2 {
                let (x, y) = (_mm512_castps_pd(e[2 * q]), _mm512_castps_pd(e[2 * q + 1]));
                g[q] = _mm512_add_ps(
                    _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                    _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
                );
            }
            let s = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(g[0], g[1]), _mm512_shuffle_ps::<0xDD>(g[0], g[1]));
            let mut lanes = [0.0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), s);
            lanes
        }
    }
}

/// 8 lanes (AVX2).
#[derive(Clone, Copy)]
pub(crate) struct W256;

impl Wide for W256 {
    type V = __m256;
    const L: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: the trait's contract.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> __m256 {
        // SAFETY: the trait's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u8) -> __m256 {
        // SAFETY: the trait's contract (8 f16 values are 16 bytes).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u8) -> __m256 {
        // SAFETY: the trait's contract.
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: the trait's contract.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[cfg(test)]
    #[inline(always)]
    unsafe fn sum(v: __m256) -> f32 {
        // SAFETY: the trait's contract.
        unsafe {
            let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
            let v = _mm_add_ss(v, _mm_movehdup_ps(v));
            _mm_cvtss_f32(v)
        }
    }
    /// Levels of lanes `i` and `i + 4` (two vectors' four partial sums in one), `+ 2`
    /// (within each half) and `+ 1`; the first eight of `a`.
    #[inline(always)]
    unsafe fn trees(a: [__m256; 16]) -> [f32; 16] {
        // SAFETY: the trait's contract (avx).
        unsafe {
            let mut c = [_mm256_setzero_ps(); 4];
            for m in 0..4 {
                let (x, y) = (a[2 * m], a[2 * m + 1]);
                c[m] = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x, y), _mm256_permute2f128_ps::<0x31>(x, y));
            }
            let mut e = [_mm256_setzero_ps(); 2];
            for p in 0..2 {
                let (x, y) = (_mm256_castps_pd(c[2 * p]), _mm256_castps_pd(c[2 * p + 1]));
                e[p] = _mm256_add_ps(
                    _mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                    _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)),
                );
            }
            let s = _mm256_add_ps(_mm256_shuffle_ps::<0x88>(e[0], e[1]), _mm256_shuffle_ps::<0xDD>(e[0], e[1]));
            let mut lanes = [0.0f32; 16];
            _mm256_storeu_ps(lanes.as_mut_ptr(), s);
            lanes
        }
    }
}

/// `W[r] · x` for each of the `count` rows of `row_bytes` in `rows` (format `F`, `cols`
/// values a row) and each x row of `xs`, handed to `emit` with the row's index; `prefetch`: the
/// weights stream from memory (see below).
///
/// # Panics
/// If `rows` is shorter than `count` rows of `cols` values, or an x row is shorter than
/// `cols`, or `xs` has more than 8 rows.
///
/// # Safety
/// The CPU must run `W`'s instruction set.
#[inline(always)]
pub(crate) unsafe fn dense<W: Wide, F: DenseFormat>(
    rows: &[u8],
    cols: usize,
    count: usize,
    xs: &[&[f32]],
    prefetch: bool,
    emit: impl FnMut(usize, &[f32]),
) {
    // Weight rows per step by x rows, so that their running lanes fit 24 registers.
    macro_rules! run {
        ($j:literal, $r:literal) => {
            // SAFETY: the caller's contract.
            unsafe { dense_rj::<W, F, $r, $j>(rows, cols, count, xs.try_into().expect("x rows"), prefetch, emit) }
        };
    }
    match xs.len() {
        0 => {}
        1 => run!(1, 8),
        2 => run!(2, 8),
        3 => run!(3, 8),
        4 => run!(4, 6),
        5 => run!(5, 4),
        6 => run!(6, 4),
        7 => run!(7, 3),
        8 => run!(8, 3),
        n => panic!("{n} x rows"),
    }
}

/// [`dense`] with `RJ` weight rows a step and `J` x rows.
///
/// # Safety
/// As [`dense`].
#[inline(always)]
unsafe fn dense_rj<W: Wide, F: DenseFormat, const RJ: usize, const J: usize>(
    rows: &[u8],
    cols: usize,
    count: usize,
    xs: &[&[f32]; J],
    prefetch: bool,
    mut emit: impl FnMut(usize, &[f32]),
) {
    const { assert!(RJ <= R) };
    let vb = size_of::<F::Block>();
    let row_bytes = cols * vb;
    assert!(rows.len() >= count * row_bytes, "{} bytes for {count} rows of {cols}", rows.len());
    for x in xs {
        assert!(x.len() >= cols, "an x row of {} values for rows of {cols}", x.len());
    }
    let (steps, tail) = (cols / W::L, cols % W::L);
    // The tail, zero-padded: x rows once per call, weight rows per group.
    let mut xt = [[0.0f32; 16]; J];
    for (t, x) in xt.iter_mut().zip(xs) {
        t[..tail].copy_from_slice(&x[steps * W::L..cols]);
    }
    for r0 in (0..count).step_by(RJ) {
        let live = (count - r0).min(RJ);
        // Rows past the last repeat it; their results are dropped.
        let w: [*const u8; RJ] = std::array::from_fn(|r| rows[(r0 + r.min(live - 1)) * row_bytes..].as_ptr());
        // SAFETY (every load below): step `s < steps` reads values `s·L..(s + 1)·L ≤ cols`
        // of a weight row (`rows` holds `count` rows of `cols`) and of an x row (`cols` or
        // more values); the CPU runs `W`'s set by the caller's contract.
        let mut acc = [[unsafe { W::zero() }; J]; RJ];
        // With `prefetch` (weights streaming from memory), the next group's rows, spread over
        // this group's steps, into L2: with several x rows a group takes long enough that the
        // hardware prefetcher falls behind. A lone x row streams fast enough for the hardware
        // alone, and weights already in L2 (many x tiles over one row group) gain nothing:
        // both measured slower with it.
        let next = &rows[((r0 + RJ).min(count) * row_bytes)..((r0 + 2 * RJ).min(count) * row_bytes)];
        let lines = next.len().div_ceil(64);
        let per_step = if prefetch && J > 1 { lines.div_ceil(steps.max(1)) } else { 0 };
        for s in 0..steps {
            for line in (s * per_step).min(lines)..((s + 1) * per_step).min(lines) {
                // SAFETY: `line * 64 < next.len()`, so the address is inside `next`.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(next.as_ptr().add(line * 64).cast()) };
            }
            let wv: [W::V; RJ] = std::array::from_fn(|r| unsafe { F::load::<W>(w[r].add(s * W::L * vb)) });
            for j in 0..J {
                let xv = unsafe { W::load_f32(xs[j].as_ptr().add(s * W::L)) };
                for r in 0..RJ {
                    acc[r][j] = unsafe { W::fma(wv[r], xv, acc[r][j]) };
                }
            }
        }
        if tail > 0 {
            for r in 0..RJ {
                let row = &rows[(r0 + r.min(live - 1)) * row_bytes..][..row_bytes];
                let mut wt = [0.0f32; 16];
                for (v, b) in wt.iter_mut().zip(bytemuck::cast_slice::<u8, F::Block>(&row[steps * W::L * vb..])) {
                    *v = F::value(*b);
                }
                // SAFETY: `wt` and `xt[j]` hold 16 ≥ L values; the set as above.
                let wv = unsafe { W::load_f32(wt.as_ptr()) };
                for j in 0..J {
                    acc[r][j] = unsafe { W::fma(wv, W::load_f32(xt[j].as_ptr()), acc[r][j]) };
                }
            }
        }
        // SAFETY: the set as above.
        let out = unsafe { W::sums(acc) };
        for (r, out) in out.iter().enumerate().take(live) {
            emit(r0 + r, out);
        }
    }
}

/// The float kernels on AVX-512.
///
/// # Safety
/// The CPU must run avx512f/bw/vl, avx2, fma and f16c.
///
/// # Panics
/// As [`dense`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c")]
pub(crate) unsafe fn avx512<F: DenseFormat>(
    rows: &[u8],
    cols: usize,
    count: usize,
    xs: &[&[f32]],
    prefetch: bool,
    emit: impl FnMut(usize, &[f32]),
) {
    // SAFETY: the caller's contract.
    unsafe { dense::<W512, F>(rows, cols, count, xs, prefetch, emit) }
}

/// The float kernels on AVX2.
///
/// # Safety
/// The CPU must run avx2, fma and f16c.
///
/// # Panics
/// As [`dense`].
#[target_feature(enable = "avx,avx2,fma,f16c")]
pub(crate) unsafe fn avx2<F: DenseFormat>(
    rows: &[u8],
    cols: usize,
    count: usize,
    xs: &[&[f32]],
    prefetch: bool,
    emit: impl FnMut(usize, &[f32]),
) {
    // SAFETY: the caller's contract.
    unsafe { dense::<W256, F>(rows, cols, count, xs, prefetch, emit) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many vectors' trees at once (sixteen on AVX-512, eight on AVX2) give each vector the
    /// bits of its own [`Wide::sum`], for one vector and for each (x rows, weight rows) shape `dense` runs (8 to 24
    /// vectors), with values of mixed sign and scale: another pairing of lanes (adjacent
    /// lanes first) rounds 61% of such vectors differently (checked in numpy).
    #[test]
    fn summing_many_vectors_at_once_gives_the_bits_of_one_at_a_time() {
        /// Random vectors of `W`'s width in each shape `dense` runs, summed both ways.
        ///
        /// # Safety
        /// The CPU must run `W`'s set.
        #[inline(always)]
        unsafe fn check<W: Wide, const J: usize, const RJ: usize>(seed: u32) {
            let mut s = seed;
            let mut value = || {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let m = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                m * [1.0, 1e-3, 1e4, 3.0][(s & 3) as usize]
            };
            let lanes: [[[f32; 16]; J]; RJ] =
                std::array::from_fn(|_| std::array::from_fn(|_| std::array::from_fn(|_| value())));
            // SAFETY (the loads and sums): the caller's contract; each array holds 16 ≥ `W::L`
            // values.
            let mut v = [[unsafe { W::zero() }; J]; RJ];
            for r in 0..RJ {
                for j in 0..J {
                    v[r][j] = unsafe { W::load_f32(lanes[r][j].as_ptr()) };
                }
            }
            let many = unsafe { W::sums(v) };
            for r in 0..RJ {
                for j in 0..J {
                    let one = unsafe { W::sum(v[r][j]) };
                    assert_eq!(many[r][j].to_bits(), one.to_bits(), "{} lanes, {RJ} × {J}, vector ({r}, {j})", W::L);
                }
            }
        }
        #[target_feature(enable = "avx512f,avx")]
        unsafe fn wide(seed: u32) {
            // SAFETY: the caller's contract.
            unsafe { shapes::<W512>(seed) }
        }
        #[target_feature(enable = "avx")]
        unsafe fn narrow(seed: u32) {
            // SAFETY: the caller's contract.
            unsafe { shapes::<W256>(seed) }
        }
        #[inline(always)]
        unsafe fn shapes<W: Wide>(seed: u32) {
            // SAFETY: the caller's contract.
            unsafe {
                check::<W, 1, 1>(seed);
                check::<W, 1, 8>(seed);
                check::<W, 2, 8>(seed);
                check::<W, 3, 8>(seed);
                check::<W, 4, 6>(seed);
                check::<W, 5, 4>(seed);
                check::<W, 6, 4>(seed);
                check::<W, 7, 3>(seed);
                check::<W, 8, 3>(seed);
            }
        }
        for seed in 0..20 {
            // SAFETY: each set runs only where its features are detected.
            unsafe {
                if std::is_x86_feature_detected!("avx512f") {
                    wide(seed);
                }
                if std::is_x86_feature_detected!("avx") {
                    narrow(seed);
                }
            }
        }
    }
}
