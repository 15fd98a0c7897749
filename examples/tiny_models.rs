//! Writes the tiny random model of every family (`starling::model::gguf_writer::tiny_model`)
//! into a directory, for the fixture tools that run llama.cpp on them
//! (`tools/fixtures/family_logits.py`): `cargo run --example tiny_models -- DIR`.

use std::path::PathBuf;

use starling::model::families::FAMILIES;
use starling::model::gguf_writer::{TinyModelSpec, tiny_model};

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "tiny-models".into()));
    std::fs::create_dir_all(&dir)?;
    for family in FAMILIES {
        let path = dir.join(format!("tiny-{}.gguf", family.name));
        std::fs::write(&path, tiny_model(&TinyModelSpec::family(family.name)))?;
        println!("{}", path.display());
    }
    Ok(())
}
