//! Starling's own routes: generate, tokenize, detokenize, sessions, cancel, models.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::error::{ApiError, ErrorKind};
use crate::gateway::extract::{from_map, from_map_with_path, read_object, reject_unknown};
use crate::gateway::render::native::{NativeRender, generation_body};
use crate::gateway::render::{Body, json_response, sse};
use crate::gateway::service::{Job, collect, session_id, submit, validate_sampling};
use crate::gateway::state::{AppState, Ctx};
use crate::gateway::structured;
use crate::gateway::tools;
use crate::protocol::{EngineCommand, PromptInput, SamplingParams};
use crate::types::{SessionId, TokenId};

/// Fields `/v1/generate` accepts besides the sampling parameters.
const GENERATE_FIELDS: &[&str] = &[
    "prompt",
    "tokens",
    "model",
    "session_id",
    "stream",
    "timeout_secs",
    "parse_special",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];
/// Fields of [`SamplingParams`] on the wire.
const SAMPLING_FIELDS: &[&str] = &[
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "repeat_last_n",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "stop",
    "stop_token_ids",
    "logprobs",
    "samplers",
    "speculative",
];

#[derive(Deserialize)]
struct GenerateBody {
    prompt: Option<String>,
    tokens: Option<Vec<TokenId>>,
    model: Option<String>,
    session_id: Option<String>,
    stream: Option<bool>,
    timeout_secs: Option<f64>,
    parse_special: Option<bool>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
}

