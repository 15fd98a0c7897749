//! `tokenize`: prompt text (or client-sent ids) into checked token ids.

use bevy_ecs::prelude::*;

use crate::engine::components::*;
use crate::engine::resources::*;
use crate::error::{ApiError, ErrorKind};
use crate::protocol::{PromptInput, StreamEvent};

/// Tokenizes new prompts, checks them against the vocabulary, the prompt limit, the context
/// and the KV cache, and announces accepted requests with a `Started` event.
pub fn tokenize_prompts(
    mut commands: Commands,
    mut requests: Query<(Entity, &Prompt, &mut Phase, &mut Outbox, &Sampling), Without<Tokens>>,
    tokenizer: Res<TokenizerRes>,
    limits: Res<EngineLimits>,
    kv: Res<Kv>,
) {
    for (entity, prompt, mut phase, mut outbox, sampling) in &mut requests {
        let span = tracing::debug_span!("tokenize", entity = ?entity);
        let _g = span.enter();
        commands.entity(entity).remove::<Prompt>();
        let ids = match &prompt.0 {
            PromptInput::Text { text, parse_special } => tokenizer.0.encode_prompt(text, *parse_special).map_err(|e| {
                ApiError::new(ErrorKind::InvalidRequest, format!("cannot tokenize the prompt: {e}"))
                    .with_param("prompt")
            }),
            PromptInput::Tokens(ids) => check_ids(ids, tokenizer.0.vocab_size()).map(|()| ids.clone()),
        };
        let checked = ids.and_then(|ids| {
            check_length(ids.len(), sampling.0.config().max_tokens as usize, &limits, &kv).map(|()| ids)
        });
        match checked {
            Ok(ids) => {
                outbox.pending.push_back(StreamEvent::Started { prompt_tokens: ids.len(), cached_tokens: 0 });
                commands.entity(entity).insert(Tokens { n_prompt: ids.len(), ids });
            }
            Err(e) => {
                commands.entity(entity).insert(Tokens::default());
                fail(&mut phase, &mut outbox, e);
            }
        }
    }
}

fn check_ids(ids: &[u32], vocab: usize) -> Result<(), ApiError> {
    match ids.iter().position(|&id| id as usize >= vocab) {
        Some(i) => Err(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("token id {} at tokens[{i}] is outside the vocabulary (0..{vocab})", ids[i]),
        )
        .with_param("tokens")),
        None => Ok(()),
    }
}

/// A prompt must leave room for one generated token, stay under the prompt limit, and fit
/// the KV cache together with its generation budget.
fn check_length(n_prompt: usize, max_tokens: usize, limits: &EngineLimits, kv: &Kv) -> Result<(), ApiError> {
    let too_long = |msg: String| ApiError::new(ErrorKind::ContextLengthExceeded, msg).with_param("prompt");
    if n_prompt == 0 {
        return Err(ApiError::new(ErrorKind::InvalidRequest, "the prompt is empty (0 tokens)").with_param("prompt"));
    }
    if n_prompt > limits.max_prompt_tokens {
        return Err(too_long(format!(
            "the prompt has {n_prompt} tokens; the limit is {} (max_prompt_tokens)",
            limits.max_prompt_tokens
        )));
    }
    if n_prompt >= limits.n_ctx {
        return Err(too_long(format!(
            "the prompt has {n_prompt} tokens; the model context is {} and one must remain for generation",
            limits.n_ctx
        )));
    }
    let layout = kv.0.layout();
    let positions = (n_prompt + max_tokens).min(limits.n_ctx);
    if layout.blocks_for(positions) > kv.0.n_blocks() {
        return Err(too_long(format!(
            "prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) needs {} KV blocks; the cache holds {}",
            layout.blocks_for(positions),
            kv.0.n_blocks()
        )));
    }
    Ok(())
}
