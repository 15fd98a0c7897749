//! The `starling` command: parses the arguments and runs one command module (`cli/`).

mod cli;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use cli::{bench, chat, generate, inspect, models, perplexity, serve, tokenize};
use starling::telemetry::{self, LogStyle};

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
    Serve(serve::ServeArgs),
    /// Generate a continuation of a prompt, streaming text to stdout.
    Generate(generate::GenerateArgs),
    /// Chat in the terminal with a model (loaded here, or a running server with --url).
    Chat(chat::ChatArgs),
    /// Print the token ids of TEXT.
    Tokenize(tokenize::TokenizeArgs),
    /// Print a GGUF file's metadata and tensor table.
    Inspect(inspect::InspectArgs),
    /// Perplexity of a text file under the model.
    Perplexity(perplexity::PerplexityArgs),
    /// Throughput figures (prefill, decode, batched, engine) comparable with llama.cpp's.
    Bench(bench::BenchArgs),
    /// The model download cache: pull a verified model file, list what is cached.
    #[command(subcommand)]
    Models(models::ModelsCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: error types that quote their
/// cause in their own message also expose it as the source, and printing both would say
/// everything twice.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    let style = match cli.log_format.as_deref() {
        Some("json") => Some(LogStyle::Json),
        Some(_) => Some(LogStyle::Text),
        None => None,
    };
    match cli.command {
        Command::Serve(args) => serve::run(args, style, cli.trace_chrome),
        Command::Generate(args) => {
            let _guard = telemetry::init(style.unwrap_or(LogStyle::Text), "warn", cli.trace_chrome.as_deref())?;
            generate::run(args)
        }
        Command::Chat(args) => {
            let _guard = telemetry::init(style.unwrap_or(LogStyle::Text), "warn", cli.trace_chrome.as_deref())?;
            chat::run(args)
        }
        Command::Tokenize(args) => tokenize::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Models(cmd) => models::run(cmd),
    }
}
