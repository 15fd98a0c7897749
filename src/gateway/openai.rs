//! OpenAI-compatible routes: `/v1/completions` and `/v1/chat/completions`, their request
//! fields mapped onto Starling's sampler, and their response and chunk shapes.
//!
//! Unknown fields are ignored (OpenAI clients send extras). Starling extensions accepted
//! here: `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `session_id`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::http::{Body, json_response};
use super::native::{Collected, Job, collect, read_object, session_id, submit, validate_sampling};
use super::sse::{self, Render};
use super::template::{ChatMessage, Specials, render_chat};
use super::{AppState, Ctx};
use crate::error::{ApiError, ErrorKind};
use crate::protocol::{FinishReason, PromptInput, StreamEvent, TokenLogprob, Usage};
use crate::sampler::SamplingParams;
use crate::tokenizer::GgufTokenizer;
use crate::types::{RequestId, TokenId};

/// A string or a list of strings (`stop`, `prompt`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// `prompt` of `/v1/completions`: text, one-element text list, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum WirePrompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<TokenId>),
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct WireMessage {
    role: String,
    content: Option<Value>,
}

/// The fields both OpenAI routes share; everything else is ignored.
#[derive(Deserialize)]
struct OpenAiBody {
    model: Option<String>,
    prompt: Option<WirePrompt>,
    messages: Option<Vec<WireMessage>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    stop: Option<OneOrMany<String>>,
    seed: Option<u64>,
    logprobs: Option<Value>,
    top_logprobs: Option<u32>,
    logit_bias: Option<BTreeMap<String, f32>>,
    n: Option<u32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    min_tokens: Option<u32>,
    ignore_eos: Option<bool>,
    session_id: Option<String>,
}

/// Which OpenAI object family a route speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// How many alternatives to report per token; `None` = no logprobs at all.
fn wanted_logprobs(kind: Kind, b: &OpenAiBody) -> Result<Option<u32>, ApiError> {
    match (kind, &b.logprobs) {
        (_, None | Some(Value::Null)) => Ok(None),
        (Kind::Chat, Some(Value::Bool(on))) => Ok(on.then_some(b.top_logprobs.unwrap_or(0))),
        (Kind::Completion, Some(Value::Number(n))) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| ApiError::invalid_parameter("logprobs", "`logprobs` must be a non-negative integer")),
        (Kind::Chat, _) => Err(ApiError::invalid_parameter("logprobs", "`logprobs` must be a boolean")),
        (Kind::Completion, _) => Err(ApiError::invalid_parameter("logprobs", "`logprobs` must be an integer")),
    }
}

