//! The `starling` command: serve, generate, tokenize, inspect, perplexity, bench.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use starling::config::{Config, LogFormat, Overrides};
use starling::engine::load::start_model;
use starling::gateway::{AppState, load_configured, mark_configured_loading, serve};
use starling::model::gguf::GgufFile;
use starling::protocol::{EngineCommand, GenerateRequest, PromptInput, StreamEvent};
use starling::registry::{Digest, ModelCache, Origin, Source};
use starling::sampler::{SamplerLimits, SamplingParams};
use starling::telemetry::{self, LogStyle, Observability};
use starling::types::{RequestId, TenantId};

#[derive(Parser)]
#[command(name = "starling", version, about = "CPU-first LLM inference server")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Write a Chrome trace of engine ticks to FILE (open it in Perfetto or chrome://tracing).
    #[arg(long, global = true, value_name = "FILE")]
    trace_chrome: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured models over HTTP.
    Serve(ServeArgs),
    /// Generate a continuation of a prompt, streaming text to stdout.
    Generate(GenerateArgs),
    /// Print the token ids of TEXT.
    Tokenize(TokenizeArgs),
    /// Print a GGUF file's metadata and tensor table.
    Inspect(InspectArgs),
    /// Perplexity of a text file under the model.
    Perplexity(PerplexityArgs),
    /// Throughput figures (prefill, decode, batched, engine) comparable with llama.cpp's.
    Bench(BenchArgs),
    /// The model download cache: pull a verified model file, list what is cached.
    #[command(subcommand)]
    Models(ModelsCommand),
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download URL into the cache (or find it there) and verify its sha256.
    Pull(PullArgs),
    /// List the cached model files, least recently used first.
    List(CacheArgs),
}

#[derive(Args)]
struct CacheArgs {
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
struct PullArgs {
    /// An http:// or https:// URL of a GGUF file.
    url: String,
    /// The file's expected sha256 (64 hex digits).
    #[arg(long)]
    sha256: String,
    #[command(flatten)]
    cache: CacheArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// GGUF model to measure (in this process).
    #[arg(long, required_unless_present = "http", conflicts_with = "http")]
    model: Option<PathBuf>,
    /// Threads of the model's pool.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Runs per figure (each figure is the median).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Concurrency levels, comma-separated: of the engine figure (an empty list skips it), or
    /// of the load generator with --http (one run per level).
    #[arg(long, default_value = "1,4,16,32", value_parser = parse_levels)]
    concurrency: Levels,
    /// Load-generate against a running server at this base URL (http://host:port) instead.
    #[arg(long, value_name = "URL")]
    http: Option<String>,
    /// With --http: requests per concurrency level.
    #[arg(long, default_value_t = 64, requires = "http")]
    requests: usize,
    /// With --http: tokens each request generates.
    #[arg(long, default_value_t = 64, requires = "http")]
    max_tokens: u32,
    /// With --http: bearer key for the server.
    #[arg(long, requires = "http", env = "STARLING_BENCH_KEY")]
    api_key: Option<String>,
    /// With --http: the model id to route requests to (default: the server's first).
    #[arg(long, requires = "http")]
    served_model: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// A comma-separated list of concurrency levels (may be empty).
#[derive(Clone, Debug)]
struct Levels(Vec<usize>);

fn parse_levels(s: &str) -> Result<Levels, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!("`{p}` is not a concurrency level (a positive integer)")),
            Ok(n) => Ok(n),
        })
        .collect::<Result<_, _>>()
        .map(Levels)
}

#[derive(Args)]
struct ServeArgs {
    /// Config file (YAML, or JSON by extension).
    #[arg(long, default_value = "config/starling.yaml")]
    config: PathBuf,
    /// Address to listen on (overrides the config and STARLING_BIND).
    #[arg(long, value_name = "HOST:PORT")]
    bind: Option<String>,
    /// GGUF model for the first configured model slot.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long)]
    max_tokens: Option<u32>,
    #[arg(long)]
    min_tokens: Option<u32>,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    repeat_last_n: Option<u32>,
    #[arg(long)]
    frequency_penalty: Option<f32>,
    #[arg(long)]
    presence_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long)]
    ignore_eos: bool,
    /// Bias a token's logit: `ID=BIAS` (repeatable; -100 bans the token).
    #[arg(long, value_parser = parse_bias)]
    logit_bias: Vec<(u32, f32)>,
    /// A token id that ends generation (repeatable).
    #[arg(long)]
    stop_token_id: Vec<u32>,
    /// Report the top-N log-probabilities of each sampled token (N <= 20; with --json).
    #[arg(long)]
    logprobs: Option<u32>,
    /// Order of the sampling steps, comma-separated (penalties,temperature,top_k,top_p,min_p).
    #[arg(long, value_delimiter = ',')]
    samplers: Option<Vec<String>>,
    /// Threads for the model's matrix work.
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[arg(long)]
    model: PathBuf,
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

