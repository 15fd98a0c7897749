//! `phi3`: Phi-3, Phi-3.5 and Phi-4-mini. Fused `attn_qkv` and fused gate/up in `ffn_up`
//! (gate first), split-half RoPE over possibly fewer values than the head holds, and for
//! the 128k models LongRoPE: per-pair factors (long ones when the context passes the
//! original one) and an attention factor on RoPE's magnitude. The window some files
//! declare is ignored, as llama.cpp does: attention is fully causal.

use crate::model::desc::{Activation, ArchDesc, ArchError, Family, RopeFactors, RopeStyle, opt_positive_f32, opt_size};
use crate::model::gguf::GgufHeader;

pub const PHI3: Family = Family {
    name: "phi3",
    rope_style: RopeStyle::SplitHalves,
    activation: Activation::Silu,
    qk_norm: false,
    post_norms: false,
    embed_scale: false,
    partial_rotary: true,
    q_dim_is_embd: true,
    extra,
};

fn extra(h: &GgufHeader, desc: &mut ArchDesc) -> Result<(), ArchError> {
    let original = opt_size(h, "phi3.rope.scaling.original_context_length")?.unwrap_or(desc.n_ctx_train);
    let long = desc.n_ctx_train > original;
    let name = if long { "rope_factors_long.weight" } else { "rope_factors_short.weight" };
    if h.tensor(name).is_some() {
        desc.rope_factors = RopeFactors::Tensor(name.into());
    }
    if let Some(f) = opt_positive_f32(h, "phi3.rope.scaling.attn_factor")? {
        desc.rope_magnitude = f;
    }
    Ok(())
}
