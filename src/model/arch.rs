//! Reading an [`ArchDesc`] from GGUF metadata and checking every tensor the forward pass
//! needs against it.
//!
//! [`describe`] reads the keys every family shares (`{arch}.embedding_length`, ...), hands
//! the description to the family's own hook (sliding windows, RoPE factors), then checks
//! each tensor's presence, shape and type. Once it passes, the forward pass can index
//! tensors by name without re-checking shapes.

use std::collections::HashSet;

use super::desc::{
    ArchDesc, ArchError, Family, LayerDesc, LayerRope, RopeFactors, bad, opt_positive_f32, opt_size, positive_f32, size,
};
use super::families;
use super::ggml_type::GgmlType;
use super::gguf::{GgufHeader, GgufValue};

/// RoPE base when `{arch}.rope.freq_base` is absent.
const DEFAULT_ROPE_BASE: f32 = 10_000.0;
/// Tensors each layer has at least (norms, attention and FFN projections): a
/// `block_count` past `tensors / LAYER_TENSORS_MIN` cannot be real, and is refused before
/// anything per layer is allocated.
const LAYER_TENSORS_MIN: usize = 6;

/// The family of `h`'s `general.architecture`, or the error listing the supported ones.
pub fn family_of(h: &GgufHeader) -> Result<&'static Family, ArchError> {
    let arch = h.get_str("general.architecture")?;
    families::family(arch)
        .ok_or_else(|| ArchError::UnsupportedArchitecture { found: arch.to_owned(), supported: families::names() })
}

/// Reads the architecture description from `h` and checks every tensor against it.
pub fn describe(h: &GgufHeader) -> Result<ArchDesc, ArchError> {
    let family = family_of(h)?;
    let mut desc = read_shared(h, family)?;
    (family.extra)(h, &mut desc)?;
    check_tensors(h, &mut desc)?;
    Ok(desc)
}

/// The keys every family shares, with the family's fixed choices filled in.
fn read_shared(h: &GgufHeader, family: &'static Family) -> Result<ArchDesc, ArchError> {
    let arch = family.name;
    let key = |k: &str| format!("{arch}.{k}");
    let n_embd = size(h, &key("embedding_length"))?;
    let n_layer = size(h, &key("block_count"))?;
    if n_layer > h.tensors.len() / LAYER_TENSORS_MIN {
        let most = h.tensors.len() / LAYER_TENSORS_MIN;
        return Err(bad(
            &key("block_count"),
            format!("at most {most} for a file of {} tensors", h.tensors.len()),
            n_layer,
        ));
    }
    let n_head = per_layer_size(h, &key("attention.head_count"), n_layer)?;
    let n_head_kv = match h.get(&key("attention.head_count_kv")) {
        Some(_) => per_layer_size(h, &key("attention.head_count_kv"), n_layer)?,
        None => n_head,
    };
    let head_dim = match opt_size(h, &key("attention.key_length"))? {
        Some(d) => d,
        None if n_embd.is_multiple_of(n_head) => n_embd / n_head,
        None => {
            let expected =
                format!("a multiple of `{}` ({n_head}) when key_length is absent", key("attention.head_count"));
            return Err(bad(&key("embedding_length"), expected, n_embd));
        }
    };
    if !n_head.is_multiple_of(n_head_kv) {
        let expected = format!("a multiple of `{}` ({n_head_kv})", key("attention.head_count_kv"));
        return Err(bad(&key("attention.head_count"), expected, n_head));
    }
    if let Some(v) = opt_size(h, &key("attention.value_length"))?
        && v != head_dim
    {
        return Err(bad(&key("attention.value_length"), format!("the key length ({head_dim})"), v));
    }
    if family.q_dim_is_embd && n_head * head_dim != n_embd {
        let expected = format!("embedding_length / head_count ({}) for {arch}", n_embd / n_head);
        return Err(bad(&key("attention.key_length"), expected, head_dim));
    }
    let rope_dim = opt_size(h, &key("rope.dimension_count"))?.unwrap_or(head_dim);
    if !rope_dim.is_multiple_of(2) || rope_dim > head_dim || (!family.partial_rotary && rope_dim != head_dim) {
        let expected = if family.partial_rotary {
            format!("an even number <= the head size {head_dim}")
        } else {
            format!("the head size {head_dim}")
        };
        return Err(bad(&key("rope.dimension_count"), expected, rope_dim));
    }
    let freq_base = opt_positive_f32(h, &key("rope.freq_base"))?.unwrap_or(DEFAULT_ROPE_BASE);
    let freq_scale = rope_scale(h, arch)?;
    Ok(ArchDesc {
        family: family.name,
        n_vocab: n_vocab(h, arch)?,
        n_embd,
        n_layer,
        n_head,
        n_head_kv,
        head_dim,
        n_ff: per_layer_size(h, &key("feed_forward_length"), n_layer)?,
        n_ctx_train: size(h, &key("context_length"))?,
        rms_eps: positive_f32(h, &key("attention.layer_norm_rms_epsilon"))?,
        activation: family.activation,
        qk_norm: family.qk_norm,
        post_norms: family.post_norms,
        embed_scale: family.embed_scale.then(|| (n_embd as f32).sqrt()),
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        rope_style: family.rope_style,
        rope_dim,
        rope_factors: RopeFactors::None,
        rope_magnitude: 1.0,
        sliding_window: None,
        layers: vec![
            LayerDesc {
                sliding: false,
                rope: LayerRope { freq_base, freq_scale },
                fused_qkv: false,
                fused_gate_up: false,
            };
            n_layer
        ],
        logit_softcap: None,
        tied_output: false,
        extra_tensors: Vec::new(),
    })
}

