//! The `starling` command: parses the arguments and runs one command module (`cli/`).

mod cli;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};

use cli::{bench, chat, generate, inspect, models, perplexity, serve, tokenize};
use starling::gateway::template::sandbox;
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
    #[command(after_help = "Example:\n  starling serve --model smollm2-135m --bind 127.0.0.1:8080")]
    Serve(serve::ServeArgs),
    /// Generate a continuation of a prompt, streaming text to stdout.
    #[command(
        after_help = "Example:\n  starling generate --model smollm2-135m --prompt \"The capital of France is\" --max-tokens 16"
    )]
    Generate(generate::GenerateArgs),
    /// Chat in the terminal with a model (loaded here, or a running server with --url).
    #[command(
        after_help = "Examples:\n  starling chat smollm2-135m\n  starling chat --url http://127.0.0.1:8080 --temperature 0.7"
    )]
    Chat(chat::ChatArgs),
    /// Print the token ids of TEXT.
    #[command(after_help = "Example:\n  starling tokenize --model smollm2-135m --parse-special \"<|im_start|>Hello\"")]
    Tokenize(tokenize::TokenizeArgs),
    /// Print a GGUF file's metadata and tensor table (a path or a catalog name).
    #[command(
        after_help = "Examples:\n  starling inspect smollm2-135m\n  starling inspect models/SmolLM2-135M-Instruct.Q4_1.gguf --json"
    )]
    Inspect(inspect::InspectArgs),
    /// Perplexity of a text file under the model.
    #[command(after_help = "Example:\n  starling perplexity --model smollm2-135m --file README.md --tokens 256")]
    Perplexity(perplexity::PerplexityArgs),
    /// Throughput figures (prefill, decode, batched, engine) comparable with llama.cpp's.
    #[command(
        after_help = "Examples:\n  starling bench --model smollm2-135m --reps 3\n  starling bench --http http://127.0.0.1:8080 --concurrency 1,8"
    )]
    Bench(bench::BenchArgs),
    /// The model download cache: pull a verified model file, list what is cached.
    #[command(subcommand, after_help = "Examples:\n  starling models pull smollm2-135m\n  starling models list")]
    Models(models::ModelsCommand),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    #[command(
        after_help = "Examples:\n  starling completions bash > ~/.local/share/bash-completion/completions/starling\n  starling completions zsh > ~/.zfunc/_starling\n  starling completions fish > ~/.config/fish/completions/starling.fish"
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
    /// Renders chat templates for a server or `chat` that started it (not for people).
    #[command(name = sandbox::WORKER_SUBCOMMAND, hide = true)]
    TemplateWorker {
        /// Address-space limit of this process.
        #[arg(long)]
        memory_bytes: u64,
        /// Wall-clock limit of one render.
        #[arg(long)]
        timeout_ms: u64,
    },
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

/// Writes the completion script for `shell` (one of the names the argument accepts).
fn completions(shell: &str) -> Result<()> {
    let shell = match shell {
        "bash" => clap_complete::Shell::Bash,
        "zsh" => clap_complete::Shell::Zsh,
        "fish" => clap_complete::Shell::Fish,
        other => anyhow::bail!("no completions for `{other}` (bash, zsh, fish)"),
    };
    clap_complete::generate(shell, &mut Cli::command(), "starling", &mut std::io::stdout());
    Ok(())
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
        Command::Completions { shell } => completions(&shell),
        Command::TemplateWorker { memory_bytes, timeout_ms } => {
            sandbox::run_worker(sandbox::Limits { memory_bytes, timeout: Duration::from_millis(timeout_ms) })
        }
    }
}