#[derive(Args)]
struct InspectArgs {
    path: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PerplexityArgs {
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

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected ID=BIAS"))?;
    let id = id.trim().parse().map_err(|_| format!("`{id}` is not a token id"))?;
    let bias = bias.trim().parse().map_err(|_| format!("`{bias}` is not a number"))?;
    Ok((id, bias))
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let style = match cli.log_format.as_deref() {
        Some("json") => Some(LogStyle::Json),
        Some(_) => Some(LogStyle::Text),
        None => None,
    };
    match cli.command {
        Command::Serve(args) => cmd_serve(args, style, cli.trace_chrome),
        Command::Generate(args) => {
            let _guard = telemetry::init(style.unwrap_or(LogStyle::Text), "warn", cli.trace_chrome.as_deref())?;
            cmd_generate(args)
        }
        Command::Tokenize(args) => cmd_tokenize(args),
        Command::Inspect(args) => cmd_inspect(args),
        Command::Perplexity(args) => cmd_perplexity(args),
        Command::Bench(args) => cmd_bench(args),
        Command::Models(ModelsCommand::Pull(args)) => cmd_models_pull(args),
        Command::Models(ModelsCommand::List(args)) => cmd_models_list(args),
    }
}

fn cmd_serve(args: ServeArgs, style: Option<LogStyle>, trace: Option<PathBuf>) -> Result<()> {
    let overrides = Overrides { bind: args.bind, model: args.model, ..Default::default() }.or(Overrides::from_env());
    let config = Config::load_with_overrides(&args.config, &overrides)?;
    let style = style.unwrap_or(match config.telemetry.log_format {
        LogFormat::Json => LogStyle::Json,
        LogFormat::Text => LogStyle::Text,
    });
    let trace = trace.or(config.telemetry.trace_chrome.clone());
    let _guard = telemetry::init(style, &config.telemetry.log_level, trace.as_deref())?;
    let obs = Arc::new(Observability::new()?);
    let bind = config.server.bind;
    let state = Arc::new(AppState::new(Arc::new(config), Vec::new(), obs).with_config_source(args.config, overrides));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    mark_configured_loading(&state);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("cannot listen on {bind}"))?;
        tracing::info!(addr = %listener.local_addr()?, "listening");
        let failure = Arc::new(std::sync::Mutex::new(None));
        let stop = stop_on_signal_or_load_failure(state.clone(), failure.clone());
        serve(listener, state, stop).await;
        match failure.lock().map(|mut f| f.take()) {
            Ok(Some(e)) => Err(e),
            _ => anyhow::Ok(()),
        }
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// Loads the configured models on a blocking task (the server is already listening and
/// answers `/readyz` with 503 "model loading"); resolves on a shutdown signal, or when a
/// load fails, after putting the error in `failure` so `serve` exits non-zero.
async fn stop_on_signal_or_load_failure(state: Arc<AppState>, failure: Arc<std::sync::Mutex<Option<anyhow::Error>>>) {
    let loading = tokio::task::spawn_blocking(move || load_configured(&state));
    let failed = async move {
        let error = match loading.await {
            Ok(Ok(())) => return std::future::pending().await,
            Ok(Err(e)) => anyhow::Error::new(e),
            Err(e) => anyhow::anyhow!("the model loader stopped: {e}"),
        };
        tracing::error!(error = %error, "model load failed; stopping");
        if let Ok(mut f) = failure.lock() {
            *f = Some(error);
        }
    };
    tokio::select! {
        () = shutdown_signal() => {}
        () = failed => {}
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}

/// Runs one request through a real engine (the same path the server uses).
fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let mut config = Config::from_str("{}", starling::config::Format::Json)?;
    config.models[0].path = a.model.clone();
    config.models[0].threads = std::num::NonZeroUsize::new(a.threads.max(1)).expect("non-zero");
    let loaded = start_model(&config, 0)?;
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        repeat_last_n: a.repeat_last_n,
        frequency_penalty: a.frequency_penalty,
        presence_penalty: a.presence_penalty,
        seed: a.seed,
        max_tokens: a.max_tokens,
        min_tokens: a.min_tokens,
        ignore_eos: Some(a.ignore_eos),
        stop: (!a.stop.is_empty()).then(|| a.stop.clone()),
        logit_bias: (!a.logit_bias.is_empty()).then(|| a.logit_bias.clone()),
        stop_token_ids: (!a.stop_token_id.is_empty()).then(|| a.stop_token_id.clone()),
        logprobs: a.logprobs,
        samplers: a.samplers.clone(),
    };
    let limits = SamplerLimits {
        vocab_size: loaded.tokenizer.vocab_size(),
        max_stop_strings: config.limits.max_stop_strings,
        default_max_tokens: config.limits.default_max_tokens,
        max_tokens_cap: config.limits.max_tokens_cap,
    };
    let sampling =
        params.validate_with_order(&limits, &loaded.sampler_order).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let request = GenerateRequest {
        id: RequestId::next(),
        client_id: None,
        tenant: TenantId::from("cli"),
        session: None,
        input: PromptInput::Text { text: a.prompt.clone(), parse_special: true },
        sampling,
        timeout: config.limits.default_timeout,
        received_at: std::time::Instant::now(),
        events: tx,
    };
    loaded.engine.send(EngineCommand::Generate(Box::new(request))).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let (mut ids, mut text, mut logprobs) = (Vec::new(), String::new(), Vec::new());
    let mut stdout = std::io::stdout().lock();
    while let Some(event) = rx.blocking_recv() {
        match event {
            StreamEvent::Started { .. } => {}
            StreamEvent::Token { id, text: piece, top_logprobs, logprob } => {
                ids.push(id);
                if a.logprobs.is_some() {
                    logprobs.push(serde_json::json!({"id": id, "logprob": logprob, "top_logprobs": top_logprobs}));
                }
                text.push_str(&piece);
                if !a.json {
                    write!(stdout, "{piece}")?;
                    stdout.flush()?;
                }
            }
            StreamEvent::Done { finish_reason, seed, text: tail, usage, .. } => {
                text.push_str(&tail);
                if a.json {
                    let mut v = serde_json::json!({"tokens": ids, "text": text, "finish_reason": finish_reason, "seed": seed, "usage": usage});
                    if a.logprobs.is_some() {
                        v["logprobs"] = serde_json::Value::Array(std::mem::take(&mut logprobs));
                    }
                    writeln!(stdout, "{v}")?;
                } else {
                    writeln!(stdout, "{tail}")?;
                }
                return Ok(());
            }
            StreamEvent::Error(e) => bail!("{} ({})", e.message, e.kind.as_str()),
        }
    }
    bail!("the engine stopped before the generation finished")
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let file = GgufFile::open(&a.model)?;
    let tok = starling::tokenizer::GgufTokenizer::from_gguf(&file.header)?;
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

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let file = GgufFile::open(&a.path)?;
    let report = starling::model::inspect::inspect(&file);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn cmd_perplexity(a: PerplexityArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let model = starling::model::llama::LlamaModel::load(&a.model, a.threads)?;
    let tok = starling::tokenizer::GgufTokenizer::from_gguf(&model.file().header)?;
    let ids = tok.encode(&text, false)?;
    let n = a.tokens.min(ids.len());
    if n < 2 {
        bail!("{} has {} tokens; perplexity needs at least 2", a.file.display(), ids.len());
    }
    let ppl = starling::model::eval::perplexity(&model, &ids[..n])?;
    if a.json {
        println!("{}", serde_json::json!({"perplexity": ppl, "tokens": n}));
    } else {
        println!("perplexity over {n} tokens of {}: {ppl:.4}", display(&a.file));
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    if let Some(url) = a.http {
        return cmd_bench_http(url, a.concurrency.0, a.requests, a.max_tokens, a.api_key, a.served_model, a.json);
    }
    let settings = starling::bench::BenchSettings {
        model: a.model.context("--model is required without --http")?,
        threads: a.threads,
        reps: a.reps,
        engine_concurrency: a.concurrency.0,
    };
    let report = starling::bench::run(&settings)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

/// One load-generator run per concurrency level; exits non-zero if any request failed.
fn cmd_bench_http(
    url: String,
    levels: Vec<usize>,
    requests: usize,
    max_tokens: u32,
    api_key: Option<String>,
    model: Option<String>,
    json: bool,
) -> Result<()> {
    use starling::bench::http::{HttpLoad, run};
    if levels.is_empty() {
        bail!("--concurrency needs at least one level with --http");
    }
    let mut failed = 0;
    for concurrency in levels {
        let load = HttpLoad {
            url: url.clone(),
            concurrency,
            requests,
            max_tokens,
            api_key: api_key.clone(),
            model: model.clone(),
        };
        let report = run(&load)?;
        failed += report.errors;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("{report}");
        }
    }
    if failed > 0 {
        bail!("{failed} requests failed");
    }
    Ok(())
}

/// The cache named by `--cache-dir`, else by the config file (defaults when it is absent).
fn open_cache(a: &CacheArgs) -> Result<ModelCache> {
    let config = if a.config.exists() {
        Config::load(&a.config).with_context(|| format!("reading {}", a.config.display()))?
    } else {
        Config::from_str("{}", starling::config::Format::Json)?
    };
    let dir = a.cache_dir.clone().unwrap_or(config.registry.cache_dir);
    Ok(ModelCache::new(dir, config.registry.cache_max_bytes))
}

fn cmd_models_pull(a: PullArgs) -> Result<()> {
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

fn cmd_models_list(a: CacheArgs) -> Result<()> {
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

fn display(p: &Path) -> String {
    p.display().to_string()
}
