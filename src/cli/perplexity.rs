//! `starling perplexity`: perplexity of a text file under a model, every position
//! predicting the next.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::common::default_threads;
use starling::tokenizer::GgufTokenizer;

#[derive(Args)]
pub struct PerplexityArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    file: PathBuf,
    /// Tokens of the file to score.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let model = starling::model::transformer::Transformer::load(&a.model, a.threads)?;
    let tok = GgufTokenizer::from_gguf(&model.file().header)?;
    let ids = tok.encode(&text, false)?;
    let n = a.tokens.min(ids.len());
    if n < 2 {
        bail!("{} has {} tokens; perplexity needs at least 2", a.file.display(), ids.len());
    }
    let ppl = starling::model::eval::perplexity(&model, &ids[..n])?;
    if a.json {
        println!("{}", serde_json::json!({"perplexity": ppl, "tokens": n}));
    } else {
        println!("perplexity over {n} tokens of {}: {ppl:.4}", a.file.display());
    }
    Ok(())
}
