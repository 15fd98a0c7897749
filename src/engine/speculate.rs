//! Drafts for speculative decoding: prompt lookup over a sequence's own tokens.
//!
//! The drafter needs no second model. The sequence's last few tokens (at least
//! `min_match`, at most [`MAX_MATCH`]) are looked up earlier in its prompt and output; the
//! tokens that followed the longest, then latest, earlier match are the draft. The forward
//! pass runs the draft beside the last sampled token and `sample` keeps draft tokens while
//! they equal what it samples, so the output never depends on the draft: a good draft only
//! saves forward passes.
//!
//! How long a draft is adapts to the sequence's recent acceptance. Draft tokens are taken
//! to be accepted each with the same probability `p` until the first rejection; `p` is
//! estimated from the sequence's recent drafts (counts that decay, starting from a prior
//! of 0.75). A step verifying `k` draft tokens costs about `1 + ROW_COST·k` plain steps and
//! yields `1 + p + … + p^k` tokens on average: alone, the drafter picks the `k` with the
//! most tokens per cost, which is none once `p` falls below about `ROW_COST`; in a batch a
//! position must pay for what it costs every other sequence of the step ([`threshold`]).
//! While it drafts nothing, its estimate drifts back towards the prior, so a sequence that
//! starts copying later is noticed; in open-ended text that costs one probe every few
//! dozen steps.

use crate::config::SpeculativeConfig;
use crate::types::TokenId;

/// Longest suffix the lookup tries to match.
pub const MAX_MATCH: usize = 6;

/// What one more verified position costs, as a fraction of a one-token decode step
/// (`starling bench --speculative` measures it: `verify_ms`).
pub const ROW_COST: f32 = 0.3;

/// The acceptance prior, as (accepted, rejected) pseudo-counts: p = 0.75.
const PRIOR: (f32, f32) = (3.0, 1.0);

/// How much of the acceptance history each new draft keeps.
const DECAY: f32 = 0.7;

/// How much of the estimate a step without a draft keeps (the rest moves to the prior).
const RECOVER: f32 = 0.99;

/// One sequence's drafting state.
#[derive(Clone, Debug)]
pub struct Drafter {
    max_draft: usize,
    min_match: usize,
    /// Decayed counts of accepted draft tokens and of drafts that ended in a rejection.
    accepted: f32,
    rejected: f32,
    /// The draft of the current step (verified after its forward pass).
    draft: Vec<TokenId>,
}

impl Drafter {
    pub fn new(config: &SpeculativeConfig) -> Self {
        let max_draft = config.max_draft.max(1);
        Drafter {
            max_draft,
            min_match: config.min_match.max(1),
            accepted: PRIOR.0,
            rejected: PRIOR.1,
            draft: Vec::with_capacity(max_draft),
        }
    }

    /// The draft proposed by the last [`Drafter::propose`].
    pub fn draft(&self) -> &[TokenId] {
        &self.draft
    }

    /// Drops the current draft (the step could not take it).
    pub fn clear(&mut self) {
        self.draft.clear();
    }

    /// The estimated probability that a draft token is accepted (given the ones before it were).
    pub fn acceptance(&self) -> f32 {
        self.accepted / (self.accepted + self.rejected)
    }

    /// The draft length, at most `limit`: draft tokens are added while the next one's chance
    /// of being used pays for its position, that is while it raises the tokens per unit of
    /// step cost of the batch (`threshold`, from [`threshold`], is what a position must
    /// yield when the step is this sequence's alone).
    fn best_len(&self, limit: usize, threshold: f32) -> usize {
        let p = self.acceptance();
        let (mut k, mut expected, mut pk) = (0, 1.0, 1.0);
        while k < limit.min(self.max_draft) {
            let next = pk * p;
            // What this sequence's step yields so far, per plain step's cost.
            let rate = expected / (1.0 + ROW_COST * k as f32);
            if next < threshold * rate {
                break;
            }
            k += 1;
            expected += next;
            pk = next;
        }
        k
    }

    /// Proposes up to `limit` tokens to follow `ids` (prompt + output so far) in a step
    /// where `decoding` sequences decode; empty when drafting does not pay at the estimated
    /// acceptance, or nothing repeats. Returns the draft length.
    pub fn propose(&mut self, ids: &[TokenId], limit: usize, decoding: usize) -> usize {
        self.draft.clear();
        let want = self.best_len(limit, threshold(decoding));
        if want == 0 {
            if limit > 0 {
                self.accepted = self.accepted * RECOVER + PRIOR.0 * (1.0 - RECOVER);
                self.rejected = self.rejected * RECOVER + PRIOR.1 * (1.0 - RECOVER);
            }
            return 0;
        }
        if let Some(from) = lookup(ids, self.min_match) {
            let end = (from + want).min(ids.len());
            self.draft.extend_from_slice(&ids[from..end]);
        }
        self.draft.len()
    }

