//! Activations quantized to 16-bit integers, for the VNNI kernels.
//!
//! Each 32-value block of an x row becomes `x_c ≈ d·q_c` with `d = max|x|/32767` and
//! `q_c = round(x_c·32767/max|x|)`, rounded to nearest even. The rounding error is at most
//! `max|x|/65534` per value, about 1.5e-5 of the block's largest value: under an f16's
//! (4.9e-4), and far under the 8-bit blocks llama.cpp uses (4e-3), which moved log-probabilities
//! past the model runtime's 0.3 bar here. The block also keeps `d·Σq`, so a weight format with
//! a per-block minimum (Q4_1: `w = q·d + m`) adds `m·d·Σq` for its minimum's share.
//!
//! [`quantize_block`] is the definition; the AVX-512 quantizer gives its bits (tested), and
//! [`dot_q4_1`] and [`dot_q8_0`] are the tests' oracles for the kernels that read them.

/// The little-endian f16 at `off`, as f32.
fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// Values per block (Q4_1, Q8_0 and the quantized activations alike).
pub const QK: usize = 32;
/// The largest quantized magnitude.
const QMAX: f32 = 32767.0;

/// `n` x rows of `cols` values, quantized per block. Grows to the largest call, then never
/// allocates.
#[derive(Default, Debug)]
pub struct QuantActs {
    q: Vec<i16>,
    d: Vec<f32>,
    s: Vec<f32>,
    cols: usize,
}

/// One quantized x row: values `q` (pairs read as little-endian `i32`s by the kernels),
/// and per block its scale `d` and `d·Σq`.
#[derive(Clone, Copy, Debug)]
pub struct QRow<'a> {
    pub q: &'a [i16],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

impl QuantActs {
    /// Quantizes the `x.len() / cols` rows of `x`.
    ///
    /// # Panics
    /// If `cols` is not a whole number of blocks or `x` not a whole number of rows.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        self.quantize_with(x, cols, quantize_block);
    }

    /// [`QuantActs::quantize`] with AVX-512 (the same bits).
    ///
    /// # Safety
    /// The CPU must have avx512f.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_avx512(&mut self, x: &[f32], cols: usize) {
        self.quantize_with(x, cols, |x, q| quantize_block_avx512(x, q));
    }

    #[inline(always)]
    fn quantize_with(&mut self, x: &[f32], cols: usize, block: impl Fn(&[f32; QK], &mut [i16; QK]) -> (f32, f32)) {
        assert!(cols.is_multiple_of(QK) && cols > 0, "{cols} columns is not whole blocks of {QK}");
        assert!(x.len().is_multiple_of(cols), "{} values is not whole rows of {cols}", x.len());
        let blocks = x.len() / QK;
        self.cols = cols;
        self.q.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        let parts = x.chunks_exact(QK).zip(self.q.chunks_exact_mut(QK)).zip(self.d.iter_mut().zip(&mut self.s));
        for ((x, q), (d, s)) in parts {
            (*d, *s) = block(x.try_into().expect("a block"), q.try_into().expect("a block"));
        }
    }

    /// Row `i` of the last [`QuantActs::quantize`].
    pub fn row(&self, i: usize) -> QRow<'_> {
        let bpr = self.cols / QK;
        QRow {
            q: &self.q[i * self.cols..(i + 1) * self.cols],
            d: &self.d[i * bpr..(i + 1) * bpr],
            s: &self.s[i * bpr..(i + 1) * bpr],
        }
    }
}

/// One block: fills `q` and returns `(d, d·Σq)`. A block holding a NaN or an infinity gets
/// `d = NaN`, so the dot products it enters are NaN, as in f32. A block whose largest
/// magnitude is zero, or so small (under about 1e-34) that its step `32767/max` overflows,
/// is all zeros.
pub fn quantize_block(x: &[f32; QK], q: &mut [i16; QK]) -> (f32, f32) {
    if !x.iter().all(|v| v.is_finite()) {
        q.fill(0);
        return (f32::NAN, f32::NAN);
    }
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let id = QMAX / amax;
    if !id.is_finite() {
        q.fill(0);
        return (0.0, 0.0);
    }
    let mut sum = 0i32;
    for (q, &x) in q.iter_mut().zip(x) {
        *q = (x * id).round_ties_even().clamp(-QMAX, QMAX) as i16;
        sum += i32::from(*q);
    }
    let d = amax / QMAX;
    (d, d * sum as f32)
}

