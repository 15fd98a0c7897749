//! The sampling steps: pure functions over a [`Candidates`] list.
//!
//! A step either changes logits (bias, masking, penalties, temperature) or drops
//! candidates (top-k, top-p, min-p). A masked or banned token keeps its place with a
//! logit of `-inf`, so its probability is exactly 0 and no draw can pick it.
//!
//! Candidate order is always deterministic: vocabulary order until a step sorts, then
//! descending logit with ties broken by the lower token id.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::types::TokenId;

/// One token still in the running, with its current logit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub id: TokenId,
    pub logit: f32,
}

/// The tokens still in the running; a reusable buffer kept in the sampler state.
#[derive(Clone, Debug, Default)]
pub struct Candidates {
    items: Vec<Candidate>,
    /// `items[i].id == i` for every `i` (full vocabulary, vocabulary order).
    identity: bool,
    /// Sorted by [`by_rank`].
    sorted: bool,
    /// Reusable heap storage for top-k.
    heap: Vec<Ranked>,
    /// Reusable unnormalised weights for top-p.
    weights: Vec<f32>,
}

/// A candidate ordered so that the worse-ranked one is greater (top-k's heap keeps the
/// worst kept candidate on top, ready to be replaced).
#[derive(Clone, Copy, Debug)]
struct Ranked(Candidate);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        by_rank(&self.0, &other.0)
    }
}

/// Descending logit, ties by ascending id: the one order every step agrees on.
fn by_rank(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

impl Candidates {
    /// A fresh list over one logits row. `NaN` logits become `-inf` (never drawn).
    pub fn from_logits(logits: &[f32]) -> Self {
        let mut c = Candidates::default();
        c.reset(logits);
        c
    }

    /// Refills the list from a logits row, reusing the allocation.
    pub fn reset(&mut self, logits: &[f32]) {
        self.items.clear();
        self.items.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| Candidate { id: i as TokenId, logit: if l.is_nan() { f32::NEG_INFINITY } else { l } }),
        );
        self.identity = true;
        self.sorted = false;
    }

    /// The candidates in their current order.
    pub fn as_slice(&self) -> &[Candidate] {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The current logit of `id`, if it is still a candidate.
    pub fn logit_of(&self, id: TokenId) -> Option<f32> {
        self.position(id).map(|i| self.items[i].logit)
    }

    fn position(&self, id: TokenId) -> Option<usize> {
        if self.identity {
            ((id as usize) < self.items.len()).then_some(id as usize)
        } else {
            self.items.iter().position(|c| c.id == id)
        }
    }

    /// Applies `f` to the logit of every candidate listed in `table` (sorted by id).
    fn update_by_id<T: Copy>(&mut self, table: &[(TokenId, T)], mut f: impl FnMut(&mut f32, T)) {
        if table.is_empty() {
            return;
        }
        if self.identity {
            for &(id, value) in table {
                if let Some(c) = self.items.get_mut(id as usize) {
                    f(&mut c.logit, value);
                }
            }
        } else {
            for c in &mut self.items {
                if let Ok(i) = table.binary_search_by_key(&c.id, |&(id, _)| id) {
                    f(&mut c.logit, table[i].1);
                }
            }
        }
        self.sorted = false;
    }

    /// Sorts by descending logit, ties to the lower id (a no-op when already sorted).
    pub fn sort_by_rank(&mut self) {
        if !self.sorted {
            self.items.sort_unstable_by(by_rank);
            self.sorted = true;
            self.identity = false;
        }
    }

    /// The largest logit (`-inf` when empty or all masked).
    pub fn max_logit(&self) -> f32 {
        if self.sorted {
            return self.items.first().map_or(f32::NEG_INFINITY, |c| c.logit);
        }
        self.items.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max)
    }

    /// Writes the softmax of the candidates' logits into `probs` (same order). When no
    /// candidate has a finite logit, every probability is 0.
    pub fn probabilities_into(&self, probs: &mut Vec<f32>) {
        probs.clear();
        let max = self.max_logit();
        if max == f32::NEG_INFINITY || max.is_nan() {
            probs.resize(self.items.len(), 0.0);
            return;
        }
        let mut sum = 0.0f64;
        probs.extend(self.items.iter().map(|c| {
            let w = (c.logit - max).exp();
            sum += f64::from(w);
            w
        }));
        let inv = (1.0 / sum) as f32;
        probs.iter_mut().for_each(|p| *p *= inv);
    }

    /// The softmax as a fresh vector (tests and diagnostics; the hot path reuses a buffer).
    pub fn probabilities(&self) -> Vec<f32> {
        let mut probs = Vec::with_capacity(self.items.len());
        self.probabilities_into(&mut probs);
        probs
    }
}

/// Adds each `(id, bias)` to that token's logit; a bias at or below `-100` bans it.
pub fn apply_logit_bias(c: &mut Candidates, bias: &[(TokenId, f32)]) {
    c.update_by_id(bias, |logit, b| {
        *logit = if b <= crate::protocol::sampling::BAN_BIAS { f32::NEG_INFINITY } else { *logit + b };
    });
}

/// Sets the logit of every listed token to `-inf` (used for EOS and stop ids).
pub fn mask_tokens(c: &mut Candidates, ids: &[TokenId]) {
    for &id in ids {
        if let Some(i) = c.position(id) {
            c.items[i].logit = f32::NEG_INFINITY;
            c.sorted = false;
        }
    }
}

