//! What every block format shares: the [`Format`] description, a block as integers, and
//! the f16 and rounding helpers the formats' decoders use.

use crate::model::ggml_type::GgmlType;
use crate::model::kernels::lanes::{Lanes, Tile, Unit};

/// Values per activation block: the unit of the integer dot products and of [`Unit`].
pub(crate) const QK: usize = 32;

/// One block-quantized GGUF format.
pub(crate) trait Format: 'static {
    const TYPE: GgmlType;
    /// The block as stored: alignment 1, its size pinned by an assert next to it.
    type Block: bytemuck::Pod;
    /// Values per block (32 or 256).
    const ELEMS: usize = Self::TYPE.block_elems();
    /// Bytes per block.
    const BYTES: usize = Self::TYPE.block_bytes();
    /// A scale (and offset) per 16 values rather than per 32 (Q2_K, Q3_K, Q6_K).
    const PER_16: bool = false;
    /// Values are `scale · q + offset` rather than `scale · q`.
    const HAS_OFFSET: bool = false;
    /// Values [`Format::lanes`] decodes per call: a whole 32-value block, or a 128-value half
    /// of a 256-value one.
    const UNIT: usize = if Self::TYPE.block_elems() == 32 { 32 } else { 128 };

    /// One block as integers: value `i` is `scale[i / 16] · q[i]`, plus `offset[i / 16]` when
    /// [`Format::HAS_OFFSET`]. With a scale per 32 values both halves carry the same one.
    fn decode(b: &Self::Block, out: &mut Ints);

    /// [`Format::decode`] for unit `unit` of the current block of every row of `t`, lane `j`
    /// holding row `j`: `out.q[k][u]` holds values `4u..4u + 4` of the unit's 32-value block
    /// `k` as bytes, `out.scale[k][h]` and `out.offset[k][h]` those of its half `h` (with a
    /// scale per 32 values, only `[k][0]` is read). The same values, scales and offsets as
    /// [`Format::decode`], bit for bit.
    fn lanes<V: Lanes>(t: &Tile<V>, unit: usize, out: &mut Unit<V>);

    /// Quantizes `x` ([`Format::ELEMS`] values) round-to-nearest. For tests and benches: it
    /// writes valid blocks, and does not try to be ggml's quantizer.
    fn quantize(x: &[f32]) -> Self::Block;
}

/// One block as integers with scales and offsets (see [`Format::decode`]).
#[derive(Clone, Debug)]
pub(crate) struct Ints {
    pub q: [i8; 256],
    pub scale: [f32; 16],
    pub offset: [f32; 16],
}

impl Default for Ints {
    fn default() -> Self {
        Ints { q: [0; 256], scale: [0.0; 16], offset: [0.0; 16] }
    }
}

impl Ints {
    /// Value `i`: `scale · q`, plus the offset for formats that have one.
    #[inline(always)]
    pub fn value<F: Format>(&self, i: usize) -> f32 {
        let v = self.scale[i / 16] * f32::from(self.q[i]);
        if F::HAS_OFFSET { v + self.offset[i / 16] } else { v }
    }

    /// Sets scale and offset of the 32 values of sub-block `g`.
    #[inline(always)]
    pub(super) fn set32(&mut self, g: usize, scale: f32, offset: f32) {
        self.scale[2 * g..2 * g + 2].fill(scale);
        self.offset[2 * g..2 * g + 2].fill(offset);
    }
}

/// The blocks of a row (panics if `row` is not whole blocks).
pub(crate) fn blocks<F: Format>(row: &[u8]) -> &[F::Block] {
    const { assert!(size_of::<F::Block>() == F::BYTES && align_of::<F::Block>() == 1) };
    bytemuck::cast_slice(row)
}

/// An f16 stored in a block, as f32.
#[inline(always)]
pub(crate) fn f16(b: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(b).to_f32()
}

/// `v` rounded to the nearest f16, as stored.
pub(crate) fn to_f16(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// The value of largest magnitude, with its sign.
pub(crate) fn signed_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// `1 / d`, or 0 for a zero step.
pub(crate) fn inv(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}
