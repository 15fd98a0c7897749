//! A GGUF v2/v3 writer for tests, fuzz seeds and tools, plus a random tiny llama model.
//!
//! The writer writes exactly what it is told: it does not check that a tensor's bytes
//! match its dims and type, nor that keys are unique. Tests rely on that to build
//! broken files; the reader ([`super::gguf::parse_header`]) is the one that checks.
//! [`GgufWriter::to_bytes_with_layout`] also returns where every field landed, so a
//! test can corrupt one precise field.
//!
//! [`tiny_llama`] writes a complete, loadable llama model with random weights and a
//! byte-level gpt2 vocabulary (see [`tiny_vocab`] for the exact vocabulary);
//! [`tiny_model`] does the same for every family Starling runs, with each family's own
//! tensors and keys (`examples/tiny_models.rs` writes them for the fixture tools).

use std::path::Path;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::ggml_type::GgmlType;
use super::gguf::GgufValue;

const DEFAULT_ALIGNMENT: u64 = 32;

/// Builds a GGUF file in memory: metadata in insertion order, tensors packed in
/// insertion order, each padded to the alignment.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    bytes: Vec<u8>,
}

/// Where one metadata entry landed in the bytes (absolute offsets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub key: String,
    /// The u64 length of the key string.
    pub key_at: usize,
    /// The u32 value type.
    pub type_at: usize,
    /// The value itself (for an array: its u32 element type, then its u64 length).
    pub value_at: usize,
}

/// Where one tensor info and its data landed in the bytes (absolute offsets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorLayout {
    pub name: String,
    /// The u64 length of the name string.
    pub name_at: usize,
    /// The u32 dimension count; the u64 dims follow it.
    pub n_dims_at: usize,
    /// The u32 ggml type.
    pub type_at: usize,
    /// The u64 data offset (relative to the data section).
    pub offset_at: usize,
    /// Absolute offset of the tensor's data.
    pub data_at: usize,
}

/// Byte offsets of every field [`GgufWriter`] wrote, for tests that corrupt one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufLayout {
    /// The u32 version is at 4, the u64 tensor count at 8, the u64 metadata count at 16.
    pub metadata: Vec<KvLayout>,
    pub tensors: Vec<TensorLayout>,
    /// Absolute offset of the data section (end of header, padded to the alignment).
    pub data_offset: usize,
}

impl GgufLayout {
    pub const VERSION_AT: usize = 4;
    pub const TENSOR_COUNT_AT: usize = 8;
    pub const METADATA_COUNT_AT: usize = 16;

    /// The layout of the metadata entry `key` (the first one, if duplicated).
    pub fn kv(&self, key: &str) -> Option<&KvLayout> {
        self.metadata.iter().find(|k| k.key == key)
    }

    /// The layout of the tensor `name` (the first one, if duplicated).
    pub fn tensor(&self, name: &str) -> Option<&TensorLayout> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

impl GgufWriter {
    /// An empty file of GGUF `version` (2 and 3 are what readers accept; others are
    /// written as asked, for tests).
    pub fn new(version: u32) -> Self {
        GgufWriter { version, alignment: DEFAULT_ALIGNMENT, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// Appends one metadata entry (duplicates are written as given).
    ///
    /// Arrays are written with the type of their first element (`u8` when empty); an
    /// array mixing element types cannot be expressed in GGUF and comes out corrupt.
    pub fn metadata(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_owned(), value));
        self
    }

    /// Appends one tensor; `bytes` is its data exactly as stored.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ggml_type: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push(PendingTensor { name: name.to_owned(), dims: dims.to_vec(), ggml_type, bytes });
        self
    }

    /// Sets the data alignment. Unless a `general.alignment` entry was added by hand, a
    /// non-default alignment is recorded as `general.alignment` (u32) after the other metadata.
    /// Zero is treated as 1 when padding, so the reader's refusal of it can be tested.
    pub fn alignment(&mut self, alignment: u64) -> &mut Self {
        self.alignment = alignment;
        self
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_with_layout().0
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }

