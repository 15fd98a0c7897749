//! The per-row operations of the llama forward pass: dot product, RMSNorm, RoPE, SiLU and
//! attention over the KV arena. Each works on one row (or one query row's heads) at a
//! time, so its result never depends on what else is in the batch. Public for the
//! criterion benches.

use crate::kv::arena::{BlockId, KvArena, KvRows};

/// Attention for one query row: every head over positions `0..=pos` of its sequence.
/// Each cached K and V row is read once for all heads (f16 rows are widened to f32 into
/// `scratch.row`); per head, scores, softmax and the weighted sum of values run in position
/// order, the same whatever else is in the batch.
#[allow(clippy::too_many_arguments)]
pub fn attend_row(
    n_head: usize,
    n_head_kv: usize,
    hd: usize,
    layer: usize,
    q: &[f32],
    pos: usize,
    blocks: &[BlockId],
    kv: &KvArena,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let bt = kv.layout().block_tokens;
    let kvd = n_head_kv * hd;
    let group = n_head / n_head_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_pos = pos + 1;
    let AttnScratch { scores, row } = scratch;
    scores.resize(n_head * n_pos, 0.0);
    row.resize(kvd, 0.0);
    for j in 0..n_pos {
        let k = kv_row(kv.keys(blocks[j / bt], layer), (j % bt) * kvd, row);
        for h in 0..n_head {
            let kh = &k[(h / group) * hd..][..hd];
            scores[h * n_pos + j] = dot(&q[h * hd..(h + 1) * hd], kh) * scale;
        }
    }
    for sc in scores.chunks_exact_mut(n_pos) {
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0.0f32;
        for x in sc.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in sc.iter_mut() {
            *x *= inv;
        }
    }
    out.fill(0.0);
    for j in 0..n_pos {
        let v = kv_row(kv.values(blocks[j / bt], layer), (j % bt) * kvd, row);
        for (h, o) in out.chunks_exact_mut(hd).enumerate() {
            let w = scores[h * n_pos + j];
            for (oi, vi) in o.iter_mut().zip(&v[(h / group) * hd..][..hd]) {
                *oi += w * vi;
            }
        }
    }
}

/// Per-thread buffers of [`attend_row`].
#[derive(Default)]
pub struct AttnScratch {
    /// `n_head × n_pos` scores, then probabilities.
    scores: Vec<f32>,
    /// One K or V row widened from f16.
    row: Vec<f32>,
}

/// The `buf.len()` values of `rows` from `start`: borrowed as they are (f32) or widened into `buf` (f16).
fn kv_row<'a>(rows: KvRows<'a>, start: usize, buf: &'a mut [f32]) -> &'a [f32] {
    match rows {
        KvRows::F32(r) => &r[start..start + buf.len()],
        KvRows::F16(_) => {
            rows.read_f32(start, buf);
            buf
        }
    }
}

/// `Σ a_i·b_i` with eight partial sums in a fixed order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent partial sums: vectorizes, and the order is fixed per call.
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
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

/// Rotates adjacent pairs `(x[2i], x[2i+1])` by `pos * inv_freq[i]` (ggml's normal mode).
pub fn rope(x: &mut [f32], pos: usize, inv_freq: &[f64]) {
    for (i, f) in inv_freq.iter().enumerate() {
        let theta = pos as f64 * f;
        let (sin, cos) = (theta.sin() as f32, theta.cos() as f32);
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        x[2 * i] = a * cos - b * sin;
        x[2 * i + 1] = a * sin + b * cos;
    }
}

/// `x · sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
