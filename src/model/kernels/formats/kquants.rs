//! The K-quants: 256-value blocks whose 16- or 32-value sub-blocks carry small integer scales
//! (and minimums) against the block's f16 `d` (and `dmin`).
//!
//! Values are numbered `v = 128·n + 32·j + l` where the layout has halves `n`: Q2_K, Q3_K and
//! Q6_K keep value `v`'s bits in byte `l` of half `n`'s arrays, at a shift chosen by `j`;
//! Q4_K and Q5_K keep values `64·j + l` and `64·j + 32 + l` in the low and high nibble of
//! byte `32·j + l`. A [`Format::lanes`] unit is one half (128 values, four 32-value blocks).

use std::mem::offset_of;

use bytemuck::{Pod, Zeroable};

use super::block::{Format, Ints, f16, inv, signed_max, to_f16};
use crate::model::ggml_type::GgmlType;
use crate::model::kernels::lanes::{Floats, Lanes, Tile, Unit};

/// Q2_K: value `(d · sc) · q − dmin · m` with 2-bit `q` and, per 16 values, a byte holding
/// the 4-bit `sc` (low nibble) and `m` (high nibble).
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ2K {
    scales: [u8; 16],
    qs: [u8; 64],
    d: [u8; 2],
    dmin: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ2K>() == 84);

/// Q3_K: value `(d · (s − 32)) · (q − 4 + 4·h)` with 2-bit `q` in `qs`, a high bit `h` in
/// `hmask` (bit `4·n + j` of byte `l`) and a 6-bit scale `s` per 16 values packed in 12 bytes.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ3K {
    hmask: [u8; 32],
    qs: [u8; 64],
    scales: [u8; 12],
    d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ3K>() == 110);

/// Q4_K: value `(d · sc) · q − dmin · m` with 4-bit `q` and 6-bit `sc`, `m` per 32 values.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ4K {
    d: [u8; 2],
    dmin: [u8; 2],
    scales: [u8; 12],
    qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// Q5_K: Q4_K with a fifth bit per value (bit `g` of byte `l` of `qh` for sub-block `g`).
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ5K {
    d: [u8; 2],
    dmin: [u8; 2],
    scales: [u8; 12],
    qh: [u8; 32],
    qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockQ5K>() == 176);

/// Q6_K: value `(d · sc) · (q − 32)` with 6-bit `q` (low nibble in `ql`, two high bits in
/// `qh`) and a signed byte `sc` per 16 values.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ6K {
    ql: [u8; 128],
    qh: [u8; 64],
    scales: [u8; 16],
    d: [u8; 2],
}
const _: () = assert!(size_of::<BlockQ6K>() == 210);

pub(crate) struct Q2K;
pub(crate) struct Q3K;
pub(crate) struct Q4K;
pub(crate) struct Q5K;
pub(crate) struct Q6K;

/// The 6-bit scale and minimum of sub-block `g` (0..8) from Q4_K's and Q5_K's 12 bytes.
fn scale_min(g: usize, s: &[u8; 12]) -> (u8, u8) {
    if g < 4 {
        (s[g] & 63, s[g + 4] & 63)
    } else {
        ((s[g + 4] & 0xF) | ((s[g - 4] >> 6) << 4), (s[g + 4] >> 4) | ((s[g] >> 6) << 4))
    }
}

/// [`scale_min`] in lanes, from the 12 bytes as three registers of four.
#[inline(always)]
fn scale_min_lanes<V: Lanes>(t: &Tile<V>, g: usize, s: [V; 3]) -> (V, V) {
    let (m6, m4, m2) = (t.splat(63), t.splat(15), t.splat(3));
    if g < 4 {
        let at = 8 * g as u32;
        (s[0].shr32(at).and(m6), s[1].shr32(at).and(m6))
    } else {
        let at = 8 * (g - 4) as u32;
        let sc = s[2].shr32(at).and(m4).or(s[0].shr32(at + 6).and(m2).shl32(4));
        let m = s[2].shr32(at + 4).and(m4).or(s[1].shr32(at + 6).and(m2).shl32(4));
        (sc, m)
    }
}

