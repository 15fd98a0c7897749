//! Tool calling on `/v1/chat/completions` with the real default model: forced calls
//! (`required`, a named function) are constrained to valid calls of the given tools, in
//! plain and streamed responses; `auto` parses the model's own syntax; the official
//! `openai` client runs a full round trip; bad tool requests are 400s naming the field.

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
    let v = crate::structured::run_client_script("openai_tools.py", &server);
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

/// Recorded token streams: outputs in each syntax tokenized by the real tokenizer (markers
/// such as `<tool_call>` split over several tokens), decoded one token at a time as the
/// engine streams them, parse exactly as the whole text does: calls interleaved with text,
/// two parallel calls, and malformed JSON kept as text.
#[test]
fn tool_calls_parse_the_same_from_recorded_token_streams() {
    use starling::gateway::tools::{ParsedCall, ToolCallParser, ToolEvent, ToolFormat, parse::parse_all};
    use starling::tokenizer::{GgufTokenizer, StreamDecoder};
    let tok = GgufTokenizer::open(&crate::model::model_path()).unwrap();
    let names = vec!["get_weather".to_owned(), "add".to_owned()];
    let call = |name: &str, args: &str| ToolEvent::Call(ParsedCall { name: name.into(), arguments: args.into() });
    let cases: Vec<(ToolFormat, &str, Vec<ToolEvent>)> = vec![
        (
            ToolFormat::Hermes,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\", \"unit\": \"celsius\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n</tool_call>",
            vec![
                ToolEvent::Text("Let me check.\n".into()),
                call("get_weather", r#"{"city":"Oslo","unit":"celsius"}"#),
                call("add", r#"{"a":2,"b":3}"#),
            ],
        ),
        (
            ToolFormat::Hermes,
            "Sure <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1,}}</tool_call> done",
            vec![ToolEvent::Text(
                "Sure <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1,}}</tool_call> done".into(),
            )],
        ),
        (
            ToolFormat::Llama3Json,
            "{\"name\": \"add\", \"parameters\": {\"a\": 4, \"b\": 5}}; {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\", \"unit\": \"celsius\"}}",
            vec![call("add", r#"{"a":4,"b":5}"#), call("get_weather", r#"{"city":"Rome","unit":"celsius"}"#)],
        ),
        (
            ToolFormat::Mistral,
            "On it. [TOOL_CALLS] [{\"name\": \"add\", \"arguments\": {\"a\": 7, \"b\": 8}}, {\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 1}}]",
            vec![ToolEvent::Text("On it.".into()), call("add", r#"{"a":7,"b":8}"#), call("add", r#"{"a":1,"b":1}"#)],
        ),
        (
            ToolFormat::Json,
            "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lima\", \"unit\": \"fahrenheit\"}}]",
            vec![call("get_weather", r#"{"city":"Lima","unit":"fahrenheit"}"#)],
        ),
        (ToolFormat::Json, "The answer is {\"name\": 3}", vec![ToolEvent::Text("The answer is {\"name\": 3}".into())]),
    ];
    let merge = |events: Vec<ToolEvent>| {
        let mut out: Vec<ToolEvent> = vec![];
        for e in events {
            match (out.last_mut(), e) {
                (Some(ToolEvent::Text(a)), ToolEvent::Text(b)) => a.push_str(&b),
                (_, e) => out.push(e),
            }
        }
        out
    };
    for (format, text, want) in cases {
        let ids = tok.encode(text, false).unwrap();
        assert!(ids.len() >= 8, "a real token stream: {ids:?}");
        let mut decoder = StreamDecoder::new(false);
        let mut parser = ToolCallParser::new(format, names.clone());
        let mut events = vec![];
        for &id in &ids {
            events.extend(parser.push(&decoder.push(&tok, id).unwrap()));
        }
        events.extend(parser.push(&decoder.finish()));
        events.extend(parser.finish());
        let streamed = merge(events);
        // The Mistral case's text before the marker keeps its trailing space as text.
        let want = merge(want);
        let whole = merge(parse_all(format, &names, text));
        assert_eq!(streamed, whole, "{format:?}: streamed and whole parses differ for {text:?}");
        let strip = |v: Vec<ToolEvent>| -> Vec<ToolEvent> {
            v.into_iter()
                .map(|e| match e {
                    ToolEvent::Text(t) => ToolEvent::Text(t.trim_end().to_owned()),
                    c => c,
                })
                .collect()
        };
        assert_eq!(strip(streamed), strip(want), "{format:?}: {text:?}");
    }
}

/// `auto` with the model's own syntax: once the output starts a call (here the plain-JSON
/// syntax, `{"name"`, which the prompt asks for), the call is held to the tools' schemas and
/// comes back as a valid call, at temperature 1.0. (Unconstrained, this model wrote
/// `"arguments": {"a": {"b": 3}}` for this prompt.) Replies that do not start a call stay text.
#[test]
fn auto_holds_a_started_call_to_the_schemas() {
    let server = TestServer::start(|_| {});
    let ask = "Reply with only this JSON, filled in: {\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}";
    let mut calls = 0;
    for seed in 1..=6 {
        let body = json!({"messages": [{"role": "user", "content": ask}], "tools": tools(),
            "tool_choice": "auto", "temperature": 1.0, "seed": seed, "max_tokens": 120});
        let out = post_json(server.addr, "/v1/chat/completions", &body).json();
        let c = &out["choices"][0];
        let text = c["message"]["content"].as_str().unwrap_or_default();
        let compact: String = text.chars().filter(|ch| !ch.is_whitespace()).collect();
        if c["message"].get("tool_calls").is_some() {
            calls += 1;
            assert_eq!(c["finish_reason"], "tool_calls", "seed {seed}: {out}");
            c["message"]["tool_calls"].as_array().unwrap().iter().for_each(check_call);
        } else {
            assert!(!compact.starts_with("{\"name\""), "seed {seed}: a started call came back as text: {out}");
        }
    }
    assert!(calls >= 2, "the prompt makes the model start calls: {calls} of 6");
}

/// `auto` does not force a call on JSON that is not one: an answer that opens with `[`
/// (a logit bias toward it) stays free content.
#[test]
fn auto_leaves_json_that_is_not_a_call_alone() {
    let server = TestServer::start(|_| {});
    let bracket =
        crate::support::post_json(server.addr, "/v1/tokenize", &json!({"text": "["})).json()["ids"][0].clone();
    let body = json!({"messages": [{"role": "user", "content": "List three small primes."}], "tools": tools(),
        "tool_choice": "auto", "temperature": 0, "max_tokens": 16, "logit_bias": {bracket.to_string(): 100}});
    let out = post_json(server.addr, "/v1/chat/completions", &body).json();
    let c = &out["choices"][0];
    let content = c["message"]["content"].as_str().unwrap();
    assert!(content.starts_with('['), "{out}");
    assert!(c["message"].get("tool_calls").is_none() && c["finish_reason"] != "tool_calls", "{out}");
}

/// The native route takes `tools` too: forced calls come back as `tool_calls` in the body
/// and in the streamed `done` event.
#[test]
fn native_generate_returns_tool_calls() {
    let server = TestServer::start(|_| {});
    let body = json!({"prompt": "Call a function to add 2 and 3.\n", "tools": tools(), "tool_choice": "required",
        "temperature": 0, "max_tokens": 80, "stream": false});
    let out = post_json(server.addr, "/v1/generate", &body).json();
    assert_eq!(out["finish_reason"], "tool_calls", "{out}");
    out["tool_calls"].as_array().unwrap().iter().for_each(check_call);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = stream_json(server.addr, "/v1/generate", &streamed).sse().rest();
    let done = events.iter().find(|e| e.event.as_deref() == Some("done")).expect("a done event").json();
    assert_eq!(done["finish_reason"], "tool_calls", "{done}");
    assert_eq!(done["tool_calls"].as_array().unwrap().len(), out["tool_calls"].as_array().unwrap().len());
}
