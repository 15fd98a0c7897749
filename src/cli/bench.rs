//! `starling bench`: throughput figures comparable with llama.cpp's, or a load generator
//! against a running server (`--http`).

use anyhow::{Context, Result, bail};
use clap::Args;
use starling::config::KvDtype;

use starling::bench::http::{HttpLoad, run as run_load};
use starling::bench::{BenchSettings, Step};

#[derive(Args)]
pub struct BenchArgs {
    /// GGUF model to measure (in this process): a file or a model name.
    #[arg(long, required_unless_present = "http", conflicts_with = "http")]
    model: Option<String>,
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
    /// Context lengths, comma-separated (e.g. 512,2048,4096,8000): at each, prefill of a
    /// prompt that long, single-stream decode after it, and 4 sequences decoding at it.
    #[arg(long, default_value = "", value_parser = parse_contexts, conflicts_with = "http")]
    contexts: Contexts,
    /// Element type of the KV cache in every engine and model figure: f32 (the default),
    /// f16 (llama.cpp's default) or q8_0.
    #[arg(long, default_value = "f32", value_parser = parse_kv_dtype, conflicts_with = "http")]
    kv_dtype: KvDtype,
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
    /// JSON schemas (a file holding one schema, or a list of {"name", "schema"}): their compile
    /// times, and decode with a fixed schema beside plain decode at 1 and 16 sequences.
    #[arg(long, value_name = "FILE", conflicts_with = "http")]
    json_schema: Option<std::path::PathBuf>,
    /// Speculative decoding off and on: fixed input-grounded and open-ended chat tasks,
    /// single stream and 16 sequences, and the cost of verifying drafts.
    #[arg(long, conflicts_with = "http")]
    speculative: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// A comma-separated list of concurrency levels (may be empty).
#[derive(Clone, Debug)]
pub struct Levels(Vec<usize>);

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

/// A comma-separated list of context lengths in tokens (may be empty).
#[derive(Clone, Debug)]
pub struct Contexts(Vec<usize>);

fn parse_kv_dtype(s: &str) -> Result<KvDtype, String> {
    KvDtype::from_name(s).ok_or_else(|| format!("`{s}` is not a KV cache type: f32, f16 or q8_0"))
}

/// Longest context `--contexts` takes (the model's own limit is checked once it is loaded).
const MAX_CONTEXT: usize = 1 << 20;

fn parse_contexts(s: &str) -> Result<Contexts, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<usize>() {
            Ok(n) if (1..=MAX_CONTEXT).contains(&n) => Ok(n),
            _ => Err(format!("`{p}` is not a context length (a number of tokens from 1 to {MAX_CONTEXT})")),
        })
        .collect::<Result<_, _>>()
        .map(Contexts)
}

pub fn run(a: BenchArgs) -> Result<()> {
    if let Some(url) = a.http {
        return cmd_bench_http(url, a.concurrency.0, a.requests, a.max_tokens, a.api_key, a.served_model, a.json);
    }
    let settings = BenchSettings {
        model: super::catalog::resolve(&a.model.context("--model is required without --http")?)?,
        threads: a.threads,
        reps: a.reps,
        engine_concurrency: a.concurrency.0,
        contexts: a.contexts.0,
        json_schemas: match &a.json_schema {
            Some(path) => read_schemas(path)?,
            None => vec![],
        },
        speculative: a.speculative,
        kv_dtype: a.kv_dtype,
    };
    let progress = super::progress::Progress::new(a.json);
    let running = progress.spinner(&format!("loading {}", settings.model.display()));
    let mut phase = String::new();
    let report = starling::bench::run_observed(&settings, &mut |step: Step| {
        running.set_message(format!("{}: repetition {} of {}", step.phase, step.rep, step.reps));
        if step.phase != phase {
            phase = step.phase.to_owned();
            if !progress.is_terminal() {
                progress.message(&format!("bench: {phase}"));
            }
        }
    });
    running.finish_and_clear();
    let report = report?;
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
        let report = run_load(&load)?;
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

/// `--json-schema FILE`: one schema, or a list of `{"name", "schema"}` (the test fixtures' shape).
fn read_schemas(path: &std::path::Path) -> Result<Vec<(String, serde_json::Value)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    match v {
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match (item.get("name").and_then(|n| n.as_str()), item.get("schema")) {
                (Some(name), Some(schema)) => Ok((name.to_owned(), schema.clone())),
                _ => bail!("{}: entry {i} needs a `name` and a `schema`", path.display()),
            })
            .collect(),
        schema @ serde_json::Value::Object(_) => Ok(vec![(path.display().to_string(), schema)]),
        _ => bail!("{}: expected a JSON schema object or a list of {{\"name\", \"schema\"}}", path.display()),
    }
}
