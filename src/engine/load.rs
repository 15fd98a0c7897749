//! Loading a configured model: map and validate the GGUF, build its tokenizer and KV
//! arena, read its pipeline, and start its engine thread.

use std::path::PathBuf;
use std::sync::Arc;

use super::pipeline::{PipelineError, PipelineSpec, Stage};
use super::resources::{EngineLimits, Policies};
use super::scheduler::TenantLimits;
use super::{EngineHandle, EngineParts};
use crate::config::{Config, ConfigError, ModelConfig, PolicyRule};
use crate::kv::arena::KvError;
use crate::kv::cache::KvCache;
use crate::model::llama::{LlamaModel, ModelError};
use crate::sampler::{PolicyError, PolicyRules, SamplerStep};
use crate::telemetry::{MetricsError, Observability};
use crate::tokenizer::{GgufTokenizer, TokenizerError};
use crate::types::ModelId;

/// Why a model could not be brought up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model `{id}` ({path}): {source}")]
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
}

/// A model that is loaded and has a running engine.
pub struct LoadedModel {
    pub id: ModelId,
    pub model: Arc<LlamaModel>,
    pub tokenizer: Arc<GgufTokenizer>,
    pub engine: EngineHandle,
    pub config: ModelConfig,
    /// The sampler step order for requests that name none (the pipeline's `sample` stage).
    pub sampler_order: Vec<SamplerStep>,
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
    let model = LlamaModel::load(&mc.path, mc.threads.get()).map_err(|e| LoadError::Model {
        id: id.clone(),
        path: mc.path.clone(),
        source: Box::new(e),
    })?;
    let tokenizer = GgufTokenizer::from_gguf(&model.file().header)
        .map_err(|source| LoadError::Tokenizer { id: id.clone(), source })?;
    let n_ctx = model.hparams.n_ctx_train;
    config.check_against_model(index, n_ctx).map_err(|source| LoadError::Config { id: id.clone(), source })?;
    let pipeline = PipelineSpec::load(&mc.pipeline).map_err(|source| LoadError::Pipeline { id: id.clone(), source })?;
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
    };
    let policies = Policies { input: compile(&config.policy.input)?, output: compile(&config.policy.output)? };
    let model = Arc::new(model);
    let tokenizer = Arc::new(tokenizer);
    let parts = EngineParts {
        model: model.clone(),
        tokenizer: tokenizer.clone(),
        kv,
        limits,
        tenants: TenantLimits::from_config(&config.tenants),
        pipeline,
        policies,
        inbox_capacity: config.queue.high_watermark.max(16) * 2,
        max_queue_delay: config.queue.max_queue_delay,
        telemetry: obs.engine_telemetry(id.as_str(), config.telemetry.log_prompts),
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
    Ok(LoadedModel { id, model, tokenizer, engine, config: mc.clone(), sampler_order })
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
