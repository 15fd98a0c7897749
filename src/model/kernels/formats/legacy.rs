//! The 32-value formats: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (one f16 scale per block, and for
//! the `_1` kinds an f16 minimum).

use std::mem::offset_of;

use bytemuck::{Pod, Zeroable};

use super::block::{Format, Ints, QK, f16, inv, signed_max, to_f16};
use crate::model::ggml_type::GgmlType;
use crate::model::kernels::lanes::{Lanes, Tile, Unit};

/// Q4_0: `d · (n − 8)` for 4-bit `n`; byte `j` holds values `j` (low nibble) and `j + 16`.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ4_0 {
    d: [u8; 2],
    qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// Q4_1: `d · n + m`, nibbles as Q4_0.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ4_1 {
    d: [u8; 2],
    m: [u8; 2],
    qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// Q5_0: `d · (n − 16)` for 5-bit `n`: nibbles as Q4_0, bit `i` of `qh` the fifth bit of value `i`.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ5_0 {
    d: [u8; 2],
    qh: [u8; 4],
    qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ5_0>() == 22);

/// Q5_1: `d · n + m`, 5-bit `n` as Q5_0.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ5_1 {
    d: [u8; 2],
    m: [u8; 2],
    qh: [u8; 4],
    qs: [u8; 16],
}
const _: () = assert!(size_of::<BlockQ5_1>() == 24);

/// Q8_0: `d · q` for signed bytes `q`.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C)]
pub(crate) struct BlockQ8_0 {
    d: [u8; 2],
    qs: [u8; 32],
}
const _: () = assert!(size_of::<BlockQ8_0>() == 34);

pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q8_0;

/// The nibbles of `qs` (plus the fifth bits of `qh`, if any) minus `bias`.
#[inline(always)]
fn unpack(qs: &[u8; 16], qh: Option<[u8; 4]>, bias: i8, q: &mut [i8]) {
    let qh = qh.map_or(0, u32::from_le_bytes);
    for (j, &b) in qs.iter().enumerate() {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        q[j] = ((b & 0xF) | (h0 << 4)) as i8 - bias;
        q[j + 16] = ((b >> 4) | (h1 << 4)) as i8 - bias;
    }
}

/// The nibbles (and fifth bits) of `q` (values `0..levels`), packed ggml's way.
fn pack(q: &[u8; QK]) -> ([u8; 16], [u8; 4]) {
    let qh = (0..QK).fold(0u32, |h, j| h | (u32::from(q[j] >> 4) & 1) << j);
    (std::array::from_fn(|j| (q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)), qh.to_le_bytes())
}

/// `d = max / −half`, `n = round(x / d) + half` (ggml's symmetric rule).
fn quantize_sym(x: &[f32], half: i32) -> (f32, [u8; QK]) {
    let d = signed_max(x) / -(half as f32);
    let id = inv(d);
    (d, std::array::from_fn(|i| ((x[i] * id + half as f32 + 0.5) as i32).clamp(0, 2 * half - 1) as u8))
}

/// `d = (max − min) / levels`, `m = min`.
fn quantize_affine(x: &[f32], levels: i32) -> (f32, f32, [u8; QK]) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / levels as f32;
    let id = inv(d);
    (d, min, std::array::from_fn(|i| (((x[i] - min) * id + 0.5) as i32).clamp(0, levels) as u8))
}

impl Format for Q4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    type Block = BlockQ4_0;

    fn decode(b: &BlockQ4_0, out: &mut Ints) {
        out.set32(0, f16(b.d), 0.0);
        unpack(&b.qs, None, 8, &mut out.q);
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, _: usize, out: &mut Unit<V>) {
        let d = t.dword(offset_of!(BlockQ4_0, d)).f16_lo();
        let eight = t.splat(0x0808_0808);
        out.q[0] = t.nibbles16(t.bytes16(offset_of!(BlockQ4_0, qs)));
        for v in &mut out.q[0] {
            *v = v.sub8(eight);
        }
        out.scale[0] = [d; 2];
    }

    fn quantize(x: &[f32]) -> BlockQ4_0 {
        let (d, q) = quantize_sym(x, 8);
        BlockQ4_0 { d: to_f16(d), qs: pack(&q).0 }
    }
}