/// The 6-bit scale `k` (0..16) of Q3_K's 12 bytes, minus 32.
fn q3k_scale(k: usize, s: &[u8; 12]) -> i32 {
    let low = if k < 8 { s[k] & 0xF } else { s[k - 8] >> 4 };
    let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
    i32::from(low | (high << 4)) - 32
}

/// Q4_K and Q5_K decode: `fifth` gives the fifth bits (Q5_K's `qh`).
#[inline(always)]
fn decode_k45(d: [u8; 2], dmin: [u8; 2], scales: &[u8; 12], qs: &[u8; 128], qh: Option<&[u8; 32]>, out: &mut Ints) {
    let (d, dmin) = (f16(d), f16(dmin));
    for g in 0..8 {
        let (sc, m) = scale_min(g, scales);
        out.set32(g, d * f32::from(sc), -(dmin * f32::from(m)));
        let (chunk, shift) = (&qs[32 * (g / 2)..32 * (g / 2) + 32], 4 * (g % 2));
        for l in 0..32 {
            let high = qh.map_or(0, |h| ((h[l] >> g) & 1) << 4);
            out.q[32 * g + l] = (((chunk[l] >> shift) & 0xF) | high) as i8;
        }
    }
}

/// Q4_K and Q5_K scales of unit `unit`'s four sub-blocks, from the block's first 16 bytes.
#[inline(always)]
fn lanes_k45_scales<V: Lanes>(t: &Tile<V>, unit: usize, out: &mut Unit<V>) {
    let [dm, s0, s1, s2] = t.bytes16(0);
    let (d, dmin) = (dm.f16_lo(), dm.shr32(16).f16_lo());
    for k in 0..4 {
        let (sc, m) = scale_min_lanes(t, 4 * unit + k, [s0, s1, s2]);
        out.set32(k, d.mul(sc.to_f32()), dmin.mul(m.to_f32()).neg());
    }
}

/// Q4_K / Q5_K quantizer: per 32 values an affine scale and minimum, both rounded to 6 bits
/// against the block's f16 `d` and `dmin`, then values in `0..=levels`.
fn quantize_k45(x: &[f32], levels: i32) -> ([u8; 2], [u8; 2], [u8; 12], [u8; 256]) {
    let (mut scale, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    for (g, xs) in x.chunks_exact(32).enumerate() {
        let min = xs.iter().copied().fold(0.0f32, f32::min);
        let max = xs.iter().copied().fold(0.0f32, f32::max);
        scale[g] = (max - min) / levels as f32;
        mins[g] = -min;
    }
    let d = f16(to_f16(scale.iter().copied().fold(0.0, f32::max) / 63.0));
    let dmin = f16(to_f16(mins.iter().copied().fold(0.0, f32::max) / 63.0));
    let (mut scales, mut q) = ([0u8; 12], [0u8; 256]);
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
        let (step, off) = (d * f32::from(ls), dmin * f32::from(lm));
        for l in 0..32 {
            q[32 * g + l] = (((x[32 * g + l] + off) * inv(step)).round() as i32).clamp(0, levels) as u8;
        }
    }
    (to_f16(d), to_f16(dmin), scales, q)
}

/// Q4_K's and Q5_K's nibble layout: values `64·j + l` low, `64·j + 32 + l` high in byte `32·j + l`.
fn pack_k45_nibbles(q: &[u8; 256]) -> [u8; 128] {
    std::array::from_fn(|i| {
        let (j, l) = (i / 32, i % 32);
        (q[64 * j + l] & 0xF) | ((q[64 * j + 32 + l] & 0xF) << 4)
    })
}

impl Format for Q2K {
    const TYPE: GgmlType = GgmlType::Q2K;
    type Block = BlockQ2K;
    const PER_16: bool = true;
    const HAS_OFFSET: bool = true;