/// [`quantize_block`] in AVX-512: the same operations on 16 lanes (the float-to-int
/// conversion rounds to nearest even, as `round_ties_even`), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn quantize_block_avx512(x: &[f32; QK], q: &mut [i16; QK]) -> (f32, f32) {
    use std::arch::x86_64::*;
    // SAFETY: `x` is 32 readable floats; both loads are unaligned.
    let (a, b) = unsafe { (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16))) };
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(b, b);
    if nan != 0 || amax.is_infinite() {
        q.fill(0);
        return (f32::NAN, f32::NAN);
    }
    let id = QMAX / amax;
    if !id.is_finite() {
        q.fill(0);
        return (0.0, 0.0);
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
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    let d = amax / QMAX;
    (d, d * sum as f32)
}

/// The VNNI Q4_1 kernel's arithmetic, one value at a time: for each block in order,
/// `acc = I·(d_w·d_x) + acc` then `acc = m_w·(d_x·Σq_x) + acc` (fused), where `I` is the
/// exact integer dot product of the nibbles and the quantized x.
pub fn dot_q4_1(row: &[u8], x: QRow) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(20).enumerate() {
        let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
        let xq = &x.q[b * QK..(b + 1) * QK];
        let mut dot = 0i32;
        for j in 0..16 {
            dot += i32::from(blk[4 + j] & 0xF) * i32::from(xq[j]);
            dot += i32::from(blk[4 + j] >> 4) * i32::from(xq[j + 16]);
        }
        acc = (dot as f32).mul_add(d * x.d[b], acc);
        acc = m.mul_add(x.s[b], acc);
    }
    acc
}

/// The VNNI Q8_0 kernel's arithmetic, one value at a time: for each block in order,
/// `acc = I·(d_w·d_x) + acc` (fused), `I` the exact integer dot product.
pub fn dot_q8_0(row: &[u8], x: QRow) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(34).enumerate() {
        let d = f16_at(blk, 0);
        let xq = &x.q[b * QK..(b + 1) * QK];
        let dot: i32 = blk[2..].iter().zip(xq).map(|(&w, &x)| i32::from(w as i8) * i32::from(x)).sum();
        acc = (dot as f32).mul_add(d * x.d[b], acc);
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
        let (d, s) = quantize_block(&x, &mut q);
        assert_eq!(q[5].unsigned_abs(), 32767);
        for (&q, &x) in q.iter().zip(&x) {
            assert!((f32::from(q) * d - x).abs() <= d * 0.5 * 1.0001, "{q}·{d} vs {x}");
        }
        assert_eq!(s, d * q.iter().map(|&q| i32::from(q)).sum::<i32>() as f32);
    }

    #[test]
    fn zero_blocks_are_exact_and_non_finite_blocks_poison_the_dot() {
        let mut q = [1i16; QK];
        assert_eq!(quantize_block(&[0.0; QK], &mut q), (0.0, 0.0));
        assert_eq!(q, [0; QK]);
        let mut x = [1.0f32; QK];
        x[3] = f32::NAN;
        assert!(quantize_block(&x, &mut q).0.is_nan());
        x[3] = f32::INFINITY;
        assert!(quantize_block(&x, &mut q).0.is_nan());
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
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.d), bits(&b.d));
        assert_eq!(bits(&a.s), bits(&b.s));
        assert!(a.d[1] == 0.0 && a.d[3].is_nan() && a.d[6].is_nan() && a.d[8].is_nan());
        assert_eq!((a.d[9], a.s[9]), (0.0, 0.0));
        assert_eq!(&a.q[320..324], &[32767, -14, -14, -12]); // -14.5 → -14, -13.5 → -14, -12.5 → -12
    }

    #[test]
    fn rows_map_to_their_blocks() {
        let x: Vec<f32> = (0..128).map(|i| i as f32 - 60.0).collect();
        let mut acts = QuantActs::default();
        acts.quantize(&x, 64);
        let r1 = acts.row(1);
        assert_eq!((r1.q.len(), r1.d.len(), r1.s.len()), (64, 2, 2));
        let mut q = [0i16; QK];
        let want = quantize_block(x[96..128].try_into().unwrap(), &mut q);
        assert_eq!((r1.d[1], r1.s[1]), want);
        assert_eq!(&r1.q[32..], &q[..]);
    }
}