impl Format for Q4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    type Block = BlockQ4_1;
    const HAS_OFFSET: bool = true;

    fn decode(b: &BlockQ4_1, out: &mut Ints) {
        out.set32(0, f16(b.d), f16(b.m));
        unpack(&b.qs, None, 0, &mut out.q);
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, _: usize, out: &mut Unit<V>) {
        let dm = t.dword(offset_of!(BlockQ4_1, d));
        out.q[0] = t.nibbles16(t.bytes16(offset_of!(BlockQ4_1, qs)));
        out.set32(0, dm.f16_lo(), dm.shr32(16).f16_lo());
    }

    fn quantize(x: &[f32]) -> BlockQ4_1 {
        let (d, m, q) = quantize_affine(x, 15);
        BlockQ4_1 { d: to_f16(d), m: to_f16(m), qs: pack(&q).0 }
    }
}

impl Format for Q5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    type Block = BlockQ5_0;

    fn decode(b: &BlockQ5_0, out: &mut Ints) {
        out.set32(0, f16(b.d), 0.0);
        unpack(&b.qs, Some(b.qh), 16, &mut out.q);
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, _: usize, out: &mut Unit<V>) {
        let d = t.dword(offset_of!(BlockQ5_0, d)).f16_lo();
        let high = t.mask_bytes(t.dword(offset_of!(BlockQ5_0, qh)), 0x10);
        let low = t.nibbles16(t.bytes16(offset_of!(BlockQ5_0, qs)));
        let sixteen = t.splat(0x1010_1010);
        for u in 0..8 {
            out.q[0][u] = low[u].or(high[u]).sub8(sixteen);
        }
        out.scale[0] = [d; 2];
    }

    fn quantize(x: &[f32]) -> BlockQ5_0 {
        let (d, q) = quantize_sym(x, 16);
        let (qs, qh) = pack(&q);
        BlockQ5_0 { d: to_f16(d), qh, qs }
    }
}

impl Format for Q5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    type Block = BlockQ5_1;
    const HAS_OFFSET: bool = true;

    fn decode(b: &BlockQ5_1, out: &mut Ints) {
        out.set32(0, f16(b.d), f16(b.m));
        unpack(&b.qs, Some(b.qh), 0, &mut out.q);
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, _: usize, out: &mut Unit<V>) {
        let dm = t.dword(offset_of!(BlockQ5_1, d));
        let high = t.mask_bytes(t.dword(offset_of!(BlockQ5_1, qh)), 0x10);
        let low = t.nibbles16(t.bytes16(offset_of!(BlockQ5_1, qs)));
        for u in 0..8 {
            out.q[0][u] = low[u].or(high[u]);
        }
        out.set32(0, dm.f16_lo(), dm.shr32(16).f16_lo());
    }

    fn quantize(x: &[f32]) -> BlockQ5_1 {
        let (d, m, q) = quantize_affine(x, 31);
        let (qs, qh) = pack(&q);
        BlockQ5_1 { d: to_f16(d), m: to_f16(m), qh, qs }
    }
}

impl Format for Q8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    type Block = BlockQ8_0;

    fn decode(b: &BlockQ8_0, out: &mut Ints) {
        out.set32(0, f16(b.d), 0.0);
        for (q, &v) in out.q.iter_mut().zip(&b.qs) {
            *q = v as i8;
        }
    }

    #[inline(always)]
    fn lanes<V: Lanes>(t: &Tile<V>, _: usize, out: &mut Unit<V>) {
        // The 4-byte read at `d` takes two value bytes too; `f16_lo` keeps the scale.
        out.scale[0] = [t.dword(offset_of!(BlockQ8_0, d)).f16_lo(); 2];
        out.q[0] = t.bytes32(offset_of!(BlockQ8_0, qs));
    }

    fn quantize(x: &[f32]) -> BlockQ8_0 {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = inv(d);
        BlockQ8_0 { d: to_f16(d), qs: std::array::from_fn(|i| ((x[i] * id).round() as i32).clamp(-127, 127) as u8) }
    }
}
