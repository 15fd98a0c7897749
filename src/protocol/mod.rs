//! The messages between the gateway and an engine thread: commands in, stream events out.
//!
//! Both sides import only this module, so systems never reach up into the gateway and the
//! gateway never touches the `World`. [`sampling`] holds the sampling parameters both sides
//! speak: the wire form and its validated form.

pub mod constraint;
pub mod sampling;
pub mod sse;

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;
use crate::types::{RequestId, SessionId, TenantId, TokenId};

pub use constraint::{Constraint, NextTokens, TokenConstraint};
pub use sampling::{SamplerLimits, SamplerStep, SamplingConfig, SamplingParams};

/// What a generation request asks the model to continue.
#[derive(Clone, Debug)]
pub enum PromptInput {
    /// Text, tokenized by the engine's `tokenize` stage.
    Text { text: String, parse_special: bool },
    /// Ids the client tokenized itself (checked against the vocabulary at admission).
    Tokens(Vec<TokenId>),
}

/// One generation request, validated by the gateway ("parse, don't validate").
#[derive(Debug)]
pub struct GenerateRequest {
    pub id: RequestId,
    /// The name the client knows the request by (the gateway's `x-request-id`), for cancel
    /// and logs; `None` = named by `id`.
    pub client_id: Option<String>,
    pub tenant: TenantId,
    pub session: Option<SessionId>,
    pub input: PromptInput,
    pub sampling: SamplingConfig,
    /// Limits what may be generated (a compiled JSON schema, regex or grammar); needs a
    /// pipeline with the `constrain` stage.
    pub constraint: Option<Constraint>,
    /// Detokenize special and control tokens into the text (tool-call markers such as
    /// `[TOOL_CALLS]` are control tokens); normally they add no text.
    pub keep_special: bool,
    /// How long the request may run in total (queue + generation).
    pub timeout: Duration,
    /// When the gateway received the request (queue time starts here).
    pub received_at: Instant,
    /// Where the engine sends this request's events; a closed receiver cancels the request.
    pub events: mpsc::Sender<StreamEvent>,
}

impl GenerateRequest {
    /// The name [`EngineCommand::Cancel`] and the request log use.
    pub fn name(&self) -> String {
        self.client_id.clone().unwrap_or_else(|| self.id.to_string())
    }
}

/// Commands the engine thread accepts on its bounded inbox.
#[derive(Debug)]
pub enum EngineCommand {
    /// A generation; [`EngineCommand::Cancel`] names it by [`GenerateRequest::name`].
    Generate(Box<GenerateRequest>),
    /// Ends the tenant's live requests named `request_id` within one tick (finish reason
    /// `cancelled`, KV blocks freed). Replies `not_found` when the tenant has none by that
    /// name (another tenant's requests are invisible).
    Cancel { tenant: TenantId, request_id: String, reply: oneshot::Sender<Result<(), ApiError>> },
    /// Frees a session's cached state. Replies `not_found` for unknown sessions (or another tenant's).
    CloseSession { tenant: TenantId, session: SessionId, reply: oneshot::Sender<Result<(), ApiError>> },
    /// Stops the engine loop after the current tick; in-flight requests are cancelled.
    Shutdown,
}

/// Why a generation ended (the wire names are stable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    Cancelled,
    Deadline,
    ContentFilter,
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "deadline",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::Error => "error",
        }
    }
}

/// Token counts reported with every finished request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the KV cache instead of being recomputed.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// Where the time of a request went, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Timings {
    pub queue_ms: f64,
    pub time_to_first_token_ms: f64,
    pub total_ms: f64,
}

/// One alternative with its log-probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub id: TokenId,
    pub logprob: f32,
}

/// What the engine streams back for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// One sampled token. `text` is the newly complete UTF-8 text it adds (may be empty while
    /// a multi-byte character or a possible stop string is held back).
    Token { id: TokenId, text: String, logprob: Option<f32>, top_logprobs: Vec<TokenLogprob> },
    /// The request was admitted and its prompt tokenized; tokens follow.
    Started { prompt_tokens: usize, cached_tokens: usize },
    /// The last event of a successful (or cut short) request. `text` is text held back
    /// (a possible stop-string prefix, an incomplete character) released at the end;
    /// usually empty.
    Done { finish_reason: FinishReason, usage: Usage, timings: Timings, seed: u64, text: String },
    /// The request failed; nothing follows.
    Error(ApiError),
}
