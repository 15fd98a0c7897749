//! Wire-level sampling parameters and their validated form ("parse, don't validate").
//!
//! The gateway deserializes [`SamplingParams`] from a request, calls
//! [`SamplingParams::validate`] once, and hands the resulting [`SamplingConfig`] to the
//! engine. Every out-of-range value becomes a 422 [`ApiError`] whose message names the
//! field and its valid range.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ApiError;
use crate::types::TokenId;

/// Default temperature (llama.cpp server).
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
/// Default top-k (llama.cpp server).
pub const DEFAULT_TOP_K: u32 = 40;
/// Default top-p (llama.cpp server).
pub const DEFAULT_TOP_P: f32 = 0.95;
/// Default min-p (llama.cpp server).
pub const DEFAULT_MIN_P: f32 = 0.05;
/// Default repetition penalty window (llama.cpp server).
pub const DEFAULT_REPEAT_LAST_N: u32 = 64;
/// The most `logprobs` a request may ask for.
pub const MAX_LOGPROBS: u32 = 20;
/// A logit bias at or below this value bans the token outright (OpenAI semantics).
pub const BAN_BIAS: f32 = -100.0;

/// Wire-level sampling parameters, all optional, with llama.cpp-server-like defaults.
///
/// `logit_bias` accepts either OpenAI's map shape `{"50256": -100}` (keys are token ids
/// written as strings) or llama.cpp's list shape `[[50256, -100]]`; it serializes as the
/// list. A later entry for the same id replaces an earlier one.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct SamplingParams {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub repeat_last_n: Option<u32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    #[serde(default, deserialize_with = "deserialize_logit_bias")]
    pub logit_bias: Option<Vec<(TokenId, f32)>>,
    pub seed: Option<u64>,
    pub max_tokens: Option<u32>,
    pub min_tokens: Option<u32>,
    pub ignore_eos: Option<bool>,
    pub stop: Option<Vec<String>>,
    pub stop_token_ids: Option<Vec<TokenId>>,
    pub logprobs: Option<u32>,
    /// Order of the configurable steps by name (see [`SamplerStep::name`]).
    pub samplers: Option<Vec<String>>,
    /// `false` opts out of speculative decoding (where the model has it on). The output is
    /// the same either way; only its speed differs.
    pub speculative: Option<bool>,
}

/// Limits that validation checks against; set by the engine from the model and config.
#[derive(Clone, Debug)]
pub struct SamplerLimits {
    /// Number of tokens in the model's vocabulary (ids must be below it).
    pub vocab_size: usize,
    /// The most stop strings one request may give.
    pub max_stop_strings: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: u32,
    /// The largest `max_tokens` a request may ask for.
    pub max_tokens_cap: u32,
}

/// One configurable step of the sampling chain.
///
/// Logit bias and stop/EOS masking are not listed here: they always run first, whatever
/// the order, because they carry guarantees (a banned token is never drawn, EOS is masked
/// until `min_tokens`). The draw always runs last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerStep {
    /// Repetition penalty, then frequency and presence penalties (llama.cpp's `penalties`).
    Penalties,
    /// Divide logits by the temperature (0 means greedy: the draw takes the argmax).
    Temperature,
    /// Keep the `k` most likely tokens.
    TopK,
    /// Keep the smallest most-likely prefix whose mass reaches `p`.
    TopP,
    /// Keep tokens whose probability is at least `min_p` times the top one's.
    MinP,
}

impl SamplerStep {
    /// The default chain after bias and masking.
    pub const DEFAULT_ORDER: [SamplerStep; 5] =
        [SamplerStep::Penalties, SamplerStep::Temperature, SamplerStep::TopK, SamplerStep::TopP, SamplerStep::MinP];

    /// The wire name, as used in `samplers` and in pipeline YAML.
    pub fn name(self) -> &'static str {
        match self {
            SamplerStep::Penalties => "penalties",
            SamplerStep::Temperature => "temperature",
            SamplerStep::TopK => "top_k",
            SamplerStep::TopP => "top_p",
            SamplerStep::MinP => "min_p",
        }
    }

    /// Parses one name; `temp` is accepted as llama.cpp's alias for `temperature`.
    pub fn from_name(name: &str) -> Option<SamplerStep> {
        match name {
            "temp" => Some(SamplerStep::Temperature),
            _ => Self::DEFAULT_ORDER.into_iter().find(|s| s.name() == name),
        }
    }

    /// Parses an order list, rejecting unknown and repeated names; `field` names the
    /// source in the error (`samplers` for a request, the YAML key for a pipeline).
    pub fn parse_order(names: &[String], field: &str) -> Result<Vec<SamplerStep>, ApiError> {
        let mut order = Vec::with_capacity(names.len());
        for name in names {
            let step = SamplerStep::from_name(name).ok_or_else(|| {
                ApiError::invalid_parameter(
                    field,
                    format!(
                        "`{field}` entries must be one of penalties, temperature, top_k, top_p, min_p; got `{name}`"
                    ),
                )
            })?;
            if order.contains(&step) {
                let msg = format!("`{field}` lists `{}` more than once", step.name());
                return Err(ApiError::invalid_parameter(field, msg));
            }
            order.push(step);
        }
        Ok(order)
    }
}

