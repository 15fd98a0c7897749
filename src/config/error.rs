//! Why a configuration was refused. Every variant names the field as a dotted path
//! (`models[0].kv_cache.max_bytes`) and, where there is one, the bound it broke.

use std::path::PathBuf;

/// A configuration that could not be read or did not validate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not well-formed, has an unknown field, or a value of the wrong type.
    #[error("{format} config: `{field}` (line {line}, column {column}): {message}")]
    Parse {
        format: &'static str,
        /// Dotted path of the field at fault (`.` for the document root).
        field: String,
        line: usize,
        column: usize,
        message: String,
    },

    /// A number outside its allowed range (zero or negative limits, weights past 1000, ...).
    #[error("`{field}` must be {bound}, got {value}")]
    OutOfRange { field: String, bound: String, value: String },

    /// A value that does not parse as what the field expects.
    #[error("`{field}`: {value:?} is not {expected}")]
    Invalid { field: String, value: String, expected: String },

    /// Two fields whose values must be ordered, e.g. the low watermark above the high one.
    #[error("`{field}` ({value}) must not exceed `{bound_field}` ({bound})")]
    Order { field: String, value: u64, bound_field: String, bound: u64 },

    /// A KV cache cap (or the sum of them) larger than the machine's memory.
    #[error(
        "`{field}` is {bytes} bytes ({}), more than this machine's memory ({mem_total} bytes, {})",
        gib(*bytes),
        gib(*mem_total)
    )]
    ExceedsMemory { field: String, bytes: u64, mem_total: u64 },

    /// `max_prompt_tokens` longer than the context the loaded model supports.
    #[error("`{field}` is {value}, longer than the model context length {context_length}")]
    ExceedsContext { field: String, value: usize, context_length: usize },

    /// A path the configuration names does not exist.
    #[error("`{field}`: {} does not exist{hint}", path.display())]
    MissingFile { field: String, path: PathBuf, hint: &'static str },

    /// A name that must be unique appears twice.
    #[error("`{field}`: duplicate {what} {value}")]
    /// `value` is shown as is (names come quoted; keys are never shown).
    Duplicate { field: String, what: &'static str, value: String },

    /// An API key or policy rule names a tenant not listed under `tenants`.
    #[error("`{field}`: tenant {tenant:?} is not listed under `tenants` (nor is it \"anonymous\")")]
    UnknownTenant { field: String, tenant: String },

    /// `check_against_model` was asked about a model the config does not have.
    #[error("`models[{index}]` does not exist: the config lists {count} model(s)")]
    NoSuchModel { index: usize, count: usize },
}

impl ConfigError {
    /// The dotted path of the field at fault, when the error has one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } | ConfigError::NoSuchModel { .. } => None,
            ConfigError::Parse { field, .. }
            | ConfigError::OutOfRange { field, .. }
            | ConfigError::Invalid { field, .. }
            | ConfigError::Order { field, .. }
            | ConfigError::ExceedsMemory { field, .. }
            | ConfigError::ExceedsContext { field, .. }
            | ConfigError::MissingFile { field, .. }
            | ConfigError::Duplicate { field, .. }
            | ConfigError::UnknownTenant { field, .. } => Some(field),
        }
    }
}

/// A byte count in GiB with two decimals, for messages.
fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}