    /// The file's bytes and where every field landed.
    pub fn to_bytes_with_layout(&self) -> (Vec<u8>, GgufLayout) {
        let align = self.alignment.max(1) as usize;
        let mut metadata: Vec<(&str, GgufValue)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let has_alignment_key = metadata.iter().any(|(k, _)| *k == "general.alignment");
        if self.alignment != DEFAULT_ALIGNMENT && !has_alignment_key {
            let value = u32::try_from(self.alignment).map_or(GgufValue::U64(self.alignment), GgufValue::U32);
            metadata.push(("general.alignment", value));
        }

        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        put_u32(&mut out, self.version);
        put_u64(&mut out, self.tensors.len() as u64);
        put_u64(&mut out, metadata.len() as u64);

        let mut kv_layout = Vec::with_capacity(metadata.len());
        for (key, value) in &metadata {
            let key_at = out.len();
            put_str(&mut out, key);
            let type_at = out.len();
            put_u32(&mut out, value.type_id());
            let value_at = out.len();
            put_value(&mut out, value);
            kv_layout.push(KvLayout { key: (*key).to_owned(), key_at, type_at, value_at });
        }

        let mut data_offsets = Vec::with_capacity(self.tensors.len());
        let mut next = 0usize;
        for t in &self.tensors {
            data_offsets.push(next);
            next = (next + t.bytes.len()).next_multiple_of(align);
        }

        let mut tensor_layout = Vec::with_capacity(self.tensors.len());
        for (t, &rel) in self.tensors.iter().zip(&data_offsets) {
            let name_at = out.len();
            put_str(&mut out, &t.name);
            let n_dims_at = out.len();
            put_u32(&mut out, t.dims.len() as u32);
            t.dims.iter().for_each(|&d| put_u64(&mut out, d));
            let type_at = out.len();
            put_u32(&mut out, t.ggml_type.id());
            let offset_at = out.len();
            put_u64(&mut out, rel as u64);
            tensor_layout.push(TensorLayout {
                name: t.name.clone(),
                name_at,
                n_dims_at,
                type_at,
                offset_at,
                data_at: 0,
            });
        }

        let data_offset = out.len().next_multiple_of(align);
        out.resize(data_offset, 0);
        for ((t, &rel), layout) in self.tensors.iter().zip(&data_offsets).zip(&mut tensor_layout) {
            out.resize(data_offset + rel, 0);
            layout.data_at = out.len();
            out.extend_from_slice(&t.bytes);
        }
        let layout = GgufLayout { metadata: kv_layout, tensors: tensor_layout, data_offset };
        (out, layout)
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => put_u32(out, *x),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(items) => {
            put_u32(out, items.elem_type_id());
            put_u64(out, items.len() as u64);
            items.values().for_each(|item| put_value(out, &item));
        }
        GgufValue::U64(x) => put_u64(out, *x),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// The shape of a random tiny llama model (see [`tiny_llama`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TinyLlamaSpec {
    /// Rows of `token_embd`; the vocabulary is padded up to it with control tokens. Below
    /// [`TINY_BASE_VOCAB`] the file is still written, and validation reports the mismatch.
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    /// Written as `llama.context_length`.
    pub n_ctx: usize,
    /// No `output.weight`: the head reuses `token_embd`.
    pub tied_output: bool,
    /// Seeds the `ChaCha8Rng` every weight is drawn from.
    pub seed: u64,
}

impl Default for TinyLlamaSpec {
    /// 2 layers, width 64 (4 heads of 16, 2 KV heads), FFN 128, the base vocabulary:
    /// every row is a whole number of 32-value blocks, so any quantized type fits.
    fn default() -> Self {
        TinyLlamaSpec {
            n_vocab: TINY_BASE_VOCAB,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            n_ctx: 256,
            tied_output: true,
            seed: 0,
        }
    }
}

/// The merges of the tiny vocabulary, in rank order (GPT-2 symbols: `Ġ` is a space).
pub const TINY_MERGES: [&str; 6] = ["Ġ t", "h e", "i n", "Ġt he", "l l", "o r"];
/// Token id of `<|endoftext|>` in the tiny vocabulary (eos, and bos when one is wanted).
pub const TINY_EOS_ID: u32 = 256 + TINY_MERGES.len() as u32;
/// Tokens in the tiny vocabulary before padding: 256 bytes, the merges, `<|endoftext|>`.
pub const TINY_BASE_VOCAB: usize = TINY_EOS_ID as usize + 1;

/// GPT-2's byte-to-unicode map: printable latin-1 bytes stand for themselves, the
/// other 68 bytes map, in byte order, to U+0100 onwards (so space is `Ġ`, U+0120).
pub fn gpt2_byte_symbol(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let rank = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(0x100 + rank).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// The tiny model's vocabulary, padded to `n_vocab`: `(tokens, token_types)`.
///
/// - ids 0..=255: the byte-level symbol of byte `id` ([`gpt2_byte_symbol`]), type 1 (normal);
/// - ids 256..=261: the results of [`TINY_MERGES`] in order (`Ġt`, `he`, `in`, `Ġthe`, `ll`, `or`);
/// - id 262 ([`TINY_EOS_ID`]): `<|endoftext|>`, type 3 (control);
/// - ids 263..n_vocab: `<|pad_N|>`, type 3 (control).
pub fn tiny_vocab(n_vocab: usize) -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| gpt2_byte_symbol(b).to_string()).collect();
    tokens.extend(TINY_MERGES.iter().map(|m| m.replace(' ', "")));
    tokens.push("<|endoftext|>".to_owned());
    let mut types = vec![1; 256 + TINY_MERGES.len()];
    types.push(3);
    for i in tokens.len()..n_vocab {
        tokens.push(format!("<|pad_{}|>", i - TINY_BASE_VOCAB));
        types.push(3);
    }
    (tokens, types)
}