    /// Learns from the current draft: `accepted` of its tokens equalled the sampled ones.
    pub fn record(&mut self, accepted: usize) {
        let drafted = self.draft.len();
        self.draft.clear();
        if drafted == 0 {
            return;
        }
        self.accepted = self.accepted * DECAY + accepted as f32;
        self.rejected = self.rejected * DECAY + if accepted < drafted { 1.0 } else { 0.0 };
    }
}

/// What a draft position must yield (in expected tokens) to pay for itself in a step where
/// `decoding` sequences decode one position each. A step of `n` positions costs about
/// `(1 - ROW_COST) + ROW_COST·n` plain one-position steps; the batch makes `decoding`
/// tokens per step, so one more position pays when it adds at least `decoding` tokens per
/// that cost times `ROW_COST`: 0.3 alone, 0.63 beside 3 others, 0.87 among 16, so drafts in
/// a full batch run only where they are nearly always accepted.
pub fn threshold(decoding: usize) -> f32 {
    let b = decoding.max(1) as f32;
    ROW_COST * b / ((1.0 - ROW_COST) + ROW_COST * b)
}

/// Where the continuation of the longest (then latest) earlier occurrence of `ids`'s last
/// `min_match..=MAX_MATCH` tokens starts, if any such occurrence has a continuation.
pub fn lookup(ids: &[TokenId], min_match: usize) -> Option<usize> {
    let n = ids.len();
    let &last = ids.last()?;
    let longest = MAX_MATCH.max(min_match);
    let mut best: Option<(usize, usize)> = None; // (match length, continuation start)
    // `end` is one past an earlier occurrence of the last token; it must leave a
    // continuation (`end < n`).
    for end in (1..n).rev() {
        if ids[end - 1] != last {
            continue;
        }
        let mut len = 1;
        while len < longest && len < end && ids[end - 1 - len] == ids[n - 1 - len] {
            len += 1;
        }
        if len >= min_match && best.is_none_or(|(l, _)| len > l) {
            best = Some((len, end));
            if len == longest {
                break;
            }
        }
    }
    best.map(|(_, from)| from)
}

