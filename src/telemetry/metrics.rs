//! The Prometheus registry and every series Starling exports.
//!
//! One [`Metrics`] exists per server. Each engine resolves its label handles once into a
//! [`ModelMetrics`], so per-token and per-tick observations are plain atomic updates.

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::error::ErrorKind;

/// Buckets for request latencies on a CPU (queue, first token, end to end), in seconds.
const REQUEST_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0];
/// Buckets for the gap between two tokens of one stream, in seconds.
const TOKEN_BUCKETS: &[f64] = &[0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5];
/// Buckets for one tick or one stage, in seconds.
const TICK_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
const GRAMMAR_BYTE_BUCKETS: &[f64] = &[64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0];
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const BATCH_TOKEN_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

/// The `reason` values of `starling_admission_rejections_total` (anything else is `other`).
const REJECTION_REASONS: &[&str] =
    &["queue_full", "too_many_sessions", "session_busy", "draining", "engine_stopped", "other"];

/// Why the metrics registry could not be built (a duplicate or malformed series: a bug).
#[derive(Debug, thiserror::Error)]
#[error("metrics registry: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every series, registered in one registry. Shared as an `Arc` by the gateway and engines.
pub struct Metrics {
    registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) errors: IntCounterVec,
    pub(crate) ttft: HistogramVec,
    pub(crate) itl: HistogramVec,
    pub(crate) e2e: HistogramVec,
    pub(crate) queue_time: HistogramVec,
    pub(crate) prompt_tokens: IntCounterVec,
    pub(crate) generation_tokens: IntCounterVec,
    pub(crate) cached_tokens: IntCounterVec,
    pub(crate) tokens_per_second: GaugeVec,
    pub(crate) queue_depth: IntGaugeVec,
    pub(crate) running: IntGaugeVec,
    pub(crate) batch_size: HistogramVec,
    pub(crate) batch_tokens: HistogramVec,
    pub(crate) tick: HistogramVec,
    pub(crate) stage: HistogramVec,
    pub(crate) kv_bytes: IntGaugeVec,
    pub(crate) kv_usage: GaugeVec,
    pub(crate) kv_evictions: IntCounterVec,
    pub(crate) prefix_hits: IntCounterVec,
    pub(crate) prefix_queries: IntCounterVec,
    pub(crate) rejections: IntCounterVec,
    pub(crate) preemptions: IntCounterVec,
    pub(crate) spec_drafted: IntCounterVec,
    pub(crate) spec_accepted: IntCounterVec,
    pub(crate) spec_wasted: IntCounterVec,
    pub(crate) model_loaded: IntGaugeVec,
    pub(crate) grammar_compile: HistogramVec,
    pub(crate) grammar_bytes: HistogramVec,
    pub(crate) grammar_cache: IntCounterVec,
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn int_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// Registers every series; `starling_build_info{version}` is set to 1.
    pub fn new() -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let m = Metrics {
            requests: counter(
                &r,
                "starling_requests_total",
                "Finished generation requests.",
                &["model", "tenant", "status", "finish_reason"],
            )?,
            errors: counter(
                &r,
                "starling_request_errors_total",
                "Requests answered with an error, by type.",
                &["type"],
            )?,
            ttft: histogram(
                &r,
                "starling_time_to_first_token_seconds",
                "Arrival to first token.",
                REQUEST_BUCKETS,
                &["model"],
            )?,
            itl: histogram(
                &r,
                "starling_inter_token_latency_seconds",
                "Gap between tokens of one stream.",
                TOKEN_BUCKETS,
                &["model"],
            )?,
            e2e: histogram(
                &r,
                "starling_e2e_request_latency_seconds",
                "Arrival to last event.",
                REQUEST_BUCKETS,
                &["model"],
            )?,
            queue_time: histogram(
                &r,
                "starling_queue_time_seconds",
                "Arrival to admission.",
                REQUEST_BUCKETS,
                &["model"],
            )?,
            prompt_tokens: counter(
                &r,
                "starling_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &["model", "tenant"],
            )?,
            generation_tokens: counter(
                &r,
                "starling_generation_tokens_total",
                "Generated tokens of finished requests.",
                &["model", "tenant"],
            )?,
            cached_tokens: counter(
                &r,
                "starling_prompt_tokens_cached_total",
                "Prompt tokens served from the KV cache.",
                &["model", "tenant"],
            )?,
            tokens_per_second: gauge(
                &r,
                "starling_generation_tokens_per_second",
                "Tokens sampled per second (5 s window).",
                &["model"],
            )?,
            queue_depth: int_gauge(&r, "starling_queue_depth", "Requests waiting to start.", &["model"])?,
            running: int_gauge(&r, "starling_running_sequences", "Sequences in prefill or decode.", &["model"])?,
            batch_size: histogram(
                &r,
                "starling_batch_size",
                "Sequences per forward pass.",
                BATCH_SIZE_BUCKETS,
                &["model"],
            )?,
            batch_tokens: histogram(
                &r,
                "starling_batch_tokens",
                "Tokens per forward pass.",
                BATCH_TOKEN_BUCKETS,
                &["model"],
            )?,
            tick: histogram(&r, "starling_tick_duration_seconds", "One engine tick.", TICK_BUCKETS, &["model"])?,
            stage: histogram(
                &r,
                "starling_stage_duration_seconds",
                "One pipeline stage.",
                TICK_BUCKETS,
                &["model", "stage"],
            )?,
            kv_bytes: int_gauge(
                &r,
                "starling_kv_cache_bytes",
                "KV cache bytes by state (used, free).",
                &["model", "state"],
            )?,
            kv_usage: gauge(&r, "starling_kv_cache_usage_ratio", "Used share of the KV cache blocks.", &["model"])?,
            kv_evictions: counter(
                &r,
                "starling_kv_evictions_total",
                "Cached sessions freed, by reason.",
                &["model", "reason"],
            )?,
            prefix_hits: counter(
                &r,
                "starling_prefix_cache_hits_total",
                "Requests that reused a cached prefix.",
                &["model"],
            )?,
            prefix_queries: counter(
                &r,
                "starling_prefix_cache_queries_total",
                "Requests that looked for a cached prefix.",
                &["model"],
            )?,
            rejections: counter(
                &r,
                "starling_admission_rejections_total",
                "Requests refused at admission.",
                &["model", "reason"],
            )?,
            preemptions: counter(
                &r,
                "starling_preemptions_total",
                "Running sequences whose KV blocks were taken for an older one (recomputed later).",
                &["model"],
            )?,
            spec_drafted: counter(
                &r,
                "starling_spec_draft_tokens_total",
                "Draft tokens run through the model by speculative decoding.",
                &["model"],
            )?,
            spec_accepted: counter(
                &r,
                "starling_spec_accepted_tokens_total",
                "Draft tokens equal to the token sampled at their position (kept: a forward step saved each).",
                &["model"],
            )?,
            spec_wasted: counter(
                &r,
                "starling_spec_wasted_tokens_total",
                "Draft tokens computed and thrown away (rejected, or after a rejected one).",
                &["model"],
            )?,
            model_loaded: int_gauge(&r, "starling_model_loaded", "1 while the model is loaded.", &["model"])?,
            grammar_compile: histogram(
                &r,
                "starling_grammar_compile_seconds",
                "Compiling a request's JSON schema, regex or grammar (cache misses only).",
                TICK_BUCKETS,
                &["model", "kind"],
            )?,
            grammar_bytes: histogram(
                &r,
                "starling_grammar_bytes",
                "Size of the JSON schemas, regexes and grammars requests sent.",
                GRAMMAR_BYTE_BUCKETS,
                &["model", "kind"],
            )?,
            grammar_cache: counter(
                &r,
                "starling_grammar_cache_total",
                "Grammar look-ups in the compiled-grammar cache, by result (hit, miss).",
                &["model", "result"],
            )?,
            registry: r,
        };
        let info = int_gauge(&m.registry, "starling_build_info", "Build information.", &["version"])?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(m)
    }

    /// Everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.render_with(&[], false)
    }

    /// [`render`](Self::render) plus `starling_kv_cache_info` for the models in `kv`, and with
    /// `vllm_names` the series the Gateway API Inference Extension's endpoint picker reads,
    /// under vLLM's names and labels as well (see [`VLLM_NAMES`]).
    pub fn render_with(&self, kv: &[KvShape<'_>], vllm_names: bool) -> String {
        let mut families = self.registry.gather();
        families.push(kv_info(kv));
        if vllm_names {
            let aliases: Vec<MetricFamily> = families.iter().filter_map(vllm_alias).collect();
            families.extend(aliases);
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Counts a request answered with an error (by its classified type).
    pub fn record_error(&self, kind: ErrorKind) {
        self.errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// Records one grammar a request sent: its size, and its compile time on a cache miss.
    pub fn record_grammar(&self, model: &str, kind: &str, bytes: usize, compile_seconds: Option<f64>) {
        self.grammar_bytes.with_label_values(&[model, kind]).observe(bytes as f64);
        let result = if compile_seconds.is_some() { "miss" } else { "hit" };
        self.grammar_cache.with_label_values(&[model, result]).inc();
        if let Some(s) = compile_seconds {
            self.grammar_compile.with_label_values(&[model, kind]).observe(s);
        }
    }

    /// Counts a request refused at admission; `code` is the error's stable code.
    pub fn record_rejection(&self, model: &str, code: Option<&'static str>) {
        let reason = code.and_then(|c| REJECTION_REASONS.iter().find(|r| **r == c)).copied().unwrap_or("other");
        self.rejections.with_label_values(&[model, reason]).inc();
    }

    /// The handles one engine uses, resolved once for `model`.
    pub fn for_model(&self, model: &str) -> ModelMetrics {
        let m = [model];
        self.model_loaded.with_label_values(&m).set(1);
        // Known reasons start at zero so dashboards see the series before the first event.
        for reason in REJECTION_REASONS {
            self.rejections.with_label_values(&[model, reason]);
        }
        ModelMetrics {
            model: model.to_owned(),
            ttft: self.ttft.with_label_values(&m),
            itl: self.itl.with_label_values(&m),
            e2e: self.e2e.with_label_values(&m),
            queue_time: self.queue_time.with_label_values(&m),
            tokens_per_second: self.tokens_per_second.with_label_values(&m),
            queue_depth: self.queue_depth.with_label_values(&m),
            running: self.running.with_label_values(&m),
            batch_size: self.batch_size.with_label_values(&m),
            batch_tokens: self.batch_tokens.with_label_values(&m),
            tick: self.tick.with_label_values(&m),
            kv_used: self.kv_bytes.with_label_values(&[model, "used"]),
            kv_free: self.kv_bytes.with_label_values(&[model, "free"]),
            kv_usage: self.kv_usage.with_label_values(&m),
            kv_cached: self.kv_bytes.with_label_values(&[model, "cached"]),
            evicted_lru: self.kv_evictions.with_label_values(&[model, "lru"]),
            evicted_ttl: self.kv_evictions.with_label_values(&[model, "ttl"]),
            evicted_close: self.kv_evictions.with_label_values(&[model, "close"]),
            prefix_hits: self.prefix_hits.with_label_values(&m),
            prefix_queries: self.prefix_queries.with_label_values(&m),
            preemptions: self.preemptions.with_label_values(&m),
            spec_drafted: self.spec_drafted.with_label_values(&m),
            spec_accepted: self.spec_accepted.with_label_values(&m),
            spec_wasted: self.spec_wasted.with_label_values(&m),
            stage_vec: self.stage.clone(),
            requests_vec: self.requests.clone(),
            prompt_vec: self.prompt_tokens.clone(),
            generation_vec: self.generation_tokens.clone(),
            cached_vec: self.cached_tokens.clone(),
            tenant_labels: false,
        }
    }
}

/// One model's KV cache as the endpoint picker sees it: block size and block count.
#[derive(Clone, Copy, Debug)]
pub struct KvShape<'a> {
    pub model: &'a str,
    pub block_tokens: usize,
    pub blocks: usize,
}

/// A series' other name: (Starling's name, the alias, label renames as (ours, theirs)).
pub type Alias = (&'static str, &'static str, &'static [(&'static str, &'static str)]);

/// Starling's series that vLLM also exports, with vLLM's name and its label renames. The
/// endpoint picker of the Gateway API Inference Extension reads these names by default
/// (queue, running, KV use as a 0–1 fraction, and the cache shape as info labels).
pub const VLLM_NAMES: [Alias; 4] = [
    ("starling_queue_depth", "vllm:num_requests_waiting", &[("model", "model_name")]),
    ("starling_running_sequences", "vllm:num_requests_running", &[("model", "model_name")]),
    ("starling_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", &[("model", "model_name")]),
    (
        "starling_kv_cache_info",
        "vllm:cache_config_info",
        &[("model", "model_name"), ("block_tokens", "block_size"), ("blocks", "num_gpu_blocks")],
    ),
];

/// `starling_kv_cache_info{model, block_tokens, blocks} 1` for each model.
fn kv_info(kv: &[KvShape<'_>]) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name("starling_kv_cache_info".into());
    family.set_help("KV cache shape per model: tokens per block and blocks (always 1).".into());
    family.set_field_type(MetricType::GAUGE);
    for k in kv {
        let pair = |name: &str, value: String| {
            let mut l = LabelPair::default();
            l.set_name(name.into());
            l.set_value(value);
            l
        };
        let labels = vec![
            pair("block_tokens", k.block_tokens.to_string()),
            pair("blocks", k.blocks.to_string()),
            pair("model", k.model.to_owned()),
        ];
        let mut gauge = prometheus::proto::Gauge::default();
        gauge.set_value(1.0);
        let mut metric = Metric::from_gauge(gauge);
        metric.set_label(labels);
        family.mut_metric().push(metric);
    }
    family
}

/// `family` under vLLM's name and labels, if vLLM exports it.
fn vllm_alias(family: &MetricFamily) -> Option<MetricFamily> {
    let (_, name, renames) = VLLM_NAMES.iter().find(|(ours, _, _)| *ours == family.name())?;
    let mut alias = family.clone();
    alias.set_name((*name).into());
    alias.set_help(format!("{} (vLLM's name for {})", family.help(), family.name()));
    for metric in alias.mut_metric() {
        let mut labels = metric.take_label();
        for label in &mut labels {
            if let Some((_, to)) = renames.iter().find(|(from, _)| *from == label.name()) {
                label.set_name((*to).into());
            }
        }
        labels.sort_by(|a, b| a.name().cmp(b.name()));
        metric.set_label(labels);
    }
    Some(alias)
}

/// One model's resolved handles (label values formatted once, at engine start).
pub struct ModelMetrics {
    pub model: String,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub tokens_per_second: Gauge,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub batch_size: Histogram,
    pub batch_tokens: Histogram,
    pub tick: Histogram,
    pub kv_used: IntGauge,
    pub kv_free: IntGauge,
    pub kv_usage: Gauge,
    pub kv_cached: IntGauge,
    pub evicted_lru: IntCounter,
    pub evicted_ttl: IntCounter,
    pub evicted_close: IntCounter,
    pub prefix_hits: IntCounter,
    pub prefix_queries: IntCounter,
    pub preemptions: IntCounter,
    pub spec_drafted: IntCounter,
    pub spec_accepted: IntCounter,
    pub spec_wasted: IntCounter,
    stage_vec: HistogramVec,
    requests_vec: IntCounterVec,
    prompt_vec: IntCounterVec,
    generation_vec: IntCounterVec,
    cached_vec: IntCounterVec,
    /// Label series with tenant names (`telemetry.tenant_labels`); else `all`.
    pub tenant_labels: bool,
}

/// Token counts and outcome of one finished request.
pub struct RequestOutcome<'a> {
    pub tenant: &'a str,
    pub status: &'static str,
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub generated_tokens: usize,
}

impl ModelMetrics {
    /// The stage histogram for `stage` (resolve once per stage, then keep the handle).
    pub fn stage(&self, stage: &str) -> Histogram {
        self.stage_vec.with_label_values(&[self.model.as_str(), stage])
    }

    /// Counts a finished request (per request, never per token).
    pub fn record_outcome(&self, o: &RequestOutcome<'_>) {
        let (model, tenant) = (self.model.as_str(), if self.tenant_labels { o.tenant } else { "all" });
        self.requests_vec.with_label_values(&[model, tenant, o.status, o.finish_reason]).inc();
        self.prompt_vec.with_label_values(&[model, tenant]).inc_by(o.prompt_tokens as u64);
        self.generation_vec.with_label_values(&[model, tenant]).inc_by(o.generated_tokens as u64);
        self.cached_vec.with_label_values(&[model, tenant]).inc_by(o.cached_tokens as u64);
    }
}
