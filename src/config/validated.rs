//! The configuration the rest of Starling reads: concrete types, units applied, bounds checked.
//! Built from [`super::raw`] by `build.rs`; cross-field rules live in `checks.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use crate::types::{ModelId, TenantId};

/// The tenant every request belongs to when auth is off, and the default for keys without one.
pub const ANONYMOUS: &str = "anonymous";

/// A validated Starling configuration (see `config/starling.yaml` for every field's meaning).
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// `server:` — the HTTP listener.
    pub server: ServerConfig,
    /// `auth:` — API keys and the admin key.
    pub auth: AuthConfig,
    /// Every tenant, always including `anonymous` (added with defaults if not listed).
    pub tenants: Vec<TenantConfig>,
    /// At least one model; `models[0]` is the one `--model` overrides.
    pub models: Vec<ModelConfig>,
    /// `queue:` — admission watermarks.
    pub queue: QueueConfig,
    /// `limits:` — per-request defaults and caps.
    pub limits: LimitsConfig,
    /// `telemetry:` — logs and traces.
    pub telemetry: TelemetryConfig,
    /// `policy:` — content rules.
    pub policy: PolicyConfig,
    /// `registry:` — model sources, the download cache, the memory budget.
    pub registry: RegistryConfig,
}

/// Where models may be loaded from at run time, and how much memory they may take.
#[derive(Clone, Debug, PartialEq)]
pub struct RegistryConfig {
    /// Directories local model paths must resolve into (symlinks are followed first).
    pub model_dirs: Vec<PathBuf>,
    /// Directories a pipeline file named by an admin load must resolve into (same rules).
    pub pipeline_dirs: Vec<PathBuf>,
    /// Where downloaded models are cached (with their `index.json`).
    pub cache_dir: PathBuf,
    /// Size cap of the download cache; least recently used models not loaded are deleted.
    pub cache_max_bytes: u64,
    /// Weights + KV cap of every loaded model together must fit; `None` = no budget.
    pub memory_budget: Option<u64>,
    /// How long an unloaded or replaced model may finish its requests before they are cancelled.
    pub drain_grace: Duration,
    /// Hosts URL sources may name; `None` = any host. Checked before any connection is made.
    pub allowed_hosts: Option<Vec<AllowedHost>>,
    /// How long one download may take in all (connect to last byte) before it is abandoned.
    pub download_timeout: Duration,
}

/// One `registry.allowed_hosts` entry: a host, and the one port allowed when it names one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHost {
    /// A host name (lowercase) or an IP address (IPv6 without its brackets).
    pub host: String,
    /// The only port allowed on that host; `None` = any port.
    pub port: Option<u16>,
}

/// The HTTP listener.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Largest request body accepted; larger bodies get 413.
    pub max_body_bytes: NonZeroUsize,
    /// Interval between SSE keep-alive comments on an idle stream.
    pub sse_keepalive: Duration,
    /// How long shutdown waits for in-flight requests (zero: stop at once).
    pub shutdown_grace: Duration,
    /// Routes served without an API key.
    pub public_routes: Vec<String>,
    /// A connection must send each request's headers within this time of opening or of
    /// finishing its previous request (so it also bounds how long an idle kept-alive
    /// connection stays open).
    pub header_read_timeout: Duration,
    /// Connections served at once; past it a connection gets one polite 429 (health
    /// routes still answer) and is closed.
    pub max_connections: NonZeroUsize,
    /// A stream whose client has read nothing for this long is cancelled and its KV freed.
    pub stream_stall: Duration,
    /// Threads for CPU-heavy request work (tokenizing, detokenizing, chat templates).
    pub cpu_workers: NonZeroUsize,
    /// Jobs waiting for those threads; past it a request gets 429 `cpu_busy`.
    pub cpu_queue: usize,
    /// Address space of each chat-template worker process: a render that needs more ends
    /// its worker and gets 400 `template_limit`.
    pub template_memory_bytes: u64,
    /// Wall-clock limit of one chat-template render, enforced in its worker the same way.
    pub template_timeout: Duration,
    /// Serve the browser playground at `/` and `/ui/*`.
    pub ui: bool,
}

