//! Starling's own routes: generate, tokenize, detokenize, sessions, health, models.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};

use super::http::{Body, json_response, parse_json, read_body};
use super::sse::{self, Render};
use super::{AppState, Ctx};
use crate::engine::load::LoadedModel;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::{
    EngineCommand, FinishReason, GenerateRequest, PromptInput, StreamEvent, Timings, TokenLogprob, Usage,
};
use crate::sampler::{SamplerLimits, SamplingConfig, SamplingParams};
use crate::types::{RequestId, SessionId, TenantId, TokenId};

/// Events buffered per stream before a slow reader pauses its sequence.
const STREAM_CAPACITY: usize = 64;

/// Fields `/v1/generate` accepts besides the sampling parameters.
const GENERATE_FIELDS: &[&str] =
    &["prompt", "tokens", "model", "session_id", "stream", "timeout_secs", "parse_special"];
/// Fields of [`SamplingParams`] on the wire.
pub const SAMPLING_FIELDS: &[&str] = &[
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
    #[serde(flatten)]
    sampling: SamplingParams,
}

pub fn healthz(state: &AppState) -> Response<Body> {
    crate::telemetry::routes::healthz(state)
}

pub fn readyz(state: &AppState) -> Response<Body> {
    crate::telemetry::routes::readyz(state)
}

/// `GET /admin/stats`: every engine's counters.
pub fn stats(state: &AppState) -> Response<Body> {
    let table = state.models.snapshot();
    let models: Vec<_> = table
        .ready
        .iter()
        .map(|m| {
            let s = &m.engine.status;
            json!({
                "id": m.id,
                "ticks": s.ticks.load(Ordering::Relaxed),
                "queued": s.queued.load(Ordering::Relaxed),
                "running": s.running.load(Ordering::Relaxed),
                "sessions": s.sessions.load(Ordering::Relaxed),
                "kv_blocks_used": s.kv_blocks_used.load(Ordering::Relaxed),
                "kv_blocks_total": s.kv_blocks_total.load(Ordering::Relaxed),
                "forward_calls": s.forward_calls.load(Ordering::Relaxed),
                "admission_open": s.admission_open.load(Ordering::Relaxed),
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"draining": state.draining.load(Ordering::Relaxed), "models": models}))
}

pub fn list_models(state: &AppState) -> Response<Body> {
    let table = state.models.snapshot();
    let data: Vec<_> = table
        .ready
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "owned_by": "starling", "context_length": m.model.hparams.n_ctx_train}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// Rejects fields a native route does not know (OpenAI routes ignore extras instead).
pub fn reject_unknown(map: &Map<String, Value>, allowed: &[&[&str]]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.iter().any(|list| list.contains(&k.as_str()))) {
        Some(k) => Err(ApiError::new(ErrorKind::InvalidRequest, format!("unknown field `{k}`")).with_param(k.clone())),
        None => Ok(()),
    }
}

