//! `starling bench`: throughput of the model alone (prefill, single-stream decode,
//! batched decode, measured like `llamacpp_bench.py` so the numbers compare) and of the
//! whole engine under 1..32 concurrent requests, plus peak memory and build facts.

mod common;
mod engine;
pub mod http;
mod model;
pub mod speculative;

use serde::Serialize;

use crate::model::transformer::Transformer;

pub use common::{BenchError, BenchSettings, ContextFigure, EngineFigure, Step};

/// Every figure `starling bench` reports (the JSON keys of DESIGN.md's contract).
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub engine: String,
    pub threads: usize,
    pub model: String,
    pub git_commit: String,
    pub kernels: String,
    /// Element type of the KV cache (`f32`, `f16` or `q8_0`).
    pub kv_dtype: String,
    pub cpu_features: Vec<String>,
    pub prefill_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s_ctx8: f64,
    pub decode_tok_s_ctx512: f64,
    pub batch: usize,
    pub batched_decode_tok_s: f64,
    pub engine_aggregate: Vec<EngineFigure>,
    /// Prefill and decode at each `--contexts` length.
    pub contexts: Vec<ContextFigure>,
    /// With `--json-schema`: constrained decode beside plain, and compile times.
    pub structured: Option<StructuredFigures>,
    /// With `--speculative`: decode with speculative decoding off and on.
    pub speculative: Option<speculative::SpeculativeFigures>,
    pub peak_rss_bytes: u64,
}

/// The cost of constrained decoding: plain and JSON-schema decode at 1 and 16 sequences
/// (same prompts, same token counts), and the first compile of each `--json-schema` schema.
#[derive(Clone, Debug, Serialize)]
pub struct StructuredFigures {
    pub plain: Vec<EngineFigure>,
    pub constrained: Vec<EngineFigure>,
    /// (schema name, compile milliseconds).
    pub compile_ms: Vec<(String, f64)>,
}

/// Concurrency levels of the constrained-decode figures.
const STRUCTURED_LEVELS: [usize; 2] = [1, 16];

fn measure_structured(
    settings: &BenchSettings,
    observe: &mut dyn FnMut(Step),
) -> Result<Option<StructuredFigures>, BenchError> {
    if settings.json_schemas.is_empty() {
        return Ok(None);
    }
    let tokenizer = std::sync::Arc::new(
        crate::tokenizer::GgufTokenizer::open(&settings.model).map_err(|e| BenchError::Engine(e.to_string()))?,
    );
    let grammars = crate::grammar::Grammars::new(tokenizer, crate::grammar::GrammarLimits::default());
    // The token trie is built once per model, on the first grammar: not a compile cost.
    let _ = grammars.compile(&crate::grammar::Grammar::Regex("[0-9]+".into()));
    let mut compile_ms = vec![];
    for (name, schema) in &settings.json_schemas {
        let c = grammars
            .compile(&crate::grammar::Grammar::JsonSchema(schema.clone()))
            .map_err(|e| BenchError::Engine(format!("schema `{name}`: {e}")))?;
        compile_ms.push((name.clone(), c.compile_time.as_secs_f64() * 1e3));
    }
    let schema = engine::decode_schema();
    let mut plain = vec![];
    let mut constrained = vec![];
    for c in STRUCTURED_LEVELS {
        plain.push(engine::measure_with(settings, c, None, observe)?);
        constrained.push(engine::measure_with(settings, c, Some(&schema), observe)?);
    }
    Ok(Some(StructuredFigures { plain, constrained, compile_ms }))
}

/// Runs every measurement.
pub fn run(settings: &BenchSettings) -> Result<BenchReport, BenchError> {
    run_observed(settings, &mut |_| {})
}

