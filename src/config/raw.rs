//! The configuration exactly as written in the file: every field optional, no unit
//! conversion, no bounds. The `build` step turns it into the typed [`super::Config`].
//!
//! What each field means is documented on the validated types and in `config/starling.yaml`.
//!
//! Integers are read as `i64` so that a negative limit reaches validation and gets an error
//! naming the field and its bound instead of a generic "expected u32".

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Visitor};

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a config mapping")]
pub struct RawConfig {
    pub server: Option<RawServer>,
    pub auth: Option<RawAuth>,
    pub tenants: Option<Vec<RawTenant>>,
    pub models: Option<Vec<RawModel>>,
    pub queue: Option<RawQueue>,
    pub limits: Option<RawLimits>,
    pub telemetry: Option<RawTelemetry>,
    pub policy: Option<RawPolicy>,
    pub registry: Option<RawRegistry>,
}

/// `server:` — the HTTP listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a server mapping")]
pub struct RawServer {
    pub bind: Option<String>,
    pub max_body_bytes: Option<RawBytes>,
    pub sse_keepalive_secs: Option<i64>,
    pub shutdown_grace_secs: Option<i64>,
    pub public_routes: Option<Vec<String>>,
    pub header_read_timeout_secs: Option<i64>,
    pub max_connections: Option<i64>,
    pub stream_stall_secs: Option<i64>,
    pub cpu_workers: Option<i64>,
    pub cpu_queue: Option<i64>,
    pub template_memory_bytes: Option<RawBytes>,
    pub template_timeout_ms: Option<i64>,
    pub ui: Option<bool>,
}

/// `auth:` — API keys and the admin key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an auth mapping")]
pub struct RawAuth {
    pub api_keys: Option<Vec<RawApiKey>>,
    pub admin_key: Option<String>,
}

/// One `auth.api_keys[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an api key mapping")]
pub struct RawApiKey {
    pub key: String,
    pub tenant: Option<String>,
}

/// One `tenants[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a tenant mapping")]
pub struct RawTenant {
    pub name: String,
    pub weight: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub max_queued: Option<i64>,
    pub requests_per_minute: Option<i64>,
    pub tokens_per_minute: Option<i64>,
    pub max_sessions: Option<i64>,
}

/// One `models[]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a model mapping")]
pub struct RawModel {
    pub id: Option<String>,
    pub path: Option<String>,
    pub pipeline: Option<String>,
    pub threads: Option<i64>,
    pub max_batch: Option<i64>,
    pub max_batch_tokens: Option<i64>,
    pub max_sessions: Option<i64>,
    pub max_prompt_tokens: Option<i64>,
    pub kv_cache: Option<RawKvCache>,
    pub speculative: Option<RawSpeculative>,
}

/// `models[].speculative:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a speculative mapping")]
pub struct RawSpeculative {
    pub method: Option<String>,
    pub max_draft: Option<i64>,
    pub min_match: Option<i64>,
}

/// `models[].kv_cache:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a kv_cache mapping")]
pub struct RawKvCache {
    pub max_bytes: Option<RawBytes>,
    pub block_tokens: Option<i64>,
    pub dtype: Option<String>,
    pub session_ttl_secs: Option<i64>,
    pub spill: Option<RawSpill>,
}

/// `models[].kv_cache.spill:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a spill mapping")]
pub struct RawSpill {
    pub dir: String,
    pub max_bytes: RawBytes,
}

/// `queue:` — admission watermarks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a queue mapping")]
pub struct RawQueue {
    pub high_watermark: Option<i64>,
    pub low_watermark: Option<i64>,
    pub high_watermark_tokens: Option<i64>,
    pub max_queue_delay_ms: Option<i64>,
}

/// `limits:` — per-request defaults and caps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a limits mapping")]
pub struct RawLimits {
    pub default_timeout_secs: Option<i64>,
    pub default_max_tokens: Option<i64>,
    pub max_tokens_cap: Option<i64>,
    pub max_stop_strings: Option<i64>,
    pub max_logprobs: Option<i64>,
}

/// `telemetry:` — logs and traces.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a telemetry mapping")]
pub struct RawTelemetry {
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub trace_chrome: Option<String>,
    pub log_prompts: Option<bool>,
    pub tenant_labels: Option<bool>,
    pub vllm_metric_names: Option<bool>,
}

/// `registry:` — where models may be loaded from, the download cache, the memory budget.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a registry mapping")]
pub struct RawRegistry {
    pub model_dirs: Option<Vec<String>>,
    pub cache_dir: Option<String>,
    pub cache_max_bytes: Option<RawBytes>,
    pub memory_budget: Option<RawBytes>,
    pub drain_grace_secs: Option<i64>,
    pub allowed_hosts: Option<Vec<String>>,
    pub download_timeout_secs: Option<i64>,
    pub pipeline_dirs: Option<Vec<String>>,
}

/// `policy:` — content rules on prompts (`input`) and generated text (`output`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a policy mapping")]
pub struct RawPolicy {
    pub input: Option<Vec<RawPolicyRule>>,
    pub output: Option<Vec<RawPolicyRule>>,
}

/// One `policy.input[]` / `policy.output[]` rule.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a policy rule mapping")]
pub struct RawPolicyRule {
    pub tenants: Option<Vec<String>>,
    pub phrases: Option<Vec<String>>,
    pub regexes: Option<Vec<String>>,
}

/// A byte count as written: a plain integer or a string such as `"512MiB"` or `"2GB"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawBytes {
    Int(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawBytes {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawBytesVisitor)
    }
}

struct RawBytesVisitor;

impl Visitor<'_> for RawBytesVisitor {
    type Value = RawBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte count: an integer or a string like \"512MiB\"")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawBytes, E> {
        Ok(RawBytes::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawBytes, E> {
        i64::try_from(v).map(RawBytes::Int).map_err(|_| E::custom(format!("byte count {v} is too large")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBytes, E> {
        Ok(RawBytes::Text(v.to_owned()))
    }
}
