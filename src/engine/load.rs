//! Loading a configured model: map and validate the GGUF, build its tokenizer and KV
//! arena, read its pipeline, and start its engine thread.

use std::path::PathBuf;
use std::sync::Arc;

use super::observe::EngineTelemetry;
use super::pipeline::{PipelineError, PipelineSpec, Stage};
use super::resources::{EngineLimits, Policies};
use super::runner::{EngineHandle, EngineParts};
use super::scheduler::TenantLimits;
use crate::config::{Config, ConfigError, ModelConfig, PolicyRule};
use crate::grammar::{GrammarLimits, Grammars};
use crate::kv::arena::KvError;
use crate::kv::cache::KvCache;
use crate::model::transformer::{ModelError, Transformer};
use crate::sampler::{PolicyError, PolicyRules, SamplerStep};
use crate::telemetry::{MetricsError, Observability};
use crate::tokenizer::{GgufTokenizer, TokenizerError};
use crate::types::ModelId;

/// Inbox room for commands other than generations (cancels, session closes).
const CONTROL_CAPACITY: usize = 64;

/// Why a model could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load model file {path}: {source}")]
    Model { id: ModelId, path: PathBuf, source: Box<ModelError> },
    #[error("model `{id}`: tokenizer: {source}")]
    Tokenizer { id: ModelId, source: TokenizerError },
    #[error("model `{id}`: {source}")]
    Config { id: ModelId, source: ConfigError },
    #[error("model `{id}`: {source}")]
    Pipeline { id: ModelId, source: PipelineError },
    #[error("model `{id}`: KV cache: {source}")]
    Kv { id: ModelId, source: KvError },
    #[error("policy rule: {0}")]
    Policy(#[from] PolicyError),
    #[error("model `{id}`: {source}")]
    Telemetry { id: ModelId, source: MetricsError },
    #[error("model `{id}`: cannot start the engine thread: {source}")]
    Thread { id: ModelId, source: std::io::Error },
    #[error("model `{id}` ({path}): {source}")]
    Io { id: ModelId, path: PathBuf, source: std::io::Error },
    #[error(
        "model `{id}` needs {need} bytes (weights + KV cap) but only {free} of the {budget}-byte memory budget are free"
    )]
    OverBudget { id: ModelId, need: u64, free: u64, budget: u64 },
}

/// What a model takes in memory once loaded: its mapped weights and its KV arena cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub weights_bytes: u64,
    pub kv_cap_bytes: u64,
}

impl Footprint {
    /// The footprint of `mc`: the size of its GGUF file plus its `kv_cache.max_bytes`.
    pub fn of(mc: &ModelConfig) -> Result<Footprint, LoadError> {
        let meta = std::fs::metadata(&mc.path).map_err(|source| LoadError::Io {
            id: mc.id.clone(),
            path: mc.path.clone(),
            source,
        })?;
        Ok(Footprint { weights_bytes: meta.len(), kv_cap_bytes: mc.kv_cache.max_bytes })
    }

    pub fn total(&self) -> u64 {
        self.weights_bytes.saturating_add(self.kv_cap_bytes)
    }

    /// Refuses model `id` when it does not fit beside `in_use` bytes under `budget`.
    pub fn check_budget(&self, id: &ModelId, in_use: u64, budget: Option<u64>) -> Result<(), LoadError> {
        let Some(budget) = budget else { return Ok(()) };
        let free = budget.saturating_sub(in_use);
        if self.total() > free {
            return Err(LoadError::OverBudget { id: id.clone(), need: self.total(), free, budget });
        }
        Ok(())
    }
}

/// A model that is loaded and has a running engine.
pub struct LoadedModel {
    pub id: ModelId,
    pub model: Arc<Transformer>,
    pub tokenizer: Arc<GgufTokenizer>,
    pub engine: EngineHandle,
    pub config: ModelConfig,
    /// The sampler step order for requests that name none (the pipeline's `sample` stage).
    pub sampler_order: Vec<SamplerStep>,
    /// Compiled grammars for constrained requests, if the pipeline has a `constrain` stage.
    pub grammars: Option<Arc<Grammars>>,
}

/// Loads model `index` of `config` and starts its engine (its metrics go to a private
/// registry; servers use [`start_model_observed`]).
pub fn start_model(config: &Config, index: usize) -> Result<LoadedModel, LoadError> {
    let obs =
        Observability::new().map_err(|e| LoadError::Telemetry { id: config.models[index].id.clone(), source: e })?;
    start_model_observed(config, index, &obs)
}

