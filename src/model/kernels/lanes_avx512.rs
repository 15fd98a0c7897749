//! [`Lanes`] on AVX-512: 16 rows per tile in `zmm` registers, and the 512-bit `vpdpbusd`.

use std::arch::asm;
use std::arch::x86_64::*;

use super::lanes::{Dpbusd, Floats, Lanes};

/// Proof that the CPU runs avx512f/bw/vl with avx2, fma and f16c.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512(());

impl Avx512 {
    /// # Safety
    /// The CPU must run avx512f, avx512bw, avx512vl, avx2, fma and f16c.
    pub unsafe fn new() -> Self {
        Avx512(())
    }
}

/// 16 lanes of 32 bits.
#[derive(Clone, Copy)]
pub(crate) struct Z(__m512i);

/// 16 f32 lanes.
#[derive(Clone, Copy)]
pub(crate) struct Zf(__m512);

/// Wraps an expression of AVX-512 intrinsics.
macro_rules! avx512 {
    ($e:expr) => {
        // SAFETY: a `Z` or `Zf` only exists once an `Avx512` token does, and the token is only
        // made where the CPU runs avx512f/bw/vl, avx2, fma and f16c (`Avx512::new`).
        unsafe { $e }
    };
}

impl Lanes for Z {
    type F = Zf;
    type Isa = Avx512;
    const L: usize = 16;

