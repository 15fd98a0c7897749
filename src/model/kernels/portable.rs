//! Portable kernels (no intrinsics): weight blocks dequantized exactly and dotted with
//! f32 activations in 16 running lanes.
//!
//! Each function computes one output with a fixed sequence of float operations, so
//! its result does not depend on where the call comes from.

use super::blocks::Unpacked;
use crate::model::ggml_type::GgmlType;

/// Lanes of the running sums.
pub(super) const LANES: usize = 16;

/// `row · x` for each of `NX` x rows, by [`dot_float`] or [`dot_quantized`].
#[inline(always)]
pub(crate) fn tile<const NX: usize>(t: GgmlType, row: &[u8], xs: &[&[f32]; NX]) -> [f32; NX] {
    let mut out = [0.0f32; NX];
    for (o, x) in out.iter_mut().zip(xs) {
        *o = if t.block_elems() == 1 { dot_float(t, row, x) } else { dot_quantized(t, row, x) };
    }
    out
}

/// [`tile`] compiled for AVX-512: the same operations in the same order (no fused
/// multiply-add is introduced), so the same bits, with the lane loops 16 wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c")]
pub(crate) fn tile_avx512<const NX: usize>(t: GgmlType, row: &[u8], xs: &[&[f32]; NX]) -> [f32; NX] {
    tile(t, row, xs)
}

/// [`tile`] compiled for AVX2 (same bits, 8-wide lane loops).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,f16c")]
pub(crate) fn tile_avx2<const NX: usize>(t: GgmlType, row: &[u8], xs: &[&[f32]; NX]) -> [f32; NX] {
    tile(t, row, xs)
}

/// Dot of one block-quantized row with one f32 activation row.
#[inline(always)]
pub(crate) fn dot_quantized(t: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let be = t.block_elems();
    let mut u = Unpacked::default();
    let mut w = [0.0f32; 256];
    let mut lanes = [0.0f32; LANES];
    for (block, xb) in row.chunks_exact(t.block_bytes()).zip(x.chunks_exact(be)) {
        u.decode(t, block);
        u.dequantize(&mut w[..be]);
        for (wc, xc) in w[..be].chunks_exact(LANES).zip(xb.chunks_exact(LANES)) {
            for k in 0..LANES {
                lanes[k] += wc[k] * xc[k];
            }
        }
    }
    sum_lanes(&lanes)
}

/// Sums 16 lanes pairwise in a fixed order.
#[inline(always)]
pub(super) fn sum_lanes(l: &[f32; LANES]) -> f32 {
    let mut v = *l;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for k in 0..n {
            v[k] += v[k + n];
        }
    }
    v[0]
}

/// Dot of one float row (F32, F16, BF16) with f32 activations, in 8 running lanes.
#[inline(always)]
pub(crate) fn dot_float(t: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut w = [0.0f32; 8];
    let bytes = t.block_bytes();
    for (wb, xc) in row.chunks(8 * bytes).zip(x.chunks(8)) {
        for (k, v) in wb.chunks_exact(bytes).enumerate() {
            w[k] = float_at(t, v);
        }
        for k in 0..xc.len() {
            lanes[k] += w[k] * xc[k];
        }
    }
    let l = lanes;
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// Decodes one stored float of type `t` (F32, F16 or BF16).
#[inline(always)]
pub(crate) fn float_at(t: GgmlType, b: &[u8]) -> f32 {
    match t {
        GgmlType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
    }
}

/// Dequantizes a row block by block through [`Unpacked`] (or float decoding).
pub(crate) fn dequantize_row(t: GgmlType, src: &[u8], dst: &mut [f32]) {
    let be = t.block_elems();
    if be == 1 {
        for (v, b) in dst.iter_mut().zip(src.chunks_exact(t.block_bytes())) {
            *v = float_at(t, b);
        }
        return;
    }
    let mut u = Unpacked::default();
    for (block, y) in src.chunks_exact(t.block_bytes()).zip(dst.chunks_exact_mut(be)) {
        u.decode(t, block);
        u.dequantize(y);
    }
}
