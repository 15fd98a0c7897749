//! The non-linear 4-bit formats: each nibble indexes ggml's 16 signed levels ([`LEVELS`]).
//! IQ4_NL has an f16 scale per 32 values; IQ4_XS a 6-bit scale per 32 values against an f16
//! per 256.

use std::mem::offset_of;

use bytemuck::{Pod, Zeroable};

use super::block::{Format, Ints, QK, f16, inv, signed_max, to_f16};
use crate::model::ggml_type::GgmlType;
use crate::model::kernels::lanes::{Floats, Lanes, Tile, Unit};

/// The levels a nibble indexes (ggml's `kvalues_iq4nl`).
pub(crate) const LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// IQ4_NL: `d · LEVELS[n]`, nibbles packed as Q4_0's.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockIQ4NL {
    d: [u8; 2],
    qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockIQ4NL>() == 18);

/// IQ4_XS: `(d · (s − 32)) · LEVELS[n]` with a 6-bit `s` per 32 values (low four bits in
/// `scales_l`, two high bits in `scales_h`), nibbles of each 32 values packed as Q4_0's.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockIQ4XS {
    d: [u8; 2],
    scales_h: [u8; 2],
    scales_l: [u8; 4],
    qs: [u8; 128],
}
const _: () = assert!(size_of::<BlockIQ4XS>() == 136);

pub(crate) struct IQ4NL;
pub(crate) struct IQ4XS;

/// Levels of the nibbles of 16 bytes packed as Q4_0's.
#[inline(always)]
fn levels(qs: &[u8], q: &mut [i8]) {
    for (j, &b) in qs.iter().enumerate() {
        q[j] = LEVELS[usize::from(b & 0xF)];
        q[j + 16] = LEVELS[usize::from(b >> 4)];
    }
}

/// [`LEVELS`] as bytes.
const LEVEL_BYTES: [u8; 16] = {
    let mut b = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        b[i] = LEVELS[i] as u8;
        i += 1;
    }
    b
};

/// [`levels`] in lanes.
#[inline(always)]
fn levels_lanes<V: Lanes>(t: &Tile<V>, raw: [V; 4]) -> [V; 8] {
    let table = V::bytes(t.isa(), LEVEL_BYTES);
    let mut q = t.nibbles16(raw);
    for v in &mut q {
        *v = table.lookup(*v);
    }
    q
}

/// The nibble indexing the level nearest `v`.
fn nearest(v: f32) -> u8 {
    let dist = |i: usize| (f32::from(LEVELS[i]) - v).abs();
    (0..16).min_by(|&a, &b| dist(a).total_cmp(&dist(b))).unwrap_or(0) as u8
}

/// Nibbles of 32 values, each the level nearest `x / step`, packed as Q4_0's.
fn quantize_levels(x: &[f32], step: f32) -> [u8; 16] {
    let n: [u8; QK] = std::array::from_fn(|i| nearest(x[i] * inv(step)));
    std::array::from_fn(|j| n[j] | (n[j + 16] << 4))
}

impl Format for IQ4NL {
    const TYPE: GgmlType = GgmlType::IQ4NL;
    type Block = BlockIQ4NL;

    fn decode(b: &BlockIQ4NL, out: &mut Ints) {
        out.set32(0, f16(b.d), 0.0);
        levels(&b.qs, &mut out.q);
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, _: usize, out: &mut Unit<V>) {
        out.scale[0] = [t.dword(offset_of!(BlockIQ4NL, d)).f16_lo(); 2];
        out.q[0] = levels_lanes(t, t.bytes16(offset_of!(BlockIQ4NL, qs)));
    }

    fn quantize(x: &[f32]) -> BlockIQ4NL {
        let d = f16(to_f16(signed_max(x) / f32::from(LEVELS[0])));
        BlockIQ4NL { d: to_f16(d), qs: quantize_levels(x, d) }
    }
}

impl Format for IQ4XS {
    const TYPE: GgmlType = GgmlType::IQ4XS;
    type Block = BlockIQ4XS;

    fn decode(b: &BlockIQ4XS, out: &mut Ints) {
        let (d, high) = (f16(b.d), u16::from_le_bytes(b.scales_h));
        for g in 0..8 {
            let low = (b.scales_l[g / 2] >> (4 * (g % 2))) & 0xF;
            let s = i32::from(low) | (i32::from((high >> (2 * g)) & 3) << 4);
            out.set32(g, d * (s - 32) as f32, 0.0);
            levels(&b.qs[16 * g..16 * g + 16], &mut out.q[32 * g..]);
        }
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, unit: usize, out: &mut Unit<V>) {
        let head = t.dword(offset_of!(BlockIQ4XS, d));
        let (d, high) = (head.f16_lo(), head.shr32(16));
        let low = t.dword(offset_of!(BlockIQ4XS, scales_l));
        let (m4, m2, bias) = (t.splat(15), t.splat(3), t.splat(32));
        for k in 0..4 {
            let g = 4 * unit + k;
            let s = low.shr32((8 * (g / 2) + 4 * (g % 2)) as u32).and(m4);
            let s = s.or(high.shr32(2 * g as u32).and(m2).shl32(4)).sub32(bias);
            out.scale[k] = [d.mul(s.to_f32()); 2];
            out.q[k] = levels_lanes(t, t.bytes16(offset_of!(BlockIQ4XS, qs) + 16 * g));
        }
    }

    fn quantize(x: &[f32]) -> BlockIQ4XS {
        // Per 32 values a step max / −127, rounded to a signed 6-bit multiple of d.
        let step: [f32; 8] = std::array::from_fn(|g| signed_max(&x[32 * g..32 * g + 32]) / f32::from(LEVELS[0]));
        let d = f16(to_f16(step.iter().fold(0.0f32, |m, s| m.max(s.abs())) / 31.0));
        let mut b = BlockIQ4XS { d: to_f16(d), scales_h: [0; 2], scales_l: [0; 4], qs: [0; 128] };
        let mut high = 0u16;
        for g in 0..8 {
            let s = ((step[g] * inv(d)).round() as i32).clamp(-32, 31);
            let ls = (s + 32) as u8;
            b.scales_l[g / 2] |= (ls & 0xF) << (4 * (g % 2));
            high |= u16::from(ls >> 4) << (2 * g);
            let qs = quantize_levels(&x[32 * g..32 * g + 32], d * s as f32);
            b.qs[16 * g..16 * g + 16].copy_from_slice(&qs);
        }
        b.scales_h = high.to_le_bytes();
        b
    }
}
