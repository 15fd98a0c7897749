//! Writes the seed corpus for `gguf_header` into `fuzz/corpus/gguf_header/`:
//! small valid files from Starling's own GGUF writer.
//! Run: `cargo run --manifest-path fuzz/Cargo.toml --bin write_seeds`.

use std::path::Path;

use starling::model::ggml_type::GgmlType;
use starling::model::gguf::GgufValue;
use starling::model::gguf_writer::{GgufWriter, TINY_BASE_VOCAB, TinyLlamaSpec, f32_bytes, tiny_llama_f32};

fn main() -> std::io::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/gguf_header");
    std::fs::create_dir_all(&dir)?;

    let mut small = GgufWriter::new(3);
    small
        .metadata("general.name", GgufValue::String("seed".into()))
        .tensor("a", &[4, 2], GgmlType::F32, f32_bytes(&[0.5; 8]))
        .tensor("b", &[32], GgmlType::Q8_0, vec![0; 34]);
    small.write(&dir.join("small_v3.gguf"))?;

    let mut values = GgufWriter::new(2);
    values.alignment(64);
    let scalars = [
        GgufValue::U8(1),
        GgufValue::I8(-1),
        GgufValue::U16(2),
        GgufValue::I16(-2),
        GgufValue::U32(3),
        GgufValue::I32(-3),
        GgufValue::F32(0.5),
        GgufValue::Bool(true),
        GgufValue::String("s".into()),
        GgufValue::U64(4),
        GgufValue::I64(-4),
        GgufValue::F64(0.25),
    ];
    for (i, v) in scalars.iter().enumerate() {
        values.metadata(&format!("k{i}"), v.clone());
    }
    let nested = GgufValue::Array(vec![GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)])]);
    values.metadata("nested", nested).tensor("t", &[2], GgmlType::F16, vec![0; 4]);
    values.write(&dir.join("all_values_v2.gguf"))?;

    let spec = TinyLlamaSpec {
        n_vocab: TINY_BASE_VOCAB,
        n_embd: 8,
        n_layer: 1,
        n_head: 2,
        n_head_kv: 1,
        n_ff: 16,
        n_ctx: 32,
        tied_output: true,
        seed: 7,
    };
    std::fs::write(dir.join("tiny_llama_tied.gguf"), tiny_llama_f32(&spec))?;
    let untied = TinyLlamaSpec { tied_output: false, n_layer: 2, ..spec };
    std::fs::write(dir.join("tiny_llama_untied.gguf"), tiny_llama_f32(&untied))?;
    println!("seeds written to {}", dir.display());
    Ok(())
}
