//! Sampling: from one logits row to the next token, and from decoded text to what a
//! client may see.
//!
//! - wire-level [`SamplingParams`], validated once into a [`SamplingConfig`], live in
//!   [`crate::protocol::sampling`] (the gateway and the engine both speak them); re-exported here.
//! - [`steps`]: the sampling steps as pure functions over a [`Candidates`] list.
//! - [`state`]: [`SamplerState`], one per sequence: config, seeded `ChaCha8Rng`, buffers.
//!   The chain is: logit bias → stop/EOS masking → the configurable steps in order
//!   (default: penalties → temperature → top-k → top-p → min-p) → draw.
//! - [`gate`]: [`TextGate`], hold-back matching of stop strings and output rules.
//! - [`policy`]: [`PolicyRules`], the phrases and regexes of the content policy.

pub mod gate;
pub mod policy;
pub mod state;
pub mod steps;

pub use crate::protocol::sampling::{SamplerLimits, SamplerStep, SamplingConfig, SamplingParams};
pub use gate::{GateEnd, GateStep, TextGate};
pub use policy::{PolicyError, PolicyRules};
pub use state::{Sampled, SamplerState, TokenFinish};
pub use steps::{Candidate, Candidates};