/// The stored form of one tensor: `encode(name, dims, values)` returns its type and bytes.
pub type TensorEncoder<'a> = &'a dyn Fn(&str, &[u64], &[f32]) -> (GgmlType, Vec<u8>);

/// A random llama model as GGUF v3 bytes.
///
/// Weights are drawn from a `ChaCha8Rng` seeded with `spec.seed`, in file order: norm
/// weights uniform in [0.9, 1.1], every other tensor uniform in ±0.035 (standard
/// deviation 0.02, as in GPT-2 initialisation). Norm weights are always F32; every other
/// tensor (embedding, projections, output head) is stored as `encode(name, dims, values)`
/// chooses. The metadata is complete for loading: llama hyperparameters
/// (rms epsilon 1e-5, rope base 10000) and the gpt2 vocabulary of [`tiny_vocab`].
pub fn tiny_llama(spec: &TinyLlamaSpec, encode: TensorEncoder<'_>) -> Vec<u8> {
    let mut w = GgufWriter::new(3);
    tiny_llama_metadata(&mut w, spec);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    for (name, dims) in tiny_llama_tensors(spec) {
        let n = dims.iter().product::<u64>() as usize;
        if name.ends_with("norm.weight") {
            let values: Vec<f32> = (0..n).map(|_| rng.random_range(0.9f32..1.1)).collect();
            w.tensor(&name, &dims, GgmlType::F32, f32_bytes(&values));
        } else {
            let values: Vec<f32> = (0..n).map(|_| rng.random_range(-0.035f32..0.035)).collect();
            let (ggml_type, bytes) = encode(&name, &dims, &values);
            w.tensor(&name, &dims, ggml_type, bytes);
        }
    }
    w.to_bytes()
}

/// [`tiny_llama`] with every tensor stored as F32.
pub fn tiny_llama_f32(spec: &TinyLlamaSpec) -> Vec<u8> {
    tiny_llama(spec, &|_, _, values| (GgmlType::F32, f32_bytes(values)))
}