/// The validated parameters the engine uses. Built only by [`SamplingParams::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// The RNG seed: the request's, or a random one to report back.
    pub seed: u64,
    pub max_tokens: u32,
    pub min_tokens: u32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<TokenId>,
    pub ignore_eos: bool,
    /// How many top log-probabilities to report per token (0 = none).
    pub logprobs: u32,
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means off.
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub repeat_last_n: u32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Sorted by token id, one entry per id.
    pub logit_bias: Vec<(TokenId, f32)>,
    /// The configurable steps, in the order they run.
    pub order: Vec<SamplerStep>,
    /// The request allows speculative decoding (the model's config decides whether it runs).
    pub speculative: bool,
}

impl SamplingConfig {
    /// Whether any of the penalties would change a logit.
    pub fn has_penalties(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repetition_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0)
    }
}

impl SamplingParams {
    /// Validates against `limits`, using [`SamplerStep::DEFAULT_ORDER`] when the request
    /// gives no `samplers`.
    pub fn validate(&self, limits: &SamplerLimits) -> Result<SamplingConfig, ApiError> {
        self.validate_with_order(limits, &SamplerStep::DEFAULT_ORDER)
    }

    /// Validates with a pipeline-specific default order (from the pipeline YAML).
    pub fn validate_with_order(
        &self,
        limits: &SamplerLimits,
        default_order: &[SamplerStep],
    ) -> Result<SamplingConfig, ApiError> {
        let (max_tokens, min_tokens) = self.token_counts(limits)?;
        let order = match &self.samplers {
            Some(names) => SamplerStep::parse_order(names, "samplers")?,
            None => default_order.to_vec(),
        };
        Ok(SamplingConfig {
            seed: self.seed.unwrap_or_else(rand::random),
            max_tokens,
            min_tokens,
            stop: self.stop_strings(limits)?,
            stop_token_ids: self.stop_token_ids(limits)?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            logprobs: check_logprobs(self.logprobs)?,
            temperature: in_range("temperature", self.temperature, DEFAULT_TEMPERATURE, 0.0, 2.0)?,
            top_k: self.top_k.unwrap_or(DEFAULT_TOP_K),
            top_p: check_top_p(self.top_p)?,
            min_p: check_min_p(self.min_p)?,
            repetition_penalty: check_repetition_penalty(self.repetition_penalty)?,
            repeat_last_n: self.repeat_last_n.unwrap_or(DEFAULT_REPEAT_LAST_N),
            frequency_penalty: in_range("frequency_penalty", self.frequency_penalty, 0.0, -2.0, 2.0)?,
            presence_penalty: in_range("presence_penalty", self.presence_penalty, 0.0, -2.0, 2.0)?,
            logit_bias: self.logit_bias(limits)?,
            order,
            speculative: self.speculative.unwrap_or(true),
        })
    }

    fn token_counts(&self, limits: &SamplerLimits) -> Result<(u32, u32), ApiError> {
        let cap = limits.max_tokens_cap;
        let max_tokens = self.max_tokens.unwrap_or(limits.default_max_tokens.min(cap));
        if max_tokens == 0 || max_tokens > cap {
            let msg = format!("`max_tokens` must be in [1, {cap}]");
            return Err(ApiError::invalid_parameter("max_tokens", msg));
        }
        let min_tokens = self.min_tokens.unwrap_or(0);
        if min_tokens > max_tokens {
            let msg = format!("`min_tokens` must be in [0, max_tokens = {max_tokens}]");
            return Err(ApiError::invalid_parameter("min_tokens", msg));
        }
        Ok((max_tokens, min_tokens))
    }

