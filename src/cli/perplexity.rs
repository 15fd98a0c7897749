//! `starling perplexity`: perplexity of a text file under a model, every position
//! predicting the next.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::common::default_threads;
use starling::tokenizer::GgufTokenizer;

#[derive(Args)]
pub struct PerplexityArgs {
    /// GGUF model file, or a model name (`starling models pull NAME` fetches it).
    #[arg(long)]
    model: String,
    #[arg(long)]
    file: PathBuf,
    /// Text tokens of the file to score (after BOS, for models that start with one).
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let progress = super::progress::Progress::new(a.json);
    let loading = progress.spinner(&format!("loading {}", a.model));
    let model = starling::model::transformer::Transformer::load(&super::catalog::resolve(&a.model)?, a.threads)?;
    let tok = GgufTokenizer::from_gguf(&model.file().header)?;
    // A model that wants BOS (add_bos_token) gets it first, and then every text token is
    // predicted; without, the first text token has nothing to be predicted from.
    let bos = tok.bos_id().filter(|_| tok.add_bos());
    let mut ids: Vec<u32> = bos.into_iter().collect();
    ids.extend(tok.encode(&text, false)?);
    let n = a.tokens.min(ids.len() - usize::from(bos.is_some()));
    let end = n + usize::from(bos.is_some());
    if end < 2 {
        bail!("{} has {} tokens; perplexity needs at least 2", a.file.display(), ids.len());
    }
    loading.finish_and_clear();
    let scoring = progress.spinner(&format!("scoring {n} tokens"));
    let ppl = starling::model::eval::perplexity(&model, &ids[..end])?;
    scoring.finish_and_clear();
    if a.json {
        println!("{}", serde_json::json!({"perplexity": ppl, "tokens": n}));
    } else {
        println!("perplexity over {n} tokens of {}: {ppl:.4}", a.file.display());
    }
    Ok(())
}
