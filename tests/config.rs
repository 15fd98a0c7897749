//! Config loading and validation: defaults, every rejection (each error must name the
//! field path and the bound), formats, and overrides.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use starling::config::{Config, ConfigError, Format, KvDtype, LogFormat, Machine, Overrides, parse_api_keys};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A scratch dir with a stand-in model file and pipeline file, so validation tests do not
/// depend on the real model being fetched.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("starling-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.gguf"), b"GGUF").unwrap();
        std::fs::write(dir.join("pipeline.yaml"), b"stages: []\n").unwrap();
        dir
    })
}

fn scratch_path(name: &str) -> String {
    scratch().join(name).to_str().unwrap().to_owned()
}

/// A valid config whose files are in the scratch dir.
fn base() -> Value {
    json!({
        "models": [{
            "id": "m0",
            "path": scratch_path("model.gguf"),
            "pipeline": scratch_path("pipeline.yaml"),
        }]
    })
}

fn with(patch: impl FnOnce(&mut Value)) -> Result<Config, ConfigError> {
    let mut v = base();
    patch(&mut v);
    Config::from_str(&v.to_string(), Format::Json)
}

/// The error names `field` (as its field and in its message) and mentions `bound`.
fn assert_rejects(result: Result<Config, ConfigError>, field: &str, bound: &str) -> ConfigError {
    let err = result.expect_err("config should be rejected");
    let msg = err.to_string();
    assert_eq!(err.field(), Some(field), "{msg}");
    assert!(msg.contains(&format!("`{field}`")), "message should name `{field}`: {msg}");
    assert!(msg.contains(bound), "message should mention {bound:?}: {msg}");
    err
}

