//! `gemma3`: Gemma 3 text models. Four norms per layer (the converter stores them as
//! `1 + w`, so they apply as written), per-head Q/K norms, tanh-GELU, embeddings scaled by
//! `sqrt(n_embd)`, and sliding-window layers with their own RoPE base: with no pattern key,
//! every sixth layer is global.

use crate::model::desc::{
    Activation, ArchDesc, ArchError, Family, RopeStyle, bad, opt_positive_f32, size, size_or_zero,
};
use crate::model::gguf::{GgufHeader, GgufValue};

pub const GEMMA3: Family = Family {
    name: "gemma3",
    rope_style: RopeStyle::SplitHalves,
    activation: Activation::GeluTanh,
    qk_norm: true,
    post_norms: true,
    embed_scale: true,
    partial_rotary: false,
    q_dim_is_embd: false,
    extra,
};

/// Every `DEFAULT_PATTERN`th layer is global when the file names no pattern.
const DEFAULT_PATTERN: usize = 6;
/// RoPE base of sliding layers when `gemma3.rope.freq_base_swa` is absent.
const DEFAULT_SWA_BASE: f32 = 10_000.0;
/// The layer count of Gemma 3 27B, whose queries are scaled by `1/sqrt(n_embd/n_head)`.
const LAYERS_27B: usize = 62;

fn extra(h: &GgufHeader, desc: &mut ArchDesc) -> Result<(), ArchError> {
    if desc.n_layer == LAYERS_27B {
        desc.attn_scale = 1.0 / ((desc.n_embd / desc.n_head) as f32).sqrt();
    }
    desc.logit_softcap = opt_positive_f32(h, "gemma3.final_logit_softcapping")?;
    let key = "gemma3.attention.sliding_window";
    let window = match h.get(key) {
        None => 0,
        Some(_) => size_or_zero(h, key)?,
    };
    if window == 0 {
        return Ok(());
    }
    if window > desc.n_ctx_train {
        return Err(bad(key, format!("at most gemma3.context_length ({})", desc.n_ctx_train), window));
    }
    let sliding = sliding_layers(h, desc.n_layer)?;
    let base = opt_positive_f32(h, "gemma3.rope.freq_base_swa")?.unwrap_or(DEFAULT_SWA_BASE);
    desc.sliding_window = Some(window);
    for (layer, sliding) in desc.layers.iter_mut().zip(sliding) {
        layer.sliding = sliding;
        if sliding {
            layer.rope.freq_base = base;
            layer.rope.freq_scale = 1.0;
        }
    }
    Ok(())
}

/// Which layers slide: `gemma3.attention.sliding_window_pattern` as one flag per layer, or
/// as a period `n` (layer `i` slides unless `i % n == n - 1`), default 6.
fn sliding_layers(h: &GgufHeader, n_layer: usize) -> Result<Vec<bool>, ArchError> {
    let key = "gemma3.attention.sliding_window_pattern";
    match h.get(key) {
        Some(GgufValue::Array(flags)) => {
            if flags.len() != n_layer {
                return Err(bad(key, format!("{n_layer} flags (one per layer)"), format!("{} flags", flags.len())));
            }
            flags
                .values()
                .map(|f| match f {
                    GgufValue::Bool(b) => Ok(b),
                    other => Err(bad(key, "booleans", other.type_name())),
                })
                .collect()
        }
        Some(_) => {
            let n = size(h, key)?;
            Ok((0..n_layer).map(|i| i % n < n - 1).collect())
        }
        None => Ok((0..n_layer).map(|i| i % DEFAULT_PATTERN < DEFAULT_PATTERN - 1).collect()),
    }
}
