//! Structured output on the wire: the request fields that constrain what a model writes,
//! parsed into a [`Grammar`] and compiled on the gateway's grammar pool before the request
//! is queued (so a bad schema is a 400 that never reaches an engine).
//!
//! - OpenAI `response_format`: `{"type": "text"}`, `{"type": "json_object"}`,
//!   `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
//! - Native `/v1/generate`: `json_schema` (a schema), `regex`, `grammar` (llguidance's Lark
//!   dialect), `choice` (a list of strings), or `response_format` as above; at most one.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::engine::load::LoadedModel;
use crate::error::{ApiError, ErrorKind};
use crate::gateway::state::AppState;
use crate::gateway::tools::{CallReading, ToolSpec};
use crate::grammar::{CallStart, Compiled, Grammar, GrammarError};
use crate::protocol::Constraint;

/// Parses OpenAI's `response_format`; `None` for plain text.
pub fn response_format(v: &Value) -> Result<Option<Grammar>, ApiError> {
    let bad = |msg: &str| ApiError::new(ErrorKind::InvalidRequest, msg).with_param("response_format");
    let Value::Object(map) = v else { return Err(bad("`response_format` must be an object")) };
    match map.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonSchema(json!({"type": "object"})))),
        Some("json_schema") => {
            let Some(Value::Object(js)) = map.get("json_schema") else {
                return Err(bad("`response_format.json_schema` must be an object with a `schema`"));
            };
            match js.get("schema") {
                Some(schema @ (Value::Object(_) | Value::Bool(true))) => Ok(Some(Grammar::JsonSchema(schema.clone()))),
                None => Ok(Some(Grammar::JsonSchema(json!({})))),
                Some(_) => Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    "`response_format.json_schema.schema` must be a JSON schema object",
                )
                .with_param("response_format.json_schema.schema")),
            }
        }
        Some(other) => {
            Err(bad(&format!("`response_format.type` must be one of text, json_object, json_schema; got `{other}`")))
        }
        None => Err(bad("`response_format.type` is required")),
    }
}

/// The native route's constraint fields (already taken out of the body); at most one.
pub fn native_fields(fields: &mut Map<String, Value>) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    let mut found: Vec<(Grammar, &'static str)> = vec![];
    for name in ["json_schema", "regex", "grammar", "choice", "response_format"] {
        let Some(v) = fields.remove(name) else { continue };
        if v.is_null() {
            continue;
        }
        let type_err = |what: &str| ApiError::invalid_field(name, format!("`{name}` must be {what}"));
        let g = match (name, v) {
            ("json_schema", v @ Value::Object(_)) => Grammar::JsonSchema(v),
            ("json_schema", _) => return Err(type_err("a JSON schema object")),
            ("regex", Value::String(s)) => Grammar::Regex(s),
            ("regex", _) => return Err(type_err("a string")),
            ("grammar", Value::String(s)) => lark_grammar(s)?,
            ("grammar", _) => return Err(type_err("a string (a Lark grammar)")),
            ("choice", Value::Array(items)) => {
                let options: Option<Vec<String>> = items.iter().map(|i| i.as_str().map(str::to_owned)).collect();
                match options {
                    Some(o) if !o.is_empty() && o.iter().all(|s| !s.is_empty()) => Grammar::Choice(o),
                    _ => return Err(type_err("a non-empty list of non-empty strings")),
                }
            }
            ("choice", _) => return Err(type_err("a list of strings")),
            (_, v) => match response_format(&v)? {
                Some(g) => g,
                None => continue,
            },
        };
        found.push((g, name));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(_, n)| *n).collect();
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "give at most one of json_schema, regex, grammar, choice, response_format; got {}",
                names.join(", ")
            ),
        )
        .with_param(names[1]));
    }
    Ok(found.pop())
}

