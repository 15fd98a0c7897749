//! Recognises tool calls in a model's streamed text output.
//!
//! A model asked to call tools writes the call in a syntax its chat template taught it. This module
//! finds such calls while the text is still arriving, so that ordinary text can be streamed to the
//! client at once while anything that might be the start of a call is held back until it is decided.
//!
//! Nothing the model wrote is ever lost: a block that looks like a call but turns out not to be one
//! (bad JSON, unknown function, never finished) is released verbatim as text.

use serde_json::Value;

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";
const PYTHON_TAG: &str = "<|python_tag|>";

/// The tool-call syntax a model writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` anywhere in the output (Hermes, Qwen).
    Hermes,
    /// The whole output is `<|python_tag|>`? then JSON call objects separated by `;` (Llama 3.x).
    Llama3Json,
    /// `[TOOL_CALLS]` then a JSON array of calls, or `[TOOL_CALLS]name[ARGS]{...}` (Mistral).
    Mistral,
    /// The whole output is one JSON call object or an array of them (any other model).
    Json,
}

impl ToolFormat {
    /// Chosen from the model's chat template text and whether its vocabulary has a given token text.
    ///
    /// Rules, first match wins: template mentions `<tool_call>` => Hermes; vocabulary has `[TOOL_CALLS]`
    /// => Mistral; template mentions `<|python_tag|>` or the `ipython` role => Llama3Json; otherwise Json.
    pub fn detect(template: Option<&str>, has_token: impl Fn(&str) -> bool) -> ToolFormat {
        let template = template.unwrap_or("");
        if template.contains(HERMES_OPEN) {
            ToolFormat::Hermes
        } else if has_token(MISTRAL_OPEN) {
            ToolFormat::Mistral
        } else if template.contains(PYTHON_TAG) || template.contains("ipython") {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Json
        }
    }

    /// Stable wire name: "hermes", "llama3_json", "mistral", "json".
    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3Json => "llama3_json",
            ToolFormat::Mistral => "mistral",
            ToolFormat::Json => "json",
        }
    }
}

/// One complete call: the function name and its arguments as compact JSON object text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    /// Name of the called function; always one of the tools the parser was given.
    pub name: String,
    /// The arguments object re-serialised compactly, keys in the order the model wrote them.
    pub arguments: String,
}

/// A piece of decided output, in the order it appeared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolEvent {
    /// Ordinary text to pass on as-is; never empty.
    Text(String),
    /// A recognised tool call; its source text (markers, JSON, separating whitespace) is not repeated as text.
    Call(ParsedCall),
}

/// Finds where one JSON object or array ends, fed the growing buffer a piece at a time.
///
/// It only tracks nesting and string/escape state, which is enough to find the closing bracket
/// even when strings hold brackets or escaped quotes; serde_json validates the span afterwards.
#[derive(Clone, Debug)]
struct JsonSpan {
    /// Byte offset of the opening `{` or `[` in the buffer.
    start: usize,
    /// Next byte offset to scan.
    pos: usize,
    depth: usize,
    in_str: bool,
    escaped: bool,
    /// Byte offset just past the closing bracket, once found.
    end: Option<usize>,
}

impl JsonSpan {
    fn new(start: usize) -> Self {
        JsonSpan { start, pos: start, depth: 0, in_str: false, escaped: false, end: None }
    }