fn sampling_params(b: &OpenAiBody, logprobs: Option<u32>) -> Result<SamplingParams, ApiError> {
    let logit_bias = match &b.logit_bias {
        None => None,
        Some(map) => Some(
            map.iter()
                .map(|(k, v)| {
                    k.parse::<TokenId>().map(|id| (id, *v)).map_err(|_| {
                        ApiError::invalid_parameter("logit_bias", format!("`logit_bias` key `{k}` is not a token id"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(SamplingParams {
        temperature: b.temperature,
        top_k: b.top_k,
        top_p: b.top_p,
        min_p: b.min_p,
        repetition_penalty: b.repetition_penalty,
        frequency_penalty: b.frequency_penalty,
        presence_penalty: b.presence_penalty,
        logit_bias,
        seed: b.seed,
        max_tokens: b.max_completion_tokens.or(b.max_tokens),
        min_tokens: b.min_tokens,
        ignore_eos: b.ignore_eos,
        stop: b.stop.as_ref().map(|s| match s {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }),
        // The sampler reports the chosen token's logprob only when asked for at least one.
        logprobs: logprobs.map(|n| n.max(1)),
        ..SamplingParams::default()
    })
}

fn parse(map: Map<String, Value>) -> Result<OpenAiBody, ApiError> {
    serde_path_to_error::deserialize(Value::Object(map)).map_err(|e| {
        let path = e.path().to_string();
        ApiError::new(ErrorKind::InvalidRequest, format!("invalid request: `{path}`: {}", e.inner())).with_param(path)
    })
}

pub async fn completions(state: &Arc<AppState>, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = parse(read_object(state, req).await?)?;
    let input = match &body.prompt {
        Some(WirePrompt::Text(t)) => PromptInput::Text { text: t.clone(), parse_special: true },
        Some(WirePrompt::Texts(v)) if v.len() == 1 => PromptInput::Text { text: v[0].clone(), parse_special: true },
        Some(WirePrompt::Texts(_)) => {
            return Err(ApiError::invalid_parameter("prompt", "`prompt` lists must hold exactly one prompt"));
        }
        Some(WirePrompt::Tokens(ids)) => PromptInput::Tokens(ids.clone()),
        None => return Err(ApiError::new(ErrorKind::InvalidRequest, "`prompt` is required").with_param("prompt")),
    };
    run(state, ctx, Kind::Completion, body, input).await
}

pub async fn chat_completions(
    state: &Arc<AppState>,
    ctx: &Ctx,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = parse(read_object(state, req).await?)?;
    let model = state.model(body.model.as_deref())?;
    let messages = chat_messages(body.messages.as_deref())?;
    let tok = &model.tokenizer;
    let piece = |id: Option<TokenId>| id.and_then(|id| tok.token_text(id).ok()).unwrap_or("").to_owned();
    let (bos, eos) = (piece(tok.bos_id()), piece(tok.eos_id()));
    let specials = Specials { bos_token: &bos, eos_token: &eos };
    let text = render_chat(model.id.as_str(), tok.chat_template(), &messages, &specials)?;
    run(state, ctx, Kind::Chat, body, PromptInput::Text { text, parse_special: true }).await
}

/// Flattens `messages` (content as a string or a list of text parts) for the template.
fn chat_messages(raw: Option<&[WireMessage]>) -> Result<Vec<ChatMessage>, ApiError> {
    let raw = match raw {
        Some(m) if !m.is_empty() => m,
        _ => {
            return Err(
                ApiError::new(ErrorKind::InvalidRequest, "`messages` must be a non-empty list").with_param("messages")
            );
        }
    };
    raw.iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts.iter().filter_map(|p| p.get("text")?.as_str()).collect(),
                Some(_) => {
                    return Err(ApiError::invalid_parameter(
                        &format!("messages[{i}].content"),
                        "`content` must be a string or a list of text parts",
                    ));
                }
            };
            Ok(ChatMessage { role: m.role.clone(), content })
        })
        .collect()
}

async fn run(
    state: &Arc<AppState>,
    ctx: &Ctx,
    kind: Kind,
    body: OpenAiBody,
    input: PromptInput,
) -> Result<Response<Body>, ApiError> {
    if let Some(n) = body.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid_parameter(
            "n",
            format!("`n` must be 1 (got {n}); ask for one choice per request"),
        ));
    }
    let model = state.model(body.model.as_deref())?;
    let top = wanted_logprobs(kind, &body)?;
    let sampling = validate_sampling(state, &model, &sampling_params(&body, top)?)?;
    let session = session_id(body.session_id.clone())?;
    let sub = submit(state, ctx, &model, Job { input, sampling, session, timeout: None }).await?;
    let shape = Shape {
        kind,
        id: format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, RequestId::next().0),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: model.id.to_string(),
        top,
        tokenizer: model.tokenizer.clone(),
    };
    if body.stream.unwrap_or(false) {
        let include_usage = body.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let render = OpenAiRender { shape, include_usage, started: false, text_offset: 0 };
        Ok(sse::response(sub, render, state.config.server.sse_keepalive))
    } else {
        let out = collect(sub).await?;
        Ok(json_response(StatusCode::OK, &shape.whole(&out)))
    }
}

/// What every response object of one request repeats.
struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    top: Option<u32>,
    tokenizer: Arc<GgufTokenizer>,
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
    fn whole(&self, out: &Collected) -> Value {
        let logprobs = self.logprobs(&out.logprobs, 0);
        let finish = finish_name(out.finish_reason);
        let choice = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs, "finish_reason": finish})
            }
            Kind::Completion => json!({"index": 0, "text": out.text, "logprobs": logprobs, "finish_reason": finish}),
        };
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage_json(&out.usage);
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
struct OpenAiRender {
    shape: Shape,
    include_usage: bool,
    started: bool,
    text_offset: usize,
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

    fn finish(&mut self, reason: FinishReason, usage: &Usage, text: &str) -> String {
        let mut out = self.opening();
        if !text.is_empty() {
            out += &data(&self.shape.chunk(text, Value::Null, None));
        }
        out += &data(&self.shape.chunk("", Value::Null, Some(finish_name(reason))));
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
                if !text.is_empty() || !logprobs.is_null() {
                    out += &data(&self.shape.chunk(&text, logprobs, None));
                }
                (out, false)
            }
            StreamEvent::Done { finish_reason, usage, text, .. } => (self.finish(finish_reason, &usage, &text), true),
            StreamEvent::Error(e) => (sse::frame(None, &e.to_json()) + DONE, true),
        }
    }
}