/// The best any prompt-lookup drafter could do for one output, knowing it in advance.
///
/// `out` is what plain decoding generated after `prompt` (its first token comes from the
/// prompt's pass), and `step_ms[k]` what a decode step of `k + 1` positions costs (one
/// token and `k` draft tokens; at most `step_ms.len() - 1` of them). Drafts are copies of
/// earlier tokens of `prompt` and `out`, as [`lookup`]'s are; an oracle drafts at each
/// step the longest copy that the output then continues with, and is free to draft less
/// where a shorter step pays better. Returns plain decoding's time for `out[1..]` and the
/// oracle's least time, so `plain / best` bounds what such drafting can gain on `out`
/// whatever it looks up, at these step costs.
pub fn lookup_ceiling(prompt: &[TokenId], out: &[TokenId], step_ms: &[f64]) -> (f64, f64) {
    let (n, max_draft) = (out.len(), step_ms.len().saturating_sub(1));
    if n < 2 || step_ms.is_empty() {
        return (0.0, 0.0);
    }
    let all: Vec<TokenId> = prompt.iter().chain(out).copied().collect();
    // The longest copy at `i`: how many of `out[i..]` (at most `max_draft`) equal the tokens
    // from some earlier start, all inside the `prompt.len() + i` tokens known there.
    let copy = |i: usize| {
        let known = prompt.len() + i;
        let longest = max_draft.min(n - i);
        (0..known)
            .map(|j| (0..longest).take_while(|&l| j + l < known && all[j + l] == out[i + l]).count())
            .max()
            .unwrap_or(0)
    };
    // best[i]: the least time from `out[..i]` known to the end.
    let mut best = vec![0.0f64; n + 1];
    for i in (1..n).rev() {
        best[i] = (0..=copy(i)).map(|k| step_ms[k] + best[(i + k + 1).min(n)]).fold(f64::INFINITY, f64::min);
    }
    ((n - 1) as f64 * step_ms[0], best[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SpeculativeMethod;

    fn config(max_draft: usize, min_match: usize) -> SpeculativeConfig {
        SpeculativeConfig { method: SpeculativeMethod::Ngram, max_draft, min_match }
    }

    #[test]
    fn lookup_takes_the_longest_then_latest_match() {
        // "1 2 3 9 | 5 2 3 7 | 2 3": the suffix "2 3" occurs twice; the latest is followed by 7.
        let ids = [1, 2, 3, 9, 5, 2, 3, 7, 2, 3];
        assert_eq!(lookup(&ids, 2), Some(7));
        // "1 2 3" matches longer at the start: it wins over the later "2 3".
        let ids = [1, 2, 3, 9, 5, 2, 3, 7, 1, 2, 3];
        assert_eq!(lookup(&ids, 2), Some(3));
        // Nothing repeats at min_match 2; a single-token match needs min_match 1.
        let ids = [4, 5, 6, 5];
        assert_eq!(lookup(&ids, 2), None);
        assert_eq!(lookup(&ids, 1), Some(2));
        assert_eq!(lookup(&[], 1), None);
        assert_eq!(lookup(&[3], 1), None);
    }

    #[test]
    fn lookup_never_proposes_past_the_end() {
        // The only earlier "7 7" ends right before the last token: continuation is the last
        // token itself, which is allowed (it is known).
        let ids = [7, 7, 7];
        assert_eq!(lookup(&ids, 2), Some(2));
    }

    #[test]
    fn drafts_follow_the_match_and_respect_the_limit() {
        let mut d = Drafter::new(&config(4, 2));
        let ids = [10, 11, 12, 13, 14, 15, 16, 10, 11];
        let n = d.propose(&ids, 8, 1);
        assert!(n > 0 && d.draft() == &[12, 13, 14, 15][..n], "{:?}", d.draft());
        assert_eq!(d.propose(&ids, 1, 1), 1);
        assert_eq!(d.draft(), [12]);
        assert_eq!(d.propose(&[1, 2, 3], 8, 1), 0);
    }

    #[test]
    fn a_full_batch_drafts_only_what_is_nearly_always_accepted() {
        assert!((threshold(1) - ROW_COST).abs() < 1e-6);
        assert!(threshold(4) > 0.6 && threshold(16) > 0.85 && threshold(16) < 1.0);
        let mut d = Drafter::new(&config(8, 1));
        let ids: Vec<TokenId> = (0..20).chain(0..3).collect();
        assert!(d.propose(&ids, 64, 1) > 0, "alone, the prior acceptance drafts");
        assert_eq!(d.propose(&ids, 64, 16), 0, "among 16, it does not");
        for _ in 0..6 {
            d.propose(&ids, 64, 1);
            d.record(d.draft().len());
        }
        assert!(d.propose(&ids, 64, 16) > 0, "p = {}: sustained acceptance drafts even among 16", d.acceptance());
    }

    #[test]
    fn the_draft_length_follows_the_acceptance() {
        let mut d = Drafter::new(&config(8, 1));
        let ids: Vec<TokenId> = (0..20).chain(0..3).collect();
        // At the prior (p = 0.75) a few tokens pay; full acceptance lengthens the drafts.
        let first = d.propose(&ids, 64, 1);
        assert!((2..8).contains(&first), "{first}");
        d.record(first);
        let second = d.propose(&ids, 64, 1);
        assert!(second > first, "{first} then {second}");
        for _ in 0..4 {
            d.propose(&ids, 64, 1);
            d.record(d.draft().len());
        }
        assert_eq!(d.propose(&ids, 64, 1), 8, "sustained acceptance reaches max_draft");
        assert_eq!(d.propose(&ids, 3, 1), 3, "the limit caps the draft");
        // Rejections at the first token: drafting stops ...
        let mut rejected = 0;
        while rejected < 20 && d.propose(&ids, 64, 1) > 0 {
            d.record(0);
            rejected += 1;
        }
        assert!((3..20).contains(&rejected), "stopped after {rejected} rejected drafts");
        // ... and comes back as a one-token probe; a rejected probe silences it for a while.
        while d.propose(&ids, 64, 1) == 0 {}
        d.record(0);
        let silent = (0..500).take_while(|_| d.propose(&ids, 64, 1) == 0).count();
        assert!((10..100).contains(&silent), "{silent} steps without a draft");
        assert_eq!(d.draft().len(), 1);
    }

    #[test]
    fn the_lookup_ceiling_drafts_only_copies_that_pay() {
        // A step of k + 1 positions costs 1 + k/2.
        let steps: Vec<f64> = (0..9).map(|k| 1.0 + 0.5 * k as f64).collect();
        // Nothing in the output repeats what came before: every step makes one token.
        assert_eq!(lookup_ceiling(&[1, 2], &[3, 4, 5, 6], &steps), (3.0, 3.0));
        // The output copies the prompt: after its first token, one step of 1 + 7 drafted
        // positions makes the remaining 8 tokens (cost 4.5, against 8 plain steps).
        let prompt: Vec<TokenId> = (10..19).collect();
        assert_eq!(lookup_ceiling(&prompt, &prompt, &steps), (8.0, 4.5));
        // Drafts are at most 8 tokens: a 20-token copy takes steps of 9 and 9, then one of 2.
        let prompt: Vec<TokenId> = (10..31).collect();
        assert_eq!(lookup_ceiling(&prompt, &prompt, &steps), (20.0, 5.0 + 5.0 + 1.5));
        // A copy is only of tokens known before the step: in "7 8 7 8 7 8" the 8 is new
        // (a plain step), then "7 8" is copied (a step of 3 positions makes 7 8 7) and a
        // plain step makes the last 8.
        assert_eq!(lookup_ceiling(&[1], &[7, 8, 7, 8, 7, 8], &steps), (5.0, 1.0 + 2.0 + 1.0));
        // Where a position costs more than a plain step, the oracle does not draft.
        let dear: Vec<f64> = (0..9).map(|k| 1.0 + 2.0 * k as f64).collect();
        assert_eq!(lookup_ceiling(&prompt, &prompt, &dear), (20.0, 20.0));
        assert_eq!(lookup_ceiling(&prompt, &[5], &steps), (0.0, 0.0));
    }
}
