//! Llama-family hyperparameters read from GGUF metadata, and the check that every
//! tensor the forward pass needs is present with the right shape and a usable type.
//!
//! [`validate_llama`] runs before a model is declared loaded: once it passes, the
//! forward pass can index tensors by name without re-checking shapes.

use serde::Serialize;

use super::ggml_type::GgmlType;
use super::gguf::{GgufError, GgufHeader};

/// Why a GGUF file is not a llama model Starling can run.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("architecture `{0}` (general.architecture) is not supported: Starling runs `llama`")]
    UnsupportedArchitecture(String),
    /// A required key is missing or has the wrong type.
    #[error(transparent)]
    Metadata(#[from] GgufError),
    #[error("metadata `{key}`: expected {expected}, found {found}")]
    BadValue { key: String, expected: String, found: String },
    #[error("tensor `{name}` is missing (expected dims {expected:?})")]
    MissingTensor { name: String, expected: Vec<u64> },
    #[error("tensor `{name}` has dims {found:?}, expected {expected:?}")]
    WrongShape { name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error("tensor `{name}` is stored as {found}, expected {expected}")]
    WrongType { name: String, expected: &'static str, found: GgmlType },
}

/// The shape of a llama model, validated against its tensors.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlamaHparams {
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// `n_embd / n_head`.
    pub head_dim: usize,
    pub n_ff: usize,
    /// `llama.context_length`: the context the model was trained with.
    pub n_ctx_train: usize,
    pub rope_freq_base: f32,
    /// Leading dimensions of each head that RoPE rotates (even, at most `head_dim`).
    pub rope_dim: usize,
    pub rms_eps: f32,
    /// No `output.weight`: the output head is `token_embd.weight`.
    pub tied_output: bool,
    /// Tensors the llama forward pass does not use (e.g. `rope_freqs.weight`), in file order.
    pub extra_tensors: Vec<String>,
}

/// What a tensor is used as, which decides the types it may be stored in.
#[derive(Clone, Copy)]
enum Role {
    /// RMSNorm weights: F32 only.
    Norm,
    /// Matrices and the embedding: any type with kernels.
    Matrix,
}

/// Reads the llama hyperparameters from `h` and checks every tensor against them.
pub fn validate_llama(h: &GgufHeader) -> Result<LlamaHparams, ArchError> {
    let arch = h.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(ArchError::UnsupportedArchitecture(arch.to_owned()));
    }
    let mut hp = read_hparams(h)?;
    // Lazily: a hostile `block_count` fails at its first missing tensor, never allocates.
    for (name, dims, role) in expected_tensors(&hp) {
        check_tensor(h, &name, &dims, role)?;
    }
    let expected: std::collections::HashSet<String> = expected_tensors(&hp).map(|(name, _, _)| name).collect();
    let out_dims = [hp.n_embd as u64, hp.n_vocab as u64];
    hp.tied_output = h.tensor("output.weight").is_none();
    if !hp.tied_output {
        check_tensor(h, "output.weight", &out_dims, Role::Matrix)?;
    }
    hp.extra_tensors = h
        .tensors
        .iter()
        .filter(|t| t.name != "output.weight" && !expected.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    Ok(hp)
}

fn read_hparams(h: &GgufHeader) -> Result<LlamaHparams, ArchError> {
    let n_embd = size(h, "llama.embedding_length")?;
    let n_head = size(h, "llama.attention.head_count")?;
    let n_head_kv = match h.get("llama.attention.head_count_kv") {
        Some(_) => size(h, "llama.attention.head_count_kv")?,
        None => n_head,
    };
    divisible(n_embd, "llama.embedding_length", n_head, "llama.attention.head_count")?;
    divisible(n_head, "llama.attention.head_count", n_head_kv, "llama.attention.head_count_kv")?;
    let head_dim = n_embd / n_head;
    for key in ["llama.attention.key_length", "llama.attention.value_length"] {
        if h.get(key).is_some() && size(h, key)? != head_dim {
            return Err(bad(key, format!("embedding_length / head_count = {head_dim}"), size(h, key)?));
        }
    }
    let rope_dim = match h.get("llama.rope.dimension_count") {
        Some(_) => size_or_zero(h, "llama.rope.dimension_count")?,
        None => head_dim,
    };
    if rope_dim % 2 != 0 || rope_dim > head_dim {
        return Err(bad("llama.rope.dimension_count", format!("an even number <= head_dim {head_dim}"), rope_dim));
    }
    let rope_freq_base = match h.get("llama.rope.freq_base") {
        Some(_) => positive_f32(h, "llama.rope.freq_base")?,
        None => 10000.0,
    };
    Ok(LlamaHparams {
        n_vocab: n_vocab(h)?,
        n_embd,
        n_layer: size(h, "llama.block_count")?,
        n_head,
        n_head_kv,
        head_dim,
        n_ff: size(h, "llama.feed_forward_length")?,
        n_ctx_train: size(h, "llama.context_length")?,
        rope_freq_base,
        rope_dim,
        rms_eps: positive_f32(h, "llama.attention.layer_norm_rms_epsilon")?,
        tied_output: false,
        extra_tensors: Vec::new(),
    })
}

