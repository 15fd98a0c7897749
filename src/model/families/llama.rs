//! `llama`: Llama 1–3.x, Mistral-style files, SmolLM and the many models converted as
//! llama. Adjacent-pair RoPE and SiLU; Llama 3.x's long-context RoPE comes as the
//! `rope_freqs.weight` factors the converter writes.

use crate::model::desc::{Activation, ArchDesc, ArchError, Family, RopeFactors, RopeStyle};
use crate::model::gguf::GgufHeader;

pub const LLAMA: Family = Family {
    name: "llama",
    rope_style: RopeStyle::Adjacent,
    activation: Activation::Silu,
    qk_norm: false,
    post_norms: false,
    embed_scale: false,
    partial_rotary: false,
    q_dim_is_embd: false,
    extra,
};

fn extra(h: &GgufHeader, desc: &mut ArchDesc) -> Result<(), ArchError> {
    if h.tensor("rope_freqs.weight").is_some() {
        desc.rope_factors = RopeFactors::Tensor("rope_freqs.weight".into());
    }
    Ok(())
}
