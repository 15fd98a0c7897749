//! The per-row operations of the forward pass: RMSNorm, RoPE, the FFN activations and
//! attention over the KV arena. Each works on one row (or one query row's heads) at a
//! time, so its result never depends on what else is in the batch. Public for the
//! criterion benches.

use crate::kv::arena::{BlockId, KvArena};
use crate::model::desc::RopeStyle;
use crate::model::kernels::Kernels;
use crate::model::kernels::attention::{AttnShape, ChunkScratch, Span, TileJob};

/// Attention for one query row over the positions `span` covers, on this thread: its
/// chunks in order, then [`Kernels::merge_strided`]. The forward pass runs the same chunks
/// spread over its pool, with the same result.
#[allow(clippy::too_many_arguments)]
pub fn attend_row(
    kernels: Kernels,
    shape: AttnShape,
    layer: usize,
    q: &[f32],
    span: Span,
    blocks: &[BlockId],
    kv: &KvArena,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let plen = shape.partial_len();
    scratch.parts.resize(span.chunks() * plen, 0.0);
    for (c, part) in scratch.parts.chunks_exact_mut(plen).enumerate() {
        let range = span.chunk(c);
        let job = TileJob { shape, layer, q, ranges: std::slice::from_ref(&range), blocks, kv };
        kernels.attend_tile(&job, &mut scratch.chunk, part);
    }
    kernels.merge_strided(shape, &scratch.parts, shape.partial_len(), out);
}

/// Buffers of [`attend_row`].
#[derive(Default)]
pub struct AttnScratch {
    chunk: ChunkScratch,
    parts: Vec<f32>,
}

/// `out = x / rms(x) · w` (the sum of squares in f32).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let k = 1.0 / (ss + eps).sqrt();
    for ((o, xi), wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * k * wi;
    }
}

/// [`rms_norm`] of every `w.len()`-wide row of `x`.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        rms_norm(xr, w, eps, or);
    }
}

/// The cosines and sines of RoPE's angles `pos · inv_freq[i]`, times `magnitude` (1
/// unless the model scales them), computed in f64 and then rounded; one pair per rotated
/// pair of a head.
pub fn rope_angles(pos: usize, inv_freq: &[f64], magnitude: f64, cos: &mut [f32], sin: &mut [f32]) {
    for ((f, c), s) in inv_freq.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
        let theta = pos as f64 * f;
        (*c, *s) = ((theta.cos() * magnitude) as f32, (theta.sin() * magnitude) as f32);
    }
}

/// RMSNorm of each `w.len()`-wide piece of `x`, in place (per-head Q/K norms, post-norms).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for head in x.chunks_exact_mut(w.len()) {
        let ss = head.iter().map(|v| v * v).sum::<f32>() / head.len() as f32;
        let k = 1.0 / (ss + eps).sqrt();
        for (v, wi) in head.iter_mut().zip(w) {
            *v = *v * k * wi;
        }
    }
}

/// Rotates the pairs of one head by the angles of [`rope_angles`]: adjacent pairs
/// `(x[2i], x[2i+1])` (ggml's normal mode) or split halves `(x[i], x[i + n/2])` over the
/// first `n = 2·cos.len()` values (NeoX mode); values past those are left as they are.
pub fn rope(style: RopeStyle, x: &mut [f32], cos: &[f32], sin: &[f32]) {
    match style {
        RopeStyle::Adjacent => {
            for ((pair, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        }
        RopeStyle::SplitHalves => {
            let half = cos.len();
            let (lo, hi) = x[..2 * half].split_at_mut(half);
            for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                let (x0, x1) = (*a, *b);
                *a = x0 * c - x1 * s;
                *b = x0 * s + x1 * c;
            }
        }
    }
}
