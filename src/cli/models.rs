//! `starling models`: the model download cache (pull a verified file, list what is cached).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::catalog::{self, Pulled};
use super::progress::Progress;
use starling::config::{Config, Format};
use starling::registry::{Digest, ModelCache, Origin, Source, Transfer};

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Fetch a model by name into the models directory, or a URL into the cache; verify its sha256.
    #[command(
        after_help = "Examples:\n  starling models pull smollm2-135m\n  starling models pull https://example.com/m.gguf --sha256 <64 hex digits>"
    )]
    Pull(PullArgs),
    /// List the models known by name and the cached model files, least recently used first.
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
    /// A model name from the catalog (smollm2-135m, gemma3-270m), or an http(s):// URL of a
    /// GGUF file.
    #[arg(value_name = "NAME|URL")]
    source: String,
    /// The file's expected sha256 (64 hex digits); required for a URL.
    #[arg(long)]
    sha256: Option<String>,
    /// Where a named model is stored (default: `STARLING_MODEL_DIR`, else `models/`).
    #[arg(long)]
    dir: Option<PathBuf>,
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

/// Pulls a named model from the catalog, or a URL into the cache.
fn pull(a: PullArgs) -> Result<()> {
    if !a.source.contains("://") {
        return pull_named(&a);
    }
    let cache = open_cache(&a.cache)?;
    let url = match Source::parse(&a.source)? {
        Source::Http(url) => url,
        Source::Local(p) => bail!("`{}` is a local path; `models pull` takes an http(s):// URL", p.display()),
    };
    let sha256 = a.sha256.as_deref().context("a URL needs its digest: add --sha256 <64 hex digits>")?;
    let sha256 = Digest::parse(sha256)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let progress = Progress::new(a.cache.json);
    let mut bar = None;
    let mut observe = |t: Transfer| {
        let bar = bar.get_or_insert_with(|| {
            if !progress.is_terminal() {
                progress.message(&format!("downloading {}", url.as_str()));
            }
            progress.transfer(t.total, "downloading")
        });
        bar.set_position(t.received);
    };
    let fetched = runtime.block_on(cache.fetch_observed(&url, Some(&sha256), &[], &mut observe));
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let fetched = fetched?;
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

/// `models pull NAME`: the catalog's file in the models directory, verified.
fn pull_named(a: &PullArgs) -> Result<()> {
    if a.sha256.is_some() {
        bail!("--sha256 is for URLs; a named model's digest comes from the catalog");
    }
    let dir = a.dir.clone().unwrap_or_else(catalog::models_dir);
    let progress = Progress::new(a.cache.json);
    let (path, pulled) = catalog::pull(&a.source, &dir, &progress)?;
    let origin = match pulled {
        Pulled::Present => "present",
        Pulled::Downloaded => "downloaded",
    };
    if a.cache.json {
        println!("{}", serde_json::json!({"name": a.source, "path": path, "origin": origin}));
    } else {
        println!("{origin} {} (sha256 verified)", path.display());
    }
    Ok(())
}

/// `models list`: the cached files.
fn list(a: CacheArgs) -> Result<()> {
    let cache = open_cache(&a)?;
    let entries = cache.entries()?;
    if a.json {
        println!("{}", serde_json::to_string(&entries)?);
        return Ok(());
    }
    let dir = catalog::models_dir();
    println!("known models (in {}):", dir.display());
    for (name, entry) in catalog::catalog() {
        let state = if dir.join(&entry.file).exists() { "pulled" } else { "not pulled" };
        println!("  {name:<14} {state:<10}  {}", entry.description);
    }
    if entries.is_empty() {
        println!("no models cached in {}", cache.dir().display());
    }
    for e in entries {
        println!("{}  {:>12}  {}", e.sha256, e.size, e.source);
    }
    Ok(())
}