/// API keys and the admin key. No API keys means auth is off.
#[derive(Clone, PartialEq, Default)]
pub struct AuthConfig {
    /// Keys clients send as `Authorization: Bearer <key>`; empty = every request is `anonymous`.
    pub api_keys: Vec<ApiKey>,
    /// Key for `/admin/*` routes; `None` disables them.
    pub admin_key: Option<String>,
}

/// One client API key and the tenant it bills to.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// The secret itself (never shown by `Debug`).
    pub key: String,
    /// Tenant the key's requests belong to: one listed under `tenants`, or the key's own
    /// (`key-…`, see `key_tenant`), which gets default limits.
    pub tenant: TenantId,
}

/// Scheduling share and limits of one tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantConfig {
    /// Unique tenant name, 1..=64 characters from `[A-Za-z0-9._:/-]`.
    pub name: TenantId,
    /// Fair-share weight, 1..=1000.
    pub weight: u32,
    /// Requests of this tenant running at once.
    pub max_concurrent: u32,
    /// Requests of this tenant waiting in the queue; more get 429.
    pub max_queued: u32,
    /// Request rate limit; `None` = unlimited.
    pub requests_per_minute: Option<u32>,
    /// Token rate limit (prompt + completion); `None` = unlimited.
    pub tokens_per_minute: Option<u32>,
    /// Sessions this tenant may hold in one model at once (each model also has its own cap).
    pub max_sessions: u32,
}

/// One served model and its engine's limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Unique id clients name in `"model"`.
    pub id: ModelId,
    /// GGUF file, relative paths resolved against the process's current directory.
    pub path: PathBuf,
    /// Pipeline file naming the tick's stages.
    pub pipeline: PathBuf,
    /// Threads of this model's matrix thread pool.
    pub threads: NonZeroUsize,
    /// Sequences in one forward pass.
    pub max_batch: NonZeroUsize,
    /// Tokens (prefill chunks + decode steps) in one forward pass.
    pub max_batch_tokens: NonZeroUsize,
    /// Sessions kept at once (active or idle).
    pub max_sessions: NonZeroUsize,
    /// Longest prompt accepted; `None` = the model's context length.
    pub max_prompt_tokens: Option<NonZeroUsize>,
    /// The model's KV block arena.
    pub kv_cache: KvCacheConfig,
    /// Speculative decoding (drafts verified in one pass); `None` = off.
    pub speculative: Option<SpeculativeConfig>,
}

/// `models[].speculative`: how sequences draft tokens to verify in one forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpeculativeConfig {
    pub method: SpeculativeMethod,
    /// Most draft tokens verified in one step.
    pub max_draft: usize,
    /// Fewest trailing tokens that must repeat earlier in the context for a draft.
    pub min_match: usize,
}

impl Default for SpeculativeConfig {
    /// What `speculative: {}` means: n-gram drafts of up to 8 tokens after a match of 2.
    fn default() -> Self {
        SpeculativeConfig { method: SpeculativeMethod::Ngram, max_draft: 8, min_match: 2 }
    }
}

/// Where drafts come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpeculativeMethod {
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the
    /// sequence's last few tokens, in its prompt and output.
    Ngram,
}

/// The model's KV block arena.
#[derive(Clone, Debug, PartialEq)]
pub struct KvCacheConfig {
    /// Arena size cap in bytes.
    pub max_bytes: u64,
    /// Positions per block.
    pub block_tokens: NonZeroUsize,
    /// Element type of cached keys and values.
    pub dtype: KvDtype,
    /// Idle sessions older than this are evicted.
    pub session_ttl: Duration,
    /// Where evicted blocks spill to; `None` = evicted blocks are dropped.
    pub spill: Option<SpillConfig>,
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    /// 4 bytes per element (`"f32"`, the default).
    F32,
    /// 2 bytes per element (`"f16"`): half the memory per cached token.
    F16,
    /// ggml's `q8_0` (`"q8_0"`): each 32 values as 8-bit integers and one f16 scale, 34
    /// bytes, so a little over a quarter of f32's memory. Rows must be a multiple of 32
    /// values wide.
    Q8_0,
}

