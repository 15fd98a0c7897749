//! A compiled grammar's per-request state, and why a grammar is refused.

use llguidance::Matcher;

use crate::protocol::{NextTokens, TokenConstraint};
use crate::tokenizer::GgufTokenizer;
use crate::types::TokenId;

/// Why a grammar was refused; the message names the problem (schema path, grammar line).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GrammarError {
    #[error("the {kind} is {bytes} bytes; the limit is {limit}")]
    TooLarge { kind: &'static str, bytes: usize, limit: usize },
    #[error("the {kind} took {seconds:.1} s to compile; the limit is {limit:.0} s")]
    TooCostly { kind: &'static str, seconds: f64, limit: f64 },
    #[error("the {kind} is invalid: {message}")]
    Invalid { kind: &'static str, message: String },
    #[error("the model's vocabulary cannot be used for constrained decoding: {0}")]
    Vocabulary(String),
}

/// One request's grammar state: which tokens may come next, advanced per sampled token.
pub struct GrammarConstraint {
    matcher: Matcher,
    eog: Vec<TokenId>,
    bits: Vec<u32>,
}

impl GrammarConstraint {
    pub(crate) fn new(matcher: Matcher, eog: &[TokenId]) -> Result<Self, GrammarError> {
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid { kind: "grammar", message: e });
        }
        Ok(GrammarConstraint { matcher, eog: eog.to_vec(), bits: Vec::new() })
    }

    /// Whether `text` is a complete output of the grammar (tests, tools).
    pub fn accepts_text(mut self, tokenizer: &GgufTokenizer, text: &str) -> bool {
        let Ok(ids) = tokenizer.encode(text, false) else { return false };
        self.matcher.consume_tokens(&ids).is_ok() && self.matcher.is_accepting().unwrap_or(false)
    }
}

impl TokenConstraint for GrammarConstraint {
    fn next_tokens(&mut self) -> Result<NextTokens<'_>, String> {
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let may_end = self.matcher.is_accepting().map_err(|e| e.to_string())?;
        self.bits.clear();
        self.bits.extend_from_slice(mask.as_slice());
        for &id in &self.eog {
            if let Some(w) = self.bits.get_mut(id as usize / 32) {
                *w &= !(1 << (id % 32));
            }
        }
        Ok(NextTokens { bits: &self.bits, may_end, free: false })
    }

    fn advance(&mut self, token: TokenId) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
