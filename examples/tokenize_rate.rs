//! Measures tokenizer throughput on about 1 MB of English text (run in release mode):
//! `cargo run --release --example tokenize_rate [-- MODEL.gguf]`.

use std::path::PathBuf;
use std::time::Instant;

use starling::model::gguf::GgufFile;
use starling::tokenizer::GgufTokenizer;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model =
        std::env::args().nth(1).map(PathBuf::from).unwrap_or(root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let seed = std::fs::read_to_string(root.join("tests/fixtures/smollm2/ppl_text.txt"))?;
    let mut text = String::with_capacity(1 << 20);
    while text.len() < 1 << 20 {
        text.push_str(&seed);
        text.push('\n');
    }
    let t0 = Instant::now();
    let file = GgufFile::open(&model)?;
    let read = t0.elapsed();
    let t0 = Instant::now();
    let tok = GgufTokenizer::from_gguf(&file.header)?;
    let build = t0.elapsed();
    for parse_special in [false, true] {
        let t = Instant::now();
        let ids = tok.encode(&text, parse_special)?;
        let enc = t.elapsed();
        let t = Instant::now();
        let back = tok.decode(&ids, false)?;
        let dec = t.elapsed();
        assert_eq!(back, text);
        let mb = text.len() as f64 / 1e6;
        println!(
            "parse_special={parse_special}: {:.2} MB -> {} tokens, encode {:.1} ms ({:.1} MB/s, {:.0} tok/s), decode {:.1} ms",
            mb,
            ids.len(),
            enc.as_secs_f64() * 1e3,
            mb / enc.as_secs_f64(),
            ids.len() as f64 / enc.as_secs_f64(),
            dec.as_secs_f64() * 1e3
        );
    }
    println!(
        "{} tokens: header read {:.1} ms, tokenizer build {:.1} ms",
        tok.vocab_size(),
        read.as_secs_f64() * 1e3,
        build.as_secs_f64() * 1e3
    );
    Ok(())
}
