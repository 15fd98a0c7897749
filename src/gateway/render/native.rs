//! Starling's own response shapes: SSE `token`, `done` and `error` events, and the one
//! JSON body of a non-streaming `/v1/generate`.

use serde::Serialize;
use serde_json::{Value, json};

use super::sse::{self, Render};
use crate::gateway::extract::random_id;
use crate::gateway::service::Collected;
use crate::gateway::tools::{self, CallReading};
use crate::protocol::{FinishReason, StreamEvent, TokenLogprob};
use crate::types::TokenId;

/// Native SSE shapes: `token`, `done`, `error` events.
pub struct NativeRender {
    /// Whether token events carry `logprob` and `top_logprobs`.
    pub logprobs: bool,
    /// Tool calls are parsed from the whole output in this syntax, for these functions,
    /// and reported in the `done` event.
    pub tools: Option<CallReading>,
    /// The output so far (kept only with `tools`).
    pub text: String,
}

/// With tools: the output's `content` and `tool_calls` added to a done event or body, and
/// `finish_reason` set to `tool_calls` when a finished output held calls.
fn add_tool_calls(v: &mut Value, tools: &Option<CallReading>, text: &str, finish: FinishReason) {
    let Some(reading) = tools else { return };
    let (content, calls) = tools::split_output(reading, text);
    v["content"] = json!(content);
    v["tool_calls"] = calls.iter().map(|c| tools::call_json(&random_id("call"), c)).collect();
    if !calls.is_empty() && finish == FinishReason::Stop {
        v["finish_reason"] = json!("tool_calls");
    }
}

#[derive(Serialize)]
struct TokenFrame<'a> {
    id: TokenId,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprob: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<&'a [TokenLogprob]>,
}

impl Render for NativeRender {
    fn render(&mut self, event: StreamEvent) -> (String, bool) {
        match event {
            StreamEvent::Started { .. } => (String::new(), false),
            StreamEvent::Token { id, text, logprob, top_logprobs } => {
                if self.tools.is_some() {
                    self.text.push_str(&text);
                }
                let f = TokenFrame {
                    id,
                    text: &text,
                    logprob: logprob.filter(|_| self.logprobs),
                    top_logprobs: self.logprobs.then_some(&top_logprobs[..]),
                };
                (sse::frame(Some("token"), &serde_json::to_string(&f).expect("serializes")), false)
            }
            StreamEvent::Done { finish_reason, usage, timings, seed, text } => {
                let mut v = json!({"finish_reason": finish_reason, "usage": usage, "timings": timings, "seed": seed, "text": text});
                self.text.push_str(&text);
                add_tool_calls(&mut v, &self.tools, &self.text, finish_reason);
                (sse::frame(Some("done"), &v.to_string()), true)
            }
            StreamEvent::Error(e) => (sse::frame(Some("error"), &e.to_json()), true),
        }
    }
}

/// The non-streaming body of a generation.
pub fn generation_body(out: &Collected, model: &str, logprobs: bool, tools: &Option<CallReading>) -> Value {
    let mut v = json!({
        "model": model,
        "text": out.text,
        "tokens": out.tokens,
        "finish_reason": out.finish_reason,
        "usage": out.usage,
        "timings": out.timings,
        "seed": out.seed,
    });
    add_tool_calls(&mut v, tools, &out.text, out.finish_reason);
    if logprobs {
        v["logprobs"] =
            out.logprobs.iter().map(|(id, lp, top)| json!({"id": id, "logprob": lp, "top_logprobs": top})).collect();
    }
    v
}
