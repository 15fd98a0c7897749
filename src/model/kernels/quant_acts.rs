//! Activations quantized to 16-bit integers, for the VNNI kernels.
//!
//! Each 32-value block of an x row becomes `x_c ≈ d·q_c` with `d = max|x|/32767` and
//! `q_c = round(x_c·32767/max|x|)`, rounded to nearest even. The rounding error is at most
//! `max|x|/65534` per value, about 1.5e-5 of the block's largest value: under an f16's
//! (4.9e-4), and far under the 8-bit blocks llama.cpp uses (4e-3), which moved log-probabilities
//! past the model runtime's 0.3 bar here. The block also keeps `d·Σq` over its 32 values and
//! over each half, so a weight format with an offset (`w = scale·n + offset`) adds
//! `offset·d·Σq` for the offset's share.
//!
//! The kernels multiply bytes (`vpdpbusd`: unsigned bytes by signed bytes), so each value is
//! also kept as the two bytes of `q + 32768`: `Σ w·q = 256·Σ w·hi + Σ w·lo − 32768·Σ w`, all
//! exact in 32-bit integers.
//!
//! [`quantize_block`] is the definition; the AVX-512 quantizer gives its bits (tested), and
//! [`dot`] is the tests' oracle for every kernel that reads them.

use super::formats::{Format, FormatFn, Ints, QK, blocks, with_format};
use crate::model::ggml_type::GgmlType;

/// The largest quantized magnitude.
const QMAX: f32 = 32767.0;

/// `n` x rows of `cols` values, quantized per block. Grows to the largest call, then never
/// allocates.
#[derive(Default, Debug)]
pub struct QuantActs {
    q: Vec<i16>,
    planes: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
    s16: Vec<f32>,
    cols: usize,
}

/// One quantized x row: values `q`; per block the high then the low bytes of `q + 32768`
/// (64 bytes, `planes`), its scale `d`, `d·Σq` (`s`) and `d·Σq` of each half (`s16`).
#[derive(Clone, Copy, Debug)]
pub struct QRow<'a> {
    pub q: &'a [i16],
    pub planes: &'a [u8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub s16: &'a [f32],
}

/// What [`quantize_block`] gives besides the values: `d`, `d·Σq` and `d·Σq` of each half.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockSums {
    pub d: f32,
    pub s: f32,
    pub s16: [f32; 2],
}

impl QuantActs {
    /// Quantizes the `x.len() / cols` rows of `x`.
    ///
    /// # Panics
    /// If `cols` is not a whole number of blocks or `x` not a whole number of rows.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        self.size_for(x, cols);
        fill(self.parts(x), quantize_block);
    }

    /// [`QuantActs::quantize`] with AVX-512 (the same bits).
    ///
    /// # Safety
    /// The CPU must have avx512f.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_avx512(&mut self, x: &[f32], cols: usize) {
        self.size_for(x, cols);
        // SAFETY: the caller's promise.
        unsafe { fill_avx512(self.parts(x)) };
    }

    /// [`QuantActs::quantize`] (with AVX-512 when `avx512`) in `tasks` runs of rows on the
    /// current rayon pool: each block is quantized by the same code wherever it runs, so the
    /// same bits.
    ///
    /// # Safety
    /// With `avx512`, the CPU must have avx512f.
    pub unsafe fn quantize_par(&mut self, x: &[f32], cols: usize, avx512: bool, tasks: usize) {
        use rayon::prelude::*;
        self.size_for(x, cols);
        let rows = x.len() / cols;
        let per = rows.div_ceil(tasks.max(1)).max(1);
        let (bpr, n) = (cols / QK, per * cols);
        let parts = x
            .par_chunks(n)
            .zip(self.q.par_chunks_mut(n))
            .zip(self.planes.par_chunks_mut(2 * n))
            .zip(self.d.par_chunks_mut(per * bpr))
            .zip(self.s.par_chunks_mut(per * bpr))
            .zip(self.s16.par_chunks_mut(2 * per * bpr));
        parts.for_each(|(((((x, q), planes), d), s), s16)| {
            let part = Parts { x, q, planes, d, s, s16 };
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the caller's promise.
                return unsafe { fill_avx512(part) };
            }
            fill(part, quantize_block);
        });
    }

    /// Sizes the buffers for `x` in rows of `cols`.
    fn size_for(&mut self, x: &[f32], cols: usize) {
        assert!(cols.is_multiple_of(QK) && cols > 0, "{cols} columns is not whole blocks of {QK}");
        assert!(x.len().is_multiple_of(cols), "{} values is not whole rows of {cols}", x.len());
        let blocks = x.len() / QK;
        self.cols = cols;
        self.q.resize(x.len(), 0);
        self.planes.resize(2 * x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        self.s16.resize(2 * blocks, 0.0);
    }

    /// Every buffer, to be filled from `x`.
    fn parts<'a>(&'a mut self, x: &'a [f32]) -> Parts<'a> {
        Parts { x, q: &mut self.q, planes: &mut self.planes, d: &mut self.d, s: &mut self.s, s16: &mut self.s16 }
    }

    /// Row `i` of the last [`QuantActs::quantize`].
    pub fn row(&self, i: usize) -> QRow<'_> {
        let bpr = self.cols / QK;
        QRow {
            q: &self.q[i * self.cols..(i + 1) * self.cols],
            planes: &self.planes[2 * i * self.cols..2 * (i + 1) * self.cols],
            d: &self.d[i * bpr..(i + 1) * bpr],
            s: &self.s[i * bpr..(i + 1) * bpr],
            s16: &self.s16[2 * i * bpr..2 * (i + 1) * bpr],
        }
    }
}

