//! `starling generate`: one generation through the same engine and generation service the
//! server uses, streaming text to stdout (or one JSON object with `--json`).

use std::io::Write;
use std::num::NonZeroUsize;

use anyhow::{Result, anyhow};
use clap::Args;

use super::common::default_threads;
use starling::config::{Config, Format, SpeculativeConfig};
use starling::engine::load::start_model;
use starling::gateway::service::{self, Job, Origin};
use starling::protocol::{PromptInput, SamplingParams};
use starling::types::TenantId;

#[derive(Args)]
pub struct GenerateArgs {
    /// GGUF model file, or a model name (`starling models pull NAME` fetches it).
    #[arg(long)]
    model: String,
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
    /// Speculative decoding by prompt lookup (n-gram drafts, up to 8 tokens, verified in one
    /// pass): the same output, faster when it repeats its prompt.
    #[arg(long)]
    speculative: bool,
    /// Print one JSON object at the end instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, bias) = s.split_once('=').ok_or_else(|| format!("`{s}`: expected ID=BIAS"))?;
    let id = id.trim().parse().map_err(|_| format!("`{id}` is not a token id"))?;
    let bias = bias.trim().parse().map_err(|_| format!("`{bias}` is not a number"))?;
    Ok((id, bias))
}

/// Loads the model, runs the prompt, and prints the continuation.
pub fn run(a: GenerateArgs) -> Result<()> {
    let mut config = Config::from_str("{}", Format::Json)?;
    config.models[0].path = super::catalog::resolve(&a.model)?;
    config.models[0].threads = NonZeroUsize::new(a.threads.max(1)).expect("non-zero");
    if a.speculative {
        config.models[0].speculative = Some(SpeculativeConfig::default());
    }
    let loading = super::progress::Progress::new(a.json).spinner(&format!("loading {}", a.model));
    let loaded = start_model(&config, 0)?;
    loading.finish_and_clear();
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
        speculative: None,
    };
    let sampling =
        service::validate_sampling(&config.limits, &loaded, &params).map_err(|e| anyhow!("{}", e.message))?;
    let job = Job::new(PromptInput::Text { text: a.prompt.clone(), parse_special: true }, sampling, None);
    let origin = Origin { tenant: TenantId::from("cli"), client_id: None, received_at: std::time::Instant::now() };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
    let mut stdout = std::io::stdout().lock();
    let streamed = runtime.block_on(async {
        let sub = service::start(&loaded, origin, job, config.limits.default_timeout).await?;
        service::collect_streaming(sub, |piece| {
            if !a.json {
                // A closed stdout (a pipe whose reader left) only loses the text.
                let _ = write!(stdout, "{piece}").and_then(|()| stdout.flush());
            }
        })
        .await
    });
    let out = streamed.map_err(|e| anyhow!("{} ({})", e.message, e.kind.as_str()))?;
    if a.json {
        let mut v = serde_json::json!({
            "tokens": out.tokens,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "seed": out.seed,
            "usage": out.usage,
        });
        if a.logprobs.is_some() {
            v["logprobs"] = out
                .logprobs
                .iter()
                .map(|(id, lp, top)| serde_json::json!({"id": id, "logprob": lp, "top_logprobs": top}))
                .collect();
        }
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout)?;
    }
    Ok(())
}
