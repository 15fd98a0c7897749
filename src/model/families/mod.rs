//! One file per GGUF architecture (`general.architecture`): how its metadata and tensors
//! map onto an [`ArchDesc`](super::desc::ArchDesc). Adding a family is a file here with
//! its [`Family`] constant, listed in [`FAMILIES`], plus its tests.

mod gemma3;
mod llama;
mod phi3;
mod qwen2;
mod qwen3;

use super::desc::Family;

/// Every architecture Starling runs.
pub const FAMILIES: &[&Family] = &[&llama::LLAMA, &qwen2::QWEN2, &qwen3::QWEN3, &gemma3::GEMMA3, &phi3::PHI3];

/// The family named `arch`, if Starling runs it.
pub fn family(arch: &str) -> Option<&'static Family> {
    FAMILIES.iter().copied().find(|f| f.name == arch)
}

/// The supported names, for error messages.
pub fn names() -> String {
    FAMILIES.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
}
