//! `starling inspect`: a GGUF file's metadata and tensor table.

use anyhow::Result;
use clap::Args;

use starling::model::gguf::GgufFile;

#[derive(Args)]
pub struct InspectArgs {
    /// A GGUF file, or a catalog name (`starling models list` shows the cache).
    model: String,
    #[arg(long)]
    json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let file = GgufFile::open(&super::catalog::resolve(&a.model)?)?;
    let report = starling::model::inspect::inspect(&file);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
