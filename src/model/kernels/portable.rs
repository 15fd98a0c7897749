//! Portable kernels (no intrinsics): weight blocks dequantized exactly ([`Format::decode`])
//! and dotted with f32 activations in 16 running lanes.
//!
//! Each function computes one output with a fixed sequence of float operations, so
//! its result does not depend on where the call comes from.

use super::formats::{BF16, F16, F32, FloatFormat, Format, FormatFn, Ints, blocks, with_format};
use crate::model::ggml_type::GgmlType;

/// Lanes of the running sums.
pub(super) const LANES: usize = 16;

/// `row · x` for each x row of `xs`, into `out`.
#[inline(always)]
pub(crate) fn tile(t: GgmlType, row: &[u8], xs: &[&[f32]], out: &mut [f32]) {
    for (o, x) in out.iter_mut().zip(xs) {
        *o = match t {
            GgmlType::F32 => dot_float::<F32>(row, x),
            GgmlType::F16 => dot_float::<F16>(row, x),
            GgmlType::BF16 => dot_float::<BF16>(row, x),
            _ => with_format(t, Dot(row, x)).unwrap_or_else(|| panic!("no kernels for {t}")),
        };
    }
}

/// [`dot_quantized`] for the format of a type.
struct Dot<'a>(&'a [u8], &'a [f32]);

impl FormatFn for Dot<'_> {
    type Out = f32;
    #[inline(always)]
    fn call<F: Format>(self) -> f32 {
        dot_quantized::<F>(self.0, self.1)
    }
}

/// Dot of one block-quantized row with one f32 activation row.
#[inline(always)]
fn dot_quantized<F: Format>(row: &[u8], x: &[f32]) -> f32 {
    let mut ints = Ints::default();
    let mut w = [0.0f32; 256];
    let mut lanes = [0.0f32; LANES];
    for (block, xb) in blocks::<F>(row).iter().zip(x.chunks_exact(F::ELEMS)) {
        F::decode(block, &mut ints);
        for (i, v) in w[..F::ELEMS].iter_mut().enumerate() {
            *v = ints.value::<F>(i);
        }
        for (wc, xc) in w[..F::ELEMS].chunks_exact(LANES).zip(xb.chunks_exact(LANES)) {
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
fn dot_float<F: FloatFormat>(row: &[u8], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut w = [0.0f32; 8];
    const { assert!(size_of::<F::Block>() == F::TYPE.block_bytes()) };
    let values: &[F::Block] = bytemuck::cast_slice(row);
    for (wb, xc) in values.chunks(8).zip(x.chunks(8)) {
        for (k, &v) in wb.iter().enumerate() {
            w[k] = F::value(v);
        }
        for k in 0..xc.len() {
            lanes[k] += w[k] * xc[k];
        }
    }
    let l = lanes;
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

/// Dequantizes a row: block by block through [`Format::decode`], or value by value.
pub(crate) fn dequantize_row(t: GgmlType, src: &[u8], dst: &mut [f32]) {
    fn floats<F: FloatFormat>(src: &[u8], dst: &mut [f32]) {
        for (v, &b) in dst.iter_mut().zip(bytemuck::cast_slice::<u8, F::Block>(src)) {
            *v = F::value(b);
        }
    }
    struct Dequantize<'a>(&'a [u8], &'a mut [f32]);
    impl FormatFn for Dequantize<'_> {
        type Out = ();
        fn call<F: Format>(self) {
            let mut ints = Ints::default();
            for (block, y) in blocks::<F>(self.0).iter().zip(self.1.chunks_exact_mut(F::ELEMS)) {
                F::decode(block, &mut ints);
                for (i, v) in y.iter_mut().enumerate() {
                    *v = ints.value::<F>(i);
                }
            }
        }
    }
    match t {
        GgmlType::F32 => floats::<F32>(src, dst),
        GgmlType::F16 => floats::<F16>(src, dst),
        GgmlType::BF16 => floats::<BF16>(src, dst),
        _ => with_format(t, Dequantize(src, dst)).unwrap_or_else(|| panic!("no kernels for {t}")),
    }
}
