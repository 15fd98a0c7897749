//! Tool calling on `/v1/chat/completions` with the real default model: forced calls
//! (`required`, a named function) are constrained to valid calls of the given tools, in
//! plain and streamed responses; `auto` parses the model's own syntax; the official
//! `openai` client runs a full round trip; bad tool requests are 400s naming the field.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{TestServer, post_json, stream_json};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
            "additionalProperties": false}}}
    ])
}

fn check_call(call: &Value) {
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call"), "{call}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments is a string")).unwrap();
    match call["function"]["name"].as_str().unwrap() {
        "get_weather" => {
            assert!(args["city"].is_string(), "{args}");
            assert!(["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()), "{args}");
            assert_eq!(args.as_object().unwrap().len(), 2, "{args}");
        }
        "add" => assert!(args["a"].is_i64() && args["b"].is_i64(), "{args}"),
        other => panic!("unknown function {other}"),
    }
}

/// `required` and a named `tool_choice` return schema-valid calls at temperature 0 and
/// 1.0 (several seeds), with `finish_reason: "tool_calls"` and no content.
#[test]
fn forced_tool_calls_are_valid_calls() {
    let server = TestServer::start(|_| {});
    let named = json!({"type": "function", "function": {"name": "add"}});
    for (choice, seed, temperature) in
        [(json!("required"), 0, 0.0), (json!("required"), 1, 1.0), (json!("required"), 2, 1.0), (named.clone(), 3, 1.0)]
    {
        let body = json!({"messages": [{"role": "user", "content": "What is the weather in Oslo, and what is 2+3?"}],
            "tools": tools(), "tool_choice": choice, "temperature": temperature, "seed": seed, "max_tokens": 120,
            "parallel_tool_calls": false});
        let r = post_json(server.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let out = r.json();
        let c = &out["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{out}");
        assert!(c["message"]["content"].is_null(), "{out}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "parallel_tool_calls: false allows one call: {out}");
        calls.iter().for_each(check_call);
        if choice == named {
            assert_eq!(calls[0]["function"]["name"], "add");
        }
    }
}

/// Streamed: the call arrives as `delta.tool_calls` chunks, index, id and name first, then
/// the arguments; the stream ends with `finish_reason: "tool_calls"`.
#[test]
fn streamed_tool_calls_come_as_deltas() {
    let server = TestServer::start(|_| {});
    let body = json!({"messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0,
        "max_tokens": 80, "stream": true});
    let events = stream_json(server.addr, "/v1/chat/completions", &body).sse().rest();
    let chunks: Vec<Value> = events.iter().filter(|e| e.data != "[DONE]").map(|e| e.json()).collect();
    let deltas: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["delta"].get("tool_calls")).collect();
    assert_eq!(deltas.len(), 2, "{chunks:#?}");
    assert_eq!(deltas[0][0]["index"], 0);
    assert_eq!(deltas[0][0]["function"]["name"], "get_weather");
    assert!(deltas[0][0]["id"].is_string());
    assert_eq!(deltas[1][0]["index"], 0);
    let call = json!({"id": deltas[0][0]["id"], "type": "function",
        "function": {"name": "get_weather", "arguments": deltas[1][0]["function"]["arguments"]}});
    check_call(&call);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");
    assert!(chunks.iter().all(|c| c["choices"][0]["delta"].get("content").is_none_or(|t| t == "")), "no text");
}

/// `auto`: the default model (no tool syntax in its template: plain JSON) answers in text
/// here, which stays content; `/v1/models` shows which syntax is parsed.
#[test]
fn auto_leaves_plain_answers_as_text() {
    let server = TestServer::start(|_| {});
    let body = json!({"messages": [{"role": "user", "content": "Say hello."}], "tools": tools(), "temperature": 0,
        "max_tokens": 20});
    let out = post_json(server.addr, "/v1/chat/completions", &body).json();
    let c = &out["choices"][0];
    assert!(c["message"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{out}");
    assert!(c["message"].get("tool_calls").is_none(), "{out}");
    assert_ne!(c["finish_reason"], "tool_calls");
    let models = crate::support::request(server.addr, "GET", "/v1/models", &[], b"").json();
    assert_eq!(models["data"][0]["tool_call_format"], "json");
    assert_eq!(models["data"][0]["structured_output"], true);
}

/// Bad tool requests are 400s naming the field, before anything is queued.
#[test]
fn bad_tool_requests_are_refused() {
    let server = TestServer::start(|_| {});
    let ask = json!([{"role": "user", "content": "x"}]);
    for (body, param) in [
        (
            json!({"messages": ask, "tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
            "tool_choice",
        ),
        (json!({"messages": ask, "tools": [{"type": "function"}]}), "tools[0].function"),
        (json!({"messages": ask, "tool_choice": "required"}), "tool_choice"),
        (
            json!({"messages": ask, "tools": tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        let r = post_json(server.addr, "/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{}", r.text());
    }
}

/// The official `openai` client: forced and named calls (plain and streamed) parse into its
/// types; the call, a `tool` message and the final answer render and run.
#[test]
fn the_openai_client_calls_tools_and_completes_a_round_trip() {
    let server = TestServer::start(|_| {});
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/test-venv/bin/python");
    assert!(python.exists(), "no target/test-venv: run scripts/test-deps.sh (make test does)");
    let out = Command::new(python)
        .arg(root.join("tests/fixtures/structured/openai_tools.py"))
        .arg(format!("http://{}/v1", server.addr))
        .arg("smollm2-135m")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["required"]["finish_reason"], "tool_calls", "{v}");
    assert_eq!(v["required"]["name"], "get_weather", "{v}");
    assert!(v["required"]["arguments"]["city"].is_string(), "{v}");
    let streamed = &v["named_stream"];
    assert_eq!(streamed["finish_reason"], "tool_calls", "{v}");
    assert_eq!(streamed["calls"][0]["name"], "get_time");
    let args: Value = serde_json::from_str(streamed["calls"][0]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["timezone"].is_string(), "{v}");
    assert_eq!(streamed["order"].as_array().unwrap()[..2], [json!("id"), json!("name")], "{v}");
    assert_eq!(v["round_trip"]["finish_reason"], "stop", "{v}");
    assert!(v["round_trip"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
}
