//! The architecture description: everything the one forward pass needs to know about a
//! model, as data. `arch::describe` reads it from GGUF metadata through a [`Family`]
//! (one small file per `general.architecture`, in `families/`); the forward pass
//! (`transformer`) never asks which family it runs.

use serde::Serialize;

use super::gguf::{GgufError, GgufHeader};

/// Why a GGUF file is not a model Starling can run.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("architecture `{found}` (general.architecture) is not supported (supported: {supported})")]
    UnsupportedArchitecture { found: String, supported: String },
    /// A required key is missing or has the wrong type.
    #[error(transparent)]
    Metadata(#[from] GgufError),
    #[error("metadata `{key}`: expected {expected}, found {found}")]
    BadValue { key: String, expected: String, found: String },
    #[error("tensor `{name}` is missing (expected dims {expected:?})")]
    MissingTensor { name: String, expected: Vec<u64> },
    #[error("tensor `{name}` has dims {found:?}, expected {expected:?}")]
    WrongShape { name: String, expected: Vec<u64>, found: Vec<u64> },
    #[error("tensor `{name}` is not part of a `{family}` layer as Starling runs it; refusing to compute without it")]
    UnusedLayerTensor { name: String, family: &'static str },
    #[error("tensor `{name}` is stored as {found}, expected {expected}")]
    WrongType { name: String, expected: &'static str, found: super::ggml_type::GgmlType },
}

/// How RoPE pairs the values of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// `(x[2i], x[2i+1])`: ggml's normal mode (llama).
    Adjacent,
    /// `(x[i], x[i + n_rot/2])`: ggml's NeoX mode (Qwen, Gemma, Phi).
    SplitHalves,
}

/// The gated FFN's activation: `down(act(gate·x) ⊙ up·x)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
}

/// Where RoPE's per-pair frequency divisors come from (`theta_i = p·base^(-2i/n_rot) / ff_i`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeFactors {
    None,
    /// A tensor of `n_rot / 2` F32 factors (Llama 3's `rope_freqs.weight`, or Phi-3's
    /// `rope_factors_long.weight` / `rope_factors_short.weight`).
    Tensor(String),
}

/// RoPE as one layer applies it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerRope {
    pub freq_base: f32,
    /// Multiplies every angle (`1 / factor` of linear scaling; 1 when unscaled).
    pub freq_scale: f32,
}

/// What differs from layer to layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerDesc {
    /// Attends only to the last `sliding_window` positions.
    pub sliding: bool,
    pub rope: LayerRope,
    /// Q, K and V are rows of one `attn_qkv` tensor (else `attn_q`, `attn_k`, `attn_v`).
    pub fused_qkv: bool,
    /// Gate and up are the two halves of one `ffn_up` of twice the width (else `ffn_gate`
    /// and `ffn_up`).
    pub fused_gate_up: bool,
}

/// A model's architecture, resolved from its GGUF metadata and checked against its tensors.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArchDesc {
    /// `general.architecture`.
    pub family: &'static str,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Values per head of Q, K and V (`{arch}.attention.key_length`, else `n_embd / n_head`).
    pub head_dim: usize,
    pub n_ff: usize,
    /// `{arch}.context_length`: the context the model was trained with.
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub activation: Activation,
    /// Per-head RMSNorm of Q and K before RoPE.
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before each residual add.
    pub post_norms: bool,
    /// Token embeddings are multiplied by this (Gemma: `sqrt(n_embd)`).
    pub embed_scale: Option<f32>,
    /// Multiplies `q·k` before the softmax.
    pub attn_scale: f32,
    pub rope_style: RopeStyle,
    /// Leading values of each head that RoPE rotates (even, at most `head_dim`).
    pub rope_dim: usize,
    pub rope_factors: RopeFactors,
    /// Multiplies RoPE's cosines and sines (Phi-3 LongRoPE's attention factor; else 1).
    pub rope_magnitude: f32,
    /// Positions a sliding layer attends to, itself included.
    pub sliding_window: Option<usize>,
    pub layers: Vec<LayerDesc>,
    /// `logits = c·tanh(logits / c)` when set.
    pub logit_softcap: Option<f32>,
    /// No `output.weight`: the output head is `token_embd.weight`.
    pub tied_output: bool,
    /// Tensors the forward pass does not use, in file order.
    pub extra_tensors: Vec<String>,
}

impl ArchDesc {
    /// Width of Q and of the attention output (`n_head × head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of K and V per position (`n_head_kv × head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}

/// What a GGUF architecture is, as data: one constant per family file.
pub struct Family {
    /// `general.architecture`.
    pub name: &'static str,
    pub rope_style: RopeStyle,
    pub activation: Activation,
    /// Requires `attn_q_norm` / `attn_k_norm` per layer.
    pub qk_norm: bool,
    /// Requires `post_attention_norm` / `post_ffw_norm` per layer.
    pub post_norms: bool,
    /// Embeddings scaled by `sqrt(n_embd)`.
    pub embed_scale: bool,
    /// RoPE may rotate fewer values than the head holds (`{arch}.rope.dimension_count`).
    pub partial_rotary: bool,
    /// Q and the attention output must be `n_embd` wide.
    pub q_dim_is_embd: bool,
    /// Family-specific metadata (sliding windows, RoPE factors, attention scale), applied
    /// after the keys every family shares are read into the description.
    pub extra: fn(&GgufHeader, &mut ArchDesc) -> Result<(), ArchError>,
}

/// A family with nothing beyond the shared keys.
pub fn no_extra(_: &GgufHeader, _: &mut ArchDesc) -> Result<(), ArchError> {
    Ok(())
}

/// The error for a key whose value is out of bounds.
pub fn bad(key: &str, expected: impl ToString, found: impl ToString) -> ArchError {
    ArchError::BadValue { key: key.to_owned(), expected: expected.to_string(), found: found.to_string() }
}

/// A size that fits in `usize` and may be zero.
pub fn size_or_zero(h: &GgufHeader, key: &str) -> Result<usize, ArchError> {
    let v = h.get_u64(key)?;
    usize::try_from(v).map_err(|_| bad(key, "a size that fits in memory", v))
}

/// A non-zero size.
pub fn size(h: &GgufHeader, key: &str) -> Result<usize, ArchError> {
    match size_or_zero(h, key)? {
        0 => Err(bad(key, "a positive integer", 0)),
        v => Ok(v),
    }
}

/// A size that may be absent (`None`).
pub fn opt_size(h: &GgufHeader, key: &str) -> Result<Option<usize>, ArchError> {
    h.get(key).map(|_| size(h, key)).transpose()
}

/// A finite positive float.
pub fn positive_f32(h: &GgufHeader, key: &str) -> Result<f32, ArchError> {
    let v = h.get_f32(key)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad(key, "a finite positive number", v));
    }
    Ok(v)
}

/// A finite positive float that may be absent.
pub fn opt_positive_f32(h: &GgufHeader, key: &str) -> Result<Option<f32>, ArchError> {
    h.get(key).map(|_| positive_f32(h, key)).transpose()
}