/// Loads model `index` of `config` and starts its engine, reporting to `obs`.
pub fn start_model_observed(config: &Config, index: usize, obs: &Observability) -> Result<LoadedModel, LoadError> {
    let mc = &config.models[index];
    let id = mc.id.clone();
    let model = Transformer::load(&mc.path, mc.threads.get()).map_err(|e| LoadError::Model {
        id: id.clone(),
        path: mc.path.clone(),
        source: Box::new(e),
    })?;
    let tokenizer = GgufTokenizer::from_gguf(&model.file().header)
        .map_err(|source| LoadError::Tokenizer { id: id.clone(), source })?;
    let n_ctx = model.desc.n_ctx_train;
    config.check_against_model(index, n_ctx).map_err(|source| LoadError::Config { id: id.clone(), source })?;
    let pipeline = PipelineSpec::load(&mc.pipeline).map_err(|source| LoadError::Pipeline { id: id.clone(), source })?;
    let constrains = pipeline.stages.iter().any(|(s, _)| *s == Stage::Constrain);
    let sampler_order =
        default_sampler_order(&pipeline).map_err(|source| LoadError::Pipeline { id: id.clone(), source })?;
    let kv = KvCache::from_config(model.kv_layout(mc.kv_cache.block_tokens.get()), &mc.kv_cache)
        .map_err(|source| LoadError::Kv { id: id.clone(), source })?;
    let limits = EngineLimits {
        max_batch: mc.max_batch.get(),
        max_batch_tokens: mc.max_batch_tokens.get(),
        max_prompt_tokens: mc.max_prompt_tokens.map_or(n_ctx, |n| n.get()),
        n_ctx,
        high_watermark: config.queue.high_watermark,
        low_watermark: config.queue.low_watermark,
        high_watermark_tokens: config.queue.high_watermark_tokens,
        max_sessions: mc.max_sessions.get(),
        session_ttl: mc.kv_cache.session_ttl,
        stream_stall: config.server.stream_stall,
        speculative: mc.speculative,
    };
    let policies = Policies { input: compile(&config.policy.input)?, output: compile(&config.policy.output)? };
    let model = Arc::new(model);
    let tokenizer = Arc::new(tokenizer);
    let grammars = constrains.then(|| Arc::new(Grammars::new(tokenizer.clone(), GrammarLimits::default())));
    let parts = EngineParts {
        model: model.clone(),
        tokenizer: tokenizer.clone(),
        kv,
        limits,
        tenants: TenantLimits::from_config(&config.tenants),
        pipeline,
        policies,
        control_capacity: CONTROL_CAPACITY,
        max_queue_delay: config.queue.max_queue_delay,
        telemetry: EngineTelemetry::observed_by(obs, id.as_str(), config.telemetry.log_prompts)
            .with_tenant_labels(config.telemetry.tenant_labels),
    };
    let engine = EngineHandle::spawn(parts).map_err(|source| LoadError::Thread { id: id.clone(), source })?;
    tracing::info!(
        model = %id,
        path = %mc.path.display(),
        kernels = model.kernels().name(),
        threads = model.threads(),
        kv_blocks = engine.status.kv_blocks_total.load(std::sync::atomic::Ordering::Relaxed),
        "model loaded"
    );
    Ok(LoadedModel { id, model, tokenizer, engine, config: mc.clone(), sampler_order, grammars })
}

type CompiledRules = Vec<(Option<Vec<crate::types::TenantId>>, Arc<PolicyRules>)>;

fn compile(rules: &[PolicyRule]) -> Result<CompiledRules, PolicyError> {
    rules.iter().map(|r| Ok((r.tenants.clone(), Arc::new(PolicyRules::new(&r.phrases, &r.regexes)?)))).collect()
}

/// The pipeline's `sample.samplers` order, checked against the known steps.
pub fn default_sampler_order(pipeline: &PipelineSpec) -> Result<Vec<SamplerStep>, PipelineError> {
    match pipeline.params(Stage::Sample).and_then(|p| p.sampler_order.as_ref()) {
        None => Ok(SamplerStep::DEFAULT_ORDER.to_vec()),
        Some(names) => SamplerStep::parse_order(names, "samplers").map_err(|e| PipelineError::BadParam {
            pipeline: pipeline.name.clone(),
            stage: Stage::Sample,
            param: "samplers".into(),
            message: e.message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_models_already_loaded() {
        let f = Footprint { weights_bytes: 100, kv_cap_bytes: 50 };
        let id = ModelId::from("m");
        assert!(f.check_budget(&id, 0, None).is_ok());
        assert!(f.check_budget(&id, 50, Some(200)).is_ok());
        let e = f.check_budget(&id, 51, Some(200)).unwrap_err().to_string();
        assert!(e.contains("needs 150 bytes") && e.contains("only 149 of the 200-byte"), "{e}");
    }
}