    fn decode(b: &BlockQ2K, out: &mut Ints) {
        let (d, dmin) = (f16(b.d), f16(b.dmin));
        for (k, &s) in b.scales.iter().enumerate() {
            out.scale[k] = d * f32::from(s & 0xF);
            out.offset[k] = -(dmin * f32::from(s >> 4));
        }
        for (v, q) in out.q.iter_mut().enumerate() {
            let (n, j, l) = (v / 128, (v % 128) / 32, v % 32);
            *q = ((b.qs[32 * n + l] >> (2 * j)) & 3) as i8;
        }
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, n: usize, out: &mut Unit<V>) {
        let scales = t.bytes16(offset_of!(BlockQ2K, scales));
        let dd = t.dword(offset_of!(BlockQ2K, d));
        let (d, dmin) = (dd.f16_lo(), dd.shr32(16).f16_lo());
        let qs = t.bytes32(offset_of!(BlockQ2K, qs) + 32 * n);
        let m4 = t.splat(15);
        for j in 0..4 {
            for (q, &v) in out.q[j].iter_mut().zip(&qs) {
                *q = t.field(v, 2 * j as u32, 2, 0);
            }
            for h in 0..2 {
                let s = t.byte(&scales, 8 * n + 2 * j + h, 0);
                out.scale[j][h] = d.mul(s.and(m4).to_f32());
                out.offset[j][h] = dmin.mul(s.shr32(4).and(m4).to_f32()).neg();
            }
        }
    }

    fn quantize(x: &[f32]) -> BlockQ2K {
        // Per 16 values: step (max − min) / 3 and minimum −min, each rounded to 4 bits.
        let (mut step, mut mins) = ([0.0f32; 16], [0.0f32; 16]);
        for (k, xs) in x.chunks_exact(16).enumerate() {
            let min = xs.iter().copied().fold(0.0f32, f32::min);
            let max = xs.iter().copied().fold(0.0f32, f32::max);
            step[k] = (max - min) / 3.0;
            mins[k] = -min;
        }
        let d = f16(to_f16(step.iter().copied().fold(0.0, f32::max) / 15.0));
        let dmin = f16(to_f16(mins.iter().copied().fold(0.0, f32::max) / 15.0));
        let mut b = BlockQ2K { scales: [0; 16], qs: [0; 64], d: to_f16(d), dmin: to_f16(dmin) };
        for k in 0..16 {
            let ls = ((step[k] * inv(d)).round() as i32).clamp(0, 15) as u8;
            let lm = ((mins[k] * inv(dmin)).round() as i32).clamp(0, 15) as u8;
            b.scales[k] = ls | (lm << 4);
            let (s, off) = (d * f32::from(ls), dmin * f32::from(lm));
            for i in 0..16 {
                let v = 16 * k + i;
                let q = (((x[v] + off) * inv(s)).round() as i32).clamp(0, 3) as u8;
                let (n, j, l) = (v / 128, (v % 128) / 32, v % 32);
                b.qs[32 * n + l] |= q << (2 * j);
            }
        }
        b
    }
}

impl Format for Q3K {
    const TYPE: GgmlType = GgmlType::Q3K;
    type Block = BlockQ3K;
    const PER_16: bool = true;

