//! Structured output: JSON schemas, regexes, Lark grammars and choices constrain what the
//! real default model writes (`constrain` stage, llguidance), through the OpenAI and native
//! routes; bad grammars are refused before queueing; constrained decoding keeps batch
//! invariance; the official `openai` client parses into a pydantic model.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::support::{TestServer, metric_value, post_json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/structured").join(name)
}

/// The test venv's Python (scripts/test-deps.sh makes it; `make test` runs that first).
fn venv_python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
    assert!(python.exists(), "no target/test-venv: run scripts/test-deps.sh (make test does)");
    python
}

/// Validates `(id, schema, text)` cases with Python's `jsonschema`; returns the failures.
fn invalid(cases: &[(String, Value, String)]) -> Vec<Value> {
    let input: Vec<Value> =
        cases.iter().map(|(id, schema, text)| json!({"id": id, "schema": schema, "text": text})).collect();
    let mut child = Command::new(venv_python())
        .arg(fixture("validate.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(Value::from(input).to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "validate.py failed");
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results.len(), cases.len());
    results.into_iter().filter(|r| r["ok"] != true).collect()
}

/// Runs a Python client script of tests/fixtures/structured/ from the test venv against
/// `server` (its base URL and the model id as arguments); returns what it printed (JSON).
pub(crate) fn run_client_script(script: &str, server: &TestServer) -> Value {
    let out = Command::new(venv_python())
        .arg(fixture(script))
        .arg(format!("http://{}/v1", server.addr))
        .arg("smollm2-135m")
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn chat_with_schema(addr: std::net::SocketAddr, prompt: &str, schema: &Value, temperature: f64, seed: u64) -> Value {
    let body = json!({
        "messages": [{"role": "user", "content": prompt}],
        "temperature": temperature, "seed": seed, "max_tokens": 256,
        "response_format": {"type": "json_schema", "json_schema": {"name": "case", "schema": schema, "strict": true}},
    });
    let r = post_json(addr, "/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Twenty schemas of increasing difficulty, greedy and at temperature 1.0 with three
/// seeds: every output ends with `stop` within 256 tokens, parses and validates (with
/// Python's `jsonschema`, formats checked).
#[test]
fn every_output_follows_its_json_schema() {
    let server = TestServer::start(|_| {});
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(fixture("schemas.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 20);
    let runs: Vec<(usize, f64, u64)> =
        (0..cases.len()).flat_map(|i| [(i, 0.0, 0), (i, 1.0, 1), (i, 1.0, 2), (i, 1.0, 3)]).collect();
    let outputs: Vec<(String, Value, Value)> = std::thread::scope(|s| {
        let workers: Vec<_> = runs
            .chunks(runs.len().div_ceil(8))
            .map(|chunk| {
                let cases = &cases;
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|&(i, t, seed)| {
                            let c = &cases[i];
                            let id = format!("{} t={t} seed={seed}", c["name"].as_str().unwrap());
                            let out =
                                chat_with_schema(server.addr, c["prompt"].as_str().unwrap(), &c["schema"], t, seed);
                            (id, c["schema"].clone(), out)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    });
    let mut finished = vec![];
    let mut cut = vec![];
    for (id, schema, out) in &outputs {
        let choice = &out["choices"][0];
        let text = choice["message"]["content"].as_str().unwrap().to_owned();
        match choice["finish_reason"].as_str().unwrap() {
            "stop" => finished.push((id.clone(), schema.clone(), text)),
            "length" => {
                assert_eq!(out["usage"]["completion_tokens"], 256, "{id}: `length` only at max_tokens");
                cut.push(id.clone());
            }
            other => panic!("{id}: finish_reason {other}"),
        }
    }
    let failures = invalid(&finished);
    assert!(failures.is_empty(), "outputs that do not validate: {failures:#?}");
    assert!(cut.is_empty(), "outputs that ran to max_tokens: {cut:?}");
    assert_eq!(finished.len(), 80);
}

/// A schema or grammar that cannot compile is a 400 naming the field and the problem,
/// answered before the request reaches the engine (nothing is queued or counted).
#[test]
fn bad_schemas_and_grammars_are_refused_before_queueing() {
    let server = TestServer::start(|_| {});
    let addr = server.addr;
    let refused = |path: &str, body: Value| {
        let r = post_json(addr, path, &body);
        assert_eq!(r.status, 400, "{}", r.text());
        r.json()["error"].clone()
    };
    let e = refused(
        "/v1/generate",
        json!({"prompt": "x", "json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}),
    );
    assert_eq!(e["param"], "json_schema");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("strin") && msg.contains("at /properties/a"), "names the keyword and the path: {msg}");
    let deep = json!({"type": "object", "properties": {"list": {"type": "array", "items": {"anyOf": [
        {"type": "integer"}, {"type": "object", "properties": {"x": {"type": "string", "dependentRequired": {}}}}]}}}});
    let e = refused("/v1/generate", json!({"prompt": "x", "json_schema": deep}));
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("at /properties/list/items/anyOf/1/properties/x") && msg.contains("dependentRequired"),
        "{msg}"
    );
    let e = refused("/v1/generate", json!({"prompt": "x", "grammar": "start: foo\nfoo: \"a\" bar"}));
    assert_eq!(e["param"], "grammar");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("bar") && msg.contains("2"), "names the unknown rule and its line: {msg}");
    let e = refused("/v1/generate", json!({"prompt": "x", "grammar": "root ::= \"yes\" | \"no\""}));
    assert!(e["message"].as_str().unwrap().contains("GBNF"), "{e}");
    let e = refused("/v1/generate", json!({"prompt": "x", "regex": "a", "choice": ["a"]}));
    assert!(e["message"].as_str().unwrap().contains("at most one"), "{e}");
    let e = refused("/v1/generate", json!({"prompt": "x", "regex": "(unclosed"}));
    assert_eq!(e["param"], "regex");
    let e = refused(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}),
    );
    assert_eq!(e["param"], "response_format");
    let e = refused(
        "/v1/completions",
        json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": "nope"}}}),
    );
    assert_eq!(e["param"], "response_format.json_schema.schema");
    // An internal failure of the grammar engine is a short 400, not its backtrace.
    let e = refused("/v1/generate", json!({"prompt": "x", "json_schema": {"type": "number", "multipleOf": 1e-10}}));
    let msg = e["message"].as_str().unwrap();
    assert!(msg.len() < 300 && !msg.contains("backtrace"), "{msg}");
    let huge = json!({"enum": (0..10_000).map(|i| format!("option number {i}")).collect::<Vec<_>>()});
    let e = refused("/v1/generate", json!({"prompt": "x", "json_schema": huge}));
    assert_eq!(e["code"], "grammar_too_large", "{e}");
    assert_eq!(metric_value(addr, "starling_requests_total"), None, "nothing reached an engine");
}

/// Native fields: `choice` returns one of the strings, `regex` output matches it, a Lark
/// grammar is followed; OpenAI `json_object` on `/v1/completions` returns an object.
#[test]
fn regex_choice_grammar_and_json_object_constrain_the_output() {
    let server = TestServer::start(|_| {});
    let generate = |extra: Value| {
        let mut body =
            json!({"prompt": "The capital of France is", "stream": false, "temperature": 0, "max_tokens": 40});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let r = post_json(server.addr, "/v1/generate", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let out = generate(json!({"choice": ["London", "Berlin", "Madrid"]}));
    assert!(["London", "Berlin", "Madrid"].contains(&out["text"].as_str().unwrap()), "{out}");
    assert_eq!(out["finish_reason"], "stop");
    let out = generate(json!({"regex": r"\(\d{3}\) \d{3}-\d{4}", "temperature": 1.0, "seed": 7}));
    let re = regex::Regex::new(r"^\(\d{3}\) \d{3}-\d{4}$").unwrap();
    assert!(re.is_match(out["text"].as_str().unwrap()), "{out}");
    let out =
        generate(json!({"grammar": "start: \"Answer: \" ANSWER\nANSWER: /(yes|no)/", "temperature": 1.0, "seed": 3}));
    assert!(["Answer: yes", "Answer: no"].contains(&out["text"].as_str().unwrap()), "{out}");
    let r = post_json(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "A JSON object describing a cat:", "max_tokens": 80, "temperature": 0,
                "response_format": {"type": "json_object"}}),
    );
    let text = r.json()["choices"][0]["text"].as_str().unwrap().to_owned();
    assert!(serde_json::from_str::<Value>(&text).unwrap().is_object(), "{text}");
}

/// `max_tokens` reached inside a constrained output ends with `length`; a grammar that
/// completes before `min_tokens` is a clear error, never a token the grammar forbids.
#[test]
fn constrained_outputs_end_honestly() {
    let server = TestServer::start(|_| {});
    let schema = json!({"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]});
    let r = post_json(
        server.addr,
        "/v1/generate",
        &json!({"prompt": "Tell a story as JSON:", "json_schema": schema, "max_tokens": 4, "stream": false}),
    );
    let out = r.json();
    assert_eq!(out["finish_reason"], "length", "{out}");
    assert_eq!(out["usage"]["completion_tokens"], 4);
    let r = post_json(
        server.addr,
        "/v1/generate",
        &json!({"prompt": "Capital of France?", "choice": ["Paris"], "min_tokens": 5, "stream": false}),
    );
    let e = r.json();
    assert_eq!(e["error"]["code"], "constraint_failed", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("min_tokens"), "{e}");
}

/// A constrained request returns the same tokens and log-probabilities alone and inside a
/// batch of eight (some constrained by other schemas, some free), greedy and seeded.
#[test]
fn constrained_decoding_is_batch_invariant() {
    let server = TestServer::start(|_| {});
    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0}}, "required": ["city", "population"], "additionalProperties": false});
    let body = |i: usize, constrained: bool| {
        let mut b = json!({"prompt": format!("City number {i} as JSON:"), "stream": false, "temperature": 0.8,
                           "seed": 11 + i, "max_tokens": 40, "logprobs": 2});
        if constrained {
            b["json_schema"] = schema.clone();
        }
        b
    };
    let alone = post_json(server.addr, "/v1/generate", &body(0, true)).json();
    let batched: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let b = body(i, i % 3 != 2);
                s.spawn(move || post_json(server.addr, "/v1/generate", &b).json())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The eight ran together: some forward pass held more than one sequence.
    let model = "model=\"smollm2-135m\"";
    let passes = metric_value(server.addr, &format!("starling_batch_size_count{{{model}}}")).unwrap();
    let singles = metric_value(server.addr, &format!("starling_batch_size_bucket{{{model},le=\"1\"}}")).unwrap();
    assert!(passes > singles, "no forward pass batched two sequences ({passes} passes, {singles} single)");
    assert_eq!(alone["tokens"], batched[0]["tokens"]);
    assert_eq!(alone["logprobs"], batched[0]["logprobs"]);
    assert_eq!(alone["text"], batched[0]["text"]);
    serde_json::from_str::<Value>(alone["text"].as_str().unwrap()).expect("the output is JSON");
}

/// Compiled grammars are cached by source: the second identical schema is a hit; both
/// are counted with their size, the miss with its compile time.
#[test]
fn grammar_compiles_are_cached_and_counted() {
    let server = TestServer::start(|_| {});
    let body = json!({"prompt": "x", "stream": false, "max_tokens": 2, "json_schema": {"type": "array", "items": {"type": "integer"}}});
    for _ in 0..2 {
        assert_eq!(post_json(server.addr, "/v1/generate", &body).status, 200);
    }
    let model = "model=\"smollm2-135m\"";
    assert_eq!(
        metric_value(server.addr, &format!("starling_grammar_cache_total{{{model},result=\"miss\"}}")),
        Some(1.0)
    );
    assert_eq!(
        metric_value(server.addr, &format!("starling_grammar_cache_total{{{model},result=\"hit\"}}")),
        Some(1.0)
    );
    let compiles = format!("starling_grammar_compile_seconds_count{{kind=\"json_schema\",{model}}}");
    assert_eq!(metric_value(server.addr, &compiles), Some(1.0));
    let sizes = format!("starling_grammar_bytes_count{{kind=\"json_schema\",{model}}}");
    assert_eq!(metric_value(server.addr, &sizes), Some(2.0));
}

/// A model whose pipeline has no `constrain` stage refuses constrained requests (400)
/// instead of ignoring the schema.
#[test]
fn a_pipeline_without_constrain_refuses_schemas() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("no-constrain");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plain.yaml");
    std::fs::write(
        &path,
        "stages: [{stage: admit}, {stage: tokenize}, {stage: batch}, {stage: forward}, {stage: sample}, {stage: emit}, {stage: evict}]",
    )
    .unwrap();
    let server = TestServer::start(|c| c.models[0].pipeline = path);
    let r = post_json(server.addr, "/v1/generate", &json!({"prompt": "x", "choice": ["a", "b"]}));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("constrain"), "{}", r.text());
    let r = post_json(server.addr, "/v1/generate", &json!({"prompt": "x", "max_tokens": 2, "stream": false}));
    assert_eq!(r.status, 200, "plain requests still run");
}

/// The official `openai` Python client: `beta.chat.completions.parse` with a pydantic
/// model returns a parsed object.
#[test]
fn the_openai_client_parses_into_a_pydantic_model() {
    let server = TestServer::start(|_| {});
    let v = run_client_script("openai_parse.py", &server);
    assert_eq!(v["finish_reason"], "stop");
    assert!(v["parsed"]["name"].is_string() && v["parsed"]["age"].is_u64(), "{v}");
    let langs = v["parsed"]["languages"].as_array().unwrap();
    assert!((1..=3).contains(&langs.len()), "{v}");
}

/// `tool_choice: auto` in the Hermes syntax: free text is not constrained; from the
/// `<tool_call>` marker (spelled over several tokens) the call must follow the tools'
/// schemas and the closing tag; after it, text is free again.
#[test]
fn a_hermes_call_is_constrained_from_its_marker_to_its_end() {
    use starling::gateway::tools::{ToolFormat, from_request};
    use starling::grammar::{GrammarLimits, Grammars};
    use starling::protocol::TokenConstraint;
    use starling::tokenizer::GgufTokenizer;
    let tok = std::sync::Arc::new(GgufTokenizer::open(&crate::model::model_path()).unwrap());
    let grammars = Grammars::new(tok.clone(), GrammarLimits::default());
    let tools = json!([{"type": "function", "function": {"name": "add", "parameters": {"type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]);
    let spec = from_request(Some(&tools), Some(&json!("auto")), None).unwrap().unwrap();
    let (grammar, start) = spec.auto_grammar(ToolFormat::Hermes).unwrap();
    let mut c = grammars.compile_lazy(&grammar, start).unwrap().constraint;
    let feed = |c: &mut starling::grammar::LazyConstraint, text: &str| {
        for id in tok.encode(text, false).unwrap() {
            c.advance(id).unwrap();
        }
    };
    let id = |text: &str| tok.encode(text, false).unwrap()[0];
    let allowed = |bits: &[u32], id: u32| bits[id as usize / 32] >> (id % 32) & 1 == 1;
    feed(&mut c, "Let me add them. ");
    assert!(!c.constraining() && c.next_tokens().unwrap().free);
    feed(&mut c, "<tool_call>\n");
    assert!(c.constraining(), "the marker starts the call");
    let next = c.next_tokens().unwrap();
    assert!(!next.free && !next.may_end, "inside a call the output may not end");
    assert!(allowed(next.bits, id("{")), "a call opens with `{{`");
    assert!(!allowed(next.bits, id("Hello")), "text is not a call");
    feed(&mut c, "{\"name\": \"add\", \"arguments\": {\"a\": 1, ");
    let next = c.next_tokens().unwrap();
    assert!(allowed(next.bits, id("\"")) && !allowed(next.bits, id("}")), "`b` is required");
    feed(&mut c, "\"b\": 2}}\n</tool_call>");
    assert!(!c.constraining(), "after the closing tag the text is free again");
    assert!(!c.is_complete(), "another call or text may follow");
}

/// Constrained turns of one session: each follows the schema, and the second reuses the
/// cache the first left (the grammar is per request, the cache per session).
#[test]
fn constrained_turns_share_a_session() {
    let server = TestServer::start(|_| {});
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}},
        "required": ["answer"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "a", "schema": schema}});
    let mut messages = vec![json!({"role": "user", "content": "What is the capital of France?"})];
    let mut cached = vec![];
    for next in ["And of Italy?", ""] {
        let body = json!({"messages": messages, "session_id": "constrained", "temperature": 0, "max_tokens": 40,
                          "response_format": format});
        let out = post_json(server.addr, "/v1/chat/completions", &body).json();
        let text = out["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v["answer"].is_string() && v.as_object().unwrap().len() == 1, "{v}");
        cached.push(out["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap());
        messages.push(json!({"role": "assistant", "content": text}));
        messages.push(json!({"role": "user", "content": next}));
    }
    assert_eq!(cached[0], 0);
    assert!(cached[1] > 20, "the second turn reused the session: {cached:?}");
}

/// Numbers are bounded as a double holds them: a bare `number` at temperature 1.0 (where
/// the default model otherwise writes thousands of digits) ends, within ±(2^53-1) and with
/// at most 8 digits after the point; a schema's own bounds and `multipleOf` are kept.
#[test]
fn json_numbers_end() {
    let server = TestServer::start(|_| {});
    for (schema, seed) in
        [(json!({"type": "number"}), 3), (json!({"type": "integer"}), 4), (json!({"type": "number"}), 5)]
    {
        let body = json!({"prompt": "A number:", "json_schema": schema, "temperature": 1.0, "seed": seed,
                          "max_tokens": 64, "stream": false});
        let out = post_json(server.addr, "/v1/generate", &body).json();
        assert_eq!(out["finish_reason"], "stop", "{out}");
        let text = out["text"].as_str().unwrap();
        let v: f64 = text.parse().unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v.abs() <= 9_007_199_254_740_991.0, "{text}");
        assert!(text.split('.').nth(1).is_none_or(|f| f.len() <= 8), "{text}");
    }
    let body = json!({"prompt": "A price:", "json_schema": {"type": "number", "minimum": 1, "maximum": 2, "multipleOf": 0.25},
                      "temperature": 1.0, "seed": 1, "stream": false, "max_tokens": 16});
    let text = post_json(server.addr, "/v1/generate", &body).json()["text"].as_str().unwrap().to_owned();
    let v: f64 = text.parse().unwrap();
    assert!((1.0..=2.0).contains(&v) && (v * 4.0).fract() == 0.0, "{text}");
}
