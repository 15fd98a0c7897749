//! ggml block layouts decoded into one shape the portable fast path works on.
//!
//! Every quantized block is `value = scale[k] * q + offset[g]` with small integers `q`,
//! a scale per 16 values (`k = i / 16`) and an offset per 32 values (`g = i / 32`).
//! The formulas match the reference dequantizers operation for operation, so a
//! dequantization through [`Unpacked`] is bit-identical to [`super::reference`].

use crate::model::ggml_type::GgmlType;

/// Reads the little-endian f16 at `off` as f32.
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// Rounds to the nearest f16 and back, as a value stored in a block would be.
pub(crate) fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc, m)
    }
}

/// One block as integers with per-16 scales and per-32 offsets (see the module doc).
pub(crate) struct Unpacked {
    /// The integer part of each value (only the first `block_elems` are meaningful).
    pub q: [i8; 256],
    /// Scale per 16 values.
    pub scale: [f32; 16],
    /// Offset per 32 values; all zero (and skipped) when the type has none.
    pub offset: [f32; 8],
    /// Whether the type has offsets (Q4_1, Q5_1, Q4_K, Q5_K).
    pub has_offset: bool,
}

impl Default for Unpacked {
    fn default() -> Self {
        Unpacked { q: [0; 256], scale: [0.0; 16], offset: [0.0; 8], has_offset: false }
    }
}

impl Unpacked {
    /// Decodes one block of quantized type `t` (not a float type).
    #[inline(always)]
    pub fn decode(&mut self, t: GgmlType, b: &[u8]) {
        match t {
            GgmlType::Q4_0 | GgmlType::Q4_1 => self.decode_q4(t, b),
            GgmlType::Q5_0 | GgmlType::Q5_1 => self.decode_q5(t, b),
            GgmlType::Q8_0 => {
                let d = f16_at(b, 0);
                self.set_32(d, 0.0, false);
                for (q, &v) in self.q.iter_mut().zip(&b[2..34]) {
                    *q = v as i8;
                }
            }
            GgmlType::Q4K | GgmlType::Q5K => self.decode_k45(t, b),
            GgmlType::Q6K => self.decode_q6k(b),
            _ => unreachable!("{t} is not a block-quantized type with kernels"),
        }
    }

    fn set_32(&mut self, d: f32, m: f32, has_offset: bool) {
        self.scale[0] = d;
        self.scale[1] = d;
        self.offset[0] = m;
        self.has_offset = has_offset;
    }

    #[inline]
    fn decode_q4(&mut self, t: GgmlType, b: &[u8]) {
        let (m, qs, bias) = if t == GgmlType::Q4_1 { (f16_at(b, 2), &b[4..20], 0) } else { (0.0, &b[2..18], 8) };
        self.set_32(f16_at(b, 0), m, t == GgmlType::Q4_1);
        for (j, &v) in qs.iter().enumerate() {
            self.q[j] = (v & 0xF) as i8 - bias;
            self.q[j + 16] = (v >> 4) as i8 - bias;
        }
    }

    #[inline]
    fn decode_q5(&mut self, t: GgmlType, b: &[u8]) {
        let with_min = t == GgmlType::Q5_1;
        let (m, at, bias) = if with_min { (f16_at(b, 2), 4, 0) } else { (0.0, 2, 16) };
        self.set_32(f16_at(b, 0), m, with_min);
        let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        for (j, &v) in b[at + 4..at + 20].iter().enumerate() {
            let h0 = ((qh >> j) & 1) as u8;
            let h1 = ((qh >> (j + 16)) & 1) as u8;
            self.q[j] = ((v & 0xF) | (h0 << 4)) as i8 - bias;
            self.q[j + 16] = ((v >> 4) | (h1 << 4)) as i8 - bias;
        }
    }

    #[inline]
    fn decode_k45(&mut self, t: GgmlType, b: &[u8]) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let scales = &b[4..16];
        let (qh, qs) = if t == GgmlType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
        self.has_offset = true;
        for g in 0..8 {
            let (sc, m) = scale_min_k4(g, scales);
            self.scale[2 * g] = d * sc as f32;
            self.scale[2 * g + 1] = d * sc as f32;
            self.offset[g] = -(dmin * m as f32);
            let chunk = &qs[32 * (g / 2)..32 * (g / 2) + 32];
            let shift = 4 * (g % 2);
            for l in 0..32 {
                let high = qh.map_or(0, |h| ((h[l] >> g) & 1) << 4);
                self.q[32 * g + l] = (((chunk[l] >> shift) & 0xF) | high) as i8;
            }
        }
    }

    #[inline]
    fn decode_q6k(&mut self, b: &[u8]) {
        let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        self.has_offset = false;
        for (k, &s) in sc.iter().enumerate() {
            self.scale[k] = d * (s as i8) as f32;
        }
        for half in 0..2 {
            let (ql, qh, y) = (&ql[64 * half..], &qh[32 * half..], 128 * half);
            for l in 0..32 {
                let h = qh[l];
                self.q[y + l] = ((ql[l] & 0xF) | ((h & 3) << 4)) as i8 - 32;
                self.q[y + l + 32] = ((ql[l + 32] & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
                self.q[y + l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                self.q[y + l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
            }
        }
    }

    /// Writes the block's `dst.len()` values (`scale * q`, plus the offset if any).
    #[inline(always)]
    pub fn dequantize(&self, dst: &mut [f32]) {
        for (i, v) in dst.iter_mut().enumerate() {
            let x = self.scale[i / 16] * self.q[i] as f32;
            *v = if self.has_offset { x + self.offset[i / 32] } else { x };
        }
    }
}