/// Little-endian bytes of `values` (the F32 tensor layout).
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn tiny_llama_metadata(w: &mut GgufWriter, spec: &TinyLlamaSpec) {
    let u32v = |x: usize| GgufValue::U32(u32::try_from(x).unwrap_or(u32::MAX));
    let head_dim = spec.n_embd.checked_div(spec.n_head).unwrap_or(0);
    let (tokens, types) = tiny_vocab(spec.n_vocab);
    let strings = |v: Vec<String>| GgufValue::array(v.into_iter().map(GgufValue::String).collect());
    let merges = TINY_MERGES.iter().map(|m| m.to_string()).collect();
    w.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("general.name", GgufValue::String("starling-tiny-llama".into()))
        .metadata("llama.vocab_size", u32v(spec.n_vocab))
        .metadata("llama.context_length", u32v(spec.n_ctx))
        .metadata("llama.embedding_length", u32v(spec.n_embd))
        .metadata("llama.block_count", u32v(spec.n_layer))
        .metadata("llama.feed_forward_length", u32v(spec.n_ff))
        .metadata("llama.attention.head_count", u32v(spec.n_head))
        .metadata("llama.attention.head_count_kv", u32v(spec.n_head_kv))
        .metadata("llama.rope.freq_base", GgufValue::F32(10000.0))
        .metadata("llama.rope.dimension_count", u32v(head_dim))
        .metadata("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(1e-5))
        .metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String("default".into()))
        .metadata("tokenizer.ggml.tokens", strings(tokens))
        .metadata("tokenizer.ggml.token_type", GgufValue::array(types.into_iter().map(GgufValue::I32).collect()))
        .metadata("tokenizer.ggml.merges", strings(merges))
        .metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(TINY_EOS_ID))
        .metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(TINY_EOS_ID))
        .metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
}

/// Every tensor of a llama model of this shape, in file order, with ggml dims.
fn tiny_llama_tensors(spec: &TinyLlamaSpec) -> Vec<(String, Vec<u64>)> {
    let [vocab, embd, ff] = [spec.n_vocab, spec.n_embd, spec.n_ff].map(|x| x as u64);
    let kv = (spec.n_embd.checked_div(spec.n_head).unwrap_or(0) * spec.n_head_kv) as u64;
    let mut out = vec![("token_embd.weight".to_owned(), vec![embd, vocab])];
    for i in 0..spec.n_layer {
        let blk = |part: &str, dims: Vec<u64>| (format!("blk.{i}.{part}.weight"), dims);
        out.extend([
            blk("attn_norm", vec![embd]),
            blk("attn_q", vec![embd, embd]),
            blk("attn_k", vec![embd, kv]),
            blk("attn_v", vec![embd, kv]),
            blk("attn_output", vec![embd, embd]),
            blk("ffn_norm", vec![embd]),
            blk("ffn_gate", vec![embd, ff]),
            blk("ffn_up", vec![embd, ff]),
            blk("ffn_down", vec![ff, embd]),
        ]);
    }
    out.push(("output_norm.weight".to_owned(), vec![embd]));
    if !spec.tied_output {
        out.push(("output.weight".to_owned(), vec![embd, vocab]));
    }
    out
}

/// A random tiny model of any family Starling runs (see [`tiny_model`]); the presets of
/// [`TinyModelSpec::family`] exercise what each family adds.
#[derive(Clone, Debug, PartialEq)]
pub struct TinyModelSpec {
    /// `general.architecture`.
    pub arch: &'static str,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Written as `{arch}.attention.key_length` and `value_length`.
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_ctx: usize,
    /// `{arch}.rope.dimension_count` (at most `head_dim`).
    pub rope_dim: usize,
    pub rope_base: f32,
    /// Q/K/V biases.
    pub qkv_bias: bool,
    /// Per-head `attn_q_norm` / `attn_k_norm`.
    pub qk_norm: bool,
    /// `post_attention_norm` / `post_ffw_norm`.
    pub post_norms: bool,
    /// One `attn_qkv` tensor instead of three.
    pub fused_qkv: bool,
    /// Gate and up in one `ffn_up` of twice the width (gate first).
    pub fused_gate_up: bool,
    /// `(window, pattern)`: `{arch}.attention.sliding_window` and `sliding_window_pattern`.
    pub sliding_window: Option<(u32, u32)>,
    /// `{arch}.rope.freq_base_swa`.
    pub swa_base: Option<f32>,
    /// Llama 3's `rope_freqs.weight` factors.
    pub rope_freqs: bool,
    /// `{arch}.rope.scaling.type = linear` with this factor.
    pub linear_scale: Option<f32>,
    /// Phi-3 LongRoPE: `(original_context_length, attn_factor)` and both factor tensors.
    pub longrope: Option<(u32, f32)>,
    /// No `output.weight`: the head reuses `token_embd`.
    pub tied_output: bool,
    pub seed: u64,
}