/// Some whole blocks of x and the buffers they quantize into.
struct Parts<'a> {
    x: &'a [f32],
    q: &'a mut [i16],
    planes: &'a mut [u8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    s16: &'a mut [f32],
}

/// Quantizes each block of `p.x` with `block` into the other buffers of `p`.
#[inline(always)]
fn fill(p: Parts, block: impl Fn(&[f32; QK], &mut [i16; QK]) -> BlockSums) {
    let sums = p.d.iter_mut().zip(p.s.iter_mut()).zip(p.s16.chunks_exact_mut(2));
    let parts = p.x.chunks_exact(QK).zip(p.q.chunks_exact_mut(QK)).zip(p.planes.chunks_exact_mut(2 * QK));
    for (((x, q), planes), ((d, s), s16)) in parts.zip(sums) {
        let q: &mut [i16; QK] = q.try_into().expect("a block");
        let sums = block(x.try_into().expect("a block"), q);
        (*d, *s) = (sums.d, sums.s);
        s16.copy_from_slice(&sums.s16);
        let (hi, lo) = planes.split_at_mut(QK);
        for ((h, l), &v) in hi.iter_mut().zip(lo).zip(q.iter()) {
            [*l, *h] = (v as u16 ^ 0x8000).to_le_bytes();
        }
    }
}

/// [`fill`] with the AVX-512 block quantizer.
///
/// # Safety
/// The CPU must have avx512f.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fill_avx512(p: Parts) {
    fill(p, |x, q| quantize_block_avx512(x, q));
}

/// One block: fills `q` and returns its sums. A block holding a NaN or an infinity gets
/// `d = NaN`, so the dot products it enters are NaN, as in f32. A block whose largest
/// magnitude is zero, or so small (under about 1e-34) that its step `32767/max` overflows,
/// is all zeros.
pub fn quantize_block(x: &[f32; QK], q: &mut [i16; QK]) -> BlockSums {
    if !x.iter().all(|v| v.is_finite()) {
        q.fill(0);
        return BlockSums { d: f32::NAN, s: f32::NAN, s16: [f32::NAN; 2] };
    }
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let id = QMAX / amax;
    if !id.is_finite() {
        q.fill(0);
        return BlockSums { d: 0.0, s: 0.0, s16: [0.0; 2] };
    }
    let mut half = [0i32; 2];
    for (c, (q, &x)) in q.iter_mut().zip(x).enumerate() {
        *q = (x * id).round_ties_even().clamp(-QMAX, QMAX) as i16;
        half[c / 16] += i32::from(*q);
    }
    sums(amax / QMAX, half)
}

/// `d` with `d·Σq` over the block and each half.
fn sums(d: f32, half: [i32; 2]) -> BlockSums {
    BlockSums { d, s: d * (half[0] + half[1]) as f32, s16: half.map(|h| d * h as f32) }
}