    /// Scans the bytes not yet seen; returns the end offset once the value is complete.
    fn advance(&mut self, buf: &str) -> Option<usize> {
        if self.end.is_some() {
            return self.end;
        }
        // Structural characters are ASCII, and UTF-8 continuation bytes never equal an ASCII byte,
        // so scanning bytes is safe and every offset returned is a char boundary.
        let bytes = buf.as_bytes();
        while let Some(&b) = bytes.get(self.pos) {
            self.pos += 1;
            if self.in_str {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_str = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_str = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.end = Some(self.pos);
                        return self.end;
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Length of the longest tail of `s` that is a proper prefix of `marker` (which must be ASCII).
fn partial_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len()).rev().find(|&k| s.ends_with(&marker[..k])).unwrap_or(0)
}

/// Compact JSON text of an arguments value: an object, or a string that itself holds an object.
fn arguments_text(value: &Value) -> Option<String> {
    match value {
        Value::Object(_) => serde_json::to_string(value).ok(),
        Value::String(s) => match serde_json::from_str::<Value>(s).ok()? {
            inner @ Value::Object(_) => serde_json::to_string(&inner).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// A call from an object `{"name", "arguments"|"parameters"}`, with an optional ignored `"id"` and
/// `"type": "function"`; any other key, or a function not in `tools`, makes it no call.
fn call_from_value(value: &Value, tools: &[String]) -> Option<ParsedCall> {
    let object = value.as_object()?;
    let mut name = None;
    let mut args = None;
    for (key, val) in object {
        match key.as_str() {
            "name" => name = Some(val.as_str()?),
            "arguments" | "parameters" => {
                if args.replace(val).is_some() {
                    return None;
                }
            }
            "id" => {}
            "type" if val.as_str() == Some("function") => {}
            _ => return None,
        }
    }
    let name = name?;
    if !tools.iter().any(|t| t == name) {
        return None;
    }
    Some(ParsedCall { name: name.to_owned(), arguments: arguments_text(args?)? })
}

/// Calls from JSON text that is one call object.
fn parse_call_object(json: &str, tools: &[String]) -> Option<ParsedCall> {
    call_from_value(&serde_json::from_str(json).ok()?, tools)
}

/// Calls from JSON text that is a non-empty array of call objects (all must be valid).
fn parse_call_array(json: &str, tools: &[String]) -> Option<Vec<ParsedCall>> {
    match serde_json::from_str(json).ok()? {
        Value::Array(items) if !items.is_empty() => items.iter().map(|v| call_from_value(v, tools)).collect(),
        _ => None,
    }
}

/// Collects decided events, merging adjacent text and holding whitespace that follows a call.
///
/// Whitespace right after a call belongs to the call syntax (models put newlines between parallel
/// calls and before end of output); it becomes text only if ordinary text follows it.
#[derive(Clone, Debug, Default)]
struct Emitter {
    events: Vec<ToolEvent>,
    after_call: bool,
    pending_ws: String,
    saw_call: bool,
}

impl Emitter {
    fn text(&mut self, s: &str) {
        let mut s = s;
        if self.after_call {
            let rest = s.trim_start();
            self.pending_ws.push_str(&s[..s.len() - rest.len()]);
            if rest.is_empty() {
                return;
            }
            self.after_call = false;
            let ws = std::mem::take(&mut self.pending_ws);
            self.push_text(&ws);
            s = rest;
        }
        self.push_text(s);
    }

    fn push_text(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        match self.events.last_mut() {
            Some(ToolEvent::Text(t)) => t.push_str(s),
            _ => self.events.push(ToolEvent::Text(s.to_owned())),
        }
    }

    fn call(&mut self, call: ParsedCall) {
        self.pending_ws.clear();
        self.after_call = true;
        self.saw_call = true;
        self.events.push(ToolEvent::Call(call));
    }

    /// End of output: whitespace after the last call is dropped.
    fn end(&mut self) {
        self.pending_ws.clear();
        self.after_call = false;
    }

    fn take(&mut self) -> Vec<ToolEvent> {
        std::mem::take(&mut self.events)
    }
}

/// What is known about a block that starts with a marker.
enum Block {
    /// Could still become a call: hold it.
    Pending,
    /// Complete calls, and the byte length of the block (from the marker on) they consumed.
    Calls(Vec<ParsedCall>, usize),
    /// Not a call: release the marker as text and rescan what follows it.
    Malformed,
}

/// Parser for syntaxes whose calls start at a marker anywhere in the text (Hermes, Mistral).
#[derive(Clone, Debug)]
struct MarkerParser {
    mistral: bool,
    /// Held text: a partial marker, or (when `open`) everything from a marker on.
    buf: String,
    /// Whether `buf` starts with a complete marker whose block is undecided.
    open: bool,
    /// The block's JSON value, once its start is known.
    span: Option<JsonSpan>,
    /// Hermes: the validated call, while waiting for the closing tag. Mistral: unused.
    parsed: Option<ParsedCall>,
    /// Mistral `name[ARGS]{...}` form: the function name.
    name: Option<String>,
}

impl MarkerParser {
    fn new(mistral: bool) -> Self {
        MarkerParser { mistral, buf: String::new(), open: false, span: None, parsed: None, name: None }
    }

    fn marker(&self) -> &'static str {
        if self.mistral { MISTRAL_OPEN } else { HERMES_OPEN }
    }

    fn process(&mut self, tools: &[String], em: &mut Emitter, last: bool) {
        let marker = self.marker();
        loop {
            if !self.open {
                if let Some(i) = self.buf.find(marker) {
                    em.text(&self.buf[..i]);
                    self.buf.drain(..i);
                    self.open = true;
                    self.span = None;
                    self.parsed = None;
                    self.name = None;
                    continue;
                }
                let keep = if last { 0 } else { partial_suffix(&self.buf, marker) };
                let cut = self.buf.len() - keep;
                em.text(&self.buf[..cut]);
                self.buf.drain(..cut);
                return;
            }
            let block = if self.mistral { self.examine_mistral(tools) } else { self.examine_hermes(tools) };
            match block {
                Block::Pending if !last => return,
                Block::Calls(calls, len) => {
                    for call in calls {
                        em.call(call);
                    }
                    self.buf.drain(..len);
                    self.open = false;
                }
                Block::Pending | Block::Malformed => {
                    em.text(marker);
                    self.buf.drain(..marker.len());
                    self.open = false;
                }
            }
        }
    }

    /// `<tool_call>` ws `{json}` ws `</tool_call>`; the JSON's extent is found by scanning, so its
    /// strings may contain the closing tag.
    fn examine_hermes(&mut self, tools: &[String]) -> Block {
        if self.span.is_none() {
            let content = self.buf[HERMES_OPEN.len()..].trim_start();
            match content.as_bytes().first() {
                None => return Block::Pending,
                Some(b'{') => self.span = Some(JsonSpan::new(self.buf.len() - content.len())),
                Some(_) => return Block::Malformed,
            }
        }
        let Some(span) = self.span.as_mut() else { return Block::Malformed };
        let Some(end) = span.advance(&self.buf) else { return Block::Pending };
        if self.parsed.is_none() {
            match parse_call_object(&self.buf[span.start..end], tools) {
                Some(call) => self.parsed = Some(call),
                None => return Block::Malformed,
            }
        }
        let tail = self.buf[end..].trim_start();
        if tail.starts_with(HERMES_CLOSE) {
            let len = self.buf.len() - tail.len() + HERMES_CLOSE.len();
            return match self.parsed.take() {
                Some(call) => Block::Calls(vec![call], len),
                None => Block::Malformed,
            };
        }
        if HERMES_CLOSE.starts_with(tail) { Block::Pending } else { Block::Malformed }
    }

    /// `[TOOL_CALLS]` ws `[{call}, ...]`, or `[TOOL_CALLS]` ws `name[ARGS]` ws `{arguments}`.
    fn examine_mistral(&mut self, tools: &[String]) -> Block {
        if self.span.is_none() {
            let rest = self.buf[MISTRAL_OPEN.len()..].trim_start();
            let Some(first) = rest.chars().next() else { return Block::Pending };
            if first == '[' {
                self.span = Some(JsonSpan::new(self.buf.len() - rest.len()));
            } else {
                let name_len = rest.find(|c: char| !is_name_char(c)).unwrap_or(rest.len());
                if name_len == 0 {
                    return Block::Malformed;
                }
                let after_name = &rest[name_len..];
                let Some(args) = after_name.strip_prefix(MISTRAL_ARGS) else {
                    return if MISTRAL_ARGS.starts_with(after_name) { Block::Pending } else { Block::Malformed };
                };
                let args = args.trim_start();
                match args.as_bytes().first() {
                    None => return Block::Pending,
                    Some(b'{') => {}
                    Some(_) => return Block::Malformed,
                }
                self.name = Some(rest[..name_len].to_owned());
                self.span = Some(JsonSpan::new(self.buf.len() - args.len()));
            }
        }
        let Some(span) = self.span.as_mut() else { return Block::Malformed };
        let Some(end) = span.advance(&self.buf) else { return Block::Pending };
        let json = &self.buf[span.start..end];
        let calls = match &self.name {
            None => parse_call_array(json, tools),
            Some(name) if tools.iter().any(|t| t == name) => serde_json::from_str::<Value>(json)
                .ok()
                .filter(Value::is_object)
                .and_then(|v| serde_json::to_string(&v).ok())
                .map(|arguments| vec![ParsedCall { name: name.clone(), arguments }]),
            Some(_) => None,
        };
        match calls {
            Some(calls) => Block::Calls(calls, end),
            None => Block::Malformed,
        }
    }
}

/// Characters a Mistral function name may contain in the `name[ARGS]` form.
fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
}

/// Where the whole-output parser is in the call sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Before the first value (leading whitespace, Llama's python tag).
    Start,
    /// Inside a JSON value.
    Value,
    /// After a complete valid value: only whitespace, or `;` for Llama, may follow.
    AfterValue,
    /// After a Llama `;`: another object, or only whitespace to the end.
    AfterSep,
}

/// Parser for syntaxes where the whole output is the call(s) (Llama3Json, Json).
#[derive(Clone, Debug)]
struct WholeParser {
    llama: bool,
    /// Everything so far, while it could still be calls.
    buf: String,
    /// Decided not to be calls: text passes straight through.
    pass: bool,
    /// Byte offset in `buf` up to which the structure has been checked.
    cursor: usize,
    phase: Phase,
    tag_seen: bool,
    span: Option<JsonSpan>,
    calls: Vec<ParsedCall>,
}

impl WholeParser {
    fn new(llama: bool) -> Self {
        WholeParser {
            llama,
            buf: String::new(),
            pass: false,
            cursor: 0,
            phase: Phase::Start,
            tag_seen: false,
            span: None,
            calls: Vec::new(),
        }
    }

    fn push(&mut self, text: &str, tools: &[String], em: &mut Emitter) {
        if self.pass {
            em.text(text);
            return;
        }
        self.buf.push_str(text);
        if !self.advance(tools) {
            self.release(em);
        }
    }

    fn finish(&mut self, tools: &[String], em: &mut Emitter) {
        if self.pass {
            return;
        }
        let complete =
            self.advance(tools) && matches!(self.phase, Phase::AfterValue | Phase::AfterSep) && !self.calls.is_empty();
        if complete {
            for call in std::mem::take(&mut self.calls) {
                em.call(call);
            }
            self.buf.clear();
            self.pass = true;
        } else {
            self.release(em);
        }
    }

    fn release(&mut self, em: &mut Emitter) {
        em.text(&std::mem::take(&mut self.buf));
        self.pass = true;
        self.calls.clear();
        self.span = None;
    }

    /// Checks the text added since last time; false once the output can no longer be calls.
    fn advance(&mut self, tools: &[String]) -> bool {
        loop {
            let rest = &self.buf[self.cursor..];
            match self.phase {
                Phase::Start => {
                    let t = rest.trim_start();
                    self.cursor = self.buf.len() - t.len();
                    let Some(first) = t.chars().next() else { return true };
                    if self.llama && !self.tag_seen {
                        if t.starts_with(PYTHON_TAG) {
                            self.cursor += PYTHON_TAG.len();
                            self.tag_seen = true;
                            continue;
                        }
                        if PYTHON_TAG.starts_with(t) {
                            return true;
                        }
                    }
                    if !(first == '{' || (!self.llama && first == '[')) {
                        return false;
                    }
                    self.span = Some(JsonSpan::new(self.cursor));
                    self.phase = Phase::Value;
                }
                Phase::Value => {
                    let Some(span) = self.span.as_mut() else { return false };
                    // A call object's first key is a string; an array of calls holds objects.
                    let open = self.buf.as_bytes()[span.start];
                    let inner = self.buf[span.start + 1..].trim_start();
                    let want = if open == b'{' { b'"' } else { b'{' };
                    if inner.as_bytes().first().is_some_and(|&b| b != want) {
                        return false;
                    }
                    let Some(end) = span.advance(&self.buf) else { return true };
                    let json = &self.buf[span.start..end];
                    let parsed = if open == b'{' {
                        parse_call_object(json, tools).map(|c| vec![c])
                    } else {
                        parse_call_array(json, tools)
                    };
                    let Some(calls) = parsed else { return false };
                    self.calls.extend(calls);
                    self.cursor = end;
                    self.span = None;
                    self.phase = Phase::AfterValue;
                }
                Phase::AfterValue | Phase::AfterSep => {
                    let t = rest.trim_start();
                    self.cursor = self.buf.len() - t.len();
                    let Some(first) = t.chars().next() else { return true };
                    match (self.phase, first) {
                        (Phase::AfterValue, ';') if self.llama => {
                            self.cursor += 1;
                            self.phase = Phase::AfterSep;
                        }
                        (Phase::AfterSep, '{') => {
                            self.span = Some(JsonSpan::new(self.cursor));
                            self.phase = Phase::Value;
                        }
                        _ => return false,
                    }
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Inner {
    Marker(MarkerParser),
    Whole(WholeParser),
}

/// Splits streamed model output into text and tool calls as it arrives.
#[derive(Clone, Debug)]
pub struct ToolCallParser {
    tools: Vec<String>,
    inner: Inner,
    emit: Emitter,
}

impl ToolCallParser {
    /// `tools`: the names of the functions the request defined (a call naming another function is reported as text).
    pub fn new(format: ToolFormat, tools: Vec<String>) -> Self {
        let inner = match format {
            ToolFormat::Hermes => Inner::Marker(MarkerParser::new(false)),
            ToolFormat::Mistral => Inner::Marker(MarkerParser::new(true)),
            ToolFormat::Llama3Json => Inner::Whole(WholeParser::new(true)),
            ToolFormat::Json => Inner::Whole(WholeParser::new(false)),
        };
        ToolCallParser { tools, inner, emit: Emitter::default() }
    }

    /// Feeds the next piece of decoded text, split anywhere. Returns what is decided now, in order:
    /// text that can no longer be part of a call is released at once; text that might begin a call
    /// is held back until decided.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        match &mut self.inner {
            Inner::Marker(m) => {
                m.buf.push_str(text);
                m.process(&self.tools, &mut self.emit, false);
            }
            Inner::Whole(w) => w.push(text, &self.tools, &mut self.emit),
        }
        self.emit.take()
    }

    /// End of output: releases everything still held. An unfinished or malformed call is released
    /// as text, verbatim.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        match &mut self.inner {
            Inner::Marker(m) => m.process(&self.tools, &mut self.emit, true),
            Inner::Whole(w) => w.finish(&self.tools, &mut self.emit),
        }
        self.emit.end();
        self.emit.take()
    }

    /// Whether any call was emitted so far.
    pub fn saw_call(&self) -> bool {
        self.emit.saw_call
    }
}

/// Convenience: parse a whole output at once (push + finish), merging adjacent Text events.
pub fn parse_all(format: ToolFormat, tools: &[String], text: &str) -> Vec<ToolEvent> {
    let mut parser = ToolCallParser::new(format, tools.to_vec());
    let mut events = parser.push(text);
    events.extend(parser.finish());
    merge_text(events)
}

fn merge_text(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::with_capacity(events.len());
    for event in events {
        match (out.last_mut(), event) {
            (Some(ToolEvent::Text(prev)), ToolEvent::Text(next)) => prev.push_str(&next),
            (_, event) => out.push(event),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ToolFormat::{Hermes, Json, Llama3Json, Mistral};

    fn tools() -> Vec<String> {
        vec!["get_weather".to_owned(), "search".to_owned()]
    }

    fn t(s: &str) -> ToolEvent {
        ToolEvent::Text(s.to_owned())
    }

    fn c(name: &str, arguments: &str) -> ToolEvent {
        ToolEvent::Call(ParsedCall { name: name.to_owned(), arguments: arguments.to_owned() })
    }

    /// Feeds `pieces` then finishes; checks no empty text, returns events with text merged.
    fn run(format: ToolFormat, tools: &[String], pieces: &[&str]) -> Vec<ToolEvent> {
        let mut parser = ToolCallParser::new(format, tools.to_vec());
        let mut events = Vec::new();
        for piece in pieces {
            events.extend(parser.push(piece));
        }
        events.extend(parser.finish());
        for event in &events {
            assert_ne!(event, &t(""), "empty text event for {pieces:?}");
        }
        assert_eq!(parser.saw_call(), events.iter().any(|e| matches!(e, ToolEvent::Call(_))));
        merge_text(events)
    }

    /// Asserts the same events for the whole input, one char at a time, every two-way split at a
    /// char boundary, and (for short inputs) every three-way split.
    fn check_with(format: ToolFormat, tools: &[String], input: &str, expected: &[ToolEvent]) {
        assert_eq!(parse_all(format, tools, input), expected, "parse_all of {input:?}");
        assert_eq!(run(format, tools, &[input]), expected, "whole {input:?}");
        let chars: Vec<String> = input.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(format, tools, &pieces), expected, "char by char {input:?}");
        let mut with_empty = vec![""];
        for piece in &pieces {
            with_empty.extend([*piece, ""]);
        }
        assert_eq!(run(format, tools, &with_empty), expected, "with empty pushes {input:?}");
        let bounds: Vec<usize> = (0..=input.len()).filter(|&i| input.is_char_boundary(i)).collect();
        for &i in &bounds {
            let (a, b) = input.split_at(i);
            assert_eq!(run(format, tools, &[a, b]), expected, "split {a:?} | {b:?}");
        }
        if input.len() <= 200 {
            for &i in &bounds {
                for &j in bounds.iter().filter(|&&j| j >= i) {
                    let pieces = [&input[..i], &input[i..j], &input[j..]];
                    assert_eq!(run(format, tools, &pieces), expected, "split {pieces:?}");
                }
            }
        }
    }

    fn check(format: ToolFormat, input: &str, expected: &[ToolEvent]) {
        check_with(format, &tools(), input, expected);
    }

    /// The input comes back as one text event, whatever the splitting.
    fn check_text(format: ToolFormat, input: &str) {
        check(format, input, &[t(input)]);
    }

    const W1: &str = r#"{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}"#;
    const W1_ARGS: &str = r#"{"city":"Paris","unit":"c"}"#;
    const S1: &str = r#"{"name": "search", "arguments": {"q": "rust"}}"#;
    const S1_ARGS: &str = r#"{"q":"rust"}"#;

    // ---- detect / name

    #[test]
    fn detect_hermes_from_template() {
        let tpl = "{% for tool in tools %}<tool_call>{{ tool }}</tool_call>{% endfor %}";
        assert_eq!(ToolFormat::detect(Some(tpl), |_| true), Hermes);
    }

    #[test]
    fn detect_mistral_from_vocabulary() {
        assert_eq!(ToolFormat::detect(Some("[INST] {{ m }} [/INST]"), |tok| tok == "[TOOL_CALLS]"), Mistral);
        assert_eq!(ToolFormat::detect(None, |tok| tok == "[TOOL_CALLS]"), Mistral);
    }

    #[test]
    fn detect_llama3_from_python_tag_or_ipython_role() {
        assert_eq!(ToolFormat::detect(Some("{{- '<|python_tag|>' }}"), |_| false), Llama3Json);
        assert_eq!(ToolFormat::detect(Some("{%- if message.role == 'ipython' %}"), |_| false), Llama3Json);
    }

    #[test]
    fn detect_fallback_json() {
        assert_eq!(ToolFormat::detect(None, |_| false), Json);
        assert_eq!(ToolFormat::detect(Some("<|im_start|>{{ m }}<|im_end|>"), |_| false), Json);
    }

    #[test]
    fn detect_rule_order() {
        // Hermes template wins over a Mistral vocabulary; Mistral vocabulary wins over a Llama template.
        assert_eq!(ToolFormat::detect(Some("<tool_call> ipython"), |_| true), Hermes);
        assert_eq!(ToolFormat::detect(Some("<|python_tag|>"), |tok| tok == "[TOOL_CALLS]"), Mistral);
    }

    #[test]
    fn format_names() {
        assert_eq!(Hermes.name(), "hermes");
        assert_eq!(Llama3Json.name(), "llama3_json");
        assert_eq!(Mistral.name(), "mistral");
        assert_eq!(Json.name(), "json");
    }

    // ---- Hermes

    #[test]
    fn hermes_single_call() {
        check(Hermes, &format!("<tool_call>\n{W1}\n</tool_call>"), &[c("get_weather", W1_ARGS)]);
    }

    #[test]
    fn hermes_two_parallel_calls() {
        let input = format!("<tool_call>\n{W1}\n</tool_call>\n<tool_call>\n{S1}\n</tool_call>\n");
        check(Hermes, &input, &[c("get_weather", W1_ARGS), c("search", S1_ARGS)]);
    }

    #[test]
    fn hermes_calls_interleaved_with_text() {
        let input = format!("Let me look.\n<tool_call>{W1}</tool_call> and then <tool_call> {S1} </tool_call>\nDone ✓");
        check(
            Hermes,
            &input,
            &[t("Let me look.\n"), c("get_weather", W1_ARGS), t(" and then "), c("search", S1_ARGS), t("\nDone ✓")],
        );
    }

    #[test]
    fn hermes_malformed_json_is_text() {
        check_text(Hermes, r#"A <tool_call>{"name": "search", "arguments": {"q": }}</tool_call> B"#);
        check_text(Hermes, "<tool_call>not json</tool_call>");
        check_text(Hermes, r#"<tool_call>{"name": "search", "arguments": {}} junk</tool_call>"#);
        check_text(Hermes, r#"<tool_call>{"name": "search", "arguments": [1]}</tool_call>"#);
        check_text(Hermes, r#"<tool_call>{"name": "search"}</tool_call>"#);
        check_text(Hermes, r#"<tool_call>{"name": "search", "arguments": {}, "extra": 1}</tool_call>"#);
    }

    #[test]
    fn hermes_malformed_block_then_valid_call() {
        let bad = r#"<tool_call>{"name": 1}</tool_call>"#;
        check(Hermes, &format!("{bad}\n<tool_call>{S1}</tool_call>"), &[t(&format!("{bad}\n")), c("search", S1_ARGS)]);
        // A stray opening tag does not swallow the real call after it.
        check(
            Hermes,
            &format!("use <tool_call> tags: <tool_call>{S1}</tool_call>"),
            &[t("use <tool_call> tags: "), c("search", S1_ARGS)],
        );
    }

    #[test]
    fn hermes_unknown_tool_is_text() {
        check_text(Hermes, r#"<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>"#);
        let input =
            format!(r#"<tool_call>{{"name": "nope", "arguments": {{}}}}</tool_call><tool_call>{S1}</tool_call>"#);
        check(
            Hermes,
            &input,
            &[t(r#"<tool_call>{"name": "nope", "arguments": {}}</tool_call>"#), c("search", S1_ARGS)],
        );
        check_with(Hermes, &[], &format!("<tool_call>{S1}</tool_call>"), &[t(&format!("<tool_call>{S1}</tool_call>"))]);
    }

    #[test]
    fn hermes_unclosed_call_is_text() {
        check_text(Hermes, &format!("Sure: <tool_call>\n{W1}\n"));
        check_text(Hermes, &format!("<tool_call>{W1}</tool_"));
        check_text(Hermes, r#"<tool_call>{"name": "search", "arguments": {"q": "#);
        check_text(Hermes, "<tool_call>");
        check_text(Hermes, "x <tool_cal");
    }

    #[test]
    fn hermes_unclosed_json_then_later_call_is_found_at_finish() {
        // The unbalanced quote keeps the first block's JSON open; at finish the rest is rescanned.
        let bad = r#"<tool_call>{"name": "x, "arguments": {}}</tool_call> "#;
        check(Hermes, &format!("{bad}<tool_call>{S1}</tool_call>"), &[t(bad), c("search", S1_ARGS)]);
    }

    #[test]
    fn hermes_braces_and_quotes_in_strings() {
        let input =
            r#"<tool_call>{"name": "search", "arguments": {"q": "a } \" { ] [ \\", "n": "</tool_call>"}}</tool_call>"#;
        check(Hermes, input, &[c("search", r#"{"q":"a } \" { ] [ \\","n":"</tool_call>"}"#)]);
    }

    #[test]
    fn hermes_arguments_as_string() {
        let input = r#"<tool_call>{"name": "search", "arguments": "{\"q\": \"x\", \"k\": 2}"}</tool_call>"#;
        check(Hermes, input, &[c("search", r#"{"q":"x","k":2}"#)]);
        check_text(Hermes, r#"<tool_call>{"name": "search", "arguments": "[1, 2]"}</tool_call>"#);
        check_text(Hermes, r#"<tool_call>{"name": "search", "arguments": "not json"}</tool_call>"#);
    }

    #[test]
    fn hermes_key_order_preserved_and_compact() {
        let input =
            r#"<tool_call>{"arguments": {"z": 1, "a": {"y": [1, 2], "b": null}}, "name": "search"}</tool_call>"#;
        check(Hermes, input, &[c("search", r#"{"z":1,"a":{"y":[1,2],"b":null}}"#)]);
    }

    #[test]
    fn hermes_text_without_call_passes_through() {
        check_text(Hermes, "hello <b>world</b> < tool_call> <tool_calls> é");
    }

    #[test]
    fn hermes_whitespace_after_call_kept_before_text() {
        check(Hermes, &format!("<tool_call>{S1}</tool_call>\n\nAfter."), &[c("search", S1_ARGS), t("\n\nAfter.")]);
    }

    #[test]
    fn hermes_holds_back_only_partial_marker() {
        let mut p = ToolCallParser::new(Hermes, tools());
        assert_eq!(p.push("hello <tool"), vec![t("hello ")]);
        assert_eq!(p.push("box> more"), vec![t("<toolbox> more")]);
        assert_eq!(p.push(" <"), vec![t(" ")]);
        assert_eq!(p.push("b>"), vec![t("<b>")]);
        assert_eq!(p.finish(), vec![]);
        assert!(!p.saw_call());
    }

    #[test]
    fn hermes_streaming_decisions() {
        let mut p = ToolCallParser::new(Hermes, tools());
        assert_eq!(p.push("Hi <"), vec![t("Hi ")]);
        assert_eq!(p.push("tool_"), vec![]);
        assert_eq!(p.push("call>\n{\"name\": \"search\", "), vec![]);
        assert_eq!(p.push("\"arguments\": {\"q\": \"rust\"}}\n</tool"), vec![]);
        assert!(!p.saw_call());
        assert_eq!(p.push("_call>"), vec![c("search", S1_ARGS)]);
        assert!(p.saw_call());
        assert_eq!(p.push("\n"), vec![]);
        assert_eq!(p.push(" ok"), vec![t("\n ok")]);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn hermes_malformed_released_early() {
        let mut p = ToolCallParser::new(Hermes, tools());
        assert_eq!(p.push("<tool_call>"), vec![]);
        assert_eq!(p.push(" oops"), vec![t("<tool_call> oops")]);
        assert_eq!(p.push(" </tool_call>"), vec![t(" </tool_call>")]);
        let mut p = ToolCallParser::new(Hermes, tools());
        assert_eq!(
            p.push(r#"<tool_call>{"name": "zzz", "arguments": {}}"#),
            vec![t(r#"<tool_call>{"name": "zzz", "arguments": {}}"#)]
        );
    }

    #[test]
    fn hermes_marker_split_across_pieces() {
        let expected = vec![t("a "), c("search", S1_ARGS), t(" b")];
        let pieces = ["a <", "tool", "_ca", "ll>", S1, "</", "tool_call", ">", " b"];
        assert_eq!(run(Hermes, &tools(), &pieces), expected);
        let pieces = ["a <tool_call", ">", &S1[..5], &S1[5..], "<", "/", "tool_call> b"];
        assert_eq!(run(Hermes, &tools(), &pieces), expected);
    }

    // ---- Llama 3 JSON

    #[test]
    fn llama3_single_call() {
        let l1 = r#"{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}"#;
        check(Llama3Json, l1, &[c("get_weather", W1_ARGS)]);
        check(Llama3Json, &format!("<|python_tag|>{l1}"), &[c("get_weather", W1_ARGS)]);
        check(Llama3Json, &format!("\n  <|python_tag|> {W1}\n"), &[c("get_weather", W1_ARGS)]);
    }

    #[test]
    fn llama3_two_calls() {
        check(Llama3Json, &format!("{W1}; {S1}"), &[c("get_weather", W1_ARGS), c("search", S1_ARGS)]);
        check(Llama3Json, &format!("<|python_tag|>{W1};\n{S1};\n"), &[c("get_weather", W1_ARGS), c("search", S1_ARGS)]);
    }

    #[test]
    fn llama3_text_around_call_is_all_text() {
        check_text(Llama3Json, &format!("Sure. {W1}"));
        check_text(Llama3Json, &format!("{W1} done"));
        check_text(Llama3Json, &format!("{W1}\n{S1}"));
        check_text(Llama3Json, &format!("{W1};; {S1}"));
        check_text(Llama3Json, "<|python_tag|>brave_search.call(query=\"x\")");
        check_text(Llama3Json, "<|python_tag|>");
    }

    #[test]
    fn llama3_malformed_is_text() {
        check_text(Llama3Json, r#"{"name": "search", "parameters": {"q": }}"#);
        check_text(Llama3Json, r#"{"name": "search", "parameters": {}, "arguments": {}}"#);
        check_text(Llama3Json, &format!(r#"{W1}; {{"name": "search", "parameters": 3}}"#));
        check_text(Llama3Json, "{}");
        check_text(Llama3Json, "{ not json }");
    }

    #[test]
    fn llama3_unknown_tool_is_text() {
        check_text(Llama3Json, r#"{"name": "rm", "parameters": {}}"#);
        check_text(Llama3Json, &format!(r#"{W1}; {{"name": "rm", "parameters": {{}}}}"#));
    }

    #[test]
    fn llama3_unclosed_is_text() {
        check_text(Llama3Json, r#"<|python_tag|>{"name": "search", "parameters": {"q": "x"}"#);
        check_text(Llama3Json, &format!("{W1}; {{\"name\""));
        check_text(Llama3Json, "  <|python_t");
    }

    #[test]
    fn llama3_braces_and_quotes_in_strings() {
        let input = r#"{"name": "search", "parameters": {"q": "}{;\"]", "r": "\\"}}"#;
        check(Llama3Json, input, &[c("search", r#"{"q":"}{;\"]","r":"\\"}"#)]);
    }

    #[test]
    fn llama3_type_function_key_accepted() {
        let input = r#"{"type": "function", "name": "search", "parameters": {"q": "rust"}}"#;
        check(Llama3Json, input, &[c("search", S1_ARGS)]);
        check_text(Llama3Json, r#"{"type": "other", "name": "search", "parameters": {"q": "rust"}}"#);
    }

    #[test]
    fn llama3_plain_text_released_immediately() {
        let mut p = ToolCallParser::new(Llama3Json, tools());
        assert_eq!(p.push("  "), vec![]);
        assert_eq!(p.push("Hello"), vec![t("  Hello")]);
        assert_eq!(p.push(" {\"name\""), vec![t(" {\"name\"")]);
        assert_eq!(p.finish(), vec![]);
        let mut p = ToolCallParser::new(Llama3Json, tools());
        assert_eq!(p.push("<|py"), vec![]);
        assert_eq!(p.push("thon"), vec![]);
        assert_eq!(p.push("x"), vec![t("<|pythonx")]);
        let mut p = ToolCallParser::new(Llama3Json, tools());
        assert_eq!(p.push("{ "), vec![]);
        assert_eq!(p.push("1"), vec![t("{ 1")]);
    }

    #[test]
    fn llama3_calls_emitted_at_finish() {
        let mut p = ToolCallParser::new(Llama3Json, tools());
        assert_eq!(p.push(" <|pyth"), vec![]);
        assert_eq!(p.push("on_ta"), vec![]);
        assert_eq!(p.push("g|>"), vec![]);
        assert_eq!(p.push(W1), vec![]);
        assert_eq!(p.push("; "), vec![]);
        assert_eq!(p.push(S1), vec![]);
        assert!(!p.saw_call());
        assert_eq!(p.finish(), vec![c("get_weather", W1_ARGS), c("search", S1_ARGS)]);
        assert!(p.saw_call());
    }

    // ---- Mistral

    #[test]
    fn mistral_single_call() {
        check(Mistral, &format!("[TOOL_CALLS][{W1}]"), &[c("get_weather", W1_ARGS)]);
        check(Mistral, &format!("[TOOL_CALLS] [ {W1} ]\n"), &[c("get_weather", W1_ARGS)]);
    }

    #[test]
    fn mistral_two_parallel_calls() {
        check(Mistral, &format!("[TOOL_CALLS][{W1}, {S1}]"), &[c("get_weather", W1_ARGS), c("search", S1_ARGS)]);
    }

    #[test]
    fn mistral_text_before_and_between_calls() {
        check(
            Mistral,
            &format!("I will check. [TOOL_CALLS][{W1}] then [TOOL_CALLS][{S1}] é"),
            &[t("I will check. "), c("get_weather", W1_ARGS), t(" then "), c("search", S1_ARGS), t(" é")],
        );
    }

    #[test]
    fn mistral_id_field_ignored() {
        let input = r#"[TOOL_CALLS][{"name": "search", "arguments": {"q": "rust"}, "id": "abc123XYZ"}]"#;
        check(Mistral, input, &[c("search", S1_ARGS)]);
    }

    #[test]
    fn mistral_name_args_form() {
        check(Mistral, r#"[TOOL_CALLS]search[ARGS]{"q": "rust"}"#, &[c("search", S1_ARGS)]);
        check(
            Mistral,
            r#"ok [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}[TOOL_CALLS]search[ARGS] {"q": "rust"}"#,
            &[t("ok "), c("get_weather", W1_ARGS), c("search", S1_ARGS)],
        );
    }

    #[test]
    fn mistral_malformed_is_text() {
        check_text(Mistral, r#"[TOOL_CALLS][{"name": "search", "arguments": {"q": }}]"#);
        check_text(Mistral, r#"x [TOOL_CALLS]{"name": "search", "arguments": {}}"#);
        check_text(Mistral, "[TOOL_CALLS][]");
        check_text(Mistral, "[TOOL_CALLS] hello there");
        check_text(Mistral, "[TOOL_CALLS]search[ARG]{}");
        check_text(Mistral, "[TOOL_CALLS]search[ARGS] 5");
        check_text(Mistral, r#"[TOOL_CALLS]search[ARGS]["q"]"#);
        check_text(Mistral, r#"[TOOL_CALLS][{"name": "search", "arguments": {}}, 3]"#);
    }

    #[test]
    fn mistral_malformed_then_valid_call() {
        check(
            Mistral,
            &format!("[TOOL_CALLS] oops [TOOL_CALLS][{S1}]"),
            &[t("[TOOL_CALLS] oops "), c("search", S1_ARGS)],
        );
    }

    #[test]
    fn mistral_unknown_tool_is_text() {
        check_text(Mistral, r#"[TOOL_CALLS][{"name": "rm", "arguments": {}}]"#);
        check_text(Mistral, &format!(r#"[TOOL_CALLS][{S1}, {{"name": "rm", "arguments": {{}}}}]"#));
        check_text(Mistral, r#"[TOOL_CALLS]rm[ARGS]{}"#);
    }

    #[test]
    fn mistral_unclosed_is_text() {
        check_text(Mistral, &format!("[TOOL_CALLS][{W1}"));
        check_text(Mistral, r#"Hi [TOOL_CALLS]search[ARGS]{"q": "x""#);
        check_text(Mistral, "[TOOL_CALLS]search[AR");
        check_text(Mistral, "[TOOL_CALLS]");
        check_text(Mistral, "a [TOOL_CA");
    }

    #[test]
    fn mistral_braces_and_quotes_in_strings() {
        let input = r#"[TOOL_CALLS][{"name": "search", "arguments": {"q": "]}[{\"\\"}}]"#;
        check(Mistral, input, &[c("search", r#"{"q":"]}[{\"\\"}"#)]);
        let input = r#"[TOOL_CALLS]search[ARGS]{"q": "} [TOOL_CALLS] \" {"}"#;
        check(Mistral, input, &[c("search", r#"{"q":"} [TOOL_CALLS] \" {"}"#)]);
    }

    #[test]
    fn mistral_holds_back_only_partial_marker() {
        let mut p = ToolCallParser::new(Mistral, tools());
        assert_eq!(p.push("Sure [TOOL"), vec![t("Sure ")]);
        assert_eq!(p.push("_CALLS"), vec![]);
        assert_eq!(p.push("]"), vec![]);
        assert_eq!(p.push(&format!("[{S1}")), vec![]);
        assert_eq!(p.push("]"), vec![c("search", S1_ARGS)]);
        assert_eq!(p.push(" [x]"), vec![t(" [x]")]);
        assert_eq!(p.finish(), vec![]);
    }

    #[test]
    fn mistral_marker_split_across_pieces() {
        let pieces = ["a [", "TOOL_", "CALLS", "]sea", "rch[AR", "GS]", "{\"q\": \"rust\"}", " b"];
        assert_eq!(run(Mistral, &tools(), &pieces), vec![t("a "), c("search", S1_ARGS), t(" b")]);
    }

    #[test]
    fn mistral_text_without_call_passes_through() {
        check_text(Mistral, "[1] [TOOL] [ARGS] plain text ✓");
    }

    // ---- Json

    #[test]
    fn json_single_call() {
        check(Json, W1, &[c("get_weather", W1_ARGS)]);
        check(Json, &format!("\n {S1} \n"), &[c("search", S1_ARGS)]);
        check(Json, r#"{"name": "search", "parameters": {"q": "rust"}}"#, &[c("search", S1_ARGS)]);
    }

    #[test]
    fn json_array_of_calls() {
        check(Json, &format!("[{W1},\n {S1}]"), &[c("get_weather", W1_ARGS), c("search", S1_ARGS)]);
        check(Json, &format!(" [ {S1} ] "), &[c("search", S1_ARGS)]);
    }

    #[test]
    fn json_text_around_call_is_text() {
        check_text(Json, &format!("Answer: {W1}"));
        check_text(Json, &format!("{W1} and more"));
        check_text(Json, &format!("{W1} {S1}"));
        check_text(Json, &format!("{W1}; {S1}"));
        check_text(Json, "[1, 2, 3]");
        check_text(Json, "[]");
    }

    #[test]
    fn json_malformed_is_text() {
        check_text(Json, r#"{"name": "search", "arguments": {"q": }}"#);
        check_text(Json, r#"{"name": "search", "arguments": 7}"#);
        check_text(Json, r#"{"city": "Paris"}"#);
        check_text(Json, &format!("[{W1}, 5]"));
    }

    #[test]
    fn json_unknown_tool_is_text() {
        check_text(Json, r#"{"name": "rm", "arguments": {}}"#);
        check_text(Json, &format!(r#"[{W1}, {{"name": "rm", "arguments": {{}}}}]"#));
    }

    #[test]
    fn json_unclosed_is_text() {
        check_text(Json, r#"{"name": "search", "arguments": {"q": "rust"}"#);
        check_text(Json, &format!("[{W1}"));
        check_text(Json, "  ");
    }

    #[test]
    fn json_braces_and_quotes_in_strings() {
        let input = r#"[{"name": "search", "arguments": {"q": "{[\"]}", "e": "\\\""}}]"#;
        check(Json, input, &[c("search", r#"{"q":"{[\"]}","e":"\\\""}"#)]);
    }

    #[test]
    fn json_plain_text_released_immediately() {
        let mut p = ToolCallParser::new(Json, tools());
        assert_eq!(p.push(" "), vec![]);
        assert_eq!(p.push("The"), vec![t(" The")]);
        assert_eq!(p.push(" answer {"), vec![t(" answer {")]);
        assert_eq!(p.finish(), vec![]);
        let mut p = ToolCallParser::new(Json, tools());
        assert_eq!(p.push("["), vec![]);
        assert_eq!(p.push("1"), vec![t("[1")]);
    }

    // ---- general

    #[test]
    fn parse_all_merges_text() {
        let events = parse_all(Hermes, &tools(), "a <tool_call> b </tool_call> c");
        assert_eq!(events, vec![t("a <tool_call> b </tool_call> c")]);
    }

    #[test]
    fn text_reconstructs_input_minus_calls() {
        let input = format!("pre <tool_call>{W1}</tool_call> mid <tool_call>bad</tool_call> post");
        let events = parse_all(Hermes, &tools(), &input);
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                ToolEvent::Text(s) => Some(s.as_str()),
                ToolEvent::Call(_) => None,
            })
            .collect();
        assert_eq!(text, input.replace(&format!("<tool_call>{W1}</tool_call>"), ""));
    }

    #[test]
    fn saw_call_reports_emitted_calls() {
        for format in [Hermes, Mistral, Llama3Json, Json] {
            let mut p = ToolCallParser::new(format, tools());
            p.push("just text");
            p.finish();
            assert!(!p.saw_call(), "{format:?}");
        }
        let mut p = ToolCallParser::new(Mistral, tools());
        p.push(&format!("[TOOL_CALLS][{S1}]"));
        assert!(p.saw_call());
    }

    /// Every concatenation of up to three fragments, in every format: splitting never changes the
    /// result, nothing panics, no text event is empty, and output without calls is the input verbatim.
    #[test]
    fn fragment_combinations_are_split_invariant() {
        let frags = [
            "<tool_call>",
            "</tool_call>",
            "[TOOL_CALLS]",
            "<|python_tag|>",
            S1,
            "search[ARGS]",
            "[",
            "]",
            ";",
            " \n",
            "hi é",
            "{\"q\": \"}\\\"\"}",
        ];
        let tools = tools();
        let mut inputs = vec![String::new()];
        for _ in 0..3 {
            let prev = inputs.clone();
            for base in prev.iter().filter(|s| s.len() < 300) {
                for f in frags {
                    inputs.push(format!("{base}{f}"));
                }
            }
        }
        inputs.sort();
        inputs.dedup();
        for format in [Hermes, Mistral, Llama3Json, Json] {
            for input in &inputs {
                let whole = run(format, &tools, &[input]);
                if !whole.iter().any(|e| matches!(e, ToolEvent::Call(_))) {
                    let expected: Vec<ToolEvent> = if input.is_empty() { vec![] } else { vec![t(input)] };
                    assert_eq!(whole, expected, "{format:?} {input:?}");
                }
                let chars: Vec<String> = input.chars().map(String::from).collect();
                let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
                assert_eq!(run(format, &tools, &pieces), whole, "{format:?} char by char {input:?}");
                for i in (0..=input.len()).filter(|&i| input.is_char_boundary(i)) {
                    let (a, b) = input.split_at(i);
                    assert_eq!(run(format, &tools, &[a, b]), whole, "{format:?} split {a:?} | {b:?}");
                }
            }
        }
    }

    #[test]
    fn empty_input_gives_no_events() {
        for format in [Hermes, Mistral, Llama3Json, Json] {
            assert_eq!(parse_all(format, &tools(), ""), vec![], "{format:?}");
        }
    }
}