/// A positive size that may also be written once per layer, all equal (Starling runs
/// models whose layers share one shape).
fn per_layer_size(h: &GgufHeader, key: &str, n_layer: usize) -> Result<usize, ArchError> {
    match h.get(key) {
        Some(GgufValue::Array(items)) => {
            let values: Vec<u64> = items.values().filter_map(|v| v.as_u64()).collect();
            let first = values.first().copied().unwrap_or(0);
            if values.len() != n_layer || items.len() != n_layer || first == 0 || values.iter().any(|&v| v != first) {
                return Err(bad(key, format!("one positive integer, or {n_layer} equal ones"), "per-layer values"));
            }
            usize::try_from(first).map_err(|_| bad(key, "a size that fits in memory", first))
        }
        _ => size(h, key),
    }
}

/// `{arch}.rope.scaling.type` `none` or `linear` (with `.factor`) as the factor every
/// angle is multiplied by; other scaling types are refused.
fn rope_scale(h: &GgufHeader, arch: &str) -> Result<f32, ArchError> {
    let type_key = format!("{arch}.rope.scaling.type");
    let kind = match h.get(&type_key) {
        Some(_) => h.get_str(&type_key)?,
        None => "linear",
    };
    let factor_key = format!("{arch}.rope.scaling.factor");
    let factor = match opt_positive_f32(h, &factor_key)? {
        Some(f) => Some(f),
        None => opt_positive_f32(h, &format!("{arch}.rope.scale_linear"))?,
    };
    match kind {
        "none" => Ok(1.0),
        "linear" => Ok(factor.map_or(1.0, |f| 1.0 / f)),
        other => Err(bad(&type_key, "`none` or `linear` (other RoPE scalings are not supported)", other)),
    }
}

/// The length of `tokenizer.ggml.tokens`, which `{arch}.vocab_size` must match when given
/// (a tokenizer with more ids than embedding rows could feed the model ids it has no row
/// for; one with fewer could not spell what the model samples).
fn n_vocab(h: &GgufHeader, arch: &str) -> Result<usize, ArchError> {
    let n = h.get_array("tokenizer.ggml.tokens")?.len();
    if n == 0 {
        return Err(bad("tokenizer.ggml.tokens", "a non-empty array", "an empty array"));
    }
    let key = format!("{arch}.vocab_size");
    if h.get(&key).is_some() {
        let given = size(h, &key)?;
        if given != n {
            let want = format!("the {n} entries of tokenizer.ggml.tokens");
            return Err(bad(&key, &want, given.to_string()));
        }
    }
    Ok(n)
}

/// What a tensor is used as, which decides the types it may be stored in.
#[derive(Clone, Copy)]
enum Role {
    /// Norm weights, biases and RoPE factors: F32.
    Vector,
    /// Matrices and the embedding: a type with kernels, rows a whole number of blocks.
    Matrix,
}

/// Checks one tensor, recording its name as expected.
struct Checker<'a> {
    h: &'a GgufHeader,
    seen: HashSet<String>,
}