/// Counts each token in `window` into `counts` (sorted by id), reusing `scratch`.
pub fn count_tokens(window: &[TokenId], scratch: &mut Vec<TokenId>, counts: &mut Vec<(TokenId, u32)>) {
    scratch.clear();
    scratch.extend_from_slice(window);
    scratch.sort_unstable();
    counts.clear();
    for &id in scratch.iter() {
        match counts.last_mut() {
            Some((last, n)) if *last == id => *n += 1,
            _ => counts.push((id, 1)),
        }
    }
}

/// llama.cpp / CTRL repetition penalty: every token seen in the window has a positive
/// logit divided by `penalty` and a negative one multiplied by it.
pub fn apply_repetition_penalty(c: &mut Candidates, counts: &[(TokenId, u32)], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    c.update_by_id(counts, |logit, _| {
        *logit = if *logit > 0.0 { *logit / penalty } else { *logit * penalty };
    });
}

/// OpenAI frequency and presence penalties:
/// `logit -= count * frequency + (count > 0) * presence`.
pub fn apply_frequency_presence(c: &mut Candidates, counts: &[(TokenId, u32)], frequency: f32, presence: f32) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    c.update_by_id(counts, |logit, n| {
        *logit -= n as f32 * frequency + presence;
    });
}

/// Divides every logit by `temperature`; a temperature of 0 (greedy) changes nothing,
/// the draw then takes the argmax.
pub fn apply_temperature(c: &mut Candidates, temperature: f32) {
    if temperature <= 0.0 || temperature == 1.0 {
        return;
    }
    let inv = 1.0 / temperature;
    c.items.iter_mut().for_each(|x| x.logit *= inv);
}

/// Keeps exactly `min(k, len)` candidates, the highest logits (ties: lower id first),
/// sorted. `k == 0` is off.
pub fn top_k(c: &mut Candidates, k: u32) {
    let k = k as usize;
    if k == 0 || k >= c.items.len() {
        return;
    }
    if c.sorted {
        c.items.truncate(k);
        return;
    }
    let mut heap = BinaryHeap::from(std::mem::take(&mut c.heap));
    for &cand in &c.items {
        if heap.len() < k {
            heap.push(Ranked(cand));
        } else if let Some(mut worst) = heap.peek_mut()
            && by_rank(&cand, &worst.0) == Ordering::Less
        {
            *worst = Ranked(cand);
        }
    }
    let best_first = heap.into_sorted_vec();
    c.items.clear();
    c.items.extend(best_first.iter().map(|r| r.0));
    c.heap = best_first;
    c.heap.clear();
    c.sorted = true;
    c.identity = false;
}

/// Keeps the smallest prefix of the most likely candidates whose probability mass is at
/// least `p` (always at least one). `p >= 1` is off.
///
/// On an unsorted list only the tokens at or above the uniform weight are sorted when
/// they already hold mass `p` (they are a prefix of the sorted order, so the result is
/// the same as sorting everything; for a peaked distribution this is a few hundred).
pub fn top_p(c: &mut Candidates, p: f32) {
    let max = c.max_logit();
    if p >= 1.0 || max == f32::NEG_INFINITY {
        return;
    }
    let weight = |x: &Candidate| f64::from((x.logit - max).exp());
    let target = if c.sorted {
        f64::from(p) * c.items.iter().map(weight).sum::<f64>()
    } else {
        let target = prune_below_uniform(c, max, p);
        c.sort_by_rank();
        target
    };
    let mut mass = 0.0f64;
    let keep = c.items.iter().position(|x| {
        mass += weight(x);
        mass >= target
    });
    c.items.truncate(keep.map_or(c.items.len(), |i| i + 1));
}

/// Drops the candidates below the uniform weight when the rest hold mass `p`; returns
/// the mass to reach, `p` times the total weight of the full list.
fn prune_below_uniform(c: &mut Candidates, max: f32, p: f32) -> f64 {
    c.weights.clear();
    c.weights.extend(c.items.iter().map(|x| (x.logit - max).exp()));
    let total: f64 = c.weights.iter().map(|&w| f64::from(w)).sum();
    let target = f64::from(p) * total;
    let floor = total / c.items.len() as f64;
    let above: f64 = c.weights.iter().map(|&w| f64::from(w)).filter(|&w| w >= floor).sum();
    if above >= target {
        let mut weights = c.weights.iter();
        c.items.retain(|_| weights.next().is_some_and(|&w| f64::from(w) >= floor));
        c.identity = false;
    }
    target
}

/// Keeps exactly the candidates whose probability is at least `min_p` times the largest
/// one (compared as `exp(logit - max) >= min_p`). `min_p == 0` is off.
pub fn min_p(c: &mut Candidates, min_p: f32) {
    if min_p <= 0.0 || c.items.is_empty() {
        return;
    }
    let max = c.max_logit();
    if max == f32::NEG_INFINITY {
        return;
    }
    c.items.retain(|x| (x.logit - max).exp() >= min_p);
    c.identity = false;
}

/// The index (into `c`) of the highest logit, ties to the lower id; `None` when empty.
pub fn argmax(c: &Candidates) -> Option<usize> {
    (0..c.items.len()).min_by(|&a, &b| by_rank(&c.items[a], &c.items[b]))
}

/// Draws an index from `probs` with one uniform number from `rng`. Zero-probability
/// entries are never chosen; `None` when every probability is 0.
pub fn draw(probs: &[f32], rng: &mut ChaCha8Rng) -> Option<usize> {
    let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let target = rng.random::<f64>() * total;
    let mut mass = 0.0f64;
    let mut last_positive = None;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            mass += f64::from(p);
            last_positive = Some(i);
            if target < mass {
                return Some(i);
            }
        }
    }
    last_positive
}
