//! Value validation: each raw field becomes its typed form, with its default when absent,
//! or a [`ConfigError`] naming its dotted path and the bound it broke.
//! Rules between fields (watermarks, tenants, files, memory) are in `checks.rs`.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use super::error::ConfigError;
use super::machine::Machine;
use super::raw::*;
use super::units::{BYTE_SIZE_FORMS, parse_byte_size};
use super::validated::*;
use crate::types::{ModelId, TenantId};

type Result<T> = std::result::Result<T, ConfigError>;

const MIB: u64 = 1 << 20;
const ANY_POSITIVE: RangeInclusive<i64> = 1..=i64::MAX;
const ANY_U32: RangeInclusive<i64> = 1..=u32::MAX as i64;

/// Turns the raw file into a [`Config`] with every value in bounds (no cross-field checks yet).
pub fn build(raw: RawConfig, machine: &Machine) -> Result<Config> {
    let models = match raw.models {
        None => vec![model(RawModel::default(), "models[0]", machine)?],
        Some(list) if list.is_empty() => return Err(out_of_range("models", "at least 1 entry", 0)),
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, m)| model(m, &format!("models[{i}]"), machine))
            .collect::<Result<_>>()?,
    };
    Ok(Config {
        server: server(raw.server.unwrap_or_default(), machine)?,
        auth: auth(raw.auth.unwrap_or_default())?,
        tenants: tenants(raw.tenants.unwrap_or_default())?,
        models,
        queue: queue(raw.queue.unwrap_or_default())?,
        limits: limits(raw.limits.unwrap_or_default())?,
        telemetry: telemetry(raw.telemetry.unwrap_or_default())?,
        policy: policy(raw.policy.unwrap_or_default())?,
        registry: registry(raw.registry.unwrap_or_default())?,
    })
}

fn registry(raw: RawRegistry) -> Result<RegistryConfig> {
    let dirs = raw.model_dirs.unwrap_or_else(|| vec!["models".to_owned()]);
    let model_dirs = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| non_empty_path(&format!("registry.model_dirs[{i}]"), d))
        .collect::<Result<_>>()?;
    let dirs = raw.pipeline_dirs.unwrap_or_else(|| vec!["pipelines".to_owned()]);
    let pipeline_dirs = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| non_empty_path(&format!("registry.pipeline_dirs[{i}]"), d))
        .collect::<Result<_>>()?;
    Ok(RegistryConfig {
        model_dirs,
        pipeline_dirs,
        cache_dir: non_empty_path("registry.cache_dir", raw.cache_dir.as_deref().unwrap_or("cache/models"))?,
        cache_max_bytes: bytes("registry.cache_max_bytes", raw.cache_max_bytes, 20 * 1024 * MIB)?,
        memory_budget: raw.memory_budget.map(|b| bytes("registry.memory_budget", Some(b), 0)).transpose()?,
        drain_grace: secs("registry.drain_grace_secs", raw.drain_grace_secs, 30, 0..=i64::MAX)?,
        allowed_hosts: raw
            .allowed_hosts
            .map(|list| {
                let field = |i| format!("registry.allowed_hosts[{i}]");
                list.iter().enumerate().map(|(i, h)| allowed_host(&field(i), h)).collect::<Result<_>>()
            })
            .transpose()?,
        download_timeout: secs("registry.download_timeout_secs", raw.download_timeout_secs, 3600, 1..=604_800)?,
    })
}

/// Parses `host`, `host:port`, `[v6]` or `[v6]:port` (a registry.allowed_hosts entry).
fn allowed_host(field: &str, text: &str) -> Result<AllowedHost> {
    let bad = || {
        invalid(
            field,
            text,
            "a host name or IP address, optionally with :PORT (\"models.example.org\", \"10.0.0.5:8080\", \"[::1]:8080\")",
        )
    };
    let t = text.trim().to_ascii_lowercase();
    let (host, port) = match t.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            if host.is_empty() || !host.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
                return Err(bad());
            }
            (host.to_owned(), port)
        }
        None => {
            let (host, port) = match t.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (t.as_str(), None),
            };
            if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
                return Err(bad());
            }
            (host.to_owned(), port)
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
    };
    Ok(AllowedHost { host, port })
}