#[test]
fn default_file_loads_with_documented_defaults() {
    let c = Config::load(&repo("config/starling.yaml")).unwrap();
    assert_eq!(c.server.bind, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(c.server.max_body_bytes.get(), MIB as usize);
    assert_eq!(c.server.sse_keepalive, Duration::from_secs(15));
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(10));
    assert_eq!(c.server.public_routes, ["/health", "/healthz", "/readyz", "/metrics"]);
    assert!(c.auth.api_keys.is_empty() && c.auth.admin_key.is_none());
    assert_eq!(c.tenants.len(), 1);
    let anon = c.tenant("anonymous").unwrap();
    assert_eq!((anon.weight, anon.max_concurrent, anon.max_queued), (1, 16, 64));
    let m = &c.models[0];
    assert_eq!(m.id.as_str(), "smollm2-135m");
    assert_eq!(m.path, Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(m.pipeline, Path::new("pipelines/default.yaml"));
    assert_eq!(m.threads, std::thread::available_parallelism().unwrap());
    assert_eq!((m.max_batch.get(), m.max_batch_tokens.get(), m.max_sessions.get()), (32, 512, 256));
    assert_eq!(m.max_prompt_tokens, None);
    assert_eq!(m.kv_cache.max_bytes, 512 * MIB);
    assert_eq!(m.kv_cache.block_tokens.get(), 16);
    assert_eq!(m.kv_cache.dtype, KvDtype::F32);
    assert_eq!(m.kv_cache.session_ttl, Duration::from_secs(600));
    assert_eq!(m.kv_cache.spill, None);
    assert_eq!((c.queue.high_watermark, c.queue.low_watermark), (256, 192));
    assert_eq!(c.queue.high_watermark_tokens, 262_144);
    assert_eq!(c.queue.max_queue_delay, Duration::from_millis(2));
    assert_eq!(c.limits.default_timeout, Duration::from_secs(300));
    assert_eq!((c.limits.default_max_tokens, c.limits.max_tokens_cap), (256, 4096));
    assert_eq!((c.limits.max_stop_strings, c.limits.max_logprobs), (8, 20));
    assert_eq!(c.telemetry.log_format, LogFormat::Text);
    assert_eq!(c.telemetry.log_level, "info");
    assert_eq!((c.telemetry.trace_chrome.clone(), c.telemetry.log_prompts), (None, false));
    assert!(c.policy.input.is_empty() && c.policy.output.is_empty());
}

#[test]
fn empty_file_gives_the_same_config_as_the_default_file() {
    let from_file = Config::load(&repo("config/starling.yaml")).unwrap();
    assert_eq!(Config::from_str("{}", Format::Json).unwrap(), from_file);
    assert_eq!(Config::from_str("server: {}\n", Format::Yaml).unwrap(), from_file);
}

#[test]
fn missing_file_error_names_the_path() {
    let err = Config::load(Path::new("config/no-such-file.yaml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err.to_string().contains("config/no-such-file.yaml"), "{err}");
}

#[test]
fn unknown_yaml_field_names_its_path_line_and_column() {
    let yaml = format!(
        "models:\n  - path: {}\n    pipeline: {}\n    kv_cache:\n      max_bytez: 5\n",
        scratch_path("model.gguf"),
        scratch_path("pipeline.yaml"),
    );
    let err = Config::from_str(&yaml, Format::Yaml).unwrap_err();
    let ConfigError::Parse { field, line, column, message, .. } = &err else {
        panic!("expected a parse error, got {err}");
    };
    assert_eq!(field, "models[0].kv_cache.max_bytez");
    assert_eq!((*line, *column), (5, 7), "{err}");
    assert!(message.starts_with("unknown field `max_bytez`"), "{message}");
    assert!(err.to_string().contains("line 5, column 7"), "{err}");
}

#[test]
fn unknown_json_field_names_its_path_line_and_column() {
    let text = "{\n  \"queue\": {\n    \"hi_watermark\": 3\n  }\n}";
    let err = Config::from_str(text, Format::Json).unwrap_err();
    let ConfigError::Parse { field, line, message, .. } = &err else {
        panic!("expected a parse error, got {err}");
    };
    assert_eq!(field, "queue.hi_watermark");
    assert_eq!(*line, 3);
    assert!(message.contains("unknown field") && !message.contains("at line"), "{message}");
}

#[test]
fn wrong_type_names_the_field() {
    let err = with(|v| v["limits"] = json!({"max_logprobs": "lots"})).unwrap_err();
    assert_eq!(err.field(), Some("limits.max_logprobs"), "{err}");
    let err = Config::from_str("{\"queue\": 5}", Format::Json).unwrap_err();
    assert_eq!(err.field(), Some("queue"), "{err}");
    assert!(err.to_string().contains("expected a queue mapping"), "{err}");
    let err = Config::from_str("queue:\n  high_watermark: [1]\n", Format::Yaml).unwrap_err();
    assert_eq!(err.field(), Some("queue.high_watermark"), "{err}");
    assert!(err.to_string().contains("line 2, column 19"), "{err}");
}

#[test]
fn malformed_yaml_is_a_parse_error_at_the_root() {
    let err = Config::from_str("queue: : :\n", Format::Yaml).unwrap_err();
    let ConfigError::Parse { field, line, .. } = &err else { panic!("expected a parse error, got {err}") };
    assert_eq!((field.as_str(), *line), (".", 1), "{err}");
    let err = Config::from_str("- a\n- b\n", Format::Yaml).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
}

#[test]
fn zero_limits_are_rejected_with_their_bound() {
    assert_rejects(with(|v| v["queue"] = json!({"high_watermark": 0})), "queue.high_watermark", "at least 1");
    assert_rejects(with(|v| v["models"][0]["max_batch_tokens"] = json!(0)), "models[0].max_batch_tokens", "at least 1");
    assert_rejects(
        with(|v| v["models"][0]["kv_cache"] = json!({"max_bytes": 0})),
        "models[0].kv_cache.max_bytes",
        "at least 1 byte",
    );
    assert_rejects(
        with(|v| v["models"][0]["kv_cache"] = json!({"max_bytes": "0MiB"})),
        "models[0].kv_cache.max_bytes",
        "at least 1 byte",
    );
    assert_rejects(with(|v| v["server"] = json!({"sse_keepalive_secs": 0})), "server.sse_keepalive_secs", "at least 1");
    assert_rejects(with(|v| v["models"] = json!([])), "models", "at least 1 entry");
}

#[test]
fn negative_limits_are_rejected_with_their_bound() {
    let err = assert_rejects(with(|v| v["models"][0]["max_batch"] = json!(-4)), "models[0].max_batch", "at least 1");
    assert!(err.to_string().contains("got -4"), "{err}");
    assert_rejects(with(|v| v["limits"] = json!({"max_tokens_cap": -1})), "limits.max_tokens_cap", "in 1..=");
    assert_rejects(
        with(|v| v["models"][0]["kv_cache"] = json!({"max_bytes": -100})),
        "models[0].kv_cache.max_bytes",
        "at least 1 byte",
    );
}

#[test]
fn upper_bounds_are_enforced() {
    let tenants = json!([{"name": "anonymous", "weight": 1001}]);
    assert_rejects(with(|v| v["tenants"] = tenants), "tenants[0].weight", "in 1..=1000");
    assert_rejects(with(|v| v["models"][0]["threads"] = json!(5000)), "models[0].threads", "in 1..=1024");
}

/// A template worker needs room for its own code (64 MiB of address space at least), and a
/// render's time limit is bounded both ways; sizes take units.
#[test]
fn template_worker_limits_are_bounded() {
    let set = |field: &str, value: serde_json::Value| with(|v| v["server"] = json!({ field: value }));
    assert_rejects(set("template_memory_bytes", json!("32MiB")), "server.template_memory_bytes", "at least 64 MiB");
    assert_rejects(set("template_timeout_ms", json!(5)), "server.template_timeout_ms", "in 10..=600000");
    assert_rejects(set("template_timeout_ms", json!(600_001)), "server.template_timeout_ms", "in 10..=600000");
    let c = set("template_memory_bytes", json!("2GiB")).unwrap();
    assert_eq!(c.server.template_memory_bytes, 2 << 30);
    let defaults = with(|_| {}).unwrap();
    assert_eq!(defaults.server.template_memory_bytes, 1 << 30);
    assert_eq!(defaults.server.template_timeout, std::time::Duration::from_secs(5));
}

#[test]
fn low_watermark_above_high_is_rejected() {
    let err = assert_rejects(
        with(|v| v["queue"] = json!({"high_watermark": 100, "low_watermark": 150})),
        "queue.low_watermark",
        "`queue.high_watermark` (100)",
    );
    assert!(err.to_string().contains("(150)"), "{err}");
    let equal = with(|v| v["queue"] = json!({"high_watermark": 100, "low_watermark": 100}));
    assert_eq!(equal.unwrap().queue.low_watermark, 100);
}

#[test]
fn other_orderings_are_rejected() {
    assert_rejects(
        with(|v| v["models"][0]["max_batch"] = json!(1024)),
        "models[0].max_batch",
        "`models[0].max_batch_tokens` (512)",
    );
    assert_rejects(
        with(|v| v["limits"] = json!({"default_max_tokens": 5000})),
        "limits.default_max_tokens",
        "`limits.max_tokens_cap` (4096)",
    );
}

#[test]
fn kv_cap_larger_than_machine_memory_is_rejected() {
    let machine = Machine::detect();
    let total = machine.mem_total.expect("this test runs on Linux with /proc/meminfo");
    let err = assert_rejects(
        with(|v| v["models"][0]["kv_cache"] = json!({"max_bytes": "1TiB"})),
        "models[0].kv_cache.max_bytes",
        &total.to_string(),
    );
    assert!(err.to_string().contains("memory"), "{err}");
}

#[test]
fn sum_of_kv_caps_must_fit_in_memory() {
    let small = Machine { mem_total: Some(GIB), parallelism: NonZeroUsize::new(2).unwrap(), open_files: Some(1024) };
    let mut v = base();
    let mut second = v["models"][0].clone();
    second["id"] = json!("m1");
    v["models"][0]["kv_cache"] = json!({"max_bytes": "600MiB"});
    second["kv_cache"] = json!({"max_bytes": "600MiB"});
    v["models"].as_array_mut().unwrap().push(second);
    let text = v.to_string();
    let result = Config::from_str_on(&text, Format::Json, &small);
    let err = result.expect_err("two 600 MiB caps exceed 1 GiB");
    assert!(matches!(err, ConfigError::ExceedsMemory { bytes, .. } if bytes == 1200 * MIB), "{err}");
    assert!(err.to_string().contains("models[*].kv_cache.max_bytes"), "{err}");
    assert!(err.to_string().contains(&GIB.to_string()), "{err}");
    let unknown = Machine { mem_total: None, ..small };
    assert!(Config::from_str_on(&text, Format::Json, &unknown).is_ok(), "no MemTotal: check skipped");
}

#[test]
fn max_prompt_longer_than_model_context_is_rejected() {
    let c = with(|v| v["models"][0]["max_prompt_tokens"] = json!(9000)).unwrap();
    let err = c.check_against_model(0, 8192).unwrap_err();
    assert!(matches!(err, ConfigError::ExceedsContext { .. }));
    assert_eq!(err.field(), Some("models[0].max_prompt_tokens"));
    let msg = err.to_string();
    assert!(msg.contains("`models[0].max_prompt_tokens`") && msg.contains("8192"), "{msg}");
    assert!(c.check_against_model(0, 9000).is_ok());
    let unset = with(|_| {}).unwrap();
    assert!(unset.check_against_model(0, 16).is_ok(), "unset = the model's context");
    let err = c.check_against_model(3, 8192).unwrap_err();
    assert!(matches!(err, ConfigError::NoSuchModel { index: 3, count: 1 }), "{err}");
}

#[test]
fn missing_pipeline_file_is_rejected() {
    let missing = scratch_path("no-pipeline.yaml");
    let err =
        assert_rejects(with(|v| v["models"][0]["pipeline"] = json!(missing)), "models[0].pipeline", "does not exist");
    assert!(err.to_string().contains(&missing), "{err}");
}

#[test]
fn missing_model_file_suggests_the_fetch_script() {
    assert_rejects(
        with(|v| v["models"][0]["path"] = json!(scratch_path("absent.gguf"))),
        "models[0].path",
        "scripts/fetch-model.sh",
    );
}

#[test]
fn duplicate_model_ids_and_tenant_names_are_rejected() {
    let err = assert_rejects(
        with(|v| {
            let again = v["models"][0].clone();
            v["models"].as_array_mut().unwrap().push(again);
        }),
        "models[1].id",
        "duplicate model id",
    );
    assert!(err.to_string().contains("\"m0\""), "{err}");
    assert_rejects(
        with(|v| v["tenants"] = json!([{"name": "a"}, {"name": "b"}, {"name": "a"}])),
        "tenants[2].name",
        "duplicate tenant name",
    );
}

#[test]
fn duplicate_api_keys_are_rejected_without_echoing_the_key() {
    let keys = json!([{"key": "sekrit"}, {"key": "sekrit"}]);
    let err =
        assert_rejects(with(|v| v["auth"] = json!({"api_keys": keys})), "auth.api_keys[1].key", "auth.api_keys[0]");
    assert!(!err.to_string().contains("sekrit"), "{err}");
}

#[test]
fn api_key_tenants_must_be_listed_or_the_keys_own() {
    let keys = json!([{"key": "k1", "tenant": "team-a"}]);
    assert_rejects(with(|v| v["auth"] = json!({"api_keys": keys})), "auth.api_keys[0].tenant", "team-a");
    let c = with(|v| {
        v["auth"] = json!({"api_keys": [{"key": "k1", "tenant": "team-a"}, {"key": "k2"}]});
        v["tenants"] = json!([{"name": "team-a", "weight": 3}]);
    })
    .unwrap();
    assert_eq!(c.auth.api_keys[0].tenant.as_str(), "team-a");
    assert_eq!(c.auth.api_keys[1].tenant, starling::config::key_tenant("k2"), "a key without a tenant is its own");
    assert!(c.auth.api_keys[1].tenant.as_str().starts_with("key-"));
    assert_eq!(c.tenant(starling::config::key_tenant("k2").as_str()).unwrap().max_concurrent, 16, "with defaults");
    assert_eq!(c.tenant("team-a").unwrap().weight, 3);
    assert_eq!(c.tenant("anonymous").unwrap().weight, 1, "anonymous added with defaults");
}

#[test]
fn policy_rules_are_checked() {
    let rule = json!({"output": [{"regexes": ["ok", "(unclosed"]}]});
    assert_rejects(with(|v| v["policy"] = rule), "policy.output[0].regexes[1]", "a valid regex");
    let rule = json!({"input": [{"tenants": ["ghost"], "phrases": ["x"]}]});
    assert_rejects(with(|v| v["policy"] = rule), "policy.input[0].tenants[0]", "ghost");
    let rule = json!({"input": [{"phrases": ["fine", " "]}]});
    assert_rejects(with(|v| v["policy"] = rule), "policy.input[0].phrases[1]", "non-empty");
    let rule = json!({"input": [{"tenants": ["anonymous"], "phrases": ["secret plan"], "regexes": ["\\d{16}"]}]});
    let c = with(|v| v["policy"] = rule).unwrap();
    assert_eq!(c.policy.input[0].phrases, ["secret plan"]);
    assert_eq!(c.policy.input[0].tenants.as_ref().unwrap()[0].as_str(), "anonymous");
}

#[test]
fn enum_and_text_values_are_checked() {
    let dtype = json!({"dtype": "bf16"});
    assert_rejects(
        with(|v| v["models"][0]["kv_cache"] = dtype),
        "models[0].kv_cache.dtype",
        "\"f32\", \"f16\", \"q8_0\"",
    );
    let q8 = with(|v| v["models"][0]["kv_cache"] = json!({"dtype": "q8_0"})).unwrap();
    assert_eq!(q8.models[0].kv_cache.dtype, KvDtype::Q8_0);
    assert_rejects(with(|v| v["telemetry"] = json!({"log_format": "xml"})), "telemetry.log_format", "\"json\"");
    assert_rejects(with(|v| v["telemetry"] = json!({"log_level": "info,,=["})), "telemetry.log_level", "log filter");
    assert_rejects(with(|v| v["server"] = json!({"bind": "localhost"})), "server.bind", "HOST:PORT");
    let routes = json!({"public_routes": ["/healthz", "metrics"]});
    assert_rejects(with(|v| v["server"] = routes), "server.public_routes[1]", "starting with '/'");
    let bytes = json!({"max_bytes": "12XB"});
    assert_rejects(with(|v| v["models"][0]["kv_cache"] = bytes), "models[0].kv_cache.max_bytes", "MiB");
    let trace = json!({"trace_chrome": scratch_path("no-dir/trace.json")});
    assert_rejects(with(|v| v["telemetry"] = trace), "telemetry.trace_chrome", "does not exist");
}

#[test]
fn units_and_optional_sections_are_applied() {
    let c = with(|v| {
        v["models"][0]["kv_cache"] = json!({
            "max_bytes": "2GB", "dtype": "f16", "session_ttl_secs": 30, "block_tokens": 32,
            "spill": {"dir": "/tmp/spill", "max_bytes": 4096}
        });
        v["queue"] = json!({"max_queue_delay_ms": 0});
        v["server"] = json!({"shutdown_grace_secs": 0, "max_body_bytes": 2048});
        v["telemetry"] = json!({"log_format": "json", "trace_chrome": scratch_path("t.json")});
    })
    .unwrap();
    let kv = &c.models[0].kv_cache;
    assert_eq!((kv.max_bytes, kv.dtype, kv.block_tokens.get()), (2_000_000_000, KvDtype::F16, 32));
    assert_eq!(kv.session_ttl, Duration::from_secs(30));
    let spill = kv.spill.as_ref().unwrap();
    assert_eq!((spill.dir.as_path(), spill.max_bytes), (Path::new("/tmp/spill"), 4096));
    assert_eq!(c.queue.max_queue_delay, Duration::ZERO);
    assert_eq!(c.server.shutdown_grace, Duration::ZERO);
    assert_eq!(c.server.max_body_bytes.get(), 2048);
    assert_eq!(c.telemetry.log_format, LogFormat::Json);
}

#[test]
fn format_is_detected_by_extension_or_leading_brace() {
    assert_eq!(Format::detect(Some(Path::new("a/b.json")), "x: 1"), Format::Json);
    assert_eq!(Format::detect(Some(Path::new("a/b.yaml")), "  {\"a\":1}"), Format::Json);
    assert_eq!(Format::detect(Some(Path::new("a/b.yaml")), "server: {}"), Format::Yaml);
    assert_eq!(Format::detect(None, "# comment\nserver: {}"), Format::Yaml);
}

#[test]
fn json_file_loads() {
    let path = scratch().join("starling.json");
    std::fs::write(&path, with_text(|v| v["queue"] = json!({"high_watermark": 9, "low_watermark": 3}))).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!((c.queue.high_watermark, c.queue.low_watermark), (9, 3));
}

fn with_text(patch: impl FnOnce(&mut Value)) -> String {
    let mut v = base();
    patch(&mut v);
    serde_json::to_string_pretty(&v).unwrap()
}

#[test]
fn overrides_come_from_the_environment_and_cli_wins() {
    let env = Overrides::from_lookup(|name| match name {
        "STARLING_BIND" => Some("0.0.0.0:9000".into()),
        "STARLING_API_KEYS" => Some("k1,k2:team".into()),
        "STARLING_ADMIN_KEY" => Some(String::new()),
        _ => None,
    });
    assert_eq!(env.bind.as_deref(), Some("0.0.0.0:9000"));
    assert_eq!(env.api_keys.as_deref(), Some("k1,k2:team"));
    assert_eq!(env.admin_key, None, "empty variables count as unset");
    let cli = Overrides { bind: Some("127.0.0.1:1".into()), model: Some("m.gguf".into()), ..Default::default() };
    let merged = cli.or(env);
    assert_eq!(merged.bind.as_deref(), Some("127.0.0.1:1"));
    assert_eq!(merged.model, Some(PathBuf::from("m.gguf")));
    assert_eq!(merged.api_keys.as_deref(), Some("k1,k2:team"));
}

#[test]
fn api_key_list_parses_keys_and_tenants() {
    let keys = parse_api_keys(" k1 , k2:team-a ,, ").unwrap();
    let pairs: Vec<_> = keys.iter().map(|k| (k.key.as_str(), k.tenant.as_str())).collect();
    let own = starling::config::key_tenant("k1");
    assert_eq!(pairs, [("k1", own.as_str()), ("k2", "team-a")]);
    let err = parse_api_keys("k1,:team").unwrap_err();
    assert_eq!(err.field(), Some("auth.api_keys[1].key"), "{err}");
    let err = parse_api_keys("k1:bad tenant").unwrap_err();
    assert_eq!(err.field(), Some("auth.api_keys[0].tenant"), "{err}");
}

#[test]
fn apply_overrides_replaces_fields_and_revalidates() {
    let mut c = with(|v| v["tenants"] = json!([{"name": "team"}])).unwrap();
    let o = Overrides {
        bind: Some("0.0.0.0:9000".into()),
        model: Some(PathBuf::from(scratch_path("pipeline.yaml"))),
        api_keys: Some("k1,k2:team".into()),
        admin_key: Some("root".into()),
    };
    c.apply_overrides(&o).unwrap();
    assert_eq!(c.server.bind, "0.0.0.0:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(c.models[0].path, PathBuf::from(scratch_path("pipeline.yaml")));
    assert_eq!(c.auth.api_keys.len(), 2);
    assert_eq!(c.auth.admin_key.as_deref(), Some("root"));

    let before = c.clone();
    let bad_bind = Overrides { bind: Some("nowhere".into()), ..Default::default() };
    assert_rejects(c.apply_overrides(&bad_bind).map(|_| c.clone()), "server.bind", "HOST:PORT");
    let no_model = Overrides { model: Some(scratch().join("absent.gguf")), ..Default::default() };
    assert_rejects(c.apply_overrides(&no_model).map(|_| c.clone()), "models[0].path", "fetch-model.sh");
    assert_eq!(c, before, "a rejected override leaves the config unchanged");
    // A tenant named only in STARLING_API_KEYS is created with the default limits.
    let ghost = Overrides { api_keys: Some("k3:ghost".into()), ..Default::default() };
    c.apply_overrides(&ghost).unwrap();
    assert_eq!(c.tenant("ghost").unwrap().max_queued, 64);
}

#[test]
fn model_override_rescues_a_missing_model_file() {
    let path = scratch().join("missing-model.yaml");
    let yaml = format!("models:\n  - path: /nonexistent/x.gguf\n    pipeline: {}\n", scratch_path("pipeline.yaml"));
    std::fs::write(&path, yaml).unwrap();
    assert!(Config::load(&path).is_err());
    let o = Overrides { model: Some(scratch().join("model.gguf")), ..Default::default() };
    let c = Config::load_with_overrides(&path, &o).unwrap();
    assert_eq!(c.models[0].path, scratch().join("model.gguf"));
}

#[test]
fn registry_allowed_hosts_take_hosts_with_optional_ports() {
    assert_eq!(with(|_| {}).unwrap().registry.allowed_hosts, None, "unset = any host");
    let c = with(|v| v["registry"] = json!({"allowed_hosts": ["Models.Example.org", "10.0.0.5:8080", "[::1]:81"]}))
        .unwrap();
    let got: Vec<(String, Option<u16>)> =
        c.registry.allowed_hosts.unwrap().into_iter().map(|a| (a.host, a.port)).collect();
    let want = [("models.example.org", None), ("10.0.0.5", Some(8080)), ("::1", Some(81))];
    assert_eq!(got, want.map(|(h, p)| (h.to_owned(), p)));
    for bad in ["", "host:0", "host:99999", "http://host", "user@host", "[::1", "host:port"] {
        let r = with(|v| v["registry"] = json!({"allowed_hosts": ["ok.example", bad]}));
        assert_rejects(r, "registry.allowed_hosts[1]", "optionally with :PORT");
    }
}

#[test]
fn registry_pipeline_dirs_default_to_the_pipelines_directory() {
    assert_eq!(with(|_| {}).unwrap().registry.pipeline_dirs, [PathBuf::from("pipelines")]);
    let r = with(|v| v["registry"] = json!({"pipeline_dirs": ["pipelines", " "]}));
    assert_rejects(r, "registry.pipeline_dirs[1]", "a non-empty path");
}

#[test]
fn registry_download_timeout_is_bounded() {
    assert_eq!(with(|_| {}).unwrap().registry.download_timeout, Duration::from_secs(3600));
    let c = with(|v| v["registry"] = json!({"download_timeout_secs": 60})).unwrap();
    assert_eq!(c.registry.download_timeout, Duration::from_secs(60));
    for bad in [0, 604_801] {
        let r = with(|v| v["registry"] = json!({"download_timeout_secs": bad}));
        assert_rejects(r, "registry.download_timeout_secs", "604800");
    }
}

#[test]
fn debug_output_redacts_keys() {
    let c = with(|v| v["auth"] = json!({"api_keys": [{"key": "sk-live-123"}], "admin_key": "adm-456"})).unwrap();
    let shown = format!("{c:?}");
    assert!(!shown.contains("sk-live-123") && !shown.contains("adm-456"), "{shown}");
    assert!(shown.contains("<redacted>"));
}

#[test]
fn every_field_in_the_default_file_has_a_comment() {
    let text = std::fs::read_to_string(repo("config/starling.yaml")).unwrap();
    let leaf = regex::Regex::new(r"^\s*(- )?[a-z_]+: \S").unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate().filter(|(_, l)| leaf.is_match(l)) {
        let above = lines[i - 1].trim_start().trim_start_matches("- ");
        assert!(above.starts_with('#'), "line {}: {line:?} has no comment above it", i + 1);
    }
}

#[test]
fn commented_out_examples_in_the_default_file_are_valid() {
    let text = std::fs::read_to_string(repo("config/starling.yaml")).unwrap();
    let example = regex::Regex::new(r"(?m)^(\s{2,})# (\s*[a-z_]+:.*)$").unwrap();
    let uncommented = example.replace_all(&text, "$1$2");
    let c = Config::from_str(&uncommented, Format::Yaml).unwrap();
    assert_eq!(c.auth.admin_key.as_deref(), Some("change-me"));
    assert_eq!(c.tenants[0].requests_per_minute, Some(600));
    assert_eq!(c.models[0].threads.get(), 2);
    assert_eq!(c.models[0].max_prompt_tokens.map(NonZeroUsize::get), Some(2048));
    assert_eq!(c.models[0].kv_cache.spill.as_ref().unwrap().max_bytes, 4 * GIB);
    assert_eq!(c.models[0].speculative.map(|s| (s.max_draft, s.min_match)), Some((8, 2)));
    assert_eq!(c.telemetry.trace_chrome, Some(PathBuf::from("traces/starling.json")));
}

#[test]
fn speculative_decoding_is_off_unless_configured_and_checked_when_it_is() {
    let c = with(|_| {}).unwrap();
    assert_eq!(c.models[0].speculative, None);
    let c = with(|v| v["models"][0]["speculative"] = json!({})).unwrap();
    let s = c.models[0].speculative.expect("on");
    assert_eq!((s.method, s.max_draft, s.min_match), (starling::config::SpeculativeMethod::Ngram, 8, 2));
    let c =
        with(|v| v["models"][0]["speculative"] = json!({"method": "ngram", "max_draft": 4, "min_match": 3})).unwrap();
    let s = c.models[0].speculative.expect("on");
    assert_eq!((s.max_draft, s.min_match), (4, 3));
    assert_rejects(
        with(|v| v["models"][0]["speculative"] = json!({"method": "eagle"})),
        "models[0].speculative.method",
        "\"ngram\"",
    );
    assert_rejects(
        with(|v| v["models"][0]["speculative"] = json!({"max_draft": 0})),
        "models[0].speculative.max_draft",
        "in 1..=64",
    );
    assert_rejects(
        with(|v| v["models"][0]["speculative"] = json!({"min_match": 0})),
        "models[0].speculative.min_match",
        "in 1..=16",
    );
    let err = with(|v| v["models"][0]["speculative"] = json!({"max_drafts": 4})).unwrap_err();
    assert!(err.to_string().contains("max_drafts"), "{err}");
}