impl TinyModelSpec {
    /// The preset of `arch`: width 64, a gpt2 vocabulary of [`TINY_BASE_VOCAB`] tokens, and
    /// what the family adds switched on (llama: Llama 3 factors; qwen2: biases; qwen3: Q/K
    /// norms with heads wider than `n_embd / n_head`; gemma3: Q/K and post norms, a window
    /// of 8 with every third layer global, linear scaling of the global layers; phi3:
    /// fused tensors, partial rotary and LongRoPE).
    pub fn family(arch: &'static str) -> Self {
        let base = TinyModelSpec {
            arch,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            n_ff: 128,
            n_ctx: 256,
            rope_dim: 16,
            rope_base: 10_000.0,
            qkv_bias: false,
            qk_norm: false,
            post_norms: false,
            fused_qkv: false,
            fused_gate_up: false,
            sliding_window: None,
            swa_base: None,
            rope_freqs: false,
            linear_scale: None,
            longrope: None,
            tied_output: true,
            seed: 7,
        };
        match arch {
            "llama" => TinyModelSpec { rope_freqs: true, tied_output: false, ..base },
            "qwen2" => TinyModelSpec { qkv_bias: true, rope_base: 1_000_000.0, ..base },
            "qwen3" => TinyModelSpec { qk_norm: true, head_dim: 32, rope_dim: 32, ..base },
            "gemma3" => TinyModelSpec {
                qk_norm: true,
                post_norms: true,
                n_layer: 3,
                n_head_kv: 1,
                head_dim: 32,
                rope_dim: 32,
                rope_base: 1_000_000.0,
                sliding_window: Some((8, 3)),
                swa_base: Some(10_000.0),
                linear_scale: Some(2.0),
                ..base
            },
            "phi3" => TinyModelSpec {
                fused_qkv: true,
                fused_gate_up: true,
                rope_dim: 12,
                longrope: Some((64, 1.1)),
                tied_output: false,
                ..base
            },
            _ => base,
        }
    }
}

/// The families whose real models come with 32k windows (Qwen2.5, Qwen3, Gemma 3), which
/// [`TinyModelSpec::long_context`] presets.
pub const LONG_CONTEXT_FAMILIES: [&str; 3] = ["qwen2", "qwen3", "gemma3"];

impl TinyModelSpec {
    /// The family preset with a 32,768-position context, RoPE base 1e6 (Qwen's and Gemma 3's
    /// global layers), two query heads of 64 over one KV head (the head size the fast
    /// attention kernels take) and one layer: what a long-context test needs to reach deep
    /// positions quickly. Gemma 3 keeps its window of 8 on two of its three layers.
    pub fn long_context(arch: &'static str) -> Self {
        let base = TinyModelSpec::family(arch);
        let n_layer = if arch == "gemma3" { base.n_layer } else { 1 };
        // Qwen2 needs Q as wide as the embedding; Qwen3 and Gemma 3 keep heads wider than it.
        let n_embd = if arch == "qwen2" { 128 } else { base.n_embd };
        TinyModelSpec {
            n_ctx: 32_768,
            n_embd,
            n_layer,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 64,
            rope_dim: 64,
            rope_base: 1_000_000.0,
            seed: 11,
            ..base
        }
    }
}

/// A random tiny model of `spec.arch` as GGUF v3 bytes, every tensor F32: norm weights
/// uniform in [0.9, 1.1], RoPE factors in [1, 4], everything else uniform in ±0.035
/// (biases ±0.1), drawn in file order from a `ChaCha8Rng` seeded with `spec.seed`. The
/// tensor set is exactly what llama.cpp asks for, so the file loads there too.
pub fn tiny_model(spec: &TinyModelSpec) -> Vec<u8> {
    tiny_model_writer(spec).to_bytes()
}

