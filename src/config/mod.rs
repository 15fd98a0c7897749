//! Typed configuration: `config/starling.yaml` (or JSON) read into raw serde structs
//! ([`raw`]), turned into typed values with bounds (`build.rs`), then checked across fields
//! (`checks.rs`). Every error names the field as a dotted path and the bound it broke.
//!
//! Relative paths in the file (model, pipeline, spill dir, trace file) are resolved against
//! the process's current directory, not the config file's directory: run `starling` from the
//! repository root (as `make run` does) or write absolute paths.
//!
//! Overrides, strongest first: CLI flags (`--bind`, `--model`), then the environment
//! (`STARLING_BIND`, `STARLING_API_KEYS`, `STARLING_ADMIN_KEY`), then the file.

mod build;
mod checks;
mod error;
mod machine;
pub mod raw;
mod units;
mod validated;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use build::key_tenant;
pub use error::ConfigError;
pub use machine::{Machine, mem_total_from_meminfo, open_files_from_limits};
pub use units::parse_byte_size;
pub use validated::*;

use raw::RawConfig;

/// The default config file, relative to the repository root.
pub const DEFAULT_CONFIG_PATH: &str = "config/starling.yaml";

/// The syntax of a config text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// JSON if the file name ends in `.json` or the text starts with `{`; YAML otherwise.
    pub fn detect(path: Option<&Path>, text: &str) -> Format {
        let json_ext = path.and_then(Path::extension).is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if json_ext || text.trim_start().starts_with('{') { Format::Json } else { Format::Yaml }
    }
}

/// Values from the command line or environment that replace what the file says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `HOST:PORT` for `server.bind`.
    pub bind: Option<String>,
    /// Replaces `models[0].path`.
    pub model: Option<PathBuf>,
    /// Replaces `auth.api_keys`: comma-separated `key` or `key:tenant`.
    pub api_keys: Option<String>,
    /// Replaces `auth.admin_key`.
    pub admin_key: Option<String>,
}

impl Overrides {
    /// Reads `STARLING_BIND`, `STARLING_API_KEYS`, `STARLING_ADMIN_KEY` (empty = unset).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Overrides::from_env`] with the variables read through `get` (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        Overrides {
            bind: var("STARLING_BIND"),
            model: None,
            api_keys: var("STARLING_API_KEYS"),
            admin_key: var("STARLING_ADMIN_KEY"),
        }
    }

    /// Each field from `self`, or from `fallback` where `self` has none (`cli.or(env)`).
    pub fn or(self, fallback: Overrides) -> Overrides {
        Overrides {
            bind: self.bind.or(fallback.bind),
            model: self.model.or(fallback.model),
            api_keys: self.api_keys.or(fallback.api_keys),
            admin_key: self.admin_key.or(fallback.admin_key),
        }
    }
}