impl Checker<'_> {
    fn require(&mut self, name: &str, dims: &[usize], role: Role) -> Result<(), ArchError> {
        let dims: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        let Some(t) = self.h.tensor(name) else {
            return Err(ArchError::MissingTensor { name: name.to_owned(), expected: dims });
        };
        // ggml pads shapes with trailing 1s: [576] and [576, 1] are the same tensor.
        let trim = |d: &[u64]| {
            let keep = d.iter().rposition(|&x| x != 1).map_or(1, |i| i + 1);
            d[..keep.min(d.len())].to_vec()
        };
        if trim(&t.dims) != trim(&dims) {
            return Err(ArchError::WrongShape { name: name.to_owned(), expected: dims, found: t.dims.clone() });
        }
        let ok = match role {
            Role::Vector => t.ggml_type == GgmlType::F32,
            Role::Matrix => t.ggml_type.has_kernels() && dims[0].is_multiple_of(t.ggml_type.block_elems() as u64),
        };
        if !ok {
            let expected = match role {
                Role::Vector => "F32",
                Role::Matrix if t.ggml_type.has_kernels() => "a type whose blocks divide the row length",
                Role::Matrix => "a type with kernels (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
            };
            return Err(ArchError::WrongType { name: name.to_owned(), expected, found: t.ggml_type });
        }
        self.seen.insert(name.to_owned());
        Ok(())
    }

    /// Checks `name` if the file has it; returns whether it does.
    fn optional(&mut self, name: &str, dims: &[usize], role: Role) -> Result<bool, ArchError> {
        if self.h.tensor(name).is_none() {
            return Ok(false);
        }
        self.require(name, dims, role).map(|()| true)
    }
}

/// Every tensor the forward pass reads, checked against `desc`; records which layers fuse
/// Q/K/V or gate/up (the forward pass reads that, never the tensors' presence) and which
/// tensors are extra.
fn check_tensors(h: &GgufHeader, desc: &mut ArchDesc) -> Result<(), ArchError> {
    let mut c = Checker { h, seen: HashSet::new() };
    let (embd, vocab, ff) = (desc.n_embd, desc.n_vocab, desc.n_ff);
    let (q, kv) = (desc.q_dim(), desc.kv_dim());
    c.require("token_embd.weight", &[embd, vocab], Role::Matrix)?;
    c.require("output_norm.weight", &[embd], Role::Vector)?;
    desc.tied_output = !c.optional("output.weight", &[embd, vocab], Role::Matrix)?;
    c.optional("output.bias", &[vocab], Role::Vector)?;
    if let RopeFactors::Tensor(name) = &desc.rope_factors {
        c.require(name, &[desc.rope_dim / 2], Role::Vector)?;
    }
    for i in 0..desc.n_layer {
        let blk = |part: &str| format!("blk.{i}.{part}");
        c.require(&blk("attn_norm.weight"), &[embd], Role::Vector)?;
        let fused_qkv = c.optional(&blk("attn_qkv.weight"), &[embd, q + 2 * kv], Role::Matrix)?;
        desc.layers[i].fused_qkv = fused_qkv;
        if fused_qkv {
            c.optional(&blk("attn_qkv.bias"), &[q + 2 * kv], Role::Vector)?;
        } else {
            for (part, width) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
                c.require(&blk(&format!("{part}.weight")), &[embd, width], Role::Matrix)?;
                c.optional(&blk(&format!("{part}.bias")), &[width], Role::Vector)?;
            }
        }
        c.require(&blk("attn_output.weight"), &[q, embd], Role::Matrix)?;
        c.optional(&blk("attn_output.bias"), &[embd], Role::Vector)?;
        if desc.qk_norm {
            c.require(&blk("attn_q_norm.weight"), &[desc.head_dim], Role::Vector)?;
            c.require(&blk("attn_k_norm.weight"), &[desc.head_dim], Role::Vector)?;
        }
        c.require(&blk("ffn_norm.weight"), &[embd], Role::Vector)?;
        if desc.post_norms {
            c.require(&blk("post_attention_norm.weight"), &[embd], Role::Vector)?;
            c.require(&blk("post_ffw_norm.weight"), &[embd], Role::Vector)?;
        }
        let gate_separate = h.tensor(&blk("ffn_gate.weight")).is_some();
        let up_fused = h.tensor(&blk("ffn_up.weight")).is_some_and(|t| t.dims.get(1) == Some(&(2 * ff as u64)));
        desc.layers[i].fused_gate_up = !gate_separate && up_fused;
        if !desc.layers[i].fused_gate_up {
            c.require(&blk("ffn_gate.weight"), &[embd, ff], Role::Matrix)?;
            c.require(&blk("ffn_up.weight"), &[embd, ff], Role::Matrix)?;
        } else {
            c.require(&blk("ffn_up.weight"), &[embd, 2 * ff], Role::Matrix)?;
        }
        c.require(&blk("ffn_down.weight"), &[ff, embd], Role::Matrix)?;
    }
    desc.extra_tensors = h.tensors.iter().filter(|t| !c.seen.contains(&t.name)).map(|t| t.name.clone()).collect();
    // A layer tensor the pass would skip (an FFN bias, say) would silently change the model.
    if let Some(name) = desc.extra_tensors.iter().find(|n| n.starts_with("blk.")) {
        return Err(ArchError::UnusedLayerTensor { name: name.clone(), family: desc.family });
    }
    Ok(())
}