/// The writer [`tiny_model`] writes, for tests that add metadata (a chat template, say).
pub fn tiny_model_writer(spec: &TinyModelSpec) -> GgufWriter {
    let mut w = GgufWriter::new(3);
    tiny_model_metadata(&mut w, spec);
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    for (name, dims) in tiny_model_tensors(spec) {
        let n = dims.iter().product::<u64>() as usize;
        let range = if name.ends_with("norm.weight") {
            0.9f32..1.1
        } else if name.starts_with("rope_") {
            1.0f32..4.0
        } else if name.ends_with(".bias") {
            -0.1f32..0.1
        } else {
            -0.035f32..0.035
        };
        let values: Vec<f32> = (0..n).map(|_| rng.random_range(range.clone())).collect();
        w.tensor(&name, &dims, GgmlType::F32, f32_bytes(&values));
    }
    w
}

fn tiny_model_metadata(w: &mut GgufWriter, spec: &TinyModelSpec) {
    let u32v = |x: usize| GgufValue::U32(u32::try_from(x).unwrap_or(u32::MAX));
    let key = |k: &str| format!("{}.{k}", spec.arch);
    let (tokens, types) = tiny_vocab(TINY_BASE_VOCAB);
    let strings = |v: Vec<String>| GgufValue::array(v.into_iter().map(GgufValue::String).collect());
    let merges = TINY_MERGES.iter().map(|m| m.to_string()).collect();
    w.metadata("general.architecture", GgufValue::String(spec.arch.into()))
        .metadata("general.name", GgufValue::String(format!("starling-tiny-{}", spec.arch.replace('3', "-three"))))
        .metadata(&key("context_length"), u32v(spec.n_ctx))
        .metadata(&key("embedding_length"), u32v(spec.n_embd))
        .metadata(&key("block_count"), u32v(spec.n_layer))
        .metadata(&key("feed_forward_length"), u32v(spec.n_ff))
        .metadata(&key("attention.head_count"), u32v(spec.n_head))
        .metadata(&key("attention.head_count_kv"), u32v(spec.n_head_kv))
        .metadata(&key("attention.key_length"), u32v(spec.head_dim))
        .metadata(&key("attention.value_length"), u32v(spec.head_dim))
        .metadata(&key("rope.dimension_count"), u32v(spec.rope_dim))
        .metadata(&key("rope.freq_base"), GgufValue::F32(spec.rope_base))
        .metadata(&key("attention.layer_norm_rms_epsilon"), GgufValue::F32(1e-6));
    if let Some(factor) = spec.linear_scale {
        w.metadata(&key("rope.scaling.type"), GgufValue::String("linear".into()))
            .metadata(&key("rope.scaling.factor"), GgufValue::F32(factor));
    }
    if let Some((window, pattern)) = spec.sliding_window {
        w.metadata(&key("attention.sliding_window"), GgufValue::U32(window))
            .metadata(&key("attention.sliding_window_pattern"), GgufValue::U32(pattern));
    }
    if let Some(base) = spec.swa_base {
        w.metadata(&key("rope.freq_base_swa"), GgufValue::F32(base));
    }
    if let Some((original, attn_factor)) = spec.longrope {
        w.metadata(&key("rope.scaling.original_context_length"), GgufValue::U32(original))
            .metadata(&key("rope.scaling.attn_factor"), GgufValue::F32(attn_factor));
    }
    w.metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String("default".into()))
        .metadata("tokenizer.ggml.tokens", strings(tokens))
        .metadata("tokenizer.ggml.token_type", GgufValue::array(types.into_iter().map(GgufValue::I32).collect()))
        .metadata("tokenizer.ggml.merges", strings(merges))
        .metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(TINY_EOS_ID))
        .metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(TINY_EOS_ID))
        .metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(false));
}

