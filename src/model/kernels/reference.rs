//! Plain scalar kernels, written straight from ggml's block layouts: the tests' oracle.
//!
//! These functions panic on a type without kernels or on lengths that are not whole
//! blocks; they serve tests and tools, never the request path.

use super::blocks::{f16_at, f16_round, scale_min_k4};
use crate::model::ggml_type::GgmlType;

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
            GgmlType::Q4K => dequant_q4k(b, y),
            GgmlType::Q5K => dequant_q5k(b, y),
            GgmlType::Q6K => dequant_q6k(b, y),
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

/// Quantizes `src` (a whole number of blocks) into blocks of `t`, round-to-nearest.
pub fn quantize_row(t: GgmlType, src: &[f32]) -> Vec<u8> {
    let be = t.block_elems();
    assert!(src.len().is_multiple_of(be), "{} values is not whole {t} blocks", src.len());
    let mut out = Vec::with_capacity(src.len() / be * t.block_bytes());
    for x in src.chunks_exact(be) {
        match t {
            GgmlType::F32 => out.extend_from_slice(&x[0].to_le_bytes()),
            GgmlType::F16 => out.extend_from_slice(&half::f16::from_f32(x[0]).to_le_bytes()),
            GgmlType::BF16 => out.extend_from_slice(&half::bf16::from_f32(x[0]).to_le_bytes()),
            GgmlType::Q4_0 => quant_sym(x, 8, &mut out, false),
            GgmlType::Q5_0 => quant_sym(x, 16, &mut out, true),
            GgmlType::Q4_1 => quant_affine(x, 15, &mut out, false),
            GgmlType::Q5_1 => quant_affine(x, 31, &mut out, true),
            GgmlType::Q8_0 => quant_q8_0(x, &mut out),
            GgmlType::Q4K => quant_k45(x, 15, &mut out),
            GgmlType::Q5K => quant_k45(x, 31, &mut out),
            GgmlType::Q6K => quant_q6k(x, &mut out),
            _ => panic!("no reference quantizer for {t}"),
        }
    }
    out
}

/// The value of largest magnitude, with its sign.
fn signed_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

fn inv(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// Packs 32 quantized values as ggml does: nibbles j | j+16 << 4, the 5th bits into `qh`.
fn pack_32(q: &[u8; 32], five_bits: bool, out: &mut Vec<u8>) {
    if five_bits {
        let qh = (0..32).fold(0u32, |h, j| h | (((q[j] >> 4) as u32 & 1) << j));
        out.extend_from_slice(&qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)));
}

/// Q4_0 / Q5_0: `d = max / -half`, `q = x / d + half` (ggml's reference quantizer).
fn quant_sym(x: &[f32], half: i32, out: &mut Vec<u8>, five_bits: bool) {
    let d = signed_max(x) / -(half as f32);
    let id = inv(d);
    let mut q = [0u8; 32];
    for (qv, &v) in q.iter_mut().zip(x) {
        *qv = ((v * id + half as f32 + 0.5) as i32).clamp(0, 2 * half - 1) as u8;
    }
    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
    pack_32(&q, five_bits, out);
}

/// Q4_1 / Q5_1: `d = (max - min) / levels`, `m = min`.
fn quant_affine(x: &[f32], levels: i32, out: &mut Vec<u8>, five_bits: bool) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / levels as f32;
    let id = inv(d);
    let mut q = [0u8; 32];
    for (qv, &v) in q.iter_mut().zip(x) {
        *qv = (((v - min) * id + 0.5) as i32).clamp(0, levels) as u8;
    }
    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&half::f16::from_f32(min).to_le_bytes());
    pack_32(&q, five_bits, out);
}

fn quant_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inv(d);
    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
    out.extend(x.iter().map(|&v| ((v * id).round() as i32).clamp(-127, 127) as i8 as u8));
}

/// Q4_K / Q5_K: per 32 values an affine scale and min, both quantized to 6 bits against
/// the block's f16 `d` and `dmin`; then round-to-nearest values in `0..=levels`.
fn quant_k45(x: &[f32], levels: i32, out: &mut Vec<u8>) {
    let (mut scale, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    for (g, xs) in x.chunks_exact(32).enumerate() {
        let min = xs.iter().copied().fold(0.0f32, f32::min);
        let max = xs.iter().copied().fold(0.0f32, f32::max);
        scale[g] = (max - min) / levels as f32;
        mins[g] = -min;
    }
    let d = f16_round(scale.iter().copied().fold(0.0, f32::max) / 63.0);
    let dmin = f16_round(mins.iter().copied().fold(0.0, f32::max) / 63.0);
    let mut scales = [0u8; 12];
    let mut q = [0u8; 256];
    for g in 0..8 {
        let ls = ((scale[g] * inv(d)).round() as i32).clamp(0, 63) as u8;
        let lm = ((mins[g] * inv(dmin)).round() as i32).clamp(0, 63) as u8;
        if g < 4 {
            scales[g] = ls;
            scales[g + 4] = lm;
        } else {
            scales[g + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            scales[g - 4] |= (ls >> 4) << 6;
            scales[g] |= (lm >> 4) << 6;
        }
        let (step, off) = (d * ls as f32, dmin * lm as f32);
        for l in 0..32 {
            let v = ((x[32 * g + l] + off) * inv(step)).round() as i32;
            q[32 * g + l] = v.clamp(0, levels) as u8;
        }
    }
    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&half::f16::from_f32(dmin).to_le_bytes());
    out.extend_from_slice(&scales);
    if levels == 31 {
        out.extend((0..32).map(|l| (0..8).fold(0u8, |h, g| h | ((q[32 * g + l] >> 4) << g))));
    }
    for j in 0..4 {
        out.extend((0..32).map(|l| (q[64 * j + l] & 0xF) | ((q[64 * j + 32 + l] & 0xF) << 4)));
    }
}

/// Q6_K: per 16 values a scale `max / -32` quantized to i8 against the block's f16 `d`.
fn quant_q6k(x: &[f32], out: &mut Vec<u8>) {
    let mut sub = [0.0f32; 16];
    for (s, xs) in sub.iter_mut().zip(x.chunks_exact(16)) {
        *s = signed_max(xs) / -32.0;
    }
    let max_scale = signed_max(&sub);
    let iscale = if max_scale != 0.0 { -128.0 / max_scale } else { 0.0 };
    let d = f16_round(inv(iscale));
    let sc: Vec<i8> = sub.iter().map(|&s| ((s * iscale).round() as i32).clamp(-128, 127) as i8).collect();
    let mut q = [0u8; 256];
    for (i, qv) in q.iter_mut().enumerate() {
        let step = d * sc[i / 16] as f32;
        *qv = (((x[i] * inv(step)).round() as i32).clamp(-32, 31) + 32) as u8;
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for n in 0..2 {
        let (q, ql, qh) = (&q[128 * n..], &mut ql[64 * n..], &mut qh[32 * n..]);
        for l in 0..32 {
            let (q1, q2, q3, q4) = (q[l], q[l + 32], q[l + 64], q[l + 96]);
            ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
}
