//! The generation service: every route that generates, and the CLI's `generate`, go
//! through it. A validated [`Job`] becomes an `EngineCommand`, admission is awaited (so
//! refusals become HTTP statuses), and the request's events are either streamed by a
//! renderer or gathered into one [`Collected`] result.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::state::{AppState, Ctx};
use crate::config::LimitsConfig;
use crate::engine::load::LoadedModel;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::{
    Constraint, EngineCommand, FinishReason, GenerateRequest, PromptInput, SamplerLimits, SamplingConfig,
    SamplingParams, StreamEvent, Timings, TokenLogprob, Usage,
};
use crate::types::{RequestId, SessionId, TenantId, TokenId};

/// Events buffered per stream before a slow reader pauses its sequence.
const STREAM_CAPACITY: usize = 64;

/// What to generate, validated: the engine-facing part of a generation request.
pub struct Job {
    pub input: PromptInput,
    pub sampling: SamplingConfig,
    pub session: Option<SessionId>,
    /// How long the request may run in total; `None` = the configured default.
    pub timeout: Option<Duration>,
    /// A compiled output constraint (`gateway::structured`).
    pub constraint: Option<Constraint>,
    /// Keep special and control tokens in the streamed text (tool-call markers).
    pub keep_special: bool,
}

impl Job {
    /// An unconstrained job whose text skips special tokens.
    pub fn new(input: PromptInput, sampling: SamplingConfig, session: Option<SessionId>) -> Self {
        Job { input, sampling, session, timeout: None, constraint: None, keep_special: false }
    }
}

/// Who a job runs for: the tenant it is billed to, and the name the client knows it by
/// (its `x-request-id`, used by cancel and the request log).
pub struct Origin {
    pub tenant: TenantId,
    pub client_id: Option<String>,
    /// When the request arrived (its timings count from here).
    pub received_at: Instant,
}

/// An admitted generation: its event receiver, plus what the stream needs on the way out
/// (the tenant's token charge, the server's cancellation signal).
pub struct Submission {
    pub rx: mpsc::Receiver<StreamEvent>,
    meter: Option<Meter>,
    /// Prompt tokens of the request (counted when it was admitted).
    pub prompt_tokens: usize,
    /// Turns `true` when shutdown cancels open streams.
    pub cancel: watch::Receiver<bool>,
}

/// Charges a request's tokens to its tenant as they are used: the prompt on admission,
/// each generated token as it reaches the stream, however the stream then ends.
struct Meter {
    state: Arc<AppState>,
    tenant: TenantId,
}

impl Meter {
    fn charge(&self, tokens: usize) {
        self.state.live().quotas.charge(&self.tenant, tokens, Instant::now());
    }
}

impl Submission {
    /// Charges what `event` carries to the request's tenant (one token per token event).
    pub fn meter(&self, event: &StreamEvent) {
        if let (Some(m), StreamEvent::Token { .. }) = (&self.meter, event) {
            m.charge(1);
        }
    }
}

/// Validates sampling parameters against the model and the server limits.
pub fn validate_sampling(
    limits: &LimitsConfig,
    model: &LoadedModel,
    p: &SamplingParams,
) -> Result<SamplingConfig, ApiError> {
    if p.logprobs.is_some_and(|n| n > limits.max_logprobs) {
        return Err(ApiError::invalid_parameter(
            "logprobs",
            format!("`logprobs` must be in [0, {}]", limits.max_logprobs),
        ));
    }
    p.validate_with_order(
        &SamplerLimits {
            vocab_size: model.tokenizer.vocab_size(),
            max_stop_strings: limits.max_stop_strings,
            default_max_tokens: limits.default_max_tokens,
            max_tokens_cap: limits.max_tokens_cap,
        },
        &model.sampler_order,
    )
}

/// The header that names a session as the body's `session_id` does.
pub const SESSION_HEADER: &str = "x-session-id";

/// Checks a client-chosen session name, given in the body (`session_id`) or in the
/// `x-session-id` header (`ctx`); both may be given if they agree.
pub fn session_id(body: Option<String>, ctx: &Ctx) -> Result<Option<SessionId>, ApiError> {
    let header = match &ctx.session_header {
        None => None,
        Some(v) => Some(v.to_str().map(str::to_owned).map_err(|_| {
            ApiError::invalid_parameter("session_id", format!("the `{SESSION_HEADER}` header must be visible ASCII"))
        })?),
    };
    let raw = match (body, header) {
        (Some(b), Some(h)) if b != h => {
            return Err(ApiError::invalid_parameter(
                "session_id",
                format!("`session_id` ({b:?}) and the `{SESSION_HEADER}` header ({h:?}) name different sessions"),
            ));
        }
        (b, h) => b.or(h),
    };
    match raw {
        Some(s) if s.is_empty() || s.len() > 256 => {
            Err(ApiError::invalid_parameter("session_id", "`session_id` must be 1 to 256 characters"))
        }
        s => Ok(s.map(SessionId)),
    }
}

