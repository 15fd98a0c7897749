//! Starling's own response shapes: SSE `token`, `done` and `error` events, and the one
//! JSON body of a non-streaming `/v1/generate`.

use serde::Serialize;
use serde_json::{Value, json};

use super::sse::{self, Render};
use crate::gateway::service::Collected;
use crate::protocol::{StreamEvent, TokenLogprob};
use crate::types::TokenId;

/// Native SSE shapes: `token`, `done`, `error` events.
pub struct NativeRender {
    /// Whether token events carry `logprob` and `top_logprobs`.
    pub logprobs: bool,
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
                let f = TokenFrame {
                    id,
                    text: &text,
                    logprob: logprob.filter(|_| self.logprobs),
                    top_logprobs: self.logprobs.then_some(&top_logprobs[..]),
                };
                (sse::frame(Some("token"), &serde_json::to_string(&f).expect("serializes")), false)
            }
            StreamEvent::Done { finish_reason, usage, timings, seed, text } => {
                let v = json!({"finish_reason": finish_reason, "usage": usage, "timings": timings, "seed": seed, "text": text});
                (sse::frame(Some("done"), &v.to_string()), true)
            }
            StreamEvent::Error(e) => (sse::frame(Some("error"), &e.to_json()), true),
        }
    }
}

/// The non-streaming body of a generation.
pub fn generation_body(out: &Collected, model: &str, logprobs: bool) -> Value {
    let mut v = json!({
        "model": model,
        "text": out.text,
        "tokens": out.tokens,
        "finish_reason": out.finish_reason,
        "usage": out.usage,
        "timings": out.timings,
        "seed": out.seed,
    });
    if logprobs {
        v["logprobs"] =
            out.logprobs.iter().map(|(id, lp, top)| json!({"id": id, "logprob": lp, "top_logprobs": top})).collect();
    }
    v
}
