//! `qwen3`: Qwen3 dense models. Qwen2's block without biases, plus a per-head RMSNorm of
//! Q and K before RoPE; the head size comes from `qwen3.attention.key_length`.

use crate::model::desc::{Activation, Family, RopeStyle, no_extra};

pub const QWEN3: Family = Family {
    name: "qwen3",
    rope_style: RopeStyle::SplitHalves,
    activation: Activation::Silu,
    qk_norm: true,
    post_norms: false,
    embed_scale: false,
    partial_rotary: false,
    q_dim_is_embd: false,
    extra: no_extra,
};
