//! `starling inspect`: a GGUF file's metadata and tensor table.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use starling::model::gguf::GgufFile;

#[derive(Args)]
pub struct InspectArgs {
    path: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let file = GgufFile::open(&a.path)?;
    let report = starling::model::inspect::inspect(&file);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