    fn decode(b: &BlockQ3K, out: &mut Ints) {
        let d = f16(b.d);
        for k in 0..16 {
            out.scale[k] = d * q3k_scale(k, &b.scales) as f32;
        }
        for (v, q) in out.q.iter_mut().enumerate() {
            let (n, j, l) = (v / 128, (v % 128) / 32, v % 32);
            let low = (b.qs[32 * n + l] >> (2 * j)) & 3;
            let high = (b.hmask[l] >> (4 * n + j)) & 1;
            *q = (low | (high << 2)) as i8 - 4;
        }
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, n: usize, out: &mut Unit<V>) {
        // The 16 bytes ending the block: the 12 scale bytes at 2..14, `d` at 14..16.
        let at = size_of::<BlockQ3K>() - 16;
        let tail = t.bytes16(at);
        let d = tail[3].shr32(16).f16_lo();
        let sb = offset_of!(BlockQ3K, scales) - at;
        let (m4, m2, bias) = (t.splat(15), t.splat(3), t.splat(32));
        let qs = t.bytes32(offset_of!(BlockQ3K, qs) + 32 * n);
        let hmask = t.bytes32(offset_of!(BlockQ3K, hmask));
        let four = t.splat(0x0404_0404);
        for j in 0..4 {
            let high = (4 * n + j) as u32;
            for u in 0..8 {
                let low = t.field(qs[u], 2 * j as u32, 2, 0);
                out.q[j][u] = low.or(t.field(hmask[u], high, 1, 2)).sub8(four);
            }
            for h in 0..2 {
                let k = 8 * n + 2 * j + h;
                let low = if k < 8 { t.byte(&tail, sb + k, 0) } else { t.byte(&tail, sb + k - 8, 4) };
                let high = t.byte(&tail, sb + 8 + k % 4, 2 * (k / 4) as u32).and(m2);
                out.scale[j][h] = d.mul(low.and(m4).or(high.shl32(4)).sub32(bias).to_f32());
            }
        }
    }

    fn quantize(x: &[f32]) -> BlockQ3K {
        // Per 16 values a step max / −4 (so q in −4..=3), rounded to a signed 6-bit multiple of d.
        let mut step = [0.0f32; 16];
        for (k, xs) in x.chunks_exact(16).enumerate() {
            step[k] = signed_max(xs) / -4.0;
        }
        let d = f16(to_f16(step.iter().fold(0.0f32, |m, s| m.max(s.abs())) / 31.0));
        let mut b = BlockQ3K { hmask: [0; 32], qs: [0; 64], scales: [0; 12], d: to_f16(d) };
        for (k, &step) in step.iter().enumerate() {
            let sc = ((step * inv(d)).round() as i32).clamp(-32, 31);
            let s = (sc + 32) as u8;
            if k < 8 {
                b.scales[k] |= s & 0xF;
            } else {
                b.scales[k - 8] |= (s & 0xF) << 4;
            }
            b.scales[8 + k % 4] |= (s >> 4) << (2 * (k / 4));
            let st = d * sc as f32;
            for i in 0..16 {
                let v = 16 * k + i;
                let q = ((x[v] * inv(st)).round() as i32).clamp(-4, 3) + 4;
                let (n, j, l) = (v / 128, (v % 128) / 32, v % 32);
                b.qs[32 * n + l] |= ((q & 3) as u8) << (2 * j);
                b.hmask[l] |= ((q >> 2) as u8) << (4 * n + j);
            }
        }
        b
    }
}

impl Format for Q4K {
    const TYPE: GgmlType = GgmlType::Q4K;
    type Block = BlockQ4K;
    const HAS_OFFSET: bool = true;

    fn decode(b: &BlockQ4K, out: &mut Ints) {
        decode_k45(b.d, b.dmin, &b.scales, &b.qs, None, out);
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, unit: usize, out: &mut Unit<V>) {
        lanes_k45_scales(t, unit, out);
        for c in 0..2 {
            let raw = t.bytes32(offset_of!(BlockQ4K, qs) + 32 * (2 * unit + c));
            out.q[2 * c] = t.nibbles(&raw, false);
            out.q[2 * c + 1] = t.nibbles(&raw, true);
        }
    }

    fn quantize(x: &[f32]) -> BlockQ4K {
        let (d, dmin, scales, q) = quantize_k45(x, 15);
        BlockQ4K { d, dmin, scales, qs: pack_k45_nibbles(&q) }
    }
}

impl Format for Q5K {
    const TYPE: GgmlType = GgmlType::Q5K;
    type Block = BlockQ5K;
    const HAS_OFFSET: bool = true;

