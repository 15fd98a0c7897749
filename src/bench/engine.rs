//! Aggregate throughput through the real engine: `c` greedy requests sent at once,
//! generated tokens over the wall time until the last one is done.

use std::time::{Duration, Instant};

use super::common::{BenchError, BenchSettings, EngineFigure, Step, bench_text, median};
use crate::config::{Config, Format};
use crate::engine::load::start_model;
use crate::gateway::service::validate_sampling;
use crate::protocol::{Constraint, EngineCommand, GenerateRequest, PromptInput, StreamEvent};
use crate::sampler::{SamplingConfig, SamplingParams};
use crate::types::{RequestId, TenantId};

/// Tokens each request generates.
const GEN_TOKENS: u32 = 64;
/// Bytes of bench text each prompt takes (about 32 tokens).
const PROMPT_BYTES: usize = 140;

/// The schema of the constrained decode figures: eight records, longer than
/// [`GEN_TOKENS`], so plain and constrained requests generate the same number of tokens.
pub(crate) fn decode_schema() -> serde_json::Value {
    serde_json::json!({"type": "array", "minItems": 8, "maxItems": 8, "items": {"type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0}, "name": {"type": "string", "maxLength": 24},
                       "tags": {"type": "array", "items": {"enum": ["new", "old", "hot"]}, "maxItems": 3}},
        "required": ["id", "name", "tags"], "additionalProperties": false}})
}

/// Median aggregate tok/s of `concurrency` simultaneous requests.
pub(crate) fn measure(
    settings: &BenchSettings,
    concurrency: usize,
    observe: &mut dyn FnMut(Step),
) -> Result<EngineFigure, BenchError> {
    measure_with(settings, concurrency, None, observe)
}

/// [`measure`], each request constrained by `schema` when one is given.
pub(crate) fn measure_with(
    settings: &BenchSettings,
    concurrency: usize,
    schema: Option<&serde_json::Value>,
    observe: &mut dyn FnMut(Step),
) -> Result<EngineFigure, BenchError> {
    let config = bench_config(settings, concurrency)?;
    let loaded = start_model(&config, 0).map_err(|e| BenchError::Engine(e.to_string()))?;
    let params = SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(GEN_TOKENS),
        ignore_eos: Some(true),
        ..Default::default()
    };
    let sampling = validate_sampling(&config.limits, &loaded, &params).map_err(|e| BenchError::Engine(e.message))?;
    let mut rates = Vec::with_capacity(settings.reps);
    let grammar = schema.map(|s| crate::grammar::Grammar::JsonSchema(s.clone()));
    let constrain = || -> Result<Option<Constraint>, BenchError> {
        let Some(g) = &grammar else { return Ok(None) };
        let grammars = loaded
            .grammars
            .as_ref()
            .ok_or_else(|| BenchError::Engine("the model's pipeline has no `constrain` stage".into()))?;
        let compiled = grammars.compile(g).map_err(|e| BenchError::Engine(e.to_string()))?;
        Ok(Some(Constraint(Box::new(compiled.constraint))))
    };
    let phase = match schema {
        None => format!("engine at concurrency {concurrency}"),
        Some(_) => format!("engine at concurrency {concurrency}, JSON schema"),
    };
    for rep in 1..=settings.reps {
        observe(Step { phase: &phase, rep, reps: settings.reps });
        rates.push(one_round(&loaded.engine, &sampling, concurrency, &constrain)?);
    }
    loaded.engine.shutdown();
    Ok(EngineFigure { concurrency, tok_s: median(rates) })
}

/// The default config with one model (the bench's path and threads) and a tenant
/// allowed `concurrency` requests at once.
fn bench_config(settings: &BenchSettings, concurrency: usize) -> Result<Config, BenchError> {
    let json = serde_json::json!({
        "tenants": [{"name": "bench", "max_concurrent": concurrency.max(1), "max_queued": concurrency.max(1)}],
        "models": [{
            "id": "bench", "path": settings.model, "threads": settings.threads, "max_batch": concurrency.max(1),
            "kv_cache": {"dtype": settings.kv_dtype.name()},
        }],
    });
    Config::from_str(&json.to_string(), Format::Json).map_err(|e| BenchError::Engine(e.to_string()))
}

/// Sends `c` requests, waits for all, returns generated tokens per second.
fn one_round(
    engine: &crate::engine::EngineHandle,
    sampling: &SamplingConfig,
    c: usize,
    constrain: &dyn Fn() -> Result<Option<Constraint>, BenchError>,
) -> Result<f64, BenchError> {
    let text = bench_text();
    let start = Instant::now();
    let mut receivers = Vec::with_capacity(c);
    for i in 0..c {
        let (tx, rx) = tokio::sync::mpsc::channel(4 * GEN_TOKENS as usize);
        // Each request starts at a different word so prompts differ.
        let at = (i * 7) % 300;
        let request = GenerateRequest {
            constraint: constrain()?,
            keep_special: false,
            id: RequestId::next(),
            client_id: None,
            tenant: TenantId::from("bench"),
            session: None,
            input: PromptInput::Text { text: text[at..at + PROMPT_BYTES].to_string(), parse_special: false },
            sampling: sampling.clone(),
            timeout: Duration::from_secs(600),
            received_at: Instant::now(),
            events: tx,
        };
        engine.send(EngineCommand::Generate(Box::new(request))).map_err(|e| BenchError::Engine(e.message))?;
        receivers.push(rx);
    }
    let mut tokens = 0usize;
    for mut rx in receivers {
        tokens += wait_done(&mut rx)?;
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Completion tokens of one request, once it is done.
fn wait_done(rx: &mut tokio::sync::mpsc::Receiver<StreamEvent>) -> Result<usize, BenchError> {
    while let Some(event) = rx.blocking_recv() {
        match event {
            StreamEvent::Done { usage, .. } => return Ok(usage.completion_tokens),
            StreamEvent::Error(e) => return Err(BenchError::Engine(e.message)),
            _ => {}
        }
    }
    Err(BenchError::Engine("the engine closed a stream before it was done".into()))
}