/// [`run`], telling `observe` each phase and repetition as it starts.
pub fn run_observed(settings: &BenchSettings, observe: &mut dyn FnMut(Step)) -> Result<BenchReport, BenchError> {
    if settings.reps == 0 || settings.threads == 0 {
        return Err(BenchError::Settings);
    }
    let lm = Transformer::load(&settings.model, settings.threads)?;
    let limit = lm.desc.n_ctx_train;
    let generated = model::CONTEXT_GEN_TOKENS;
    if let Some(&context) = settings.contexts.iter().find(|&&c| c.saturating_add(generated) > limit) {
        return Err(BenchError::Context { context, generated, limit });
    }
    let figures = model::measure(&lm, settings.kv_dtype, settings.reps, observe)?;
    let contexts = settings
        .contexts
        .iter()
        .map(|&c| model::measure_context(&lm, settings.kv_dtype, c, settings.reps, observe))
        .collect::<Result<_, _>>()?;
    let kernels = lm.kernels().name().to_string();
    drop(lm);
    let engine_aggregate = settings
        .engine_concurrency
        .iter()
        .map(|&c| engine::measure(settings, c, observe))
        .collect::<Result<Vec<_>, _>>()?;
    let structured = measure_structured(settings, observe)?;
    let speculative = if settings.speculative { Some(speculative::measure(settings, observe)?) } else { None };
    Ok(BenchReport {
        engine: format!("starling {}", env!("CARGO_PKG_VERSION")),
        threads: settings.threads,
        model: settings.model.display().to_string(),
        git_commit: git_commit(),
        kernels,
        kv_dtype: figures.kv_dtype.name().to_string(),
        cpu_features: cpu_features(),
        prefill_tokens: figures.prefill_tokens,
        prefill_tok_s: figures.prefill_tok_s,
        decode_tok_s_ctx8: figures.decode_ctx8,
        decode_tok_s_ctx512: figures.decode_ctx512,
        batch: model::BATCH,
        batched_decode_tok_s: figures.batched,
        engine_aggregate,
        contexts,
        structured,
        speculative,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// `VmHWM` of this process in bytes, 0 where /proc is not available.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    parse_vm_hwm(&status).unwrap_or(0)
}

/// The `VmHWM:` line of a /proc status file, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut parts = line["VmHWM:".len()..].split_whitespace();
    let kb: u64 = parts.next()?.parse().ok()?;
    (parts.next()? == "kB").then_some(kb * 1024)
}

/// `git rev-parse --short HEAD` in the working directory, or "unknown".
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The SIMD features the kernels care about that this CPU has.
pub fn cpu_features() -> Vec<String> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let probes = [
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("f16c", is_x86_feature_detected!("f16c")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512bw", is_x86_feature_detected!("avx512bw")),
            ("avx512vl", is_x86_feature_detected!("avx512vl")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
            ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
        ];
        out.extend(probes.iter().filter(|p| p.1).map(|p| p.0.to_string()));
    }
    out
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} · {} · {} threads · kernels {} · kv {} · commit {}",
            self.engine, self.model, self.threads, self.kernels, self.kv_dtype, self.git_commit
        )?;
        writeln!(f, "cpu features: {}", self.cpu_features.join(" "))?;
        writeln!(f, "{:<36} {:>10}", "figure", "tok/s")?;
        writeln!(f, "{:<36} {:>10.1}", format!("prefill ({} tokens)", self.prefill_tokens), self.prefill_tok_s)?;
        writeln!(f, "{:<36} {:>10.1}", "decode, 8-token context", self.decode_tok_s_ctx8)?;
        writeln!(
            f,
            "{:<36} {:>10.1}",
            format!("decode, {}-token context", self.prefill_tokens),
            self.decode_tok_s_ctx512
        )?;
        writeln!(
            f,
            "{:<36} {:>10.1}",
            format!("batched decode ({} sequences)", self.batch),
            self.batched_decode_tok_s
        )?;
        for e in &self.engine_aggregate {
            writeln!(f, "{:<36} {:>10.1}", format!("engine, {} concurrent", e.concurrency), e.tok_s)?;
        }
        if let Some(first) = self.contexts.first() {
            let batched = format!("decode ×{}", first.batch);
            writeln!(f, "{:<10} {:>12} {:>12} {:>12}", "context", "prefill", "decode", batched)?;
            for c in &self.contexts {
                writeln!(
                    f,
                    "{:<10} {:>12.1} {:>12.1} {:>12.1}",
                    c.context, c.prefill_tok_s, c.decode_tok_s, c.batched_decode_tok_s
                )?;
            }
        }
        if let Some(s) = &self.structured {
            for (p, c) in s.plain.iter().zip(&s.constrained) {
                writeln!(
                    f,
                    "{:<36} {:>10.1} (plain {:.1}, {:.0}%)",
                    format!("JSON schema, {} concurrent", c.concurrency),
                    c.tok_s,
                    p.tok_s,
                    100.0 * c.tok_s / p.tok_s
                )?;
            }
            for (name, ms) in &s.compile_ms {
                writeln!(f, "{:<36} {:>10.2} ms", format!("compile `{name}`"), ms)?;
            }
        }
        if let Some(s) = &self.speculative {
            speculative::write_table(f, s)?;
        }
        writeln!(f, "peak RSS: {:.1} MiB", self.peak_rss_bytes as f64 / (1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  999 kB\nVmHWM:\t   2048 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB"), None);
        assert_eq!(parse_vm_hwm("VmHWM: lots kB"), None);
    }

    #[test]
    fn peak_rss_is_positive_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes() > 0);
        }
    }
}
