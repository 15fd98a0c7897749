//! Activations quantized to 8 bits, 32 values per block (like ggml's Q8_1, with f32 scales).

/// Values per activation block.
pub(crate) const QK: usize = 32;

/// Rows of activations quantized per 32 values: `x ≈ d[b] * q[i]`, and per block
/// `s[b] = d[b] * Σ q` (the term an offset `m` multiplies in `Σ (d·q + m)·x`).
#[derive(Default, Debug, Clone)]
pub(crate) struct Q8Acts {
    /// Quantized values, `rows * cols` of them, row-major.
    pub q: Vec<i8>,
    /// One scale per block of 32 values.
    pub d: Vec<f32>,
    /// One `d * Σq` per block of 32 values.
    pub s: Vec<f32>,
}

impl Q8Acts {
    /// Quantizes `x` (a whole number of blocks) in place of the previous contents,
    /// reusing the buffers (no allocation once they are large enough).
    pub fn quantize(&mut self, x: &[f32]) {
        debug_assert!(x.len().is_multiple_of(QK));
        let blocks = x.len() / QK;
        self.q.resize(x.len(), 0);
        self.d.resize(blocks, 0.0);
        self.s.resize(blocks, 0.0);
        let q = self.q.chunks_exact_mut(QK);
        for (((xb, qb), d), s) in x.chunks_exact(QK).zip(q).zip(&mut self.d).zip(&mut self.s) {
            (*d, *s) = quantize_block(xb, qb);
        }
    }
}

/// Quantizes 32 values round-to-nearest with `d = max|x| / 127`; returns `(d, d * Σq)`.
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (qv, &v) in q.iter_mut().zip(x) {
        // Round half away from zero by adding ±0.5 and truncating (no libm `roundf` call).
        // |v * id| <= 127 up to rounding; the clamp keeps it in range.
        let y = v * id;
        let r = (y + 0.5f32.copysign(y)).clamp(-127.0, 127.0) as i8;
        *qv = r;
        sum += r as i32;
    }
    (d, d * sum as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_block_is_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let mut acts = Q8Acts::default();
        acts.quantize(&x);
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            assert_eq!(acts.d[b], amax / 127.0);
            let mut sum = 0i32;
            for (i, &v) in xb.iter().enumerate() {
                let q = acts.q[b * QK + i];
                assert!(q.unsigned_abs() <= 127);
                assert!((acts.d[b] * q as f32 - v).abs() <= acts.d[b] * 0.5001, "{v} vs q={q}");
                sum += q as i32;
            }
            assert_eq!(acts.s[b], acts.d[b] * sum as f32);
        }
    }

    #[test]
    fn zero_block_quantizes_to_zero() {
        let mut acts = Q8Acts::default();
        acts.quantize(&[0.0; 32]);
        assert_eq!(acts.d, [0.0]);
        assert!(acts.q.iter().all(|&q| q == 0));
    }
}