impl KvDtype {
    /// Bytes that `elems` values take (for `Q8_0`, whole blocks of 32: `elems` must be a
    /// multiple of 32).
    pub fn bytes(self, elems: usize) -> usize {
        match self {
            KvDtype::F32 => elems * 4,
            KvDtype::F16 => elems * 2,
            KvDtype::Q8_0 => elems / 32 * 34,
        }
    }

    /// The type a config (or `--kv-dtype`) names, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0].into_iter().find(|d| d.name() == name)
    }

    /// The name the config uses (`f32`, `f16`, `q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
        }
    }
}

/// Disk spill of evicted KV blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpillConfig {
    /// Directory of the spill file (created if missing).
    pub dir: PathBuf,
    /// Cap on the spill file's size in bytes.
    pub max_bytes: u64,
}

/// Admission control: above the high watermark new work gets 429 until the queue drains
/// below the low one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queued requests at which admission stops.
    pub high_watermark: usize,
    /// Queued requests at which admission resumes (≤ `high_watermark`).
    pub low_watermark: usize,
    /// Queued prompt tokens at which admission stops.
    pub high_watermark_tokens: usize,
    /// Longest a tick waits to fill a batch (zero: never waits).
    pub max_queue_delay: Duration,
}

/// Per-request defaults and caps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Deadline of a request that sets none.
    pub default_timeout: Duration,
    /// `max_tokens` of a request that sets none.
    pub default_max_tokens: u32,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_cap: u32,
    /// Most stop strings in one request.
    pub max_stop_strings: usize,
    /// Most logprobs alternatives per token.
    pub max_logprobs: u32,
}

/// Logs and traces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Log line format.
    pub log_format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive such as `info` or `starling=debug`.
    pub log_level: String,
    /// Write a Chrome trace of ticks here; `None` = no trace.
    pub trace_chrome: Option<PathBuf>,
    /// Log prompt and output text (off by default: prompts may be private).
    pub log_prompts: bool,
    /// Label request and token series with the tenant's name (off by default: `/metrics` is
    /// usually public, and tenant names and their traffic may not be; off, the label is
    /// `all`).
    pub tenant_labels: bool,
    /// Also export the queue, running, KV-use and KV-shape series under vLLM's names
    /// (`vllm:num_requests_waiting` …), which the Gateway API Inference Extension's endpoint
    /// picker reads by default.
    pub vllm_metric_names: bool,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (`"text"`, the default).
    Text,
    /// One JSON object per line (`"json"`).
    Json,
}

/// Content rules checked on prompts (`input`) and on generated text (`output`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PolicyConfig {
    /// Rules on prompts: a match refuses the request.
    pub input: Vec<PolicyRule>,
    /// Rules on generated text: a match stops generation.
    pub output: Vec<PolicyRule>,
}

/// One content rule: matching text is refused. Regexes are checked to compile at load.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PolicyRule {
    /// Tenants the rule applies to; `None` = all.
    pub tenants: Option<Vec<TenantId>>,
    /// Case-insensitive substrings.
    pub phrases: Vec<String>,
    /// Regular expressions (Rust `regex` syntax).
    pub regexes: Vec<String>,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("api_keys", &self.api_keys)
            .field("admin_key", &self.admin_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey").field("key", &"<redacted>").field("tenant", &self.tenant).finish()
    }
}

impl TenantConfig {
    /// A tenant with the default share and limits.
    pub fn with_defaults(name: TenantId) -> Self {
        TenantConfig {
            name,
            weight: 1,
            max_concurrent: 16,
            max_queued: 64,
            requests_per_minute: None,
            tokens_per_minute: None,
            max_sessions: 64,
        }
    }
}

impl Config {
    /// The tenant named `name`, if configured.
    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name.as_str() == name)
    }

    /// The model served as `id`, if configured.
    pub fn model(&self, id: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.id.as_str() == id)
    }
}
