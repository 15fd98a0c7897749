//! A compiled grammar's per-request state, and why a grammar is refused.

use llguidance::Matcher;
use llguidance::toktrie::SimpleVob;

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
    /// The last mask computed (its bits are lent to the engine).
    mask: SimpleVob,
}

impl GrammarConstraint {
    pub(crate) fn new(matcher: Matcher) -> Result<Self, GrammarError> {
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid { kind: "grammar", message: e });
        }
        Ok(GrammarConstraint { matcher, mask: SimpleVob::new() })
    }

    /// Whether `text` is a complete output of the grammar (tests, tools).
    pub fn accepts_text(mut self, tokenizer: &GgufTokenizer, text: &str) -> bool {
        let Ok(ids) = tokenizer.encode(text, false) else { return false };
        self.matcher.consume_tokens(&ids).is_ok() && self.matcher.is_accepting().unwrap_or(false)
    }
}

impl TokenConstraint for GrammarConstraint {
    fn next_tokens(&mut self) -> Result<NextTokens<'_>, String> {
        self.mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let may_end = self.matcher.is_accepting().map_err(|e| e.to_string())?;
        Ok(NextTokens { bits: self.mask.as_slice(), may_end, free: false })
    }

    fn advance(&mut self, token: TokenId) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}