/// Sends `job` to the model's engine and waits for admission (the first event): an error
/// there is returned; after it, errors travel in the stream. `default_timeout` applies
/// when the job sets none.
pub async fn start(
    model: &LoadedModel,
    origin: Origin,
    job: Job,
    default_timeout: Duration,
) -> Result<Submission, ApiError> {
    let Job { input, sampling, session, timeout, constraint, keep_special } = job;
    let (tx, mut rx) = mpsc::channel(STREAM_CAPACITY);
    let request = GenerateRequest {
        constraint,
        keep_special,
        id: RequestId::next(),
        client_id: origin.client_id,
        tenant: origin.tenant,
        session,
        input,
        sampling,
        timeout: timeout.unwrap_or(default_timeout),
        received_at: origin.received_at,
        events: tx,
    };
    model.engine.send(EngineCommand::Generate(Box::new(request)))?;
    match rx.recv().await {
        Some(StreamEvent::Started { prompt_tokens, .. }) => {
            Ok(Submission { rx, meter: None, prompt_tokens, cancel: watch::channel(false).1 })
        }
        Some(StreamEvent::Error(e)) => Err(e),
        Some(other) => Err(ApiError::new(ErrorKind::Internal, format!("unexpected first event {other:?}"))),
        None => {
            Err(ApiError::new(ErrorKind::Unavailable, "the engine dropped the request").with_code("engine_stopped"))
        }
    }
}

/// [`start`] for an HTTP request: refused while the server drains, refusals counted in
/// the metrics, tokens charged to the caller's tenant, and the stream ended at shutdown.
pub async fn submit(state: &Arc<AppState>, ctx: &Ctx, model: &LoadedModel, job: Job) -> Result<Submission, ApiError> {
    if state.draining.load(Ordering::Relaxed) {
        let e = ApiError::new(ErrorKind::Unavailable, "the server is shutting down").with_code("draining");
        return Err(state.obs.rejected(model.id.as_str(), e));
    }
    let origin = Origin {
        tenant: ctx.caller.tenant.clone(),
        client_id: Some(ctx.request_id.clone()),
        received_at: ctx.received_at,
    };
    let default_timeout = state.live().config.limits.default_timeout;
    // Text is tokenized on the CPU pool, never on the engine's thread.
    let job = match job.input {
        PromptInput::Text { text, parse_special } => {
            let tok = model.tokenizer.clone();
            let ids = state.cpu.run(move || tok.encode_prompt(&text, parse_special)).await?.map_err(|e| {
                ApiError::new(ErrorKind::InvalidRequest, format!("cannot tokenize the prompt: {e}"))
                    .with_param("prompt")
            })?;
            Job { input: PromptInput::Tokens(ids), ..job }
        }
        PromptInput::Tokens(_) => job,
    };
    let mut sub =
        start(model, origin, job, default_timeout).await.map_err(|e| state.obs.rejected(model.id.as_str(), e))?;
    let meter = Meter { state: state.clone(), tenant: ctx.caller.tenant.clone() };
    meter.charge(sub.prompt_tokens);
    sub.meter = Some(meter);
    sub.cancel = state.cancel.subscribe();
    Ok(sub)
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

/// Reads events to the end. An error after admission is returned as the error.
pub async fn collect(sub: Submission) -> Result<Collected, ApiError> {
    collect_streaming(sub, |_| {}).await
}

/// [`collect`], handing each piece of text to `on_text` as it arrives.
pub async fn collect_streaming(mut sub: Submission, mut on_text: impl FnMut(&str)) -> Result<Collected, ApiError> {
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
        sub.meter(&event);
        match event {
            StreamEvent::Started { .. } => {}
            StreamEvent::Token { id, text, logprob, top_logprobs } => {
                on_text(&text);
                out.tokens.push(id);
                out.text.push_str(&text);
                out.logprobs.push((id, logprob.unwrap_or(0.0), top_logprobs));
            }
            StreamEvent::Done { finish_reason, usage, timings, seed, text } => {
                on_text(&text);
                out.text.push_str(&text);
                (out.finish_reason, out.usage, out.timings, out.seed) = (finish_reason, usage, timings, seed);
                return Ok(out);
            }
            StreamEvent::Error(e) => return Err(e),
        }
    }
    Err(ApiError::new(ErrorKind::Internal, "the engine ended the request without a final event"))
}
