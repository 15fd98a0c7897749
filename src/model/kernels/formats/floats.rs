//! The float formats: one value per "block" (F32, F16, BF16), multiplied as f32.

use crate::model::ggml_type::GgmlType;

/// A float format: the stored value's bytes and its f32 value.
pub(crate) trait FloatFormat {
    const TYPE: GgmlType;
    /// One stored value.
    type Block: bytemuck::Pod;
    fn value(b: Self::Block) -> f32;
    /// `v` rounded to nearest, as stored.
    fn quantize(v: f32) -> Self::Block;
}

pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct BF16;

impl FloatFormat for F32 {
    const TYPE: GgmlType = GgmlType::F32;
    type Block = [u8; 4];

    #[inline(always)]
    fn value(b: [u8; 4]) -> f32 {
        f32::from_le_bytes(b)
    }

    fn quantize(v: f32) -> [u8; 4] {
        v.to_le_bytes()
    }
}

impl FloatFormat for F16 {
    const TYPE: GgmlType = GgmlType::F16;
    type Block = [u8; 2];

    #[inline(always)]
    fn value(b: [u8; 2]) -> f32 {
        half::f16::from_le_bytes(b).to_f32()
    }

    fn quantize(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_le_bytes()
    }
}

impl FloatFormat for BF16 {
    const TYPE: GgmlType = GgmlType::BF16;
    type Block = [u8; 2];

    #[inline(always)]
    fn value(b: [u8; 2]) -> f32 {
        half::bf16::from_le_bytes(b).to_f32()
    }

    fn quantize(v: f32) -> [u8; 2] {
        half::bf16::from_f32(v).to_le_bytes()
    }
}
