//! Elementwise FFN activations, compiled once per vector width with the same operations in
//! the same order (no fused multiply-add introduced), so every kernel set gives the same bits;
//! and the argmax of a logit row, which only compares.

use super::attention::exp_separate;

/// `gate_i ← gelu_tanh(gate_i) · up_i`, GELU's tanh approximation
/// `x/2 · (1 + tanh y)`, `y = √(2/π) · (x + 0.044715 x³)`, as `x / (1 + t)` for `y ≥ 0` and
/// `x · t / (1 + t)` below, `t = e^{−2|y|}` from the polynomial `exp`: no libm call, so the
/// loop vectorises, and no `1 + tanh y` cancelling where GELU is nearly 0.
#[inline(always)]
pub(super) fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let y = SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
        let t = exp_separate(-2.0 * y.abs());
        let num = if y < 0.0 { x * t } else { x };
        *g = num / (1.0 + t) * u;
    }
}

/// [`gelu_tanh_mul`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c")]
pub(super) fn gelu_tanh_mul_avx512(gate: &mut [f32], up: &[f32]) {
    gelu_tanh_mul(gate, up)
}

/// [`gelu_tanh_mul`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,f16c")]
pub(super) fn gelu_tanh_mul_avx2(gate: &mut [f32], up: &[f32]) {
    gelu_tanh_mul(gate, up)
}

/// `gate_i ← silu(gate_i) · up_i`, `silu(x) = x / (1 + e^{−x})`, as `x / (1 + t)` for
/// `x ≥ 0` and `x · t / (1 + t)` below, `t = e^{−|x|}` from the polynomial `exp` (−0 for
/// −∞, the limit, where the formula gives NaN): no libm
/// call (libm's `expf` was 2–3% of a SmolLM2 prefill profile), so the loop vectorises.
#[inline(always)]
pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let t = exp_separate(-x.abs());
        // Below −87 `t` is 0 and the product −0 (also for −∞, where `x · t` would be NaN).
        let num = if x >= 0.0 {
            x
        } else if t > 0.0 {
            x * t
        } else {
            -0.0
        };
        *g = num / (1.0 + t) * u;
    }
}

/// [`silu_mul`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx,avx2,fma,f16c")]
pub(super) fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    silu_mul(gate, up)
}

/// [`silu_mul`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,avx2,fma,f16c")]
pub(super) fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    silu_mul(gate, up)
}

/// Lanes of [`argmax_lanes`]: one AVX-512 register of f32.
const ARGMAX_LANES: usize = 16;

/// Index of the largest value, the first on ties, NaN never chosen; 0 when no value is above
/// −∞. Each of 16 lanes keeps its largest value and the first 16-value chunk it came from, so
/// the loop is compares and selects across the lanes (vectorised), not one chain of
/// compare-and-branch: 360 µs a 262,144-logit row before, 114 µs on SSE2 and 22 µs on
/// AVX-512 (one thread).
#[inline(always)]
pub(super) fn argmax_lanes(row: &[f32]) -> usize {
    const L: usize = ARGMAX_LANES;
    let (mut best, mut chunk) = ([f32::NEG_INFINITY; L], [0u32; L]);
    let chunks = row.chunks_exact(L);
    let rest = chunks.remainder();
    for (c, xs) in chunks.enumerate() {
        for ((b, at), &x) in best.iter_mut().zip(chunk.iter_mut()).zip(xs) {
            let above = x > *b;
            *b = if above { x } else { *b };
            *at = if above { c as u32 } else { *at };
        }
    }
    // The lanes' winners as indices; among equal values the lowest index.
    let mut pick = (0usize, f32::NEG_INFINITY);
    for (lane, (&b, &c)) in best.iter().zip(&chunk).enumerate() {
        let i = c as usize * L + lane;
        if b > pick.1 || (b == pick.1 && b > f32::NEG_INFINITY && i < pick.0) {
            pick = (i, b);
        }
    }
    let base = row.len() - rest.len();
    for (j, &x) in rest.iter().enumerate() {
        if x > pick.1 {
            pick = (base + j, x);
        }
    }
    pick.0
}

/// [`argmax_lanes`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn argmax_avx512(row: &[f32]) -> usize {
    argmax_lanes(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain scan: the first value above every earlier one.
    fn first_largest(row: &[f32]) -> usize {
        row.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
    }

    #[test]
    fn argmax_is_the_first_largest_value_on_every_path() {
        let mut rows: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN; 40],
            vec![f32::NEG_INFINITY; 33],
            vec![2.0; 50],
            (0..100).map(|i| if i % 7 == 0 { f32::NAN } else { (i % 13) as f32 }).collect(),
            (0..70)
                .map(|i| {
                    if i == 5 {
                        -0.0
                    } else if i == 40 {
                        0.0
                    } else {
                        -1.0
                    }
                })
                .collect(),
            (0..70).map(|i| if i == 69 { 5.0 } else { 1.0 }).collect(),
            (0..64).map(|i| if i == 3 || i == 19 || i == 35 { 9.0 } else { f32::NEG_INFINITY }).collect(),
            (0..48).map(|i| if i == 31 || i == 17 { 4.0 } else { 0.0 }).collect(),
        ];
        // Small integers: ties within and across lanes and chunks, tails of every length.
        let mut s = 7u64;
        for n in 0..300 {
            let row = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    (s >> 60) as f32
                })
                .collect();
            rows.push(row);
        }
        for row in &rows {
            let want = first_largest(row);
            assert_eq!(argmax_lanes(row), want, "{row:?}");
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F.
                assert_eq!(unsafe { argmax_avx512(row) }, want, "avx512: {row:?}");
            }
        }
    }
}
