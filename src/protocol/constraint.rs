//! The contract between a compiled grammar and the engine's `constrain` and `sample` stages.
//!
//! The gateway compiles a request's JSON schema, regex or grammar into something that
//! implements [`TokenConstraint`] (see `crate::grammar`) and hands it over with the request;
//! the engine only asks it which tokens may come next and tells it which one came. Keeping
//! the trait here lets the engine stay ignorant of the grammar engine behind it.

use std::fmt;

use crate::types::TokenId;

/// What may follow the tokens accepted so far.
pub struct NextTokens<'a> {
    /// One bit per vocabulary id (`bits[id / 32] >> (id % 32) & 1`): may that token come next.
    /// Not read for end-of-generation and stop ids: `may_end` decides those.
    pub bits: &'a [u32],
    /// The output may end here (an end-of-generation token is allowed).
    pub may_end: bool,
    /// Nothing is constrained at this step (`bits` is not read): a grammar that applies only
    /// to part of the output, outside that part.
    pub free: bool,
}

/// A per-request token constraint, advanced one sampled token at a time.
pub trait TokenConstraint: Send + Sync {
    /// Computes the tokens allowed next. An error (the grammar engine ran out of its
    /// per-step budget, or its state is inconsistent) ends the request.
    fn next_tokens(&mut self) -> Result<NextTokens<'_>, String>;
    /// Accepts the token that was sampled (never an end-of-generation id).
    fn advance(&mut self, token: TokenId) -> Result<(), String>;
    /// Nothing may follow: the output is complete (the request ends with `stop`).
    fn is_complete(&self) -> bool;
}

/// A boxed constraint carried by a request.
pub struct Constraint(pub Box<dyn TokenConstraint>);

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Constraint")
    }
}
