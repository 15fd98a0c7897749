//! OpenAI tool calling: the request's `tools`, `tool_choice` and `parallel_tool_calls`
//! validated into a [`ToolSpec`]; the schema a forced call must follow; and the calls
//! found in the output ([`parse`]) rendered as `message.tool_calls`.
//!
//! - `none`: the output is plain text (tools are not given to the template).
//! - `auto`: the output is parsed in the model's own tool-call syntax ([`ToolFormat`],
//!   chosen from its chat template and special tokens).
//! - `required` or a named function: the output is constrained to a JSON array of calls
//!   (`[{"name": ..., "arguments": {...}}]`, one call unless `parallel_tool_calls`), each
//!   valid for its function's parameter schema, so even a model never trained for tools
//!   returns a schema-valid call.

pub mod parse;

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::grammar::{CallStart, Grammar, bounded_json};
use crate::tokenizer::GgufTokenizer;
pub use parse::{ParsedCall, ToolCallParser, ToolEvent, ToolFormat};

/// What the request asked the model to do with its tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// A request's tools, validated.
#[derive(Clone, Debug)]
pub struct ToolSpec {
    /// The `tools` list as sent (what the chat template receives).
    pub tools: Value,
    /// Function names with their parameter schemas, in order.
    pub functions: Vec<(String, Value)>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

/// Validates `tools`, `tool_choice` and `parallel_tool_calls`; `None` without tools.
pub fn from_request(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolSpec>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => {
            return match tool_choice {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
                Some(_) => Err(ApiError::invalid_field("tool_choice", "`tool_choice` needs `tools`")),
            };
        }
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(_) => {
            return Err(ApiError::invalid_field("tools", "`tools` must be a non-empty list of function definitions"));
        }
    };
    let mut functions = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid_field(&at(".type"), "only `\"type\": \"function\"` tools are supported"));
        }
        let f = t.get("function").ok_or_else(|| ApiError::invalid_field(&at(".function"), "`function` is required"))?;
        let name = f.get("name").and_then(Value::as_str).filter(|n| valid_name(n)).ok_or_else(|| {
            ApiError::invalid_field(
                &at(".function.name"),
                "`name` must be 1 to 64 characters of letters, digits, `_` or `-`",
            )
        })?;
        if functions.iter().any(|(n, _)| n == name) {
            return Err(ApiError::invalid_field(&at(".function.name"), format!("function `{name}` is defined twice")));
        }
        let params = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(Value::Object(p)) => match p.get("type") {
                // Arguments are always an object: a schema without a type gets it.
                None => {
                    let mut p = p.clone();
                    p.insert("type".into(), json!("object"));
                    Value::Object(p)
                }
                Some(t) if t == "object" => Value::Object(p.clone()),
                Some(_) => {
                    return Err(ApiError::invalid_field(
                        &at(".function.parameters"),
                        "`parameters` must describe an object (`\"type\": \"object\"`)",
                    ));
                }
            },
            Some(_) => {
                return Err(ApiError::invalid_field(
                    &at(".function.parameters"),
                    "`parameters` must be a JSON schema object",
                ));
            }
        };
        functions.push((name.to_owned(), params));
    }
    let choice = match tool_choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid_field(
                    "tool_choice",
                    format!("`tool_choice` must be none, auto, required or a function; got `{other}`"),
                ));
            }
        },
        Some(v) => {
            let name = v.pointer("/function/name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid_field(
                    "tool_choice",
                    "`tool_choice` must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )
            })?;
            if !functions.iter().any(|(n, _)| n == name) {
                return Err(ApiError::invalid_field(
                    "tool_choice",
                    format!("`tool_choice` names `{name}`, which is not in `tools`"),
                ));
            }
            ToolChoice::Named(name.to_owned())
        }
    };
    Ok(Some(ToolSpec { tools: Value::Array(list.clone()), functions, choice, parallel: parallel.unwrap_or(true) }))
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ToolSpec {
    /// The functions a call may name.
    pub fn names(&self) -> Vec<String> {
        self.functions.iter().map(|(n, _)| n.clone()).collect()
    }

    /// With `required` or a named function: the JSON schema the whole output must follow.
    pub fn forced_schema(&self) -> Option<Value> {
        let call = |name: &str, params: &Value| {
            json!({"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                   "required": ["name", "arguments"], "additionalProperties": false})
        };
        let items = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => {
                let calls: Vec<Value> = self.functions.iter().map(|(n, p)| call(n, p)).collect();
                if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) }
            }
            ToolChoice::Named(name) => {
                let (n, p) = self.functions.iter().find(|(n, _)| n == name)?;
                call(n, p)
            }
        };
        let mut schema = json!({"type": "array", "items": items, "minItems": 1});
        if !self.parallel || matches!(self.choice, ToolChoice::Named(_)) {
            schema["maxItems"] = json!(1);
        }
        Some(schema)
    }

    /// With `auto`: the grammar a call must follow once it starts in the model's own
    /// syntax, and where it starts. Arguments are held to each function's schema.
    pub fn auto_grammar(&self, format: ToolFormat) -> Option<(Grammar, CallStart)> {
        if self.choice != ToolChoice::Auto {
            return None;
        }
        let any = |args_key: &str| {
            let calls: Vec<Value> = self
                .functions
                .iter()
                .map(|(n, p)| {
                    json!({"type": "object", "properties": {"name": {"const": n}, args_key: p},
                           "required": ["name", args_key], "additionalProperties": false})
                })
                .collect();
            if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) }
        };
        // The model started the call in its own layout: whitespace is its choice.
        let json = |schema: Value| format!("%json {}", bounded_json(&schema));
        let array = |args_key: &str| {
            let mut a = json!({"type": "array", "items": any(args_key), "minItems": 1});
            if !self.parallel {
                a["maxItems"] = json!(1);
            }
            a
        };
        let ws = "WS: /[ \\t\\n]+/";
        let call_prefixes = |starts: &[&str]| CallStart::Output(starts.iter().map(|s| s.to_string()).collect());
        let (lark, start) = match format {
            ToolFormat::Hermes => (
                format!("start: WS? {} WS? \"</tool_call>\"\n{ws}", json(any("arguments"))),
                CallStart::Marker("<tool_call>".into()),
            ),
            ToolFormat::Mistral => {
                (format!("start: WS? {}\n{ws}", json(array("arguments"))), CallStart::Marker("[TOOL_CALLS]".into()))
            }
            ToolFormat::Llama3Json => {
                let call = json(any("parameters"));
                let more = if self.parallel { format!(" (\";\" WS? {call})*") } else { String::new() };
                (format!("start: WS? {call}{more}\n{ws}"), call_prefixes(&["{\"name\""]))
            }
            ToolFormat::Json => {
                let calls = if self.parallel {
                    json!({"anyOf": [any("arguments"), array("arguments")]})
                } else {
                    any("arguments")
                };
                (format!("start: WS? {}\n{ws}", json(calls)), call_prefixes(&["{\"name\"", "[{\"name\""]))
            }
        };
        Some((Grammar::Lark(lark), start))
    }

    /// How many calls one reply may carry: one with `parallel_tool_calls: false` or a named
    /// function (later calls are dropped), else any number.
    pub fn keep_calls(&self) -> usize {
        if self.parallel && !matches!(self.choice, ToolChoice::Named(_)) { usize::MAX } else { 1 }
    }

    /// The syntax the output is parsed in: forced calls are plain JSON; `auto` reads the
    /// model's own syntax; `none` parses nothing.
    pub fn format(&self, tokenizer: &GgufTokenizer) -> Option<ToolFormat> {
        match self.choice {
            ToolChoice::None => None,
            ToolChoice::Auto => Some(model_format(tokenizer)),
            ToolChoice::Required | ToolChoice::Named(_) => Some(ToolFormat::Json),
        }
    }
}

