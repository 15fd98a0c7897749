//! A grammar that applies only once the output starts a tool call (`tool_choice: auto`):
//! free text until then, the call's grammar from its first byte to its end, then free text
//! again (another call may follow).

use std::sync::Arc;

use llguidance::{Matcher, TokenParser};

use super::state::{GrammarConstraint, GrammarError};
use crate::protocol::{NextTokens, TokenConstraint};
use crate::tokenizer::GgufTokenizer;
use crate::types::TokenId;

/// Where a tool call begins in a model's output.
#[derive(Clone, Debug, PartialEq)]
pub enum CallStart {
    /// After this marker, wherever it appears (`<tool_call>`, `[TOOL_CALLS]`).
    Marker(String),
    /// At the start of the output (Llama 3 JSON, plain JSON): the grammar follows the output
    /// from its first token and is enforced once it has accepted a non-whitespace byte; a
    /// token it rejects before that means the output is not a call.
    Output,
}

/// The per-request state of a lazily applied grammar.
pub struct LazyConstraint {
    tokenizer: Arc<GgufTokenizer>,
    parser: TokenParser,
    start: CallStart,
    /// The tail of the output text, for spotting a marker split over tokens.
    window: Vec<u8>,
    /// The call in progress (`Marker`), or the shadow of the whole output (`Output`).
    call: Option<GrammarConstraint>,
    /// `Output`: the grammar has accepted visible text and now constrains.
    enforced: bool,
    /// `Output`: the output turned out not to be a call.
    gave_up: bool,
    free: Vec<u32>,
}

impl LazyConstraint {
    pub(super) fn new(
        tokenizer: Arc<GgufTokenizer>,
        parser: TokenParser,
        start: CallStart,
    ) -> Result<Self, GrammarError> {
        let mut lazy = LazyConstraint {
            tokenizer,
            parser,
            start,
            window: vec![],
            call: None,
            enforced: false,
            gave_up: false,
            free: vec![],
        };
        if lazy.start == CallStart::Output {
            lazy.call = Some(lazy.matcher()?);
        }
        Ok(lazy)
    }

    fn matcher(&self) -> Result<GrammarConstraint, GrammarError> {
        GrammarConstraint::new(Matcher::new(Ok(self.parser.deep_clone())), self.tokenizer.eog_ids())
    }

    /// Whether a grammar is constraining the next token now.
    pub fn constraining(&self) -> bool {
        match self.start {
            CallStart::Marker(_) => self.call.is_some(),
            CallStart::Output => self.enforced && self.call.is_some(),
        }
    }

    fn advance_marker(&mut self, marker: &str, token: TokenId, bytes: &[u8]) {
        if let Some(call) = self.call.as_mut() {
            if call.advance(token).is_err() || call.is_complete() {
                self.call = None;
            }
            return;
        }
        self.window.extend_from_slice(bytes);
        let m = marker.as_bytes();
        if let Some(at) = find(&self.window, m) {
            let rest = self.window[at + m.len()..].to_vec();
            self.window.clear();
            self.call = self.matcher().ok().and_then(|mut call| {
                // Bytes after the marker inside the same token: the call has begun.
                let text = std::str::from_utf8(&rest).ok()?;
                let ids = if text.is_empty() { vec![] } else { self.tokenizer.encode(text, false).ok()? };
                ids.iter().all(|&id| call.advance(id).is_ok()).then_some(call)
            });
        } else {
            let keep = m.len().saturating_sub(1).min(self.window.len());
            self.window.drain(..self.window.len() - keep);
        }
    }

    fn advance_output(&mut self, token: TokenId, bytes: &[u8]) {
        if self.gave_up {
            return;
        }
        let Some(call) = self.call.as_mut() else { return };
        if call.advance(token).is_err() {
            // The output is not a call (it can only be, from its first byte).
            self.call = None;
            self.gave_up = true;
            return;
        }
        if !self.enforced && bytes.iter().any(|b| !b.is_ascii_whitespace()) {
            self.enforced = true;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl TokenConstraint for LazyConstraint {
    fn next_tokens(&mut self) -> Result<NextTokens<'_>, String> {
        if self.constraining() {
            return self.call.as_mut().expect("constraining has a call").next_tokens();
        }
        Ok(NextTokens { bits: &self.free, may_end: true, free: true })
    }

    fn advance(&mut self, token: TokenId) -> Result<(), String> {
        let bytes = self.tokenizer.token_bytes(token).map_err(|e| e.to_string())?.to_vec();
        match self.start.clone() {
            CallStart::Marker(marker) => self.advance_marker(&marker, token, &bytes),
            CallStart::Output => self.advance_output(token, &bytes),
        }
        Ok(())
    }

    fn is_complete(&self) -> bool {
        self.start == CallStart::Output && self.enforced && self.call.as_ref().is_some_and(|c| c.is_complete())
    }
}