/// Connections served at once when the config names no cap: three quarters of the
/// open-file limit (the rest is left for model files, spill files and downloads), at most
/// 4,096, at least 16.
pub fn default_max_connections(open_files: Option<u64>) -> i64 {
    open_files.map_or(4096, |n| (n.saturating_mul(3) / 4).saturating_sub(16).clamp(16, 4096) as i64)
}

fn server(raw: RawServer, machine: &Machine) -> Result<ServerConfig> {
    let routes =
        raw.public_routes.unwrap_or_else(|| ["/health", "/healthz", "/readyz", "/metrics"].map(String::from).to_vec());
    for (i, route) in routes.iter().enumerate() {
        if !route.starts_with('/') {
            return Err(invalid(&format!("server.public_routes[{i}]"), route, "a path starting with '/'"));
        }
    }
    let max_body = bytes("server.max_body_bytes", raw.max_body_bytes, MIB)?;
    Ok(ServerConfig {
        bind: parse_bind("server.bind", raw.bind.as_deref().unwrap_or("127.0.0.1:8080"))?,
        max_body_bytes: nonzero_usize("server.max_body_bytes", max_body)?,
        sse_keepalive: secs("server.sse_keepalive_secs", raw.sse_keepalive_secs, 15, ANY_POSITIVE)?,
        shutdown_grace: secs("server.shutdown_grace_secs", raw.shutdown_grace_secs, 10, 0..=i64::MAX)?,
        public_routes: routes,
        header_read_timeout: secs("server.header_read_timeout_secs", raw.header_read_timeout_secs, 10, 1..=3600)?,
        max_connections: nonzero(
            "server.max_connections",
            raw.max_connections,
            default_max_connections(machine.open_files),
            1..=1_000_000,
        )?,
        stream_stall: secs("server.stream_stall_secs", raw.stream_stall_secs, 30, 1..=86_400)?,
        cpu_workers: nonzero("server.cpu_workers", raw.cpu_workers, machine.parallelism.get() as i64, 1..=1024)?,
        cpu_queue: ranged("server.cpu_queue", raw.cpu_queue, 256, 0..=1_000_000)? as usize,
        template_memory_bytes: template_memory("server.template_memory_bytes", raw.template_memory_bytes)?,
        template_timeout: Duration::from_millis(ranged(
            "server.template_timeout_ms",
            raw.template_timeout_ms,
            5_000,
            10..=600_000,
        )? as u64),
        ui: raw.ui.unwrap_or(true),
    })
}

/// A template worker's address space: 1 GiB unless set, at least 64 MiB (the worker is a
/// `starling` process: its code and stacks alone take tens of MiB of address space).
fn template_memory(field: &str, value: Option<RawBytes>) -> Result<u64> {
    let v = bytes(field, value, 1024 * MIB)?;
    if v < 64 * MIB {
        return Err(invalid(field, &v.to_string(), "at least 64 MiB"));
    }
    Ok(v)
}

/// Parses a `HOST:PORT` listen address (also used for `--bind` and `STARLING_BIND`).
pub fn parse_bind(field: &str, text: &str) -> Result<SocketAddr> {
    text.trim().parse().map_err(|_| invalid(field, text, "a socket address HOST:PORT such as 127.0.0.1:8080"))
}

fn auth(raw: RawAuth) -> Result<AuthConfig> {
    let mut api_keys = Vec::new();
    for (i, k) in raw.api_keys.unwrap_or_default().into_iter().enumerate() {
        let field = format!("auth.api_keys[{i}]");
        let own = key_tenant(&k.key);
        let tenant = k.tenant.as_deref().unwrap_or(own.as_str());
        api_keys.push(api_key(&field, &k.key, tenant)?);
    }
    if let Some(admin) = &raw.admin_key
        && admin.trim().is_empty()
    {
        return Err(invalid("auth.admin_key", "", "a non-empty key (omit the field to disable admin)"));
    }
    Ok(AuthConfig { api_keys, admin_key: raw.admin_key })
}

