//! What the x86 kernels (AVX-512 and AVX2) share: the block sizes of the types they
//! handle, and the bounds check their unchecked loads rely on.

/// Values per Q4_1 / Q8_0 block (the activation block too).
pub(super) use super::quant_acts::QK;
/// Bytes of one Q4_1 block: f16 d, f16 m, 16 bytes of nibbles.
pub(super) const Q4_1_BYTES: usize = 20;
/// Bytes of one Q8_0 block: f16 d, 32 signed bytes.
pub(super) const Q8_0_BYTES: usize = 34;

/// Checks every x row holds `blocks * QK` values (the kernels' loads rely on it).
pub(super) fn check_rows<const NX: usize>(xs: &[&[f32]; NX], blocks: usize) {
    for x in xs {
        assert!(x.len() >= blocks * QK, "x row of {} values for {blocks} blocks", x.len());
    }
}
