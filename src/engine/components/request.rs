//! Components of a request entity, spawned by `admit`, despawned by `evict`.

use bevy_ecs::prelude::*;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::kv::arena::BlockTable;
use crate::protocol::{Constraint, FinishReason, PromptInput, StreamEvent};
use crate::sampler::SamplerState;
use crate::tokenizer::StreamDecoder;
use crate::types::{RequestId, TenantId, Timestamp, TokenId};

/// The request's id. Written by admit; read by every stage for logs and traces.
#[derive(Component, Clone, Copy, Debug)]
pub struct Request(pub RequestId);

/// The name the client knows the request by (its `x-request-id`, or `req-N`). Written by
/// admit; read by admit when a cancel names it.
#[derive(Component, Clone, Debug, PartialEq, Eq)]
pub struct ClientId(pub String);

/// The tenant that sent the request. Written by admit; read by batch (fairness) and policies.
#[derive(Component, Clone, Debug)]
pub struct Tenant(pub TenantId);

/// The session entity this request continues, if any. Written by admit; read by evict,
/// which hands the sequence's cache back to the session.
#[derive(Component, Clone, Copy, Debug)]
pub struct SessionLink(pub Entity);

/// The prompt as received. Written by admit; consumed (removed) by tokenize.
#[derive(Component, Debug)]
pub struct Prompt(pub PromptInput);

/// Prompt ids followed by generated ids. Written by tokenize (prompt) and sample (each new
/// token); read by batch and forward (what to run) and sample (penalties).
#[derive(Component, Debug, Default)]
pub struct Tokens {
    pub ids: Vec<TokenId>,
    pub n_prompt: usize,
}

impl Tokens {
    pub fn n_generated(&self) -> usize {
        self.ids.len() - self.n_prompt
    }
}

/// Where a request is in its life. Written by tokenize, sample, emit and evict; read by batch.
#[derive(Component, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for tokenization or for KV room.
    Queued,
    /// Prompt positions are being computed (some may be cached).
    Prefill,
    /// One token per tick.
    Decode,
    /// Done; emit sends the final event, then evict despawns.
    Finished(FinishReason),
}

/// The sequence's KV blocks and how many positions are filled. Written by batch (reserve)
/// and forward (len); read by forward; released or handed back to the session by evict.
#[derive(Component, Debug, Default)]
pub struct KvHandle(pub BlockTable);

/// Marks a sequence that was preempted (its KV blocks freed to let an older sequence
/// grow): it waits at the head of its tenant's queue and recomputes its prompt plus what
/// it generated. Written by batch; read by batch (queue order, usage accounting).
#[derive(Component, Clone, Copy, Debug)]
#[component(storage = "SparseSet")]
pub struct Preempted;

/// Sampling parameters, RNG and penalty state. Written by sample.
#[derive(Component)]
pub struct Sampling(pub SamplerState);

/// The request's output constraint (a compiled grammar). Written by admit; read by
/// constrain (which tokens may come next) and sample (advanced on each sampled token).
#[derive(Component)]
pub struct Constrained(pub Constraint);

/// A sequence that drafts tokens and verifies them in its decode step (speculative
/// decoding). Written by batch (the draft) and sample (acceptance); read by forward.
#[derive(Component, Debug)]
pub struct Drafting(pub crate::engine::speculate::Drafter);

/// The stream back to the client. Read by emit; a closed channel cancels the request.
#[derive(Component, Debug)]
pub struct StreamTx(pub mpsc::Sender<StreamEvent>);

/// When the request must end (finish reason `deadline`). Read by evict.
#[derive(Component, Clone, Copy, Debug)]
pub struct Deadline(pub Timestamp);

/// Timestamps for usage and metrics. Written by admit, emit; read by emit (done event).
#[derive(Component, Clone, Copy, Debug)]
pub struct Timing {
    pub received: Timestamp,
    pub admitted: Timestamp,
    pub first_token: Option<Timestamp>,
}

/// Prompt positions served from a session cache. Written by batch when it reuses a prefix.
#[derive(Component, Clone, Copy, Debug, Default)]
pub struct CachedPrefix(pub usize);

/// A token sample produced, waiting for emit to detokenize it.
#[derive(Clone, Debug, PartialEq)]
pub struct FreshToken {
    pub id: TokenId,
    pub logprob: f32,
    pub top_logprobs: Vec<(TokenId, f32)>,
    /// An end-of-generation or stop token id: it ends the stream and adds no text.
    pub is_stop: bool,
}

/// Events on their way to the client. Sample pushes `fresh` tokens; emit turns them into
/// `pending` events and sends what the channel takes. A sequence with undelivered events
/// is not batched (a slow reader pauses only its own sequence).
#[derive(Component, Debug, Default)]
pub struct Outbox {
    pub fresh: Vec<FreshToken>,
    pub pending: std::collections::VecDeque<StreamEvent>,
    /// The final event (done or error) has been queued: nothing more will be added.
    pub closed: bool,
    /// Since when the client's channel has been full with events still waiting (the client
    /// stopped reading). Written by emit; read by evict (a stall past the limit cancels) and
    /// batch (preemption takes stalled sequences first).
    pub stalled_since: Option<Timestamp>,
}

impl Outbox {
    /// The final event is out (or the client is gone): the entity may be despawned.
    pub fn delivered(&self) -> bool {
        self.closed && self.pending.is_empty()
    }
}

/// Incremental detokenizer and the stop/policy hold-back gate. Written by emit.
#[derive(Component)]
pub struct TextOut {
    pub decoder: StreamDecoder,
    pub gate: crate::sampler::TextGate,
}

/// Ends a request with an error event; evict frees it once the event is out.
pub fn fail(phase: &mut Phase, outbox: &mut Outbox, error: ApiError) {
    *phase = Phase::Finished(FinishReason::Error);
    outbox.pending.push_back(StreamEvent::Error(error));
    outbox.closed = true;
}