/// The tenant of a key that names none: its own, `key-` and the first 12 hex digits of the
/// key's sha256 (so keys never share sessions, prefix caches or cancel rights by accident,
/// and the name reveals nothing of the key).
pub fn key_tenant(key: &str) -> TenantId {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    TenantId(format!("key-{hex}"))
}

/// Checks one key and its tenant name; `field` is the entry's path (`auth.api_keys[2]`).
pub fn api_key(field: &str, key: &str, tenant: &str) -> Result<ApiKey> {
    if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c == ',') {
        return Err(invalid(&format!("{field}.key"), key, "a non-empty key without spaces or commas"));
    }
    Ok(ApiKey { key: key.to_owned(), tenant: TenantId(name(&format!("{field}.tenant"), tenant)?) })
}

fn tenants(raw: Vec<RawTenant>) -> Result<Vec<TenantConfig>> {
    raw.into_iter()
        .enumerate()
        .map(|(i, t)| {
            let f = |key: &str| format!("tenants[{i}].{key}");
            Ok(TenantConfig {
                name: TenantId(name(&f("name"), &t.name)?),
                weight: ranged(&f("weight"), t.weight, 1, 1..=1000)? as u32,
                max_concurrent: ranged(&f("max_concurrent"), t.max_concurrent, 16, ANY_U32)? as u32,
                max_queued: ranged(&f("max_queued"), t.max_queued, 64, ANY_U32)? as u32,
                requests_per_minute: optional(&f("requests_per_minute"), t.requests_per_minute)?,
                tokens_per_minute: optional(&f("tokens_per_minute"), t.tokens_per_minute)?,
                max_sessions: ranged(&f("max_sessions"), t.max_sessions, 64, ANY_U32)? as u32,
            })
        })
        .collect()
}