/// Reads a JSON object body.
pub async fn read_object(state: &AppState, req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(req, state.config.server.max_body_bytes.get()).await?;
    match parse_json::<Value>(&bytes)? {
        Value::Object(map) => Ok(map),
        other => Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("expected a JSON object, found {}", json_kind(&other)),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn from_map<T: serde::de::DeserializeOwned>(map: Map<String, Value>) -> Result<T, ApiError> {
    serde_json::from_value(Value::Object(map))
        .map_err(|e| ApiError::new(ErrorKind::InvalidRequest, format!("invalid request: {e}")))
}

/// Validates sampling parameters against the model and the server limits.
pub fn validate_sampling(
    state: &AppState,
    model: &LoadedModel,
    p: &SamplingParams,
) -> Result<SamplingConfig, ApiError> {
    let live = state.live();
    let l = &live.config.limits;
    if p.logprobs.is_some_and(|n| n > l.max_logprobs) {
        return Err(ApiError::invalid_parameter("logprobs", format!("`logprobs` must be in [0, {}]", l.max_logprobs)));
    }
    p.validate_with_order(
        &SamplerLimits {
            vocab_size: model.tokenizer.vocab_size(),
            max_stop_strings: l.max_stop_strings,
            default_max_tokens: l.default_max_tokens,
            max_tokens_cap: l.max_tokens_cap,
        },
        &model.sampler_order,
    )
}

/// An admitted generation: its event receiver, plus what the stream needs on the way out
/// (the tenant's token charge, the server's cancellation signal).
pub struct Submission {
    pub rx: mpsc::Receiver<StreamEvent>,
    meter: Meter,
    /// Turns `true` when shutdown cancels open streams.
    pub cancel: watch::Receiver<bool>,
}

/// Charges a finished request's tokens to its tenant, once.
struct Meter {
    state: Arc<AppState>,
    tenant: TenantId,
}

impl Submission {
    /// Charges the request's tokens to its tenant (call on the `Done` event).
    pub fn charge(&self, usage: &Usage) {
        let used = usage.prompt_tokens + usage.completion_tokens;
        self.meter.state.live().quotas.charge(&self.meter.tenant, used, Instant::now());
    }
}

/// What to generate, validated: the engine-facing part of a generation request.
pub struct Job {
    pub input: PromptInput,
    pub sampling: SamplingConfig,
    pub session: Option<SessionId>,
    pub timeout: Option<Duration>,
}

/// Sends a request to the model's engine and waits for admission (the first event): an
/// error there becomes the HTTP status; after it, errors travel in the stream.
pub async fn submit(state: &Arc<AppState>, ctx: &Ctx, model: &LoadedModel, job: Job) -> Result<Submission, ApiError> {
    let Job { input, sampling, session, timeout } = job;
    if state.draining.load(Ordering::Relaxed) {
        let e = ApiError::new(ErrorKind::Unavailable, "the server is shutting down").with_code("draining");
        return Err(state.obs.rejected(model.id.as_str(), e));
    }
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    let request = GenerateRequest {
        id: RequestId::next(),
        client_id: Some(ctx.request_id.clone()),
        tenant: ctx.caller.tenant.clone(),
        session,
        input,
        sampling,
        timeout: timeout.unwrap_or(state.live().config.limits.default_timeout),
        received_at: Instant::now(),
        events: tx,
    };
    let sent = model.engine.send(EngineCommand::Generate(Box::new(request)));
    sent.map_err(|e| state.obs.rejected(model.id.as_str(), e))?;
    match rx.recv().await {
        Some(StreamEvent::Started { .. }) => Ok(Submission {
            rx,
            meter: Meter { state: state.clone(), tenant: ctx.caller.tenant.clone() },
            cancel: state.cancel.subscribe(),
        }),
        Some(StreamEvent::Error(e)) => Err(state.obs.rejected(model.id.as_str(), e)),
        Some(other) => Err(ApiError::new(ErrorKind::Internal, format!("unexpected first event {other:?}"))),
        None => {
            Err(ApiError::new(ErrorKind::Unavailable, "the engine dropped the request").with_code("engine_stopped"))
        }
    }
}

pub async fn generate(state: &Arc<AppState>, ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let map = read_object(state, req).await?;
    reject_unknown(&map, &[GENERATE_FIELDS, SAMPLING_FIELDS])?;
    let body: GenerateBody = from_map(map)?;
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
    let sampling = validate_sampling(state, &model, &body.sampling)?;
    let want_logprobs = sampling.logprobs > 0;
    let session = session_id(body.session_id)?;
    let sub = submit(state, ctx, &model, Job { input, sampling, session, timeout }).await?;
    if body.stream.unwrap_or(true) {
        let render = NativeRender { logprobs: want_logprobs };
        Ok(sse::response(sub, render, state.config.server.sse_keepalive))
    } else {
        let out = collect(sub).await?;
        Ok(json_response(StatusCode::OK, &out.to_json(&model.id.0, want_logprobs)))
    }
}

/// Checks a client-chosen session name.
pub fn session_id(raw: Option<String>) -> Result<Option<SessionId>, ApiError> {
    match raw {
        Some(s) if s.is_empty() || s.len() > 256 => {
            Err(ApiError::invalid_parameter("session_id", "`session_id` must be 1 to 256 characters"))
        }
        s => Ok(s.map(SessionId)),
    }
}

/// A finished generation gathered from its events.
pub struct Collected {
    pub tokens: Vec<TokenId>,
    pub text: String,
    pub logprobs: Vec<(TokenId, f32, Vec<TokenLogprob>)>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    pub seed: u64,
}

impl Collected {
    fn to_json(&self, model: &str, logprobs: bool) -> Value {
        let mut v = json!({
            "model": model,
            "text": self.text,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "timings": self.timings,
            "seed": self.seed,
        });
        if logprobs {
            v["logprobs"] = self
                .logprobs
                .iter()
                .map(|(id, lp, top)| json!({"id": id, "logprob": lp, "top_logprobs": top}))
                .collect();
        }
        v
    }
}

/// Reads events to the end. An error after admission is returned as the error.
pub async fn collect(mut sub: Submission) -> Result<Collected, ApiError> {
    let mut out = Collected {
        tokens: vec![],
        text: String::new(),
        logprobs: vec![],
        finish_reason: FinishReason::Error,
        usage: Usage::default(),
        timings: Timings::default(),
        seed: 0,
    };
    while let Some(event) = sub.rx.recv().await {
        match event {
            StreamEvent::Started { .. } => {}
            StreamEvent::Token { id, text, logprob, top_logprobs } => {
                out.tokens.push(id);
                out.text.push_str(&text);
                out.logprobs.push((id, logprob.unwrap_or(0.0), top_logprobs));
            }
            StreamEvent::Done { finish_reason, usage, timings, seed, text } => {
                sub.charge(&usage);
                out.text.push_str(&text);
                (out.finish_reason, out.usage, out.timings, out.seed) = (finish_reason, usage, timings, seed);
                return Ok(out);
            }
            StreamEvent::Error(e) => return Err(e),
        }
    }
    Err(ApiError::new(ErrorKind::Internal, "the engine ended the request without a final event"))
}

/// Native SSE shapes: `token`, `done`, `error` events.
struct NativeRender {
    logprobs: bool,
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
    let body: TokenizeBody = from_map(read_object(state, req).await?)?;
    let model = state.model(body.model.as_deref())?;
    let enc = model
        .tokenizer
        .encode_with_offsets(&body.text, body.parse_special.unwrap_or(true))
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
    let body: DetokenizeBody = from_map(read_object(state, req).await?)?;
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
    let text = model
        .tokenizer
        .decode(&ids, body.skip_special.unwrap_or(false))
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
    let body: CloseBody = from_map(read_object(state, req).await?)?;
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
    let body: CancelBody = from_map(read_object(state, req).await?)?;
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
