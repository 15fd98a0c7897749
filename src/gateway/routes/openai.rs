//! OpenAI-compatible routes: `/v1/completions` and `/v1/chat/completions`, their request
//! fields mapped onto Starling's sampler (the shapes they answer with are in
//! `render::openai`).
//!
//! Unknown fields are ignored (OpenAI clients send extras). Starling extensions accepted
//! here: `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `session_id`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ApiError, ErrorKind};
use crate::gateway::extract::{from_map_with_path, random_id, read_object};
use crate::gateway::render::openai::{Kind, OpenAiRender, Shape};
use crate::gateway::render::{Body, json_response, sse};
use crate::gateway::service::{Job, collect, session_id, submit, validate_sampling};
use crate::gateway::state::{AppState, Ctx};
use crate::gateway::structured;
use crate::gateway::template::ChatMessage;
use crate::gateway::template::sandbox::RenderJob;
use crate::gateway::tools::{self, ToolChoice};
use crate::protocol::{PromptInput, SamplingParams};
use crate::types::TokenId;

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
    tool_calls: Option<Value>,
    tool_call_id: Option<String>,
    name: Option<String>,
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
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    speculative: Option<bool>,
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
        speculative: b.speculative,
        ..SamplingParams::default()
    })
}

pub async fn completions(state: &Arc<AppState>, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: OpenAiBody = from_map_with_path(read_object(req, state.config.server.max_body_bytes.get()).await?)?;
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
    let body: OpenAiBody = from_map_with_path(read_object(req, state.config.server.max_body_bytes.get()).await?)?;
    let model = state.model(body.model.as_deref())?;
    let messages = chat_messages(body.messages.as_deref())?;
    let spec = tools::from_request(body.tools.as_ref(), body.tool_choice.as_ref(), body.parallel_tool_calls)?;
    let mut job = RenderJob::new(model.id.as_str(), &model.tokenizer, messages);
    job.tools = spec.as_ref().filter(|s| s.choice != ToolChoice::None).map(|s| s.tools.clone());
    let templates = state.templates.clone();
    let text = state.template_slots.run(move || templates.render(&job)).await??;
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
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
                tool_calls: m.tool_calls.as_ref().filter(|v| !v.is_null()).map(tools::template_tool_calls),
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
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
    let sampling = validate_sampling(&state.live().config.limits, &model, &sampling_params(&body, top)?)?;
    let session = session_id(body.session_id.clone(), ctx)?;
    let spec = match kind {
        Kind::Chat => tools::from_request(body.tools.as_ref(), body.tool_choice.as_ref(), body.parallel_tool_calls)?,
        Kind::Completion => None,
    };
    let format = body.response_format.as_ref().map(structured::response_format).transpose()?.flatten();
    let tool_format = spec.as_ref().and_then(|s| s.reading(&model.tokenizer));
    let grammar = format.map(|g| (g, "response_format"));
    let constraint =
        structured::request_constraint(state, &model, grammar, spec.as_ref(), tool_format.as_ref()).await?;
    let job = Job { constraint, keep_special: tool_format.is_some(), ..Job::new(input, sampling, session) };
    let sub = submit(state, ctx, &model, job).await?;
    let shape = Shape {
        kind,
        id: random_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: model.id.to_string(),
        top,
        tokenizer: model.tokenizer.clone(),
        tools: tool_format,
    };
    if body.stream.unwrap_or(false) {
        let include_usage = body.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let render = OpenAiRender::new(shape, include_usage);
        Ok(sse::response(sub, render, state.config.server.sse_keepalive))
    } else {
        let out = collect(sub).await?;
        Ok(json_response(StatusCode::OK, &shape.whole(&out)))
    }
}