fn model(raw: RawModel, prefix: &str, machine: &Machine) -> Result<ModelConfig> {
    let f = |key: &str| format!("{prefix}.{key}");
    let threads = machine.parallelism.get() as i64;
    let id = raw.id.as_deref().unwrap_or("smollm2-135m");
    let path = raw.path.as_deref().unwrap_or("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let pipeline = raw.pipeline.as_deref().unwrap_or("pipelines/default.yaml");
    let max_prompt = match raw.max_prompt_tokens {
        None => None,
        Some(v) => Some(nonzero(&f("max_prompt_tokens"), Some(v), 1, ANY_POSITIVE)?),
    };
    Ok(ModelConfig {
        id: ModelId(name(&f("id"), id)?),
        path: non_empty_path(&f("path"), path)?,
        pipeline: non_empty_path(&f("pipeline"), pipeline)?,
        threads: nonzero(&f("threads"), raw.threads, threads, 1..=1024)?,
        max_batch: nonzero(&f("max_batch"), raw.max_batch, 32, ANY_POSITIVE)?,
        max_batch_tokens: nonzero(&f("max_batch_tokens"), raw.max_batch_tokens, 512, ANY_POSITIVE)?,
        max_sessions: nonzero(&f("max_sessions"), raw.max_sessions, 256, ANY_POSITIVE)?,
        max_prompt_tokens: max_prompt,
        kv_cache: kv_cache(raw.kv_cache.unwrap_or_default(), &f("kv_cache"))?,
        speculative: match raw.speculative {
            None => None,
            Some(s) => Some(speculative(s, &f("speculative"))?),
        },
    })
}

fn speculative(raw: RawSpeculative, prefix: &str) -> Result<SpeculativeConfig> {
    let f = |key: &str| format!("{prefix}.{key}");
    let method = match raw.method.as_deref().unwrap_or("ngram") {
        "ngram" => SpeculativeMethod::Ngram,
        other => return Err(invalid(&f("method"), other, "\"ngram\"")),
    };
    Ok(SpeculativeConfig {
        method,
        max_draft: ranged(&f("max_draft"), raw.max_draft, SpeculativeConfig::default().max_draft as i64, 1..=64)?
            as usize,
        min_match: ranged(&f("min_match"), raw.min_match, SpeculativeConfig::default().min_match as i64, 1..=16)?
            as usize,
    })
}

fn kv_cache(raw: RawKvCache, prefix: &str) -> Result<KvCacheConfig> {
    let f = |key: &str| format!("{prefix}.{key}");
    let name = raw.dtype.as_deref().unwrap_or("f32");
    let Some(dtype) = KvDtype::from_name(name) else {
        return Err(invalid(&f("dtype"), name, "one of \"f32\", \"f16\", \"q8_0\""));
    };
    let spill = match raw.spill {
        None => None,
        Some(s) => Some(SpillConfig {
            dir: non_empty_path(&f("spill.dir"), &s.dir)?,
            max_bytes: bytes(&f("spill.max_bytes"), Some(s.max_bytes), 0)?,
        }),
    };
    Ok(KvCacheConfig {
        max_bytes: bytes(&f("max_bytes"), raw.max_bytes, 512 * MIB)?,
        block_tokens: nonzero(&f("block_tokens"), raw.block_tokens, 16, 1..=4096)?,
        dtype,
        session_ttl: secs(&f("session_ttl_secs"), raw.session_ttl_secs, 600, ANY_POSITIVE)?,
        spill,
    })
}

fn queue(raw: RawQueue) -> Result<QueueConfig> {
    let delay = ranged("queue.max_queue_delay_ms", raw.max_queue_delay_ms, 2, 0..=i64::MAX)?;
    Ok(QueueConfig {
        high_watermark: ranged("queue.high_watermark", raw.high_watermark, 256, ANY_POSITIVE)? as usize,
        low_watermark: ranged("queue.low_watermark", raw.low_watermark, 192, ANY_POSITIVE)? as usize,
        high_watermark_tokens: ranged("queue.high_watermark_tokens", raw.high_watermark_tokens, 262_144, ANY_POSITIVE)?
            as usize,
        max_queue_delay: Duration::from_millis(delay as u64),
    })
}

fn limits(raw: RawLimits) -> Result<LimitsConfig> {
    Ok(LimitsConfig {
        default_timeout: secs("limits.default_timeout_secs", raw.default_timeout_secs, 300, ANY_POSITIVE)?,
        default_max_tokens: ranged("limits.default_max_tokens", raw.default_max_tokens, 256, ANY_U32)? as u32,
        max_tokens_cap: ranged("limits.max_tokens_cap", raw.max_tokens_cap, 4096, ANY_U32)? as u32,
        max_stop_strings: ranged("limits.max_stop_strings", raw.max_stop_strings, 8, ANY_POSITIVE)? as usize,
        max_logprobs: ranged("limits.max_logprobs", raw.max_logprobs, 20, ANY_U32)? as u32,
    })
}

fn telemetry(raw: RawTelemetry) -> Result<TelemetryConfig> {
    let log_format = match raw.log_format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => return Err(invalid("telemetry.log_format", other, "one of \"text\", \"json\"")),
    };
    let log_level = raw.log_level.unwrap_or_else(|| "info".to_owned());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() || log_level.trim().is_empty() {
        let expected = "a log filter such as \"info\" or \"starling=debug,warn\"";
        return Err(invalid("telemetry.log_level", &log_level, expected));
    }
    let trace_chrome = match raw.trace_chrome {
        None => None,
        Some(p) => Some(non_empty_path("telemetry.trace_chrome", &p)?),
    };
    Ok(TelemetryConfig {
        log_format,
        log_level,
        trace_chrome,
        log_prompts: raw.log_prompts.unwrap_or(false),
        tenant_labels: raw.tenant_labels.unwrap_or(false),
        vllm_metric_names: raw.vllm_metric_names.unwrap_or(true),
    })
}

fn policy(raw: RawPolicy) -> Result<PolicyConfig> {
    Ok(PolicyConfig {
        input: rules(raw.input.unwrap_or_default(), "policy.input")?,
        output: rules(raw.output.unwrap_or_default(), "policy.output")?,
    })
}