/// `llama.vocab_size`, or else the length of `tokenizer.ggml.tokens`.
fn n_vocab(h: &GgufHeader) -> Result<usize, ArchError> {
    if h.get("llama.vocab_size").is_some() {
        return size(h, "llama.vocab_size");
    }
    let n = h.get_array("tokenizer.ggml.tokens")?.len();
    if n == 0 {
        return Err(bad("tokenizer.ggml.tokens", "a non-empty array", "an empty array"));
    }
    Ok(n)
}

fn bad(key: &str, expected: impl ToString, found: impl ToString) -> ArchError {
    ArchError::BadValue { key: key.to_owned(), expected: expected.to_string(), found: found.to_string() }
}

/// A size that fits in `usize` and may be zero.
fn size_or_zero(h: &GgufHeader, key: &str) -> Result<usize, ArchError> {
    let v = h.get_u64(key)?;
    usize::try_from(v).map_err(|_| bad(key, "a size that fits in memory", v))
}

/// A non-zero size.
fn size(h: &GgufHeader, key: &str) -> Result<usize, ArchError> {
    match size_or_zero(h, key)? {
        0 => Err(bad(key, "a positive integer", 0)),
        v => Ok(v),
    }
}

fn positive_f32(h: &GgufHeader, key: &str) -> Result<f32, ArchError> {
    let v = h.get_f32(key)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad(key, "a finite positive number", v));
    }
    Ok(v)
}

fn divisible(a: usize, a_key: &str, b: usize, b_key: &str) -> Result<(), ArchError> {
    if !a.is_multiple_of(b) {
        return Err(bad(a_key, format!("a multiple of `{b_key}` ({b})"), a));
    }
    Ok(())
}

/// Every tensor the forward pass reads (except the optional `output.weight`), in file order.
fn expected_tensors(hp: &LlamaHparams) -> impl Iterator<Item = (String, Vec<u64>, Role)> {
    let [embd, vocab, ff] = [hp.n_embd, hp.n_vocab, hp.n_ff].map(|x| x as u64);
    let kv = (hp.n_head_kv * hp.head_dim) as u64;
    let first = ("token_embd.weight".to_owned(), vec![embd, vocab], Role::Matrix);
    let layers = (0..hp.n_layer).flat_map(move |i| {
        let blk = |part: &str, dims: Vec<u64>, role| (format!("blk.{i}.{part}.weight"), dims, role);
        [
            blk("attn_norm", vec![embd], Role::Norm),
            blk("attn_q", vec![embd, embd], Role::Matrix),
            blk("attn_k", vec![embd, kv], Role::Matrix),
            blk("attn_v", vec![embd, kv], Role::Matrix),
            blk("attn_output", vec![embd, embd], Role::Matrix),
            blk("ffn_norm", vec![embd], Role::Norm),
            blk("ffn_gate", vec![embd, ff], Role::Matrix),
            blk("ffn_up", vec![embd, ff], Role::Matrix),
            blk("ffn_down", vec![ff, embd], Role::Matrix),
        ]
    });
    let last = ("output_norm.weight".to_owned(), vec![embd], Role::Norm);
    std::iter::once(first).chain(layers).chain(std::iter::once(last))
}

fn check_tensor(h: &GgufHeader, name: &str, expected: &[u64], role: Role) -> Result<(), ArchError> {
    let Some(t) = h.tensor(name) else {
        return Err(ArchError::MissingTensor { name: name.to_owned(), expected: expected.to_vec() });
    };
    // ggml pads shapes with trailing 1s: [576] and [576, 1] are the same tensor.
    let trim = |d: &[u64]| {
        let keep = d.iter().rposition(|&x| x != 1).map_or(1, |i| i + 1);
        d[..keep.min(d.len())].to_vec()
    };
    if trim(&t.dims) != trim(expected) {
        return Err(ArchError::WrongShape {
            name: name.to_owned(),
            expected: expected.to_vec(),
            found: t.dims.clone(),
        });
    }
    let (ok, wanted) = match role {
        Role::Norm => (t.ggml_type == GgmlType::F32, "F32"),
        Role::Matrix => (
            t.ggml_type.has_kernels(),
            "a type with kernels (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)",
        ),
    };
    if !ok {
        return Err(ArchError::WrongType { name: name.to_owned(), expected: wanted, found: t.ggml_type });
    }
    Ok(())
}
