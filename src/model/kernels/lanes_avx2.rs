//! [`Lanes`] on AVX2: 8 rows per tile in `ymm` registers, and the 256-bit `vpdpbusd` of
//! AVX-VNNI (or its AVX-512 VNNI encoding, on CPUs that have that instead).

use std::arch::asm;
use std::arch::x86_64::*;

use super::lanes::{Dpbusd, Floats, Lanes};

/// Proof that the CPU runs avx2, fma and f16c.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

impl Avx2 {
    /// # Safety
    /// The CPU must run avx2, fma and f16c.
    pub unsafe fn new() -> Self {
        Avx2(())
    }
}

/// 8 lanes of 32 bits.
#[derive(Clone, Copy)]
pub(crate) struct Y(__m256i);

/// 8 f32 lanes.
#[derive(Clone, Copy)]
pub(crate) struct Yf(__m256);

/// Wraps an expression of AVX2 intrinsics.
macro_rules! avx2 {
    ($e:expr) => {
        // SAFETY: a `Y` or `Yf` only exists once an `Avx2` token does, and the token is only
        // made where the CPU runs avx2, fma and f16c (`Avx2::new`).
        unsafe { $e }
    };
}

impl Lanes for Y {
    type F = Yf;
    type Isa = Avx2;
    const L: usize = 8;