    fn decode(b: &BlockQ5K, out: &mut Ints) {
        decode_k45(b.d, b.dmin, &b.scales, &b.qs, Some(&b.qh), out);
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, unit: usize, out: &mut Unit<V>) {
        lanes_k45_scales(t, unit, out);
        let qh = t.bytes32(offset_of!(BlockQ5K, qh));
        for c in 0..2 {
            let raw = t.bytes32(offset_of!(BlockQ5K, qs) + 32 * (2 * unit + c));
            for (k, high) in [(2 * c, false), (2 * c + 1, true)] {
                let g = (4 * unit + k) as u32;
                let low = t.nibbles(&raw, high);
                for u in 0..8 {
                    out.q[k][u] = low[u].or(t.field(qh[u], g, 1, 4));
                }
            }
        }
    }

    fn quantize(x: &[f32]) -> BlockQ5K {
        let (d, dmin, scales, q) = quantize_k45(x, 31);
        let qh = std::array::from_fn(|l| (0..8).fold(0u8, |h, g| h | ((q[32 * g + l] >> 4) << g)));
        BlockQ5K { d, dmin, scales, qh, qs: pack_k45_nibbles(&q) }
    }
}

impl Format for Q6K {
    const TYPE: GgmlType = GgmlType::Q6K;
    type Block = BlockQ6K;
    const PER_16: bool = true;

    fn decode(b: &BlockQ6K, out: &mut Ints) {
        let d = f16(b.d);
        for (k, &s) in b.scales.iter().enumerate() {
            out.scale[k] = d * f32::from(s as i8);
        }
        for (v, q) in out.q.iter_mut().enumerate() {
            let (n, j, l) = (v / 128, (v % 128) / 32, v % 32);
            let low = (b.ql[64 * n + 32 * (j % 2) + l] >> (4 * (j / 2))) & 0xF;
            let high = (b.qh[32 * n + l] >> (2 * j)) & 3;
            *q = (low | (high << 4)) as i8 - 32;
        }
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, n: usize, out: &mut Unit<V>) {
        let scales = t.bytes16(offset_of!(BlockQ6K, scales));
        // `d` is the block's last two bytes: read the four ending there.
        let d = t.dword(offset_of!(BlockQ6K, d) - 2).shr32(16).f16_lo();
        let at = offset_of!(BlockQ6K, ql) + 64 * n;
        let ql = [t.bytes32(at), t.bytes32(at + 32)];
        let qh = t.bytes32(offset_of!(BlockQ6K, qh) + 32 * n);
        let bias = t.splat(0x2020_2020);
        for j in 0..4 {
            let low = t.nibbles(&ql[j % 2], j >= 2);
            for u in 0..8 {
                out.q[j][u] = low[u].or(t.field(qh[u], 2 * j as u32, 2, 4)).sub8(bias);
            }
            for h in 0..2 {
                out.scale[j][h] = d.mul(t.i8_at(&scales, 8 * n + 2 * j + h));
            }
        }
    }

    fn quantize(x: &[f32]) -> BlockQ6K {
        // Per 16 values a step max / −32, rounded to a signed byte multiple of d.
        let mut sub = [0.0f32; 16];
        for (s, xs) in sub.iter_mut().zip(x.chunks_exact(16)) {
            *s = signed_max(xs) / -32.0;
        }
        let max_scale = signed_max(&sub);
        let iscale = if max_scale != 0.0 { -128.0 / max_scale } else { 0.0 };
        let d = f16(to_f16(inv(iscale)));
        let sc: [i8; 16] = std::array::from_fn(|k| ((sub[k] * iscale).round() as i32).clamp(-128, 127) as i8);
        let mut b = BlockQ6K { ql: [0; 128], qh: [0; 64], scales: sc.map(|s| s as u8), d: to_f16(d) };
        for v in 0..256 {
            let step = d * f32::from(sc[v / 16]);
            let q = (((x[v] * inv(step)).round() as i32).clamp(-32, 31) + 32) as u8;
            let (n, j, l) = (v / 128, (v % 128) / 32, v % 32);
            b.ql[64 * n + 32 * (j % 2) + l] |= (q & 0xF) << (4 * (j / 2));
            b.qh[32 * n + l] |= (q >> 4) << (2 * j);
        }
        b
    }
}