/// [`quantize_block`] in AVX-512: the same operations on 16 lanes (the float-to-int
/// conversion rounds to nearest even, as `round_ties_even`), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn quantize_block_avx512(x: &[f32; QK], q: &mut [i16; QK]) -> BlockSums {
    use std::arch::x86_64::*;
    // SAFETY: `x` is 32 readable floats; both loads are unaligned.
    let (a, b) = unsafe { (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16))) };
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(b, b);
    if nan != 0 || amax.is_infinite() {
        q.fill(0);
        return BlockSums { d: f32::NAN, s: f32::NAN, s16: [f32::NAN; 2] };
    }
    let id = QMAX / amax;
    if !id.is_finite() {
        q.fill(0);
        return BlockSums { d: 0.0, s: 0.0, s16: [0.0; 2] };
    }
    let id = _mm512_set1_ps(id);
    let (lo, hi) = (_mm512_set1_ps(-QMAX), _mm512_set1_ps(QMAX));
    let round = |v| _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, id), lo), hi));
    let (qa, qb) = (round(a), round(b));
    // SAFETY: `q` is 32 writable i16s; both stores are unaligned.
    unsafe {
        _mm256_storeu_si256(q.as_mut_ptr().cast(), _mm512_cvtepi32_epi16(qa));
        _mm256_storeu_si256(q.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi16(qb));
    }
    sums(amax / QMAX, [_mm512_reduce_add_epi32(qa), _mm512_reduce_add_epi32(qb)])
}

/// The VNNI kernels' arithmetic for weight row `row` of type `t` and x row `x`, one value at
/// a time: for each 32-value block `b` in order, with `I_h` the exact integer dot product of
/// half `h`'s 16 values,
/// - a scale per 32 values: `acc = (I_0 + I_1)·(scale·d) + acc`, then with an offset
///   `acc = offset·s + acc`;
/// - a scale per 16 values: for each half, `acc = I_h·(scale_h·d) + acc`, then with an offset
///   `acc = offset_h·s16_h + acc`,
///
/// each rounded once (fused). `None` for a type without integer kernels (floats).
pub fn dot(t: GgmlType, row: &[u8], x: QRow) -> Option<f32> {
    struct Dot<'a>(&'a [u8], QRow<'a>);
    impl FormatFn for Dot<'_> {
        type Out = f32;
        fn call<F: Format>(self) -> f32 {
            dot_format::<F>(self.0, self.1)
        }
    }
    with_format(t, Dot(row, x))
}

