//! Each GGUF block format described once: its `#[repr(C)]` block, its values as small
//! integers with scales ([`Format::decode`], the scalar description every kernel agrees
//! with), the same decoding on a tile of rows in SIMD lanes ([`Format::lanes`], written once
//! for every instruction set against [`Lanes`]), and a plain quantizer for tests.
//!
//! Every quantized value is `scale · q (+ offset)`, with an integer `q` that fits an `i8`, a
//! scale per 16 or 32 values and, in some formats, an offset per 16 or 32 values. The scales
//! and offsets are computed with the same float operations as ggml's dequantizers, so
//! `scale · q + offset` gives their bits.

mod block;
mod floats;
mod iq4;
mod kquants;
mod legacy;

pub(crate) use floats::{BF16, F16, F32, FloatFormat};
pub(crate) use iq4::{IQ4NL, IQ4XS};
pub(crate) use kquants::{Q2K, Q3K, Q4K, Q5K, Q6K};
pub(crate) use legacy::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

pub(crate) use block::{Format, Ints, QK, blocks};

use crate::model::ggml_type::GgmlType;

/// A computation over one format, run by [`with_format`] with the format of a type.
pub(crate) trait FormatFn {
    type Out;
    fn call<F: Format>(self) -> Self::Out;
}

/// Runs `f` with the [`Format`] of `t`, or returns `None` for a float type or a type
/// without kernels. The one list of the block formats.
pub(crate) fn with_format<C: FormatFn>(t: GgmlType, f: C) -> Option<C::Out> {
    Some(match t {
        GgmlType::Q4_0 => f.call::<Q4_0>(),
        GgmlType::Q4_1 => f.call::<Q4_1>(),
        GgmlType::Q5_0 => f.call::<Q5_0>(),
        GgmlType::Q5_1 => f.call::<Q5_1>(),
        GgmlType::Q8_0 => f.call::<Q8_0>(),
        GgmlType::Q2K => f.call::<Q2K>(),
        GgmlType::Q3K => f.call::<Q3K>(),
        GgmlType::Q4K => f.call::<Q4K>(),
        GgmlType::Q5K => f.call::<Q5K>(),
        GgmlType::Q6K => f.call::<Q6K>(),
        GgmlType::IQ4NL => f.call::<IQ4NL>(),
        GgmlType::IQ4XS => f.call::<IQ4XS>(),
        _ => return None,
    })
}