fn rules(raw: Vec<RawPolicyRule>, prefix: &str) -> Result<Vec<PolicyRule>> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let f = |key: &str, j: usize| format!("{prefix}[{i}].{key}[{j}]");
        let tenants = match r.tenants {
            None => None,
            Some(list) => Some(
                list.iter()
                    .enumerate()
                    .map(|(j, t)| name(&f("tenants", j), t).map(TenantId))
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        let phrases = r.phrases.unwrap_or_default();
        if let Some(j) = phrases.iter().position(|p| p.trim().is_empty()) {
            return Err(invalid(&f("phrases", j), &phrases[j], "a non-empty phrase"));
        }
        let regexes = r.regexes.unwrap_or_default();
        for (j, re) in regexes.iter().enumerate() {
            if let Err(e) = regex::Regex::new(re) {
                return Err(invalid(&f("regexes", j), re, &format!("a valid regex ({e})")));
            }
        }
        out.push(PolicyRule { tenants, phrases, regexes });
    }
    Ok(out)
}

/// A tenant or model name: 1..=64 characters from `[A-Za-z0-9._:/-]`.
fn name(field: &str, text: &str) -> Result<String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:/-".contains(c);
    if text.is_empty() || text.len() > 64 || !text.chars().all(ok_char) {
        return Err(invalid(field, text, "a name of 1 to 64 characters from A-Z a-z 0-9 . _ : / -"));
    }
    Ok(text.to_owned())
}

fn non_empty_path(field: &str, text: &str) -> Result<PathBuf> {
    if text.trim().is_empty() {
        return Err(invalid(field, text, "a non-empty path"));
    }
    Ok(PathBuf::from(text))
}

fn ranged(field: &str, value: Option<i64>, default: i64, range: RangeInclusive<i64>) -> Result<i64> {
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        return Ok(v);
    }
    let bound = if *range.end() == i64::MAX {
        format!("at least {}", range.start())
    } else {
        format!("in {}..={}", range.start(), range.end())
    };
    Err(out_of_range(field, &bound, v))
}

fn nonzero(field: &str, value: Option<i64>, default: i64, range: RangeInclusive<i64>) -> Result<NonZeroUsize> {
    let v = ranged(field, value, default, range)?;
    nonzero_usize(field, v as u64)
}

fn nonzero_usize(field: &str, v: u64) -> Result<NonZeroUsize> {
    usize::try_from(v)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| out_of_range(field, &format!("in 1..={}", usize::MAX), v))
}

fn optional(field: &str, value: Option<i64>) -> Result<Option<u32>> {
    value.map(|v| ranged(field, Some(v), 1, ANY_U32).map(|v| v as u32)).transpose()
}

fn secs(field: &str, value: Option<i64>, default: i64, range: RangeInclusive<i64>) -> Result<Duration> {
    Ok(Duration::from_secs(ranged(field, value, default, range)? as u64))
}

/// A positive byte count, from an integer or a string like `"512MiB"`.
fn bytes(field: &str, value: Option<RawBytes>, default: u64) -> Result<u64> {
    match value {
        None => Ok(default),
        Some(RawBytes::Int(n)) if n >= 1 => Ok(n as u64),
        Some(RawBytes::Int(n)) => Err(out_of_range(field, "at least 1 byte", n)),
        Some(RawBytes::Text(text)) => match parse_byte_size(&text) {
            Some(0) => Err(out_of_range(field, "at least 1 byte", format!("{text:?}"))),
            Some(v) => Ok(v),
            None => Err(invalid(field, &text, BYTE_SIZE_FORMS)),
        },
    }
}

fn out_of_range(field: &str, bound: &str, value: impl ToString) -> ConfigError {
    ConfigError::OutOfRange { field: field.to_owned(), bound: bound.to_owned(), value: value.to_string() }
}

fn invalid(field: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::Invalid { field: field.to_owned(), value: value.to_owned(), expected: expected.to_owned() }
}