/// How a reply's calls are read: the syntax, the functions they may name, how many count.
#[derive(Clone, Debug)]
pub struct CallReading {
    pub format: ToolFormat,
    pub names: Vec<String>,
    /// Calls past this many are dropped ([`ToolSpec::keep_calls`]).
    pub keep: usize,
}

impl ToolSpec {
    /// How this request's reply is read for calls; `None` with `tool_choice: none`.
    pub fn reading(&self, tokenizer: &GgufTokenizer) -> Option<CallReading> {
        Some(CallReading { format: self.format(tokenizer)?, names: self.names(), keep: self.keep_calls() })
    }
}

/// The tool-call syntax `tokenizer`'s model writes (from its chat template and tokens).
pub fn model_format(tokenizer: &GgufTokenizer) -> ToolFormat {
    ToolFormat::detect(tokenizer.chat_template(), |text| {
        tokenizer.encode(text, true).is_ok_and(|ids| ids.len() == 1 && tokenizer.is_special(ids[0]))
    })
}

/// One call as OpenAI's `tool_calls` entry; `id` is unique within the server's life.
pub fn call_json(id: &str, call: &ParsedCall) -> Value {
    json!({"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
}

/// The text and calls of a finished output (at most `reading.keep` calls).
pub fn split_output(reading: &CallReading, text: &str) -> (String, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls = vec![];
    for e in parse::parse_all(reading.format, &reading.names, text) {
        match e {
            ToolEvent::Text(t) => content.push_str(&t),
            ToolEvent::Call(c) if calls.len() < reading.keep => calls.push(c),
            ToolEvent::Call(_) => {}
        }
    }
    (content, calls)
}

/// An assistant message's `tool_calls` as the template expects them: `arguments` given as
/// a JSON string is parsed into an object (Hugging Face templates print it with `tojson`).
pub fn template_tool_calls(calls: &Value) -> Value {
    let mut calls = calls.clone();
    if let Value::Array(list) = &mut calls {
        for c in list {
            if let Some(args) = c.pointer_mut("/function/arguments")
                && let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok())
            {
                *args = parsed;
            }
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The syntax is read off real chat templates: Qwen's `<tool_call>` tags, Llama 3.1's
    /// `ipython` role; a template without tools falls back to plain JSON.
    #[test]
    fn formats_are_detected_from_chat_templates() {
        let none = |_: &str| false;
        let qwen = include_str!("../../../tests/fixtures/templates/qwen2.5-instruct.jinja");
        let llama = include_str!("../../../tests/fixtures/templates/llama-3.1-instruct.jinja");
        let gemma = include_str!("../../../tests/fixtures/templates/gemma-3-it.jinja");
        assert_eq!(ToolFormat::detect(Some(qwen), none), ToolFormat::Hermes);
        assert_eq!(ToolFormat::detect(Some(llama), none), ToolFormat::Llama3Json);
        assert_eq!(ToolFormat::detect(Some(gemma), none), ToolFormat::Json);
        assert_eq!(ToolFormat::detect(Some(gemma), |t| t == "[TOOL_CALLS]"), ToolFormat::Mistral);
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "ping"}}])
    }

    #[test]
    fn forced_choices_build_the_call_schema() {
        let spec = from_request(Some(&weather()), Some(&json!("required")), Some(false)).unwrap().unwrap();
        let schema = spec.forced_schema().unwrap();
        assert_eq!(schema["maxItems"], 1);
        assert_eq!(schema["items"]["anyOf"].as_array().unwrap().len(), 2);
        assert_eq!(schema["items"]["anyOf"][1]["properties"]["arguments"], json!({"type": "object"}));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let spec = from_request(Some(&weather()), Some(&named), None).unwrap().unwrap();
        let schema = spec.forced_schema().unwrap();
        assert_eq!(schema["items"]["properties"]["name"]["const"], "get_weather");
        let auto = from_request(Some(&weather()), None, None).unwrap().unwrap();
        assert!(auto.forced_schema().is_none());
    }

    #[test]
    fn bad_tool_requests_name_the_field() {
        let param = |tools: Value, choice: Value| from_request(Some(&tools), Some(&choice), None).unwrap_err().param;
        let unknown = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(param(weather(), unknown).as_deref(), Some("tool_choice"));
        assert_eq!(param(json!([{"type": "code"}]), json!("auto")).as_deref(), Some("tools[0].type"));
        let bad_name = json!([{"type": "function", "function": {"name": "a b"}}]);
        assert_eq!(param(bad_name, json!("auto")).as_deref(), Some("tools[0].function.name"));
        assert_eq!(param(weather(), json!("sometimes")).as_deref(), Some("tool_choice"));
        let e = from_request(None, Some(&json!("required")), None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
    }

    #[test]
    fn parameters_always_describe_an_object() {
        let untyped = json!([{"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}]);
        let spec = from_request(Some(&untyped), None, None).unwrap().unwrap();
        assert_eq!(spec.functions[0].1["type"], "object");
        let scalar = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]);
        let e = from_request(Some(&scalar), None, None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools[0].function.parameters"));
    }

    /// `parallel_tool_calls: false` keeps one call of a reply that holds two.
    #[test]
    fn one_call_is_kept_without_parallel_calls() {
        let two = r#"[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "ping", "arguments": {}}]"#;
        let spec = from_request(Some(&weather()), Some(&json!("auto")), Some(false)).unwrap().unwrap();
        let reading = CallReading { format: ToolFormat::Json, names: spec.names(), keep: spec.keep_calls() };
        assert_eq!(split_output(&reading, two).1.len(), 1);
        let spec = from_request(Some(&weather()), Some(&json!("auto")), None).unwrap().unwrap();
        let reading = CallReading { keep: spec.keep_calls(), ..reading };
        assert_eq!(split_output(&reading, two).1.len(), 2);
        let (grammar, _) = spec.auto_grammar(ToolFormat::Json).unwrap();
        let Grammar::Lark(lark) = grammar else { panic!("a Lark grammar") };
        assert!(lark.contains("\"type\":\"array\""), "parallel calls may come as an array");
        let single = from_request(Some(&weather()), Some(&json!("auto")), Some(false)).unwrap().unwrap();
        let Grammar::Lark(lark) = single.auto_grammar(ToolFormat::Json).unwrap().0 else { panic!() };
        assert!(!lark.contains("\"type\":\"array\""), "one call, no array");
    }

    #[test]
    fn assistant_arguments_reach_the_template_as_objects() {
        let calls = json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]);
        assert_eq!(template_tool_calls(&calls)[0]["function"]["arguments"], json!({"a": 1}));
    }
}