    #[inline(always)]
    fn splat(_: Avx2, v: u32) -> Self {
        Y(avx2!(_mm256_set1_epi32(v as i32)))
    }
    #[inline(always)]
    fn bytes(_: Avx2, b: [u8; 16]) -> Self {
        Y(avx2!(_mm256_broadcastsi128_si256(_mm_loadu_si128(b.as_ptr().cast()))))
    }
    #[inline(always)]
    fn fsplat(_: Avx2, v: f32) -> Yf {
        Yf(avx2!(_mm256_set1_ps(v)))
    }
    #[inline(always)]
    fn and(self, o: Self) -> Self {
        Y(avx2!(_mm256_and_si256(self.0, o.0)))
    }
    #[inline(always)]
    fn or(self, o: Self) -> Self {
        Y(avx2!(_mm256_or_si256(self.0, o.0)))
    }
    #[inline(always)]
    fn sub8(self, o: Self) -> Self {
        Y(avx2!(_mm256_sub_epi8(self.0, o.0)))
    }
    #[inline(always)]
    fn add32(self, o: Self) -> Self {
        Y(avx2!(_mm256_add_epi32(self.0, o.0)))
    }
    #[inline(always)]
    fn sub32(self, o: Self) -> Self {
        Y(avx2!(_mm256_sub_epi32(self.0, o.0)))
    }
    #[inline(always)]
    fn shr16(self, n: u32) -> Self {
        Y(avx2!(_mm256_srl_epi16(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn shl16(self, n: u32) -> Self {
        Y(avx2!(_mm256_sll_epi16(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn shr32(self, n: u32) -> Self {
        Y(avx2!(_mm256_srl_epi32(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn shl32(self, n: u32) -> Self {
        Y(avx2!(_mm256_sll_epi32(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn sar32(self, n: u32) -> Self {
        Y(avx2!(_mm256_sra_epi32(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn lookup(self, idx: Self) -> Self {
        Y(avx2!(_mm256_shuffle_epi8(self.0, idx.0)))
    }
    #[inline(always)]
    fn eq8(self, o: Self) -> Self {
        Y(avx2!(_mm256_cmpeq_epi8(self.0, o.0)))
    }
    #[inline(always)]
    fn to_f32(self) -> Yf {
        Yf(avx2!(_mm256_cvtepi32_ps(self.0)))
    }
    #[inline(always)]
    fn f16_lo(self) -> Yf {
        // The low halves of each 128 bits' four lanes into its low 8 bytes, then the two
        // 128-bit halves' low 8 bytes side by side.
        const HALVES: [i8; 16] = [0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1];
        Yf(avx2!({
            let ctl = _mm256_broadcastsi128_si256(_mm_loadu_si128(HALVES.as_ptr().cast()));
            let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(self.0, ctl));
            _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
        }))
    }

    #[inline(always)]
    unsafe fn dword_at(_: Avx2, base: *const u8, offsets: &[usize; 16]) -> Self {
        let mut v = [0i32; 8];
        for (v, &off) in v.iter_mut().zip(offsets) {
            // SAFETY: the caller guarantees 4 readable bytes at `base + off`; the read is
            // unaligned.
            *v = unsafe { base.add(off).cast::<i32>().read_unaligned() };
        }
        Y(avx2!(_mm256_loadu_si256(v.as_ptr().cast())))
    }

    /// Rows `k` and `k + 4` per register, then a 4×4 transpose in each 128 bits.
    #[inline(always)]
    unsafe fn columns16(_: Avx2, base: *const u8, offsets: &[usize; 16]) -> [Self; 4] {
        let mut r = [avx2!(_mm256_setzero_si256()); 4];
        for (k, r) in r.iter_mut().enumerate() {
            // SAFETY: the caller guarantees 16 readable bytes at each `base + offsets[j]`; the
            // loads are unaligned.
            let (a, b) = unsafe {
                (_mm_loadu_si128(base.add(offsets[k]).cast()), _mm_loadu_si128(base.add(offsets[k + 4]).cast()))
            };
            *r = avx2!(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(a), b));
        }
        avx2!({
            let [r0, r1, r2, r3] = r;
            let (t0, t1) = (_mm256_unpacklo_epi32(r0, r1), _mm256_unpackhi_epi32(r0, r1));
            let (t2, t3) = (_mm256_unpacklo_epi32(r2, r3), _mm256_unpackhi_epi32(r2, r3));
            [
                Y(_mm256_unpacklo_epi64(t0, t2)),
                Y(_mm256_unpackhi_epi64(t0, t2)),
                Y(_mm256_unpacklo_epi64(t1, t3)),
                Y(_mm256_unpackhi_epi64(t1, t3)),
            ]
        })
    }
}

impl Floats for Yf {
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Yf(avx2!(_mm256_add_ps(self.0, o.0)))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Yf(avx2!(_mm256_mul_ps(self.0, o.0)))
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        Yf(avx2!(_mm256_fmadd_ps(self.0, a.0, b.0)))
    }
    #[inline(always)]
    fn neg(self) -> Self {
        Yf(avx2!(_mm256_xor_ps(self.0, _mm256_set1_ps(-0.0))))
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; 16]) {
        avx2!(_mm256_storeu_ps(out.as_mut_ptr(), self.0))
    }
}

/// Proof that the CPU runs AVX-VNNI: `vpdpbusd` on `ymm` in its VEX encoding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AvxVnni(());

impl AvxVnni {
    /// # Safety
    /// The CPU must run avxvnni.
    pub unsafe fn new() -> Self {
        AvxVnni(())
    }
}

/// Proof that the CPU runs avx512vnni and avx512vl: the same 256-bit `vpdpbusd` in its EVEX
/// encoding, so CPUs with AVX-512 VNNI but no AVX-VNNI (this project's Zen 4 among them) run
/// the 256-bit kernels too.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vnni256Evex(());

impl Vnni256Evex {
    /// # Safety
    /// The CPU must run avx512vnni and avx512vl.
    pub unsafe fn new() -> Self {
        Vnni256Evex(())
    }
}

impl Dpbusd<Y> for AvxVnni {
    #[inline(always)]
    fn dpbusd(self, acc: Y, a: Y, b: Y) -> Y {
        // SAFETY: an `AvxVnni` exists only where the CPU runs avxvnni, and `Y` values only
        // where it runs avx2.
        Y(unsafe { vpdpbusd_vex(acc.0, a.0, b.0) })
    }
}

impl Dpbusd<Y> for Vnni256Evex {
    #[inline(always)]
    fn dpbusd(self, acc: Y, a: Y, b: Y) -> Y {
        // SAFETY: a `Vnni256Evex` exists only where the CPU runs avx512vnni and avx512vl, and
        // `Y` values only where it runs avx2.
        Y(unsafe { vpdpbusd_evex(acc.0, a.0, b.0) })
    }
}

/// `acc + Σ a·b` over each lane's four unsigned bytes of `a` and signed bytes of `b`, VEX
/// encoded (AVX-VNNI). In `asm!` so that callers need no feature beyond AVX.
#[target_feature(enable = "avx")]
#[inline]
fn vpdpbusd_vex(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; callers hold an `AvxVnni`.
    unsafe {
        asm!("{{vex}} vpdpbusd {acc}, {a}, {b}", acc = inout(ymm_reg) acc, a = in(ymm_reg) a, b = in(ymm_reg) b,
            options(pure, nomem, nostack));
    }
    acc
}

/// [`vpdpbusd_vex`] EVEX encoded (AVX-512 VNNI with VL).
#[target_feature(enable = "avx")]
#[inline]
fn vpdpbusd_evex(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; callers hold a `Vnni256Evex`.
    unsafe {
        asm!("{{evex}} vpdpbusd {acc}, {a}, {b}", acc = inout(ymm_reg) acc, a = in(ymm_reg) a, b = in(ymm_reg) b,
            options(pure, nomem, nostack));
    }
    acc
}
