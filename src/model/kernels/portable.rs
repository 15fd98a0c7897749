//! Portable kernels (no intrinsics): integer dot products of decoded weight blocks with
//! 8-bit activations, and f32 dots for the float types.
//!
//! Each function computes one output with a fixed sequence of float operations, so
//! its result does not depend on where the call comes from.

use super::blocks::Unpacked;
use super::q8::QK;
use crate::model::ggml_type::GgmlType;

/// Activation blocks of one x row: quantized values, scales, and `d * Σq` per block.
#[derive(Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// Dot of one block-quantized row with one quantized activation row.
pub(crate) fn dot_quantized(t: GgmlType, row: &[u8], x: ActRow<'_>) -> f32 {
    let groups = t.block_elems() / QK;
    let per16 = t == GgmlType::Q6K;
    let mut u = Unpacked::default();
    let mut sum = 0.0f32;
    for (b, block) in row.chunks_exact(t.block_bytes()).enumerate() {
        u.decode(t, block);
        for g in 0..groups {
            let a = b * groups + g;
            let xq = &x.q[a * QK..a * QK + QK];
            let wq = &u.q[g * QK..g * QK + QK];
            let lo = idot(&wq[..16], &xq[..16]);
            let hi = idot(&wq[16..], &xq[16..]);
            let w = if per16 {
                u.scale[2 * g] * lo as f32 + u.scale[2 * g + 1] * hi as f32
            } else {
                u.scale[2 * g] * (lo + hi) as f32
            };
            sum += w * x.d[a];
            if u.has_offset {
                sum += u.offset[g] * x.s[a];
            }
        }
    }
    sum
}

fn idot(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

/// Dot of one float row (F32, F16, BF16) with f32 activations, in 8 running lanes.
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