    #[inline(always)]
    fn splat(_: Avx512, v: u32) -> Self {
        Z(avx512!(_mm512_set1_epi32(v as i32)))
    }
    #[inline(always)]
    fn bytes(_: Avx512, b: [u8; 16]) -> Self {
        Z(avx512!(_mm512_broadcast_i32x4(_mm_loadu_si128(b.as_ptr().cast()))))
    }
    #[inline(always)]
    fn fsplat(_: Avx512, v: f32) -> Zf {
        Zf(avx512!(_mm512_set1_ps(v)))
    }
    #[inline(always)]
    fn and(self, o: Self) -> Self {
        Z(avx512!(_mm512_and_si512(self.0, o.0)))
    }
    #[inline(always)]
    fn or(self, o: Self) -> Self {
        Z(avx512!(_mm512_or_si512(self.0, o.0)))
    }
    #[inline(always)]
    fn sub8(self, o: Self) -> Self {
        Z(avx512!(_mm512_sub_epi8(self.0, o.0)))
    }
    #[inline(always)]
    fn add32(self, o: Self) -> Self {
        Z(avx512!(_mm512_add_epi32(self.0, o.0)))
    }
    #[inline(always)]
    fn sub32(self, o: Self) -> Self {
        Z(avx512!(_mm512_sub_epi32(self.0, o.0)))
    }
    #[inline(always)]
    fn shr16(self, n: u32) -> Self {
        Z(avx512!(_mm512_srl_epi16(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn shl16(self, n: u32) -> Self {
        Z(avx512!(_mm512_sll_epi16(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn shr32(self, n: u32) -> Self {
        Z(avx512!(_mm512_srl_epi32(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn shl32(self, n: u32) -> Self {
        Z(avx512!(_mm512_sll_epi32(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn sar32(self, n: u32) -> Self {
        Z(avx512!(_mm512_sra_epi32(self.0, _mm_cvtsi32_si128(n as i32))))
    }
    #[inline(always)]
    fn lookup(self, idx: Self) -> Self {
        Z(avx512!(_mm512_shuffle_epi8(self.0, idx.0)))
    }
    #[inline(always)]
    fn eq8(self, o: Self) -> Self {
        Z(avx512!(_mm512_movm_epi8(_mm512_cmpeq_epi8_mask(self.0, o.0))))
    }
    #[inline(always)]
    fn to_f32(self) -> Zf {
        Zf(avx512!(_mm512_cvtepi32_ps(self.0)))
    }
    #[inline(always)]
    fn f16_lo(self) -> Zf {
        Zf(avx512!(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(self.0))))
    }

    /// A masked broadcast per lane (a gather here stalled single-row decode on its cache
    /// misses).
    #[inline(always)]
    unsafe fn dword_at(_: Avx512, base: *const u8, offsets: &[usize; 16]) -> Self {
        let mut v = avx512!(_mm512_setzero_si512());
        for (j, &off) in offsets.iter().enumerate() {
            // SAFETY: the caller guarantees 4 readable bytes at `base + off`; the read is
            // unaligned.
            let x = unsafe { base.add(off).cast::<i32>().read_unaligned() };
            v = avx512!(_mm512_mask_set1_epi32(v, 1 << j, x));
        }
        Z(v)
    }

    /// Four rows per register (one per 128 bits), then two rounds of `vpermt2d`.
    #[inline(always)]
    unsafe fn columns16(_: Avx512, base: *const u8, offsets: &[usize; 16]) -> [Self; 4] {
        let mut q = [avx512!(_mm512_setzero_si512()); 4];
        for (v, q) in q.iter_mut().enumerate() {
            // SAFETY: the caller guarantees 16 readable bytes at each `base + offsets[j]`; the
            // loads are unaligned.
            let [r0, r1, r2, r3] = unsafe {
                let rows = &offsets[4 * v..4 * v + 4];
                [
                    _mm_loadu_si128(base.add(rows[0]).cast()),
                    _mm_loadu_si128(base.add(rows[1]).cast()),
                    _mm_loadu_si128(base.add(rows[2]).cast()),
                    _mm_loadu_si128(base.add(rows[3]).cast()),
                ]
            };
            *q = avx512!({
                let z = _mm512_inserti32x4::<1>(_mm512_castsi128_si512(r0), r1);
                _mm512_inserti32x4::<3>(_mm512_inserti32x4::<2>(z, r2), r3)
            });
        }
        // Dwords u ∈ {0, 1} (`lo`) or {2, 3} (`hi`) of the first two inputs' eight rows...
        let (pair_lo, pair_hi) = (ints(&PAIR_LO), ints(&PAIR_HI));
        // ...then of all 16 rows.
        let (first, second) = (ints(&FIRST), ints(&SECOND));
        avx512!({
            let lo01 = _mm512_permutex2var_epi32(q[0], pair_lo, q[1]);
            let lo23 = _mm512_permutex2var_epi32(q[2], pair_lo, q[3]);
            let hi01 = _mm512_permutex2var_epi32(q[0], pair_hi, q[1]);
            let hi23 = _mm512_permutex2var_epi32(q[2], pair_hi, q[3]);
            [
                Z(_mm512_permutex2var_epi32(lo01, first, lo23)),
                Z(_mm512_permutex2var_epi32(lo01, second, lo23)),
                Z(_mm512_permutex2var_epi32(hi01, first, hi23)),
                Z(_mm512_permutex2var_epi32(hi01, second, hi23)),
            ]
        })
    }
}

/// The 16 integers of `v`.
#[inline(always)]
fn ints(v: &[i32; 16]) -> __m512i {
    avx512!(_mm512_loadu_si512(v.as_ptr().cast()))
}

const PAIR_LO: [i32; 16] = [0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29];
const PAIR_HI: [i32; 16] = [2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31];
const FIRST: [i32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23];
const SECOND: [i32; 16] = [8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31];

impl Floats for Zf {
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Zf(avx512!(_mm512_add_ps(self.0, o.0)))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Zf(avx512!(_mm512_mul_ps(self.0, o.0)))
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        Zf(avx512!(_mm512_fmadd_ps(self.0, a.0, b.0)))
    }
    #[inline(always)]
    fn neg(self) -> Self {
        Zf(avx512!(_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(self.0), _mm512_set1_epi32(i32::MIN)))))
    }
    #[inline(always)]
    fn store(self, out: &mut [f32; 16]) {
        avx512!(_mm512_storeu_ps(out.as_mut_ptr(), self.0))
    }
}

/// Proof that the CPU runs avx512vnni (besides [`Avx512`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Vnni512(());

impl Vnni512 {
    /// # Safety
    /// The CPU must run avx512vnni.
    pub unsafe fn new() -> Self {
        Vnni512(())
    }
}

impl Dpbusd<Z> for Vnni512 {
    #[inline(always)]
    fn dpbusd(self, acc: Z, a: Z, b: Z) -> Z {
        // SAFETY: a `Vnni512` exists only where the CPU runs avx512vnni, and `Z` values only
        // where it runs avx512f.
        Z(unsafe { vpdpbusd(acc.0, a.0, b.0) })
    }
}

/// `acc + Σ a·b` over each lane's four unsigned bytes of `a` and signed bytes of `b`. In
/// `asm!`, so that generic callers need no feature enabled (the intrinsic would), and LLVM
/// cannot split it into two instructions as it has split `vpdpwssd`.
#[target_feature(enable = "avx512f")]
#[inline]
fn vpdpbusd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; callers hold a `Vnni512`, so the CPU runs avx512vnni.
    unsafe {
        asm!("vpdpbusd {acc}, {a}, {b}", acc = inout(zmm_reg) acc, a = in(zmm_reg) a, b = in(zmm_reg) b,
            options(pure, nomem, nostack));
    }
    acc
}