/// A `grammar` string: llguidance's Lark dialect. GBNF (llama.cpp's `::=` rules) is named
/// as such rather than failing with a Lark syntax error.
fn lark_grammar(s: String) -> Result<Grammar, ApiError> {
    let gbnf = s.lines().any(|l| {
        let l = l.trim_start();
        !l.starts_with('#') && !l.starts_with("//") && l.contains("::=")
    });
    if gbnf {
        return Err(ApiError::invalid_field(
            "grammar",
            "`grammar` looks like GBNF (`rule ::= ...`); Starling takes Lark syntax as llguidance defines it \
             (`rule: ...`, `start` as the root)",
        ));
    }
    Ok(Grammar::Lark(s))
}

/// Compiles `grammar` for `model` on the grammar pool (bounded in size and time), records
/// its size and compile time, and returns the constraint for the engine. `param` names the
/// request field in errors.
pub async fn compile(
    state: &Arc<AppState>,
    model: &LoadedModel,
    grammar: Grammar,
    param: &str,
) -> Result<Constraint, ApiError> {
    compile_from(state, model, grammar, None, param).await
}

/// [`compile`] for a grammar that applies from where `start` finds a tool call to the
/// call's end (`tool_choice: auto`), or to the whole output when `start` is `None`.
pub async fn compile_from(
    state: &Arc<AppState>,
    model: &LoadedModel,
    grammar: Grammar,
    start: Option<CallStart>,
    param: &str,
) -> Result<Constraint, ApiError> {
    let Some(grammars) = model.grammars.clone() else {
        return Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!(
                "model `{}` runs a pipeline without the `constrain` stage; it cannot follow a schema or grammar",
                model.id
            ),
        )
        .with_param(param));
    };
    let kind = grammar.kind();
    // Waiting for a slot is bounded by the pool's queue (429 `cpu_busy` past it); the compile
    // itself by llguidance's fuel limits, and one that still ran past
    // `GrammarLimits::max_compile` is refused (and not cached).
    let compiled = state
        .grammar_slots
        .run(move || match start {
            None => grammars.compile(&grammar).map(Compiled::boxed),
            Some(start) => grammars.compile_lazy(&grammar, start).map(Compiled::boxed),
        })
        .await?;
    let compiled = compiled.map_err(|e| {
        let code = match e {
            GrammarError::TooLarge { .. } => "grammar_too_large",
            GrammarError::TooCostly { .. } => "grammar_too_costly",
            GrammarError::Invalid { .. } => "invalid_grammar",
            GrammarError::Vocabulary(_) => "grammar_unsupported",
        };
        ApiError::new(ErrorKind::InvalidRequest, e.to_string()).with_code(code).with_param(param)
    })?;
    let seconds = (!compiled.cached).then_some(compiled.compile_time.as_secs_f64());
    state.obs.metrics.record_grammar(model.id.as_str(), kind, compiled.bytes, seconds);
    Ok(compiled.constraint)
}

/// The request's one output constraint: its own grammar (`grammar`, with the field that
/// gave it), or what its tools imply: a forced call's schema, or under `auto` the grammar a
/// call follows once it starts in the model's syntax (`reading`). A grammar beside a forced
/// call is a 400.
pub async fn request_constraint(
    state: &Arc<AppState>,
    model: &LoadedModel,
    grammar: Option<(Grammar, &str)>,
    tools: Option<&ToolSpec>,
    reading: Option<&CallReading>,
) -> Result<Option<Constraint>, ApiError> {
    match (grammar, tools.and_then(ToolSpec::forced_schema)) {
        (Some((_, param)), Some(_)) => Err(ApiError::invalid_field(
            param,
            format!("`{param}` cannot be combined with a `tool_choice` that forces a call"),
        )),
        (Some((g, param)), None) => compile(state, model, g, param).await.map(Some),
        (None, Some(schema)) => compile(state, model, Grammar::JsonSchema(schema), "tools").await.map(Some),
        (None, None) => {
            let lazy = match (tools, reading, &model.grammars) {
                (Some(spec), Some(r), Some(_)) => spec.auto_grammar(r.format),
                _ => None,
            };
            match lazy {
                Some((g, start)) => compile_from(state, model, g, Some(start), "tools").await.map(Some),
                None => Ok(None),
            }
        }
    }
}
