//! Writes the tiny random model of every family (`starling::model::gguf_writer::tiny_model`)
//! into a directory, for the fixture tools that run llama.cpp on them
//! (`tools/fixtures/family_logits.py`): `cargo run --example tiny_models -- DIR`. It also
//! writes the 32k-context variants of the families with long windows
//! ([`TinyModelSpec::long_context`], `tiny-{arch}-32k.gguf`) for
//! `tools/fixtures/long_context_logits.py`.

use std::path::PathBuf;

use starling::model::families::FAMILIES;
use starling::model::gguf_writer::{LONG_CONTEXT_FAMILIES, TinyModelSpec, tiny_model};

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "tiny-models".into()));
    std::fs::create_dir_all(&dir)?;
    for family in FAMILIES {
        let path = dir.join(format!("tiny-{}.gguf", family.name));
        std::fs::write(&path, tiny_model(&TinyModelSpec::family(family.name)))?;
        println!("{}", path.display());
    }
    for arch in LONG_CONTEXT_FAMILIES {
        let path = dir.join(format!("tiny-{arch}-32k.gguf"));
        std::fs::write(&path, tiny_model(&TinyModelSpec::long_context(arch)))?;
        println!("{}", path.display());
    }
    Ok(())
}
