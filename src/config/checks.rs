//! Cross-field rules, run after every value is in bounds and again after overrides:
//! orderings (watermarks, batch sizes), unique names, known tenants, memory, files on disk.

use std::collections::HashMap;
use std::path::Path;

use super::error::ConfigError;
use super::machine::Machine;
use super::validated::{ANONYMOUS, Config, TenantConfig};
use crate::types::TenantId;

type Result<T> = std::result::Result<T, ConfigError>;

/// Shown when the model file is missing.
const FETCH_HINT: &str = " (run scripts/fetch-model.sh to download the default model, or pass --model PATH)";

/// Runs every cross-field rule. Adds the `anonymous` tenant if it is not listed.
pub fn check(config: &mut Config, machine: &Machine) -> Result<()> {
    check_orders(config)?;
    check_unique_names(config)?;
    if config.tenant(ANONYMOUS).is_none() {
        config.tenants.push(TenantConfig::with_defaults(TenantId::from(ANONYMOUS)));
    }
    // A key that names no tenant is its own tenant, with the default limits.
    let own: Vec<TenantId> = config
        .auth
        .api_keys
        .iter()
        .filter(|k| k.tenant == super::build::key_tenant(&k.key) && config.tenant(k.tenant.as_str()).is_none())
        .map(|k| k.tenant.clone())
        .collect();
    config.tenants.extend(own.into_iter().map(TenantConfig::with_defaults));
    check_tenants_known(config)?;
    check_memory(config, machine)?;
    check_files(config)
}

fn check_orders(c: &Config) -> Result<()> {
    let q = &c.queue;
    ordered("queue.low_watermark", q.low_watermark, "queue.high_watermark", q.high_watermark)?;
    let l = &c.limits;
    ordered(
        "limits.default_max_tokens",
        l.default_max_tokens as usize,
        "limits.max_tokens_cap",
        l.max_tokens_cap as usize,
    )?;
    for (i, m) in c.models.iter().enumerate() {
        ordered(
            &format!("models[{i}].max_batch"),
            m.max_batch.get(),
            &format!("models[{i}].max_batch_tokens"),
            m.max_batch_tokens.get(),
        )?;
    }
    Ok(())
}

fn ordered(field: &str, value: usize, bound_field: &str, bound: usize) -> Result<()> {
    if value <= bound {
        return Ok(());
    }
    Err(ConfigError::Order {
        field: field.to_owned(),
        value: value as u64,
        bound_field: bound_field.to_owned(),
        bound: bound as u64,
    })
}

fn check_unique_names(c: &Config) -> Result<()> {
    let ids = c.models.iter().map(|m| m.id.as_str());
    first_duplicate(ids, |i| format!("models[{i}].id"), "model id")?;
    let names = c.tenants.iter().map(|t| t.name.as_str());
    first_duplicate(names, |i| format!("tenants[{i}].name"), "tenant name")?;
    let keys: Vec<&str> = c.auth.api_keys.iter().map(|k| k.key.as_str()).collect();
    let mut seen = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        if let Some(j) = seen.insert(*key, i) {
            let value = format!("(same key as auth.api_keys[{j}])");
            return Err(duplicate(format!("auth.api_keys[{i}].key"), "API key", value));
        }
    }
    if let Some(admin) = &c.auth.admin_key
        && let Some(j) = seen.get(admin.as_str())
    {
        let value = format!("(same key as auth.api_keys[{j}])");
        return Err(duplicate("auth.admin_key".to_owned(), "key", value));
    }
    Ok(())
}

fn first_duplicate<'a>(
    names: impl Iterator<Item = &'a str>,
    field: impl Fn(usize) -> String,
    what: &'static str,
) -> Result<()> {
    let mut seen = HashMap::new();
    for (i, name) in names.enumerate() {
        if seen.insert(name, i).is_some() {
            return Err(duplicate(field(i), what, format!("{name:?}")));
        }
    }
    Ok(())
}

fn duplicate(field: String, what: &'static str, value: String) -> ConfigError {
    ConfigError::Duplicate { field, what, value }
}

fn check_tenants_known(c: &Config) -> Result<()> {
    let known = |t: &TenantId| c.tenant(t.as_str()).is_some();
    for (i, k) in c.auth.api_keys.iter().enumerate() {
        if !known(&k.tenant) {
            return Err(unknown_tenant(format!("auth.api_keys[{i}].tenant"), &k.tenant));
        }
    }
    for (side, rules) in [("input", &c.policy.input), ("output", &c.policy.output)] {
        for (i, rule) in rules.iter().enumerate() {
            let listed = rule.tenants.iter().flatten().enumerate();
            if let Some((j, t)) = listed.into_iter().find(|(_, t)| !known(t)) {
                return Err(unknown_tenant(format!("policy.{side}[{i}].tenants[{j}]"), t));
            }
        }
    }
    Ok(())
}

fn unknown_tenant(field: String, tenant: &TenantId) -> ConfigError {
    ConfigError::UnknownTenant { field, tenant: tenant.to_string() }
}

fn check_memory(c: &Config, machine: &Machine) -> Result<()> {
    let Some(mem_total) = machine.mem_total else {
        return Ok(());
    };
    let exceeds = |field: String, bytes: u64| ConfigError::ExceedsMemory { field, bytes, mem_total };
    let mut sum: u64 = 0;
    for (i, m) in c.models.iter().enumerate() {
        let bytes = m.kv_cache.max_bytes;
        if bytes > mem_total {
            return Err(exceeds(format!("models[{i}].kv_cache.max_bytes"), bytes));
        }
        sum = sum.saturating_add(bytes);
    }
    if sum > mem_total {
        return Err(exceeds("models[*].kv_cache.max_bytes (sum over models)".to_owned(), sum));
    }
    Ok(())
}

fn check_files(c: &Config) -> Result<()> {
    for (i, m) in c.models.iter().enumerate() {
        must_exist(&format!("models[{i}].pipeline"), &m.pipeline, "")?;
        must_exist(&format!("models[{i}].path"), &m.path, FETCH_HINT)?;
    }
    if let Some(trace) = &c.telemetry.trace_chrome {
        let dir = trace.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            must_exist("telemetry.trace_chrome", dir, " (create the directory first)")?;
        }
    }
    Ok(())
}

fn must_exist(field: &str, path: &Path, hint: &'static str) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    Err(ConfigError::MissingFile { field: field.to_owned(), path: path.to_owned(), hint })
}
