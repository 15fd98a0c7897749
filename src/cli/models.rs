//! `starling models`: the model download cache (pull a verified file, list what is cached).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use starling::config::{Config, Format};
use starling::registry::{Digest, ModelCache, Origin, Source};

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Download URL into the cache (or find it there) and verify its sha256.
    Pull(PullArgs),
    /// List the cached model files, least recently used first.
    List(CacheArgs),
}

#[derive(Args)]
pub struct CacheArgs {
    /// Cache directory (default: `registry.cache_dir` of the config file).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Config file whose `registry:` section gives the cache directory and size cap.
    #[arg(long, default_value = "config/starling.yaml")]
    config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PullArgs {
    /// An http:// or https:// URL of a GGUF file.
    url: String,
    /// The file's expected sha256 (64 hex digits).
    #[arg(long)]
    sha256: String,
    #[command(flatten)]
    cache: CacheArgs,
}

/// Runs one `models` subcommand.
pub fn run(cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::Pull(args) => pull(args),
        ModelsCommand::List(args) => list(args),
    }
}

/// The cache named by `--cache-dir`, else by the config file (defaults when it is absent).
fn open_cache(a: &CacheArgs) -> Result<ModelCache> {
    let config = if a.config.exists() {
        Config::load(&a.config).with_context(|| format!("reading {}", a.config.display()))?
    } else {
        Config::from_str("{}", Format::Json)?
    };
    let dir = a.cache_dir.clone().unwrap_or(config.registry.cache_dir);
    Ok(ModelCache::new(dir, config.registry.cache_max_bytes).with_download_timeout(config.registry.download_timeout))
}

fn pull(a: PullArgs) -> Result<()> {
    let cache = open_cache(&a.cache)?;
    let url = match Source::parse(&a.url)? {
        Source::Http(url) => url,
        Source::Local(p) => bail!("`{}` is a local path; `models pull` takes an http(s):// URL", p.display()),
    };
    let sha256 = Digest::parse(&a.sha256)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let fetched = runtime.block_on(cache.fetch(&url, Some(&sha256), &[]))?;
    let origin = match fetched.origin {
        Origin::Hit => "cached",
        Origin::Revalidated => "revalidated",
        Origin::Downloaded => "downloaded",
    };
    if a.cache.json {
        let v = serde_json::json!({"path": fetched.path, "sha256": fetched.sha256.to_string(), "size": fetched.size, "origin": origin});
        println!("{v}");
    } else {
        println!("{origin} {} ({} bytes, sha256 {})", fetched.path.display(), fetched.size, fetched.sha256);
    }
    Ok(())
}

fn list(a: CacheArgs) -> Result<()> {
    let cache = open_cache(&a)?;
    let entries = cache.entries()?;
    if a.json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no models cached in {}", cache.dir().display());
    }
    for e in entries {
        println!("{}  {:>12}  {}", e.sha256, e.size, e.source);
    }
    Ok(())
}
