//! Plain scalar kernels, written straight from ggml's dequantizers (value by value, apart from
//! [`super::formats`]' decoders): the tests' oracle. Checked against the `gguf` Python
//! package's dequantizers, which give ggml's bits (tests/kernels.rs).
//!
//! These functions panic on a type without kernels or on lengths that are not whole
//! blocks; they serve tests, benches and tools, never the request path.

use super::formats::{BF16, F16, F32, FloatFormat, Format, FormatFn, with_format};
use crate::model::ggml_type::GgmlType;

/// The little-endian f16 at `off`, as f32.
fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc, m)
    }
}

/// ggml's `kvalues_iq4nl`.
const IQ4_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Dequantizes `dst.len()` values stored in `t` from `src`.
pub fn dequantize_row(t: GgmlType, src: &[u8], dst: &mut [f32]) {
    let be = t.block_elems();
    assert!(dst.len().is_multiple_of(be), "{} values is not whole {t} blocks", dst.len());
    assert_eq!(src.len(), dst.len() / be * t.block_bytes(), "{t} row length");
    let blocks = src.chunks_exact(t.block_bytes()).zip(dst.chunks_exact_mut(be));
    for (b, y) in blocks {
        match t {
            GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => y[0] = f16_at(b, 0),
            GgmlType::BF16 => y[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            GgmlType::Q4_0 => dequant_q4_0(b, y),
            GgmlType::Q4_1 => dequant_q4_1(b, y),
            GgmlType::Q5_0 => dequant_q5(b, y, false),
            GgmlType::Q5_1 => dequant_q5(b, y, true),
            GgmlType::Q8_0 => dequant_q8_0(b, y),
            GgmlType::Q2K => dequant_q2k(b, y),
            GgmlType::Q3K => dequant_q3k(b, y),
            GgmlType::Q4K => dequant_q4k(b, y),
            GgmlType::Q5K => dequant_q5k(b, y),
            GgmlType::Q6K => dequant_q6k(b, y),
            GgmlType::IQ4NL => dequant_iq4nl(b, y),
            GgmlType::IQ4XS => dequant_iq4xs(b, y),
            _ => panic!("no reference kernel for {t}"),
        }
    }
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        y[j] = ((b[2 + j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..16 {
        y[j] = (b[4 + j] & 0xF) as f32 * d + m;
        y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
    }
}

fn dequant_q5(b: &[u8], y: &mut [f32], with_min: bool) {
    let d = f16_at(b, 0);
    let at = if with_min { 4 } else { 2 };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    for j in 0..16 {
        let lo = (b[at + 4 + j] & 0xF) as u32 | (((qh >> j) & 1) << 4);
        let hi = (b[at + 4 + j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        if with_min {
            let m = f16_at(b, 2);
            y[j] = lo as f32 * d + m;
            y[j + 16] = hi as f32 * d + m;
        } else {
            y[j] = (lo as i32 - 16) as f32 * d;
            y[j + 16] = (hi as i32 - 16) as f32 * d;
        }
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

fn dequant_q2k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut out = y.iter_mut();
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                for l in 0..16 {
                    *out.next().unwrap() = dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

fn dequant_q3k(b: &[u8], y: &mut [f32]) {
    let (hm, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d_all = f16_at(b, 108);
    // ggml's unpacking of the 16 six-bit scales through four u32s.
    let aux: [u32; 3] =
        std::array::from_fn(|i| u32::from_le_bytes([sc[4 * i], sc[4 * i + 1], sc[4 * i + 2], sc[4 * i + 3]]));
    let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let tmp = aux[2];
    let unpacked = [
        (aux[0] & kmask2) | ((tmp & kmask1) << 4),
        (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4),
        ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
        ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4),
    ];
    let scales: Vec<i8> = unpacked.iter().flat_map(|w| w.to_le_bytes()).map(|b| b as i8).collect();
    let mut out = y.iter_mut();
    let (mut is, mut m) = (0, 1u8);
    for n in 0..2 {
        let q = &qs[32 * n..];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * (scales[is] as i32 - 32) as f32;
                is += 1;
                for l in 16 * half..16 * half + 16 {
                    let v = ((q[l] >> shift) & 3) as i32 - if hm[l] & m != 0 { 0 } else { 4 };
                    *out.next().unwrap() = dl * v as f32;
                }
            }
            m <<= 1;
        }
    }
}

fn dequant_iq4nl(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..16 {
        y[j] = d * IQ4_LEVELS[(b[2 + j] & 0xF) as usize] as f32;
        y[j + 16] = d * IQ4_LEVELS[(b[2 + j] >> 4) as usize] as f32;
    }
}

fn dequant_iq4xs(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let (scales_l, qs) = (&b[4..8], &b[8..136]);
    for ib in 0..8 {
        let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) as i32 | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
        let dl = d * (ls - 32) as f32;
        let (q, y) = (&qs[16 * ib..16 * ib + 16], &mut y[32 * ib..32 * ib + 32]);
        for j in 0..16 {
            y[j] = dl * IQ4_LEVELS[(q[j] & 0xF) as usize] as f32;
            y[j + 16] = dl * IQ4_LEVELS[(q[j] >> 4) as usize] as f32;
        }
    }
}

fn dequant_q4k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    for j in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * j, &b[4..16]);
        let (sc2, m2) = scale_min_k4(2 * j + 1, &b[4..16]);
        let (d1, d2) = (d * sc1 as f32, d * sc2 as f32);
        let (m1, m2) = (dmin * m1 as f32, dmin * m2 as f32);
        for l in 0..32 {
            let q = b[16 + 32 * j + l];
            y[64 * j + l] = d1 * (q & 0xF) as f32 - m1;
            y[64 * j + 32 + l] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

fn dequant_q5k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for j in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * j, &b[4..16]);
        let (sc2, m2) = scale_min_k4(2 * j + 1, &b[4..16]);
        let (d1, d2) = (d * sc1 as f32, d * sc2 as f32);
        let (m1, m2) = (dmin * m1 as f32, dmin * m2 as f32);
        for l in 0..32 {
            let q = qs[32 * j + l];
            let h1 = if qh[l] & (1 << (2 * j)) != 0 { 16 } else { 0 };
            let h2 = if qh[l] & (2 << (2 * j)) != 0 { 16 } else { 0 };
            y[64 * j + l] = d1 * ((q & 0xF) + h1) as f32 - m1;
            y[64 * j + 32 + l] = d2 * ((q >> 4) + h2) as f32 - m2;
        }
    }
}

fn dequant_q6k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
        let y = &mut y[128 * n..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// `Σ W[c] · x[c]` with the row dequantized and the sum taken in f64.
pub fn dot(t: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let mut w = vec![0.0f32; x.len()];
    dequantize_row(t, row, &mut w);
    w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32
}

/// Quantizes `src` (a whole number of blocks) into blocks of `t`, round-to-nearest, with each
/// format's own simple quantizer ([`Format::quantize`]): valid blocks, not ggml's choices.
pub fn quantize_row(t: GgmlType, src: &[f32]) -> Vec<u8> {
    fn floats<F: FloatFormat>(src: &[f32]) -> Vec<u8> {
        src.iter().flat_map(|&v| bytemuck::bytes_of(&F::quantize(v)).to_vec()).collect()
    }
    struct Quantize<'a>(&'a [f32]);
    impl FormatFn for Quantize<'_> {
        type Out = Vec<u8>;
        fn call<F: Format>(self) -> Vec<u8> {
            self.0.chunks_exact(F::ELEMS).flat_map(|x| bytemuck::bytes_of(&F::quantize(x)).to_vec()).collect()
        }
    }
    let be = t.block_elems();
    assert!(src.len().is_multiple_of(be), "{} values is not whole {t} blocks", src.len());
    match t {
        GgmlType::F32 => floats::<F32>(src),
        GgmlType::F16 => floats::<F16>(src),
        GgmlType::BF16 => floats::<BF16>(src),
        _ => with_format(t, Quantize(src)).unwrap_or_else(|| panic!("no reference quantizer for {t}")),
    }
}