    fn stop_strings(&self, limits: &SamplerLimits) -> Result<Vec<String>, ApiError> {
        let stop = self.stop.clone().unwrap_or_default();
        if stop.len() > limits.max_stop_strings {
            let msg = format!("`stop` may hold at most {} strings", limits.max_stop_strings);
            return Err(ApiError::invalid_parameter("stop", msg));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid_parameter("stop", "`stop` strings must not be empty"));
        }
        Ok(stop)
    }

    fn stop_token_ids(&self, limits: &SamplerLimits) -> Result<Vec<TokenId>, ApiError> {
        let ids = self.stop_token_ids.clone().unwrap_or_default();
        for &id in &ids {
            check_token_id("stop_token_ids", id, limits.vocab_size)?;
        }
        Ok(ids)
    }

    fn logit_bias(&self, limits: &SamplerLimits) -> Result<Vec<(TokenId, f32)>, ApiError> {
        let mut merged = BTreeMap::new();
        for &(id, bias) in self.logit_bias.as_deref().unwrap_or_default() {
            check_token_id("logit_bias", id, limits.vocab_size)?;
            if !(-100.0..=100.0).contains(&bias) {
                let msg = format!("`logit_bias` values must be in [-100, 100]; token {id} has {bias}");
                return Err(ApiError::invalid_parameter("logit_bias", msg));
            }
            merged.insert(id, bias);
        }
        let banned = merged.values().filter(|&&b| b <= BAN_BIAS).count();
        if limits.vocab_size > 0 && banned >= limits.vocab_size {
            let msg = "`logit_bias` must leave at least one token allowed";
            return Err(ApiError::invalid_parameter("logit_bias", msg));
        }
        Ok(merged.into_iter().collect())
    }
}

fn in_range(field: &str, value: Option<f32>, default: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    let v = value.unwrap_or(default);
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid_parameter(field, format!("`{field}` must be in [{lo}, {hi}]")))
    }
}

fn check_top_p(value: Option<f32>) -> Result<f32, ApiError> {
    let p = value.unwrap_or(DEFAULT_TOP_P);
    if p > 0.0 && p <= 1.0 { Ok(p) } else { Err(ApiError::invalid_parameter("top_p", "`top_p` must be in (0, 1]")) }
}

fn check_min_p(value: Option<f32>) -> Result<f32, ApiError> {
    let p = value.unwrap_or(DEFAULT_MIN_P);
    if (0.0..1.0).contains(&p) { Ok(p) } else { Err(ApiError::invalid_parameter("min_p", "`min_p` must be in [0, 1)")) }
}

fn check_repetition_penalty(value: Option<f32>) -> Result<f32, ApiError> {
    let r = value.unwrap_or(1.0);
    if r.is_finite() && r > 0.0 {
        Ok(r)
    } else {
        let msg = "`repetition_penalty` must be a finite number > 0";
        Err(ApiError::invalid_parameter("repetition_penalty", msg))
    }
}

fn check_logprobs(value: Option<u32>) -> Result<u32, ApiError> {
    let n = value.unwrap_or(0);
    if n <= MAX_LOGPROBS {
        Ok(n)
    } else {
        let msg = format!("`logprobs` must be in [0, {MAX_LOGPROBS}]");
        Err(ApiError::invalid_parameter("logprobs", msg))
    }
}

fn check_token_id(field: &str, id: TokenId, vocab_size: usize) -> Result<(), ApiError> {
    if (id as usize) < vocab_size {
        Ok(())
    } else {
        let msg = format!("`{field}` token ids must be in [0, {vocab_size}); got {id}");
        Err(ApiError::invalid_parameter(field, msg))
    }
}

/// The two wire shapes of `logit_bias`.
#[derive(Deserialize)]
#[serde(untagged)]
enum LogitBiasWire {
    List(Vec<(TokenId, f32)>),
    Map(BTreeMap<String, f32>),
}

fn deserialize_logit_bias<'de, D>(deserializer: D) -> Result<Option<Vec<(TokenId, f32)>>, D::Error>
where
    D: Deserializer<'de>,
{
    let wire = Option::<LogitBiasWire>::deserialize(deserializer)?;
    let Some(wire) = wire else { return Ok(None) };
    let pairs = match wire {
        LogitBiasWire::List(pairs) => pairs,
        LogitBiasWire::Map(map) => map
            .into_iter()
            .map(|(key, bias)| {
                let id = key
                    .trim()
                    .parse::<TokenId>()
                    .map_err(|_| serde::de::Error::custom(format!("`logit_bias` key `{key}` is not a token id")))?;
                Ok((id, bias))
            })
            .collect::<Result<_, D::Error>>()?,
    };
    Ok(Some(pairs))
}
