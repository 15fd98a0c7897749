//! `starling tokenize`: a text's token ids (and pieces, offsets) under a model's vocabulary.

use anyhow::Result;
use clap::Args;

use starling::model::gguf::GgufFile;
use starling::tokenizer::GgufTokenizer;

#[derive(Args)]
pub struct TokenizeArgs {
    /// GGUF model file, or a model name (`starling models pull NAME` fetches it).
    #[arg(long)]
    model: String,
    /// Match special tokens such as `<|im_start|>` in the text.
    #[arg(long)]
    parse_special: bool,
    /// Also print byte offsets of each token.
    #[arg(long)]
    offsets: bool,
    #[arg(long)]
    json: bool,
    text: String,
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let file = GgufFile::open(&super::catalog::resolve(&a.model)?)?;
    let tok = GgufTokenizer::from_gguf(&file.header)?;
    let enc = tok.encode_with_offsets(&a.text, a.parse_special)?;
    if a.json {
        let mut v = serde_json::json!({"ids": enc.ids});
        if a.offsets {
            v["offsets"] = serde_json::json!(enc.offsets);
        }
        println!("{v}");
    } else {
        for (i, id) in enc.ids.iter().enumerate() {
            match a.offsets {
                true => println!("{id}\t{:?}\t{}..{}", enc.pieces[i], enc.offsets[i].0, enc.offsets[i].1),
                false => println!("{id}\t{:?}", enc.pieces[i]),
            }
        }
    }
    Ok(())
}
