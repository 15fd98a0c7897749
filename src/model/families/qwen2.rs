//! `qwen2`: Qwen2 and Qwen2.5. Llama's block with split-half RoPE; Q/K/V carry biases
//! (optional to the loader, present in real files) and the head may have one.

use crate::model::desc::{Activation, Family, RopeStyle, no_extra};

pub const QWEN2: Family = Family {
    name: "qwen2",
    rope_style: RopeStyle::SplitHalves,
    activation: Activation::Silu,
    qk_norm: false,
    post_norms: false,
    embed_scale: false,
    partial_rotary: false,
    q_dim_is_embd: true,
    extra: no_extra,
};
