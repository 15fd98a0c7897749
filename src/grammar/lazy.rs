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
    /// from its first token and is enforced once the output has begun with one of these
    /// prefixes (after whitespace), e.g. `{"name"`, so JSON that is not a call stays free;
    /// a token the grammar rejects before that means the output is not a call.
    Output(Vec<String>),
}

/// The per-request state of a lazily applied grammar.
pub struct LazyConstraint {
    tokenizer: Arc<GgufTokenizer>,
    parser: TokenParser,
    /// Shared so that advancing (once per token) borrows it without a copy.
    start: Arc<CallStart>,
    /// The tail of the output text, for spotting a marker split over tokens.
    window: Vec<u8>,
    /// The call in progress (`Marker`), or the shadow of the whole output (`Output`).
    call: Option<GrammarConstraint>,
    /// `Output`: the output has begun a call and the grammar now constrains.
    enforced: bool,
    /// `Output`: the visible text so far, until enforcement is decided.
    seen: Vec<u8>,
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
            start: Arc::new(start),
            window: vec![],
            call: None,
            enforced: false,
            seen: vec![],
            gave_up: false,
            free: vec![],
        };
        if matches!(*lazy.start, CallStart::Output(_)) {
            lazy.call = Some(lazy.matcher()?);
        }
        Ok(lazy)
    }

    fn matcher(&self) -> Result<GrammarConstraint, GrammarError> {
        GrammarConstraint::new(Matcher::new(Ok(self.parser.deep_clone())))
    }

    /// Whether a grammar is constraining the next token now.
    pub fn constraining(&self) -> bool {
        match *self.start {
            CallStart::Marker(_) => self.call.is_some(),
            CallStart::Output(_) => self.enforced && self.call.is_some(),
        }
    }

    fn advance_marker(&mut self, marker: &str, token: TokenId, bytes: &[u8]) -> Result<(), String> {
        if let Some(call) = self.call.as_mut() {
            // The mask allowed only what the grammar takes: a rejection is a fault, not text.
            call.advance(token)?;
            if call.is_complete() {
                self.call = None;
            }
            return Ok(());
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
        Ok(())
    }

    fn advance_output(&mut self, prefixes: &[String], token: TokenId, bytes: &[u8]) -> Result<(), String> {
        if self.gave_up {
            return Ok(());
        }
        let Some(call) = self.call.as_mut() else { return Ok(()) };
        if self.enforced {
            call.advance(token)?;
            return Ok(());
        }
        if call.advance(token).is_err() {
            // The output is not a call (it can only be, from its first byte).
            self.call = None;
            self.gave_up = true;
            return Ok(());
        }
        // Whitespace is layout (`{\n  "name"` begins a call as `{"name"` does).
        self.seen.extend(bytes.iter().filter(|b| !b.is_ascii_whitespace()));
        let text = self.seen.as_slice();
        if prefixes.iter().any(|p| text.starts_with(p.as_bytes())) {
            self.enforced = true;
            self.seen = vec![];
        } else if !prefixes.iter().any(|p| p.as_bytes().starts_with(text)) {
            // Visible text that cannot begin a call: JSON content, not a call.
            self.call = None;
            self.gave_up = true;
        }
        Ok(())
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
        let (tokenizer, start) = (self.tokenizer.clone(), self.start.clone());
        let bytes = tokenizer.token_bytes(token).map_err(|e| e.to_string())?;
        match &*start {
            CallStart::Marker(marker) => self.advance_marker(marker, token, bytes),
            CallStart::Output(prefixes) => self.advance_output(prefixes, token, bytes),
        }
    }

    fn is_complete(&self) -> bool {
        matches!(*self.start, CallStart::Output(_))
            && self.enforced
            && self.call.as_ref().is_some_and(|c| c.is_complete())
    }
}
