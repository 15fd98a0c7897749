//! Elementwise FFN activations, compiled once per vector width with the same operations in
//! the same order (no fused multiply-add introduced), so every kernel set gives the same bits.

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
