//! Per-sequence sampler state: the validated config, a seeded `ChaCha8Rng`, and the
//! reusable buffers every step works in (no allocation per token after the first).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::steps::{self, Candidates};
use crate::protocol::sampling::{SamplerStep, SamplingConfig};
use crate::types::TokenId;

/// The token picked for one step, with its log-probability in the chosen distribution.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    /// Natural log of the token's probability after every step of the chain.
    pub logprob: f32,
    /// The `logprobs` most likely tokens of that distribution, most likely first
    /// (ties: lower id first); empty when the request asked for none.
    pub top_logprobs: Vec<(TokenId, f32)>,
    /// The token is an end-of-generation id (unless `ignore_eos`) or a stop token id.
    pub is_stop_token: bool,
}

/// Why a sequence ends after a sampled token (the text-level ends are in `GateEnd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFinish {
    /// An EOS or stop token id was sampled (finish reason `stop`).
    Stop,
    /// `max_tokens` tokens were generated (finish reason `length`).
    Length,
}

impl TokenFinish {
    /// The wire finish reason.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenFinish::Stop => "stop",
            TokenFinish::Length => "length",
        }
    }
}

/// Per-sequence sampling state; the engine keeps one per request.
#[derive(Clone, Debug)]
pub struct SamplerState {
    config: SamplingConfig,
    rng: ChaCha8Rng,
    candidates: Candidates,
    probs: Vec<f32>,
    window: Vec<TokenId>,
    counts: Vec<(TokenId, u32)>,
    masked: Vec<TokenId>,
}

impl SamplerState {
    /// A state whose RNG is seeded from `config.seed`.
    pub fn new(config: SamplingConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        SamplerState {
            config,
            rng,
            candidates: Candidates::default(),
            probs: Vec::new(),
            window: Vec::new(),
            counts: Vec::new(),
            masked: Vec::new(),
        }
    }

    /// The seed in use (report it back to the client).
    pub fn seed(&self) -> u64 {
        self.config.seed
    }

    /// The validated parameters.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// Picks the next token from one logits row. `history` is prompt + generated tokens
    /// (penalties look at its last `repeat_last_n`), `n_generated` counts generated tokens
    /// (EOS and stop ids are masked while it is below `min_tokens`), `eog_ids` are the
    /// model's end-of-generation ids. The row is read, not modified.
    ///
    /// If every token ends up masked (only possible when bans and masks together cover
    /// the vocabulary), the argmax of the raw row is returned with logprob `-inf`.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        history: &[TokenId],
        n_generated: usize,
        eog_ids: &[TokenId],
    ) -> Sampled {
        self.candidates.reset(logits);
        steps::apply_logit_bias(&mut self.candidates, &self.config.logit_bias);
        self.mask_end_tokens(n_generated, eog_ids);
        for i in 0..self.config.order.len() {
            self.run_step(self.config.order[i], history);
        }
        self.candidates.probabilities_into(&mut self.probs);
        let picked = if self.config.temperature <= 0.0 {
            steps::argmax(&self.candidates).filter(|&i| self.probs[i] > 0.0)
        } else {
            steps::draw(&self.probs, &mut self.rng)
        };
        let (token, logprob) = match picked {
            Some(i) => (self.candidates.as_slice()[i].id, self.probs[i].ln()),
            None => (raw_argmax(logits), f32::NEG_INFINITY),
        };
        Sampled { token, logprob, top_logprobs: self.top_logprobs(), is_stop_token: self.is_stop_token(token, eog_ids) }
    }

    /// How the sequence ends after `sampled`, now that `n_generated` tokens (including
    /// it) exist; `None` to keep going.
    pub fn finish_after(&self, sampled: &Sampled, n_generated: usize) -> Option<TokenFinish> {
        if sampled.is_stop_token {
            Some(TokenFinish::Stop)
        } else if n_generated >= self.config.max_tokens as usize {
            Some(TokenFinish::Length)
        } else {
            None
        }
    }

    fn is_stop_token(&self, token: TokenId, eog_ids: &[TokenId]) -> bool {
        (!self.config.ignore_eos && eog_ids.contains(&token)) || self.config.stop_token_ids.contains(&token)
    }

    fn mask_end_tokens(&mut self, n_generated: usize, eog_ids: &[TokenId]) {
        self.masked.clear();
        let before_min = n_generated < self.config.min_tokens as usize;
        if self.config.ignore_eos || before_min {
            self.masked.extend_from_slice(eog_ids);
        }
        if before_min {
            self.masked.extend_from_slice(&self.config.stop_token_ids);
        }
        steps::mask_tokens(&mut self.candidates, &self.masked);
    }

    fn run_step(&mut self, step: SamplerStep, history: &[TokenId]) {
        let c = &mut self.candidates;
        let cfg = &self.config;
        match step {
            SamplerStep::Penalties => {
                if !cfg.has_penalties() {
                    return;
                }
                let start = history.len().saturating_sub(cfg.repeat_last_n as usize);
                steps::count_tokens(&history[start..], &mut self.window, &mut self.counts);
                steps::apply_repetition_penalty(c, &self.counts, cfg.repetition_penalty);
                steps::apply_frequency_presence(c, &self.counts, cfg.frequency_penalty, cfg.presence_penalty);
            }
            SamplerStep::Temperature => steps::apply_temperature(c, cfg.temperature),
            SamplerStep::TopK => steps::top_k(c, cfg.top_k),
            SamplerStep::TopP => steps::top_p(c, cfg.top_p),
            SamplerStep::MinP => steps::min_p(c, cfg.min_p),
        }
    }

    /// The `logprobs` most likely entries of the final distribution.
    fn top_logprobs(&self) -> Vec<(TokenId, f32)> {
        let n = self.config.logprobs as usize;
        if n == 0 {
            return Vec::new();
        }
        let mut top: Vec<(TokenId, f32)> = Vec::with_capacity(n + 1);
        for (c, &p) in self.candidates.as_slice().iter().zip(&self.probs) {
            let better = |&(id, q): &(TokenId, f32)| q > p || (q == p && id < c.id);
            if top.len() == n && top.last().is_some_and(better) {
                continue;
            }
            let at = top.iter().take_while(|e| better(e)).count();
            top.insert(at, (c.id, p));
            top.truncate(n);
        }
        top.into_iter().map(|(id, p)| (id, p.ln())).collect()
    }
}

/// The highest raw logit (ties: lower id), ignoring NaN; 0 for an empty row.
fn raw_argmax(logits: &[f32]) -> TokenId {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_nan() && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map_or(0, |(i, _)| i as TokenId)
}