/// `GET /v1/models`: the serving models.
pub fn list_models(state: &AppState) -> Response<Body> {
    let table = state.models.snapshot();
    let data: Vec<_> = table
        .ready
        .iter()
        .map(|m| {
            json!({"id": m.id, "object": "model", "owned_by": "starling", "context_length": m.model.desc.n_ctx_train,
                   "tool_call_format": tools::model_format(&m.tokenizer).name(),
                   "structured_output": m.grammars.is_some()})
        })
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

pub async fn generate(state: &Arc<AppState>, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let mut map = read_object(req, state.config.server.max_body_bytes.get()).await?;
    let grammar = structured::native_fields(&mut map)?;
    reject_unknown(&map, &[GENERATE_FIELDS, SAMPLING_FIELDS])?;
    // Sampling fields apart, so a field of the wrong type is named in the error.
    let (sampling, map): (serde_json::Map<String, Value>, _) =
        map.into_iter().partition(|(k, _)| SAMPLING_FIELDS.contains(&k.as_str()));
    let sampling: SamplingParams = from_map_with_path(sampling)?;
    let body: GenerateBody = from_map_with_path(map)?;
    let model = state.model(body.model.as_deref())?;
    let input = match (body.prompt, body.tokens) {
        (Some(text), None) => PromptInput::Text { text, parse_special: body.parse_special.unwrap_or(true) },
        (None, Some(ids)) => PromptInput::Tokens(ids),
        (Some(_), Some(_)) => {
            return Err(ApiError::new(ErrorKind::InvalidRequest, "give either `prompt` or `tokens`, not both")
                .with_param("prompt"));
        }
        (None, None) => {
            return Err(ApiError::new(ErrorKind::InvalidRequest, "`prompt` (text) or `tokens` (ids) is required")
                .with_param("prompt"));
        }
    };
    let timeout = match body.timeout_secs {
        Some(t) if !(t > 0.0 && t <= 86_400.0) => {
            return Err(ApiError::invalid_parameter("timeout_secs", "`timeout_secs` must be in (0, 86400]"));
        }
        t => t.map(Duration::from_secs_f64),
    };
    let sampling = validate_sampling(&state.live().config.limits, &model, &sampling)?;
    let want_logprobs = sampling.logprobs > 0;
    let session = session_id(body.session_id, ctx)?;
    // Tools: the prompt is the client's own (no template); calls are constrained and parsed
    // as on the chat route.
    let spec = tools::from_request(body.tools.as_ref(), body.tool_choice.as_ref(), body.parallel_tool_calls)?;
    let tool_format = spec.as_ref().and_then(|s| s.reading(&model.tokenizer));
    let constraint =
        structured::request_constraint(state, &model, grammar, spec.as_ref(), tool_format.as_ref()).await?;
    let job = Job { timeout, constraint, keep_special: tool_format.is_some(), ..Job::new(input, sampling, session) };
    let sub = submit(state, ctx, &model, job).await?;
    if body.stream.unwrap_or(true) {
        let render = NativeRender { logprobs: want_logprobs, tools: tool_format, text: String::new() };
        Ok(sse::response(sub, render, state.config.server.sse_keepalive))
    } else {
        let out = collect(sub).await?;
        let v = generation_body(&out, model.id.as_str(), want_logprobs, &tool_format);
        Ok(json_response(StatusCode::OK, &v))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeBody {
    text: String,
    model: Option<String>,
    parse_special: Option<bool>,
    with_offsets: Option<bool>,
    with_pieces: Option<bool>,
}

pub async fn tokenize(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: TokenizeBody = from_map(read_object(req, state.config.server.max_body_bytes.get()).await?)?;
    let model = state.model(body.model.as_deref())?;
    let (tok, text, special) = (model.tokenizer.clone(), body.text, body.parse_special.unwrap_or(true));
    let enc = state
        .cpu
        .run(move || tok.encode_with_offsets(&text, special))
        .await?
        .map_err(|e| ApiError::new(ErrorKind::InvalidRequest, e.to_string()).with_param("text"))?;
    let mut v = json!({"ids": enc.ids, "count": enc.ids.len()});
    if body.with_offsets.unwrap_or(false) {
        v["offsets"] = json!(enc.offsets);
    }
    if body.with_pieces.unwrap_or(false) {
        v["pieces"] = json!(enc.pieces);
    }
    Ok(json_response(StatusCode::OK, &v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeBody {
    tokens: Vec<i64>,
    model: Option<String>,
    skip_special: Option<bool>,
}

pub async fn detokenize(state: &Arc<AppState>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: DetokenizeBody = from_map(read_object(req, state.config.server.max_body_bytes.get()).await?)?;
    let model = state.model(body.model.as_deref())?;
    let vocab = model.tokenizer.vocab_size();
    let ids = body
        .tokens
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            u32::try_from(id).ok().filter(|&id| (id as usize) < vocab).ok_or_else(|| {
                ApiError::invalid_parameter(
                    "tokens",
                    format!("token id {id} at tokens[{i}] is outside the vocabulary (0..{vocab})"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (tok, skip) = (model.tokenizer.clone(), body.skip_special.unwrap_or(false));
    let text = state
        .cpu
        .run(move || tok.decode(&ids, skip))
        .await?
        .map_err(|e| ApiError::invalid_parameter("tokens", e.to_string()))?;
    Ok(json_response(StatusCode::OK, &json!({"text": text})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    session_id: String,
    model: Option<String>,
}

pub async fn close_session(
    state: &Arc<AppState>,
    ctx: &Ctx,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: CloseBody = from_map(read_object(req, state.config.server.max_body_bytes.get()).await?)?;
    let model = state.model(body.model.as_deref())?;
    let (reply, wait) = oneshot::channel();
    let tenant = ctx.caller.tenant.clone();
    model.engine.send(EngineCommand::CloseSession { tenant, session: SessionId(body.session_id.clone()), reply })?;
    match wait.await {
        Ok(Ok(())) => Ok(json_response(StatusCode::OK, &json!({"closed": body.session_id}))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::new(ErrorKind::Unavailable, "the engine stopped").with_code("engine_stopped")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    request_id: String,
    model: Option<String>,
}

/// `POST /v1/cancel`: ends the caller's running request named `request_id` (the
/// `x-request-id` its response carried). Its stream ends with finish reason `cancelled`;
/// an unknown id, or another tenant's, is 404.
pub async fn cancel(state: &Arc<AppState>, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: CancelBody = from_map(read_object(req, state.config.server.max_body_bytes.get()).await?)?;
    if body.request_id.is_empty() {
        return Err(ApiError::invalid_parameter("request_id", "`request_id` must not be empty"));
    }
    let model = state.model(body.model.as_deref())?;
    let (reply, wait) = oneshot::channel();
    let tenant = ctx.caller.tenant.clone();
    model.engine.send(EngineCommand::Cancel { tenant, request_id: body.request_id.clone(), reply })?;
    match wait.await {
        Ok(Ok(())) => Ok(json_response(StatusCode::OK, &json!({"cancelled": body.request_id}))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::new(ErrorKind::Unavailable, "the engine stopped").with_code("engine_stopped")),
    }
}
