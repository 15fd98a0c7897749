//! OpenAI's response shapes: `chat.completion` / `text_completion` objects, their
//! streamed chunks ending with `data: [DONE]`, usage and logprobs objects.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::sse::{self, Render};
use crate::gateway::extract::random_id;
use crate::gateway::service::Collected;
use crate::gateway::tools::{self, CallReading, ParsedCall, ToolCallParser, ToolEvent};
use crate::protocol::{FinishReason, StreamEvent, Timings, TokenLogprob, Usage};
use crate::tokenizer::GgufTokenizer;
use crate::types::TokenId;

/// Which OpenAI object family a route speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// What every response object of one request repeats.
pub struct Shape {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// Alternatives per token to report; `None` = no logprobs.
    pub top: Option<u32>,
    pub tokenizer: Arc<GgufTokenizer>,
    /// Tool calls are parsed from the output in this syntax, for these function names.
    pub tools: Option<CallReading>,
}

/// OpenAI's usage object.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn finish_name(r: FinishReason) -> &'static str {
    r.as_str()
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }

    fn token_text(&self, id: TokenId) -> (String, Vec<u8>) {
        let bytes = self.tokenizer.token_bytes(id).map(<[u8]>::to_vec).unwrap_or_default();
        (self.tokenizer.decode(&[id], false).unwrap_or_default(), bytes)
    }

    /// Chat logprobs entries (`{"content":[...]}`) for tokens with their alternatives.
    fn chat_logprobs(&self, tokens: &[(TokenId, f32, Vec<TokenLogprob>)]) -> Value {
        let top_n = self.top.unwrap_or(0) as usize;
        let entry = |id: TokenId, lp: f32| {
            let (token, bytes) = self.token_text(id);
            json!({"token": token, "logprob": lp, "bytes": bytes})
        };
        let content: Vec<Value> = tokens
            .iter()
            .map(|(id, lp, alts)| {
                let mut e = entry(*id, *lp);
                e["top_logprobs"] = alts.iter().take(top_n).map(|a| entry(a.id, a.logprob)).collect();
                e
            })
            .collect();
        json!({"content": content})
    }

    /// Completion logprobs (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).
    fn completion_logprobs(&self, tokens: &[(TokenId, f32, Vec<TokenLogprob>)], mut offset: usize) -> Value {
        let top_n = self.top.unwrap_or(0) as usize;
        let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
        for (id, lp, alts) in tokens {
            let text = self.token_text(*id).0;
            offsets.push(offset);
            offset += text.len();
            texts.push(text);
            lps.push(*lp);
            let m: Map<String, Value> =
                alts.iter().take(top_n).map(|a| (self.token_text(a.id).0, json!(a.logprob))).collect();
            tops.push(Value::Object(m));
        }
        json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
    }

    fn logprobs(&self, tokens: &[(TokenId, f32, Vec<TokenLogprob>)], offset: usize) -> Value {
        match (self.top, self.kind) {
            (None, _) => Value::Null,
            (Some(_), Kind::Chat) => self.chat_logprobs(tokens),
            (Some(_), Kind::Completion) => self.completion_logprobs(tokens, offset),
        }
    }

    /// The non-streaming response.
    pub fn whole(&self, out: &Collected) -> Value {
        let logprobs = self.logprobs(&out.logprobs, 0);
        let finish = finish_name(out.finish_reason);
        let choice = match (self.kind, &self.tools) {
            (Kind::Chat, Some(reading)) => {
                let (content, calls) = tools::split_output(reading, &out.text);
                let mut message = json!({"role": "assistant", "content": content});
                let mut finish = finish;
                if !calls.is_empty() {
                    if content.trim().is_empty() {
                        message["content"] = Value::Null;
                    }
                    let calls: Vec<Value> = calls.iter().map(|c| tools::call_json(&random_id("call"), c)).collect();
                    message["tool_calls"] = Value::Array(calls);
                    if out.finish_reason == FinishReason::Stop {
                        finish = "tool_calls";
                    }
                }
                json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Chat, None) => {
                json!({"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs, "finish_reason": finish})
            }
            (Kind::Completion, _) => {
                json!({"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage_json(&out.usage);
        v["timings"] = json!(out.timings);
        v["seed"] = json!(out.seed);
        v
    }

    /// One streamed choice carrying `text` (a delta for chat).
    fn chunk(&self, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = if text.is_empty() { json!({}) } else { json!({"content": text}) };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}),
        };
        self.envelope(true, json!([choice]))
    }
}

/// OpenAI chunk frames (`data: {...}`), ending with `data: [DONE]`.
pub struct OpenAiRender {
    shape: Shape,
    include_usage: bool,
    started: bool,
    text_offset: usize,
    /// Finds tool calls in the streamed text (chat with tools).
    parser: Option<ToolCallParser>,
    calls: usize,
}

impl OpenAiRender {
    /// Chunks of `shape`; a final usage chunk when `include_usage`.
    pub fn new(shape: Shape, include_usage: bool) -> Self {
        let parser = shape.tools.as_ref().map(|r| ToolCallParser::new(r.format, r.names.clone()));
        OpenAiRender { shape, include_usage, started: false, text_offset: 0, parser, calls: 0 }
    }

    /// Content deltas for text, and for each call two `tool_calls` deltas: its index, id
    /// and name first, then its arguments.
    fn tool_events(&mut self, events: Vec<ToolEvent>) -> String {
        let mut out = String::new();
        for e in events {
            match e {
                ToolEvent::Text(t) => out += &data(&self.shape.chunk(&t, Value::Null, None)),
                ToolEvent::Call(_) if self.shape.tools.as_ref().is_some_and(|r| self.calls >= r.keep) => {}
                ToolEvent::Call(ParsedCall { name, arguments }) => {
                    let index = self.calls;
                    self.calls += 1;
                    let head = json!([{"index": index, "id": random_id("call"), "type": "function",
                                       "function": {"name": name, "arguments": ""}}]);
                    let args = json!([{"index": index, "function": {"arguments": arguments}}]);
                    for delta in [head, args] {
                        let choice = json!([{"index": 0, "delta": {"tool_calls": delta}, "logprobs": null, "finish_reason": null}]);
                        out += &data(&self.shape.envelope(true, choice));
                    }
                }
            }
        }
        out
    }
}

fn data(v: &Value) -> String {
    sse::frame(None, &v.to_string())
}

const DONE: &str = "data: [DONE]\n\n";

impl OpenAiRender {
    /// Chat streams open with the assistant role (once, before any content).
    fn opening(&mut self) -> String {
        if self.started || self.shape.kind != Kind::Chat {
            self.started = true;
            return String::new();
        }
        self.started = true;
        let choice = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
        data(&self.shape.envelope(true, choice))
    }

    fn finish(&mut self, reason: FinishReason, usage: &Usage, text: &str, timings: &Timings, seed: u64) -> String {
        let mut out = self.opening();
        let mut finish = finish_name(reason);
        if let Some(mut parser) = self.parser.take() {
            let mut events = parser.push(text);
            events.extend(parser.finish());
            out += &self.tool_events(events);
            if self.calls > 0 && reason == FinishReason::Stop {
                finish = "tool_calls";
            }
        } else if !text.is_empty() {
            out += &data(&self.shape.chunk(text, Value::Null, None));
        }
        // Like llama.cpp's server, the last chunk carries the request's timings (and the seed,
        // so a reply can be reproduced).
        let mut last = self.shape.chunk("", Value::Null, Some(finish));
        last["timings"] = json!(timings);
        last["seed"] = json!(seed);
        out += &data(&last);
        if self.include_usage {
            let mut v = self.shape.envelope(true, json!([]));
            v["usage"] = usage_json(usage);
            out += &data(&v);
        }
        out + DONE
    }
}

impl Render for OpenAiRender {
    fn render(&mut self, event: StreamEvent) -> (String, bool) {
        match event {
            StreamEvent::Started { .. } => (String::new(), false),
            StreamEvent::Token { id, text, logprob, top_logprobs } => {
                let mut out = self.opening();
                let logprobs = self.shape.logprobs(&[(id, logprob.unwrap_or(0.0), top_logprobs)], self.text_offset);
                self.text_offset += text.len();
                if let Some(parser) = self.parser.as_mut() {
                    let events = parser.push(&text);
                    out += &self.tool_events(events);
                    if !logprobs.is_null() {
                        out += &data(&self.shape.chunk("", logprobs, None));
                    }
                } else if !text.is_empty() || !logprobs.is_null() {
                    out += &data(&self.shape.chunk(&text, logprobs, None));
                }
                (out, false)
            }
            StreamEvent::Done { finish_reason, usage, text, timings, seed } => {
                (self.finish(finish_reason, &usage, &text, &timings, seed), true)
            }
            StreamEvent::Error(e) => (sse::frame(None, &e.to_json()) + DONE, true),
        }
    }
}