impl Config {
    /// Reads and validates a file (YAML or JSON). Missing file → error naming the path.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_overrides(path, &Overrides::default())
    }

    /// Reads a file, applies overrides, then validates once: a `--model` override makes a
    /// missing `models[0].path` in the file harmless. This is what `starling serve` calls.
    pub fn load_with_overrides(path: &Path, o: &Overrides) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let raw = parse(&text, Format::detect(Some(path), &text))?;
        let machine = Machine::detect();
        let mut config = build::build(raw, &machine)?;
        config.set_overrides(o)?;
        checks::check(&mut config, &machine)?;
        Ok(config)
    }

    /// Parses and validates a config text against this machine.
    pub fn from_str(text: &str, format: Format) -> Result<Config, ConfigError> {
        Config::from_str_on(text, format, &Machine::detect())
    }

    /// Parses and validates a config text against the given machine facts.
    pub fn from_str_on(text: &str, format: Format, machine: &Machine) -> Result<Config, ConfigError> {
        let mut config = build::build(parse(text, format)?, machine)?;
        checks::check(&mut config, machine)?;
        Ok(config)
    }

    /// Applies CLI/env overrides (bind, model path for `models[0]`, API keys, admin key),
    /// re-validating.
    pub fn apply_overrides(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        let mut next = self.clone();
        next.set_overrides(o)?;
        checks::check(&mut next, &Machine::detect())?;
        *self = next;
        Ok(())
    }

    /// Checks that need the loaded model: max_prompt_tokens ≤ context length (field path in
    /// message).
    pub fn check_against_model(&self, model_index: usize, context_length: usize) -> Result<(), ConfigError> {
        let count = self.models.len();
        let model = self.models.get(model_index).ok_or(ConfigError::NoSuchModel { index: model_index, count })?;
        match model.max_prompt_tokens {
            Some(max) if max.get() > context_length => Err(ConfigError::ExceedsContext {
                field: format!("models[{model_index}].max_prompt_tokens"),
                value: max.get(),
                context_length,
            }),
            _ => Ok(()),
        }
    }

    /// Replaces fields with override values, checking each value (not the cross-field rules).
    fn set_overrides(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(bind) = &o.bind {
            self.server.bind = build::parse_bind("server.bind", bind)?;
        }
        if let Some(model) = &o.model {
            let count = self.models.len();
            let first = self.models.first_mut().ok_or(ConfigError::NoSuchModel { index: 0, count })?;
            first.path = model.clone();
        }
        if let Some(list) = &o.api_keys {
            self.auth.api_keys = parse_api_keys(list)?;
            // A tenant named only in the environment gets the default limits.
            for k in &self.auth.api_keys {
                if self.tenant(k.tenant.as_str()).is_none() {
                    self.tenants.push(TenantConfig::with_defaults(k.tenant.clone()));
                }
            }
        }
        if let Some(admin) = &o.admin_key {
            self.auth.admin_key = Some(admin.clone());
        }
        Ok(())
    }
}

/// Parses `STARLING_API_KEYS`: comma-separated `key` (its own tenant, see
/// `build::key_tenant`) or `key:tenant`.
/// Entries are named `auth.api_keys[i]` in errors, since that is what they replace.
pub fn parse_api_keys(list: &str) -> Result<Vec<ApiKey>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .enumerate()
        .map(|(i, entry)| {
            let field = format!("auth.api_keys[{i}]");
            match entry.split_once(':') {
                Some((key, tenant)) => build::api_key(&field, key.trim(), tenant.trim()),
                None => build::api_key(&field, entry, build::key_tenant(entry).as_str()),
            }
        })
        .collect()
}

/// Structural parsing: syntax, types, unknown fields. Errors carry the field path from
/// `serde_path_to_error` and the line/column from the parser.
fn parse(text: &str, format: Format) -> Result<RawConfig, ConfigError> {
    match format {
        Format::Json => {
            let mut de = serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(&mut de).map_err(|e| {
                let field = e.path().to_string();
                let inner = e.into_inner();
                let message = strip_json_position(&inner.to_string());
                parse_error("JSON", field, inner.line(), inner.column(), message)
            })
        }
        Format::Yaml => {
            let mut track = serde_path_to_error::Track::new();
            let result = serde_saphyr::with_deserializer_from_str(text, |de| {
                RawConfig::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
            });
            result.map_err(|e| {
                let (line, column) = e.location().map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
                let message = strip_yaml_position(&e.without_snippet().to_string(), line, column);
                parse_error("YAML", track.path().to_string(), line, column, message)
            })
        }
    }
}

fn parse_error(format: &'static str, field: String, line: usize, column: usize, message: String) -> ConfigError {
    ConfigError::Parse { format, field, line, column, message }
}

/// serde_json appends " at line L column C"; the error shows them separately.
fn strip_json_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// serde-saphyr appends " at line L, column C"; the error shows them separately.
fn strip_yaml_position(message: &str, line: usize, column: usize) -> String {
    let position = format!(" at line {line}, column {column}");
    message.strip_suffix(&position).unwrap_or(message).to_owned()
}
