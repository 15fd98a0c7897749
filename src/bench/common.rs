//! What the measurements share: settings, errors, the prompt text, medians.

use crate::config::KvDtype;
use std::path::PathBuf;

use serde::Serialize;

use crate::model::transformer::ModelError;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("KV arena: {0}")]
    Kv(String),
    #[error("engine: {0}")]
    Engine(String),
    #[error("the benchmark needs at least 1 rep and 1 thread")]
    Settings,
    #[error("load generator: {0}")]
    Http(String),
    #[error(
        "context {context} plus {generated} generated tokens is past the model's context length {limit} \
         (--contexts)"
    )]
    Context { context: usize, generated: usize, limit: usize },
}

/// Where a bench run is: told to its observer before each repetition of each phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step<'a> {
    /// What is being measured, e.g. `prefill and decode` or `engine at concurrency 8`.
    pub phase: &'a str,
    /// The repetition starting (1-based), of `reps`.
    pub rep: usize,
    pub reps: usize,
}

/// What to measure and how often.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    pub model: PathBuf,
    pub threads: usize,
    /// Runs per figure; each figure is their median.
    pub reps: usize,
    /// Concurrency levels of the engine measurement (empty = skip it).
    pub engine_concurrency: Vec<usize>,
    /// Context lengths of the long-context figures (empty = skip them).
    pub contexts: Vec<usize>,
    /// `--json-schema`: named schemas whose compile times are reported; when given, decode
    /// with a fixed schema is measured beside plain decode (single stream and 16 sequences).
    pub json_schemas: Vec<(String, serde_json::Value)>,
    /// `--speculative`: decode with speculative decoding off and on, on fixed tasks.
    pub speculative: bool,
    /// `--kv-dtype`: element type of the KV cache in every figure.
    pub kv_dtype: KvDtype,
}

/// Throughput at one context length: prefill of a prompt that long, then decode after it.
#[derive(Clone, Debug, Serialize)]
pub struct ContextFigure {
    /// Prompt tokens (the context the decode steps start from).
    pub context: usize,
    pub prefill_tok_s: f64,
    /// Single-stream greedy decode after the prompt.
    pub decode_tok_s: f64,
    /// Sequences of the batched figure.
    pub batch: usize,
    /// Generated tokens per second over `batch` sequences decoding together, each at `context`.
    pub batched_decode_tok_s: f64,
}

/// Aggregate engine throughput at one concurrency level.
#[derive(Clone, Debug, Serialize)]
pub struct EngineFigure {
    pub concurrency: usize,
    /// Generated tokens per second over all requests.
    pub tok_s: f64,
}

/// Text the prompts are cut from (the peer script's).
pub fn bench_text() -> String {
    "The quick brown fox jumps over the lazy dog. ".repeat(400)
}

/// Median of the values (0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
