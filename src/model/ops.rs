//! The per-row operations of the llama forward pass: dot product, RMSNorm, RoPE, SiLU and
//! attention over the KV arena. Each works on one row (or one query row's heads) at a
//! time, so its result never depends on what else is in the batch. Public for the
//! criterion benches.

use crate::kv::arena::{BlockId, KvArena};
use crate::model::kernels::Kernels;
use crate::model::kernels::attention::{AttnShape, CHUNK, ChunkJob, ChunkScratch, merge};

/// Attention for one query row over positions `0..=pos` of its sequence, on this thread:
/// its chunks in order, then [`merge`]. The forward pass runs the same chunks spread over
/// its pool, with the same result.
#[allow(clippy::too_many_arguments)]
pub fn attend_row(
    kernels: Kernels,
    shape: AttnShape,
    layer: usize,
    q: &[f32],
    pos: usize,
    blocks: &[BlockId],
    kv: &KvArena,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let plen = shape.partial_len();
    let chunks = AttnShape::chunks(pos);
    scratch.parts.resize(chunks * plen, 0.0);
    for (c, part) in scratch.parts.chunks_exact_mut(plen).enumerate() {
        let range = c * CHUNK..((c + 1) * CHUNK).min(pos + 1);
        let job = ChunkJob { shape, layer, q, range, blocks, kv };
        kernels.attend_chunk(&job, &mut scratch.chunk, part);
    }
    merge(shape, &scratch.parts, out);
}

/// Buffers of [`attend_row`].
#[derive(Default)]
pub struct AttnScratch {
    chunk: ChunkScratch,
    parts: Vec<f32>,
}

/// `out = x / rms(x) · w`.
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

/// The cosines and sines of RoPE's angles `pos · inv_freq[i]` (computed in f64, then
/// rounded), one pair per rotated pair of a head.
pub fn rope_angles(pos: usize, inv_freq: &[f64], cos: &mut [f32], sin: &mut [f32]) {
    for ((f, c), s) in inv_freq.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
        let theta = pos as f64 * f;
        (*c, *s) = (theta.cos() as f32, theta.sin() as f32);
    }
}

/// Rotates adjacent pairs `(x[2i], x[2i+1])` by the angles of [`rope_angles`] (ggml's normal
/// mode); pairs past `cos.len()` are left as they are.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for ((pair, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// `x · sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
