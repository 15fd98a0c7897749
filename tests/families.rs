//! Every family Starling runs, checked on a tiny random model of each
//! (`gguf_writer::tiny_model`) against llama.cpp's logits for the same file
//! (`tests/fixtures/families/*.json`, made by `tools/fixtures/family_logits.py`).

use serde_json::Value;
use starling::kv::arena::{BlockTable, KvArena};
use starling::model::arch::describe;
use starling::model::desc::{ArchDesc, ArchError};
use starling::model::families::FAMILIES;
use starling::model::ggml_type::GgmlType;
use starling::model::gguf::{GgufError, GgufFile, GgufValue, parse_header};
use starling::model::gguf_writer::{GgufWriter, LONG_CONTEXT_FAMILIES, TinyModelSpec, tiny_model};
use starling::model::kernels::Kernels;
use starling::model::transformer::{LogitsWanted, SeqChunk, Transformer};

fn load_tiny(arch: &'static str, kernels: Kernels) -> Transformer {
    load_spec(&TinyModelSpec::family(arch), kernels)
}

/// The tiny model `spec` describes, written to a temporary file and loaded on 2 threads.
fn load_spec(spec: &TinyModelSpec, kernels: Kernels) -> Transformer {
    let dir = std::env::temp_dir().join(format!("starling-families-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("tiny-{}-{}.gguf", spec.arch, spec.n_ctx));
    std::fs::write(&path, tiny_model(spec)).unwrap();
    Transformer::from_file(GgufFile::open(&path).unwrap(), 2, kernels).unwrap()
}

/// Logits at every position of `ids`: the first `split` positions prefilled in one chunk,
/// the rest decoded one token at a time (so both paths, and the KV cache across calls, are
/// exercised).
fn logits_by_steps(model: &Transformer, ids: &[u32], split: usize) -> Vec<Vec<f32>> {
    let ends = std::iter::once(split.max(1)).chain(split.max(1) + 1..=ids.len());
    logits_over_chunks(model, ids, ends, 4, |_| true).into_iter().map(|(_, row)| row).collect()
}

/// `(position, logits)` for each position of `ids` that `keep`s, running `ids` as chunks
/// ending at each of `ends` (ascending, the last `ids.len()`) over a KV cache of
/// `block_tokens`-position blocks.
fn logits_over_chunks(
    model: &Transformer,
    ids: &[u32],
    ends: impl IntoIterator<Item = usize>,
    block_tokens: usize,
    keep: impl Fn(usize) -> bool,
) -> Vec<(usize, Vec<f32>)> {
    let layout = model.kv_layout(block_tokens);
    let mut arena = KvArena::new(layout, (layout.blocks_for(ids.len()) * layout.block_bytes()) as u64).unwrap();
    let mut table = BlockTable::default();
    table.reserve(&mut arena, ids.len()).unwrap();
    let n_vocab = model.desc.n_vocab;
    let mut rows = Vec::new();
    let mut start = 0;
    for end in ends {
        let chunk = SeqChunk {
            tokens: ids[start..end].to_vec(),
            start_pos: start,
            blocks: table.blocks.clone(),
            logits: LogitsWanted::All,
        };
        let mut out = Vec::new();
        model.forward(&[chunk], &mut arena, &mut out).unwrap();
        let kept = out.chunks_exact(n_vocab).enumerate().filter(|&(i, _)| keep(start + i));
        rows.extend(kept.map(|(i, row)| (start + i, row.to_vec())));
        start = end;
    }
    rows
}

/// Largest `|ours − theirs|` over a row, relative to the row's largest `|theirs|`.
fn relative_gap(ours: &[f32], theirs: &[f64]) -> f64 {
    let scale = theirs.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    ours.iter().zip(theirs).map(|(&a, &b)| (f64::from(a) - b).abs()).fold(0.0, f64::max) / scale
}

/// llama.cpp computes with F32 weights and an F32 KV cache in f32 too, so what is left is
/// summation order (≈1e-6 relative), except Gemma's GELU, which llama.cpp's CPU backend
/// reads from an f16 table (≈1e-3 relative per activation).
fn tolerance(arch: &str) -> f64 {
    if arch == "gemma3" { 1e-3 } else { 1e-5 }
}

#[test]
fn every_family_matches_llama_cpp_on_its_tiny_model() {
    for family in FAMILIES {
        let arch = family.name;
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/families/{arch}.json"));
        let text = std::fs::read_to_string(path).unwrap();
        let fx: Value = serde_json::from_str(&text).unwrap();
        for kernels in [Kernels::portable(), Kernels::detect()] {
            let model = load_tiny(arch, kernels);
            let mut worst = 0.0f64;
            for p in fx["prompts"].as_array().unwrap() {
                let ids: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                let rows = logits_by_steps(&model, &ids, ids.len() / 2);
                for (pos, want) in p["positions"].as_array().unwrap().iter().zip(p["logits"].as_array().unwrap()) {
                    let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                    let gap = relative_gap(&rows[pos.as_u64().unwrap() as usize], &want);
                    worst = worst.max(gap);
                }
            }
            println!("{arch} {}: largest relative gap to llama.cpp {worst:.2e}", kernels.name());
            assert!(worst <= tolerance(arch), "{arch} on {}: relative gap {worst:.2e}", kernels.name());
        }
    }
}

/// Qwen's and Gemma 3's 32k windows: each family's tiny long-context model
/// ([`TinyModelSpec::long_context`], RoPE base 1e6, Gemma's window of 8 on two layers of
/// three) runs a 32,760-token prompt in 2,048-position prefill chunks and decodes its last
/// token, against llama.cpp's logits at positions spread over the whole context
/// (`tests/fixtures/families/{arch}-32k.json`, made by
/// `tools/fixtures/long_context_logits.py`).
#[test]
fn long_context_families_match_llama_cpp_deep_into_a_32k_window() {
    const CHUNK: usize = 2048;
    for arch in LONG_CONTEXT_FAMILIES {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/families/{arch}-32k.json"));
        let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ids: Vec<u32> = fx["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let wanted: Vec<usize> =
            fx["positions"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let model = load_spec(&TinyModelSpec::long_context(arch), Kernels::detect());
        assert_eq!(model.desc.n_ctx_train, 32_768, "{arch}");
        // Prefill chunks up to the last token, which is decoded alone.
        let ends = (CHUNK..ids.len() - 1).step_by(CHUNK).chain([ids.len() - 1, ids.len()]);
        let rows = logits_over_chunks(&model, &ids, ends, 16, |p| wanted.contains(&p));
        assert_eq!(rows.len(), wanted.len(), "{arch}");
        let mut worst = 0.0f64;
        for ((pos, ours), want) in rows.iter().zip(fx["logits"].as_array().unwrap()) {
            let want: Vec<f64> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let gap = relative_gap(ours, &want);
            assert!(gap <= tolerance(arch), "{arch} at position {pos}: relative gap {gap:.2e}");
            worst = worst.max(gap);
        }
        println!("{arch} at 32k: largest relative gap to llama.cpp {worst:.2e}");
    }
}

/// The tiny model of `arch` with `edit` applied to its metadata and tensors, described.
fn describe_edited(
    arch: &'static str,
    edit: impl FnOnce(&mut Vec<(String, GgufValue)>, &mut Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>),
) -> Result<ArchDesc, ArchError> {
    let bytes = tiny_model(&TinyModelSpec::family(arch));
    let h = parse_header(&bytes).unwrap();
    let mut metadata = h.metadata.clone();
    let mut tensors: Vec<_> = h
        .tensors
        .iter()
        .map(|t| {
            let at = (h.data_offset + t.offset) as usize;
            (t.name.clone(), t.dims.clone(), t.ggml_type, bytes[at..at + t.n_bytes as usize].to_vec())
        })
        .collect();
    edit(&mut metadata, &mut tensors);
    let mut w = GgufWriter::new(3);
    for (k, v) in metadata {
        w.metadata(&k, v);
    }
    for (name, dims, ty, data) in tensors {
        w.tensor(&name, &dims, ty, data);
    }
    describe(&parse_header(&w.to_bytes()).unwrap())
}

fn set(metadata: &mut Vec<(String, GgufValue)>, key: &str, value: GgufValue) {
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value,
        None => metadata.push((key.to_owned(), value)),
    }
}

fn err_of(r: Result<ArchDesc, ArchError>) -> ArchError {
    r.map(|d| panic!("expected an error, got {d:?}")).unwrap_err()
}

/// Missing keys, windows past the context, head sizes that do not divide, fused tensors of
/// the wrong width: each a load error naming the key or tensor, for every family.
#[test]
fn hostile_metadata_is_a_load_error_naming_the_key_or_tensor() {
    for family in FAMILIES {
        let arch = family.name;
        let key = |k: &str| format!("{arch}.{k}");
        describe_edited(arch, |_, _| {}).unwrap_or_else(|e| panic!("{arch}: the preset itself fails: {e}"));

        let eps = key("attention.layer_norm_rms_epsilon");
        let e = err_of(describe_edited(arch, |m, _| m.retain(|(k, _)| *k != eps)));
        assert!(matches!(&e, ArchError::Metadata(GgufError::MissingKey(k)) if *k == eps), "{arch}: {e}");

        let e = err_of(describe_edited(arch, |m, _| set(m, &key("attention.head_count_kv"), GgufValue::U32(3))));
        assert!(e.to_string().contains(&key("attention.head_count")), "{arch}: {e}");

        let e = err_of(describe_edited(arch, |m, _| set(m, &key("attention.value_length"), GgufValue::U32(8))));
        assert!(e.to_string().contains(&key("attention.value_length")), "{arch}: {e}");

        let e =
            err_of(describe_edited(arch, |m, _| set(m, &key("rope.scaling.type"), GgufValue::String("yarn".into()))));
        assert!(e.to_string().contains(&key("rope.scaling.type")) && e.to_string().contains("yarn"), "{arch}: {e}");

        let e = err_of(describe_edited(arch, |m, _| set(m, &key("block_count"), GgufValue::U32(1 << 30))));
        assert!(e.to_string().contains(&key("block_count")), "{arch}: {e}");

        // A vocabulary size the tokenizer disagrees with.
        let e = err_of(describe_edited(arch, |m, _| set(m, &key("vocab_size"), GgufValue::U32(7))));
        assert!(
            e.to_string().contains(&key("vocab_size")) && e.to_string().contains("tokenizer.ggml.tokens"),
            "{arch}: {e}"
        );

        // A projection of the wrong width, fused or not.
        let qkv = if family.name == "phi3" { "blk.1.attn_qkv.weight" } else { "blk.1.attn_k.weight" };
        let e = err_of(describe_edited(arch, |_, t| {
            let k = t.iter_mut().find(|t| t.0 == qkv).unwrap();
            k.1[1] += 1;
            k.3.extend(vec![0; 64 * 4]);
        }));
        assert!(matches!(&e, ArchError::WrongShape { name, .. } if name == qkv), "{arch}: {e}");
    }
}

#[test]
fn family_specific_metadata_is_checked() {
    // A window larger than the context.
    let e =
        err_of(describe_edited("gemma3", |m, _| set(m, "gemma3.attention.sliding_window", GgufValue::U32(100_000))));
    assert!(e.to_string().contains("gemma3.attention.sliding_window") && e.to_string().contains("100000"), "{e}");
    // A per-layer pattern of the wrong length; one of the right length is used as given.
    let flags = |n: usize| GgufValue::array((0..n).map(|i| GgufValue::Bool(i != 0)).collect());
    let e = err_of(describe_edited("gemma3", |m, _| set(m, "gemma3.attention.sliding_window_pattern", flags(5))));
    assert!(e.to_string().contains("sliding_window_pattern"), "{e}");
    let d = describe_edited("gemma3", |m, _| set(m, "gemma3.attention.sliding_window_pattern", flags(3))).unwrap();
    assert_eq!(d.layers.iter().map(|l| l.sliding).collect::<Vec<_>>(), [false, true, true]);
    // Without a window, no layer slides and every layer uses the global RoPE base.
    let d = describe_edited("gemma3", |m, _| m.retain(|(k, _)| k != "gemma3.attention.sliding_window")).unwrap();
    assert!(d.sliding_window.is_none() && d.layers.iter().all(|l| !l.sliding && l.rope.freq_base == 1e6));
    // Q/K norms are required where the family has them.
    let e = err_of(describe_edited("qwen3", |_, t| t.retain(|t| t.0 != "blk.0.attn_q_norm.weight")));
    assert!(matches!(&e, ArchError::MissingTensor { name, .. } if name == "blk.0.attn_q_norm.weight"), "{e}");
    // Phi-3's fused gate/up of the wrong width names what is missing.
    let e = err_of(describe_edited("phi3", |_, t| {
        let up = t.iter_mut().find(|t| t.0 == "blk.0.ffn_up.weight").unwrap();
        up.1[1] = 128;
        up.3.truncate(64 * 128 * 4);
    }));
    assert!(e.to_string().contains("blk.0.ffn_gate.weight"), "{e}");
    // Partial rotary is Phi-3's alone; an odd count is refused everywhere.
    let e = err_of(describe_edited("qwen2", |m, _| set(m, "qwen2.rope.dimension_count", GgufValue::U32(8))));
    assert!(e.to_string().contains("qwen2.rope.dimension_count"), "{e}");
    let e = err_of(describe_edited("phi3", |m, _| set(m, "phi3.rope.dimension_count", GgufValue::U32(7))));
    assert!(e.to_string().contains("phi3.rope.dimension_count"), "{e}");
    // Qwen2 needs Q as wide as the embedding.
    let e = err_of(describe_edited("qwen2", |m, _| {
        set(m, "qwen2.attention.key_length", GgufValue::U32(32));
        set(m, "qwen2.attention.value_length", GgufValue::U32(32));
    }));
    assert!(e.to_string().contains("qwen2.attention.key_length"), "{e}");
}