fn dot_format<F: Format>(row: &[u8], x: QRow) -> f32 {
    let (mut ints, mut acc) = (Ints::default(), 0.0f32);
    for (n, blk) in blocks::<F>(row).iter().enumerate() {
        F::decode(blk, &mut ints);
        for k in 0..F::ELEMS / QK {
            let b = n * F::ELEMS / QK + k;
            let half = |h: usize| -> i32 {
                let (w, xq) = (&ints.q[QK * k + 16 * h..][..16], &x.q[QK * b + 16 * h..][..16]);
                w.iter().zip(xq).map(|(&w, &x)| i32::from(w) * i32::from(x)).sum()
            };
            let i = [half(0), half(1)];
            if F::PER_16 {
                for (h, &i) in i.iter().enumerate() {
                    acc = (i as f32).mul_add(ints.scale[2 * k + h] * x.d[b], acc);
                    if F::HAS_OFFSET {
                        acc = ints.offset[2 * k + h].mul_add(x.s16[2 * b + h], acc);
                    }
                }
            } else {
                acc = ((i[0] + i[1]) as f32).mul_add(ints.scale[2 * k] * x.d[b], acc);
                if F::HAS_OFFSET {
                    acc = ints.offset[2 * k].mul_add(x.s[b], acc);
                }
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_keeps_its_largest_value_exactly_and_every_value_within_half_a_step() {
        let mut x = [0.0f32; QK];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i as f32 * 0.37).sin() * if i == 5 { 40.0 } else { 1.0 };
        }
        let mut q = [0i16; QK];
        let BlockSums { d, s, s16 } = quantize_block(&x, &mut q);
        assert_eq!(q[5].unsigned_abs(), 32767);
        for (&q, &x) in q.iter().zip(&x) {
            assert!((f32::from(q) * d - x).abs() <= d * 0.5 * 1.0001, "{q}·{d} vs {x}");
        }
        assert_eq!(s, d * q.iter().map(|&q| i32::from(q)).sum::<i32>() as f32);
        assert_eq!(s16[1], d * q[16..].iter().map(|&q| i32::from(q)).sum::<i32>() as f32);
    }

    #[test]
    fn zero_blocks_are_exact_and_non_finite_blocks_poison_the_dot() {
        let mut q = [1i16; QK];
        assert_eq!(quantize_block(&[0.0; QK], &mut q), BlockSums { d: 0.0, s: 0.0, s16: [0.0; 2] });
        assert_eq!(q, [0; QK]);
        let mut x = [1.0f32; QK];
        x[3] = f32::NAN;
        assert!(quantize_block(&x, &mut q).d.is_nan());
        x[3] = f32::INFINITY;
        assert!(quantize_block(&x, &mut q).d.is_nan());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_quantizer_gives_the_scalar_bits() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut x: Vec<f32> = (0..32 * 40).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.013).collect();
        x[32..64].fill(0.0); // block 1: zeros
        x[100] = f32::NAN; // block 3
        x[200] = f32::NEG_INFINITY; // block 6
        x[256..288].fill(0.0); // block 8: zeros and one NaN
        x[260] = f32::NAN;
        x[288..320].fill(1e-37); // block 9: too small for a finite step
        x[290] = 0.0;
        for (i, v) in x[320..352].iter_mut().enumerate() {
            // block 10: amax 32767, so step 1 and values on .5 ties
            *v = if i == 0 { 32767.0 } else { i as f32 - 15.5 };
        }
        for k in (0..x.len()).step_by(33) {
            x[k] *= 100.0; // an outlier in most blocks
        }
        let (mut a, mut b) = (QuantActs::default(), QuantActs::default());
        a.quantize(&x, 32 * 8);
        // SAFETY: avx512f was detected above.
        unsafe { b.quantize_avx512(&x, 32 * 8) };
        assert_eq!(a.q, b.q);
        assert_eq!(a.planes, b.planes);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.d), bits(&b.d));
        assert_eq!(bits(&a.s), bits(&b.s));
        assert_eq!(bits(&a.s16), bits(&b.s16));
        assert!(a.d[1] == 0.0 && a.d[3].is_nan() && a.d[6].is_nan() && a.d[8].is_nan());
        assert_eq!((a.d[9], a.s[9]), (0.0, 0.0));
        assert_eq!(&a.q[320..324], &[32767, -14, -14, -12]); // -14.5 → -14, -13.5 → -14, -12.5 → -12
    }

    /// Rows quantized in runs on a pool (any number of runs, rows not a multiple of it, a
    /// buffer left longer by an earlier call) are the bits of one run on this thread.
    #[test]
    fn rows_quantized_in_runs_on_a_pool_give_the_bits_of_one_run() {
        let cols = 32 * 3;
        let x: Vec<f32> = (0..cols * 37).map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 0.0173).collect();
        let mut one = QuantActs::default();
        one.quantize(&x, cols);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let wide = cfg!(target_arch = "x86_64") && std::is_x86_feature_detected!("avx512f");
        for avx512 in [false, wide] {
            for tasks in [1, 2, 3, 5, 36, 37, 64] {
                let mut runs = QuantActs::default();
                runs.quantize(&vec![1.0; cols * 50], cols);
                // SAFETY: `avx512` only where the CPU has avx512f.
                pool.install(|| unsafe { runs.quantize_par(&x, cols, avx512, tasks) });
                assert_eq!(runs.q, one.q, "{tasks} runs");
                assert_eq!(runs.planes, one.planes, "{tasks} runs");
                assert_eq!(
                    (bits(&runs.d), bits(&runs.s), bits(&runs.s16)),
                    (bits(&one.d), bits(&one.s), bits(&one.s16))
                );
            }
        }
    }

    #[test]
    fn rows_map_to_their_blocks() {
        let x: Vec<f32> = (0..128).map(|i| i as f32 - 60.0).collect();
        let mut acts = QuantActs::default();
        acts.quantize(&x, 64);
        let r1 = acts.row(1);
        assert_eq!((r1.q.len(), r1.planes.len(), r1.d.len(), r1.s.len(), r1.s16.len()), (64, 128, 2, 2, 4));
        let mut q = [0i16; QK];
        let want = quantize_block(x[96..128].try_into().unwrap(), &mut q);
        assert_eq!(BlockSums { d: r1.d[1], s: r1.s[1], s16: [r1.s16[2], r1.s16[3]] }, want);
        assert_eq!(&r1.q[32..], &q[..]);
        // The planes hold q + 32768: high bytes, then low bytes.
        for (c, &v) in q.iter().enumerate() {
            let u = (i32::from(v) + 32768) as u16;
            assert_eq!([r1.planes[64 + c], r1.planes[96 + c]], [(u >> 8) as u8, u as u8], "value {c}");
        }
    }
}