/// Every tensor of a [`tiny_model`], in file order, with ggml dims.
fn tiny_model_tensors(spec: &TinyModelSpec) -> Vec<(String, Vec<u64>)> {
    let [vocab, embd, ff] = [TINY_BASE_VOCAB, spec.n_embd, spec.n_ff].map(|x| x as u64);
    let (q, kv, hd) = ((spec.n_head * spec.head_dim) as u64, (spec.n_head_kv * spec.head_dim) as u64, spec.head_dim);
    let mut out = vec![("token_embd.weight".to_owned(), vec![embd, vocab])];
    if spec.rope_freqs {
        out.push(("rope_freqs.weight".to_owned(), vec![(spec.rope_dim / 2) as u64]));
    }
    if spec.longrope.is_some() {
        for name in ["rope_factors_long.weight", "rope_factors_short.weight"] {
            out.push((name.to_owned(), vec![(spec.rope_dim / 2) as u64]));
        }
    }
    for i in 0..spec.n_layer {
        let blk = |part: &str, dims: Vec<u64>| (format!("blk.{i}.{part}"), dims);
        out.push(blk("attn_norm.weight", vec![embd]));
        if spec.fused_qkv {
            out.push(blk("attn_qkv.weight", vec![embd, q + 2 * kv]));
        } else {
            out.extend([
                blk("attn_q.weight", vec![embd, q]),
                blk("attn_k.weight", vec![embd, kv]),
                blk("attn_v.weight", vec![embd, kv]),
            ]);
            if spec.qkv_bias {
                out.extend([blk("attn_q.bias", vec![q]), blk("attn_k.bias", vec![kv]), blk("attn_v.bias", vec![kv])]);
            }
        }
        if spec.qk_norm {
            out.extend([blk("attn_q_norm.weight", vec![hd as u64]), blk("attn_k_norm.weight", vec![hd as u64])]);
        }
        out.push(blk("attn_output.weight", vec![q, embd]));
        if spec.post_norms {
            out.push(blk("post_attention_norm.weight", vec![embd]));
        }
        out.push(blk("ffn_norm.weight", vec![embd]));
        if spec.fused_gate_up {
            out.push(blk("ffn_up.weight", vec![embd, 2 * ff]));
        } else {
            out.extend([blk("ffn_gate.weight", vec![embd, ff]), blk("ffn_up.weight", vec![embd, ff])]);
        }
        out.push(blk("ffn_down.weight", vec![ff, embd]));
        if spec.post_norms {
            out.push(blk("post_ffw_norm.weight", vec![embd]));
        }
    }
    out.push(("output_norm.weight".to_owned(), vec![embd]));
    if !spec.tied_output {
        out.push(("output.weight".to_owned(), vec![embd, vocab]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_symbols_match_the_known_table() {
        assert_eq!(gpt2_byte_symbol(b' '), 'Ġ');
        assert_eq!(gpt2_byte_symbol(b'\n'), 'Ċ');
        assert_eq!(gpt2_byte_symbol(0), 'Ā');
        assert_eq!(gpt2_byte_symbol(b'a'), 'a');
        assert_eq!(gpt2_byte_symbol(0xAD), 'Ń');
        let all: std::collections::HashSet<char> = (0..=255u8).map(gpt2_byte_symbol).collect();
        assert_eq!(all.len(), 256, "the map is a bijection");
    }

    #[test]
    fn tiny_vocab_has_merges_eos_and_padding() {
        let (tokens, types) = tiny_vocab(TINY_BASE_VOCAB + 2);
        assert_eq!(tokens.len(), TINY_BASE_VOCAB + 2);
        assert_eq!(types.len(), tokens.len());
        assert_eq!(tokens[256 + 3], "Ġthe");
        assert_eq!(tokens[TINY_EOS_ID as usize], "<|endoftext|>");
        assert_eq!(types[TINY_EOS_ID as usize], 3);
        assert_eq!(tokens[TINY_BASE_VOCAB + 1], "<|pad_1|>");
        for m in TINY_MERGES {
            let (a, b) = m.split_once(' ').expect("merge has two parts");
            for part in [a, b, &m.replace(' ', "")] {
                assert!(tokens.iter().any(|t| t == part), "`{part}` of merge `{m}` is in the vocabulary");
            }
        }
    }

    #[test]
    fn data_is_padded_to_the_alignment() {
        let mut w = GgufWriter::new(3);
        w.alignment(64).tensor("a", &[3], GgmlType::F32, vec![1; 12]).tensor("b", &[1], GgmlType::F32, vec![2; 4]);
        let (bytes, layout) = w.to_bytes_with_layout();
        assert_eq!(layout.data_offset % 64, 0);
        assert_eq!(layout.tensor("b").map(|t| t.data_at), Some(layout.data_offset + 64));
        assert_eq!(bytes.len(), layout.data_offset + 64 + 4);
        assert!(layout.kv("general.alignment").is_some(), "non-default alignment is recorded");
    }
}
