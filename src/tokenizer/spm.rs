//! SentencePiece (`tokenizer.ggml.model = "llama"`: Gemma, Llama 2, Mistral, Phi-3) as
//! llama.cpp runs it (`llm_tokenizer_spm_session`).
//!
//! Hand-written rather than emulated with Hugging Face BPE, because no merge list can say what
//! llama.cpp does: it merges the adjacent pair whose concatenation is *any* vocabulary token
//! with the highest score, breaking ties by position (leftmost first), where BPE ranks are
//! unique; and it merges characters that are not tokens themselves (an out-of-vocabulary
//! character can become part of a larger token) where BPE falls back to bytes first. An
//! emulation also needs every split of every token as a merge, which a hostile vocabulary can
//! blow up to tens of GiB; this needs one map entry per token and, per encode, a few words
//! per character of text.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;

use crate::model::gguf::StrList;
use crate::types::TokenId;

use super::error::TokenizerError;
use super::vocab::VocabSpec;

/// `▁` (U+2581), which stands for a space in SentencePiece vocabularies.
const SPACE: char = '\u{2581}';
/// No neighbour.
const NONE: u32 = u32::MAX;

/// Token text to id over the vocabulary's own text list: 4 bytes a token plus the table's
/// control bytes, where a map of owned strings took about 80 (Gemma 3's 262,144 tokens: 2.6
/// MB against 21 MB). A repeated text keeps its first id; empty texts are left out.
#[derive(Debug)]
struct TextIds {
    texts: Arc<StrList>,
    table: HashTable<TokenId>,
    hasher: foldhash::fast::RandomState,
}

impl TextIds {
    fn new(texts: Arc<StrList>) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        let mut table = HashTable::with_capacity(texts.len());
        for (id, t) in texts.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            let hash = hasher.hash_one(t);
            if table.find(hash, |&i: &TokenId| &texts[i as usize] == t).is_none() {
                table.insert_unique(hash, id as TokenId, |&i| hasher.hash_one(&texts[i as usize]));
            }
        }
        TextIds { texts, table, hasher }
    }

    fn get(&self, text: &str) -> Option<TokenId> {
        self.table.find(self.hasher.hash_one(text), |&i| &self.texts[i as usize] == text).copied()
    }
}

/// A SentencePiece vocabulary ready to encode. Immutable; per-call state lives in [`Scratch`].
#[derive(Debug)]
pub(crate) struct Spm {
    /// Token text to id; a repeated text keeps its first id, empty texts are left out.
    ids: TextIds,
    /// Merge priority of each id (higher first).
    scores: Vec<f32>,
    /// The ids a byte is spelled with when its character is not a token: `<0xHH>`, else the
    /// one-byte token (ASCII only), else none.
    bytes: Box<[Option<TokenId>; 256]>,
    unk: Option<TokenId>,
    add_space_prefix: bool,
}

/// One character, or a run of them merged into a token: `len` bytes at `start` of the
/// escaped text, linked to its neighbours. A symbol merged into its left neighbour has `len` 0.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
}

/// Two adjacent symbols whose concatenation (`size` bytes) is a token of score `score`.
#[derive(Clone, Copy, Debug)]
struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl Ord for Bigram {
    /// Higher score first, then the leftmost pair, as llama.cpp's `llm_bigram_spm::comparator`.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

/// Buffers one encode call reuses across its text fragments.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// The fragment with the leading space added and every space written as `▁`.
    text: String,
    symbols: Vec<Symbol>,
    queue: BinaryHeap<Bigram>,
}

impl Spm {
    pub fn new(spec: &VocabSpec) -> Result<Self, TokenizerError> {
        let raw = spec.scores.as_ref().ok_or(TokenizerError::MissingScores)?;
        // -0.0 ties with 0.0 and NaN never wins, as with llama.cpp's `<` on floats.
        let scores = raw
            .iter()
            .map(|&s| {
                if s.is_nan() {
                    f32::NEG_INFINITY
                } else if s == 0.0 {
                    0.0
                } else {
                    s
                }
            })
            .collect();
        let ids = TextIds::new(Arc::clone(&spec.tokens));
        let mut bytes = Box::new([None; 256]);
        for (b, slot) in bytes.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            // llama.cpp looks the byte up as a C string: NUL is the empty string, never a token.
            let ascii = (1..0x80).contains(&b).then(|| char::from(b as u8).to_string());
            *slot = ids.get(&hex).or_else(|| ascii.and_then(|a| ids.get(&a)));
        }
        Ok(Spm { ids, scores, bytes, unk: spec.ids.unk, add_space_prefix: spec.add_space_prefix })
    }

    /// Encodes one stretch of plain text (a fragment between special tokens) starting at byte
    /// `base` of the caller's text, appending ids and, if asked, byte ranges into that text.
    /// The leading space, if added, has no bytes there: alone it gets an empty range.
    pub fn encode(
        &self,
        seg: &str,
        base: usize,
        ids: &mut Vec<TokenId>,
        offsets: Option<&mut Vec<(usize, usize)>>,
        s: &mut Scratch,
    ) -> Result<(), TokenizerError> {
        s.text.clear();
        if self.add_space_prefix {
            s.text.push(SPACE);
        }
        for (i, part) in seg.split(' ').enumerate() {
            if i > 0 {
                s.text.push(SPACE);
            }
            s.text.push_str(part);
        }
        if u32::try_from(s.text.len()).is_err() {
            return Err(TokenizerError::Encode(format!("a text of {} bytes is too long", seg.len())));
        }
        self.merge(s);
        self.emit(seg, base, ids, offsets, s);
        Ok(())
    }

    /// Splits the escaped text into characters and merges the best pair until none is a token.
    fn merge(&self, s: &mut Scratch) {
        let Scratch { text, symbols, queue } = s;
        symbols.clear();
        queue.clear();
        let n = text.chars().count() as u32;
        for (i, (start, c)) in text.char_indices().enumerate() {
            let i = i as u32;
            let prev = if i == 0 { NONE } else { i - 1 };
            let next = if i + 1 == n { NONE } else { i + 1 };
            symbols.push(Symbol { start: start as u32, len: c.len_utf8() as u32, prev, next });
        }
        for right in 1..n {
            self.push_pair(text, symbols, queue, right - 1, right);
        }
        while let Some(pair) = queue.pop() {
            let (l, r) = (symbols[pair.left as usize], symbols[pair.right as usize]);
            // Stale: one side was merged away, or the left one grew, since it was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != pair.size {
                continue;
            }
            let left = &mut symbols[pair.left as usize];
            left.len += r.len;
            left.next = r.next;
            symbols[pair.right as usize].len = 0;
            if r.next != NONE {
                symbols[r.next as usize].prev = pair.left;
            }
            self.push_pair(text, symbols, queue, l.prev, pair.left);
            self.push_pair(text, symbols, queue, pair.left, r.next);
        }
    }

    /// Queues `left`+`right` if their text together is a token.
    fn push_pair(&self, text: &str, symbols: &[Symbol], queue: &mut BinaryHeap<Bigram>, left: u32, right: u32) {
        if left == NONE || right == NONE {
            return;
        }
        let (l, r) = (symbols[left as usize], symbols[right as usize]);
        let size = l.len + r.len;
        let joined = &text[l.start as usize..(l.start + size) as usize];
        if let Some(id) = self.ids.get(joined) {
            queue.push(Bigram { score: self.scores[id as usize], left, right, size });
        }
    }

    /// Emits each remaining symbol: its token, else its bytes, else `unk`.
    fn emit(
        &self,
        seg: &str,
        base: usize,
        ids: &mut Vec<TokenId>,
        mut offsets: Option<&mut Vec<(usize, usize)>>,
        s: &Scratch,
    ) {
        let orig = seg.as_bytes();
        // Where the next symbol starts in `seg`; the added leading space has no bytes there.
        let mut cursor = 0usize;
        let mut prefix = self.add_space_prefix;
        let mut i = if s.symbols.is_empty() { NONE } else { 0 };
        while i != NONE {
            let sym = s.symbols[i as usize];
            i = sym.next;
            let piece = &s.text[sym.start as usize..(sym.start + sym.len) as usize];
            let start = cursor;
            for c in piece.chars() {
                if prefix {
                    prefix = false;
                } else {
                    // An escaped `▁` came from one space byte; any other character is itself.
                    cursor += if orig[cursor] == b' ' { 1 } else { c.len_utf8() };
                }
            }
            let range = (base + start, base + cursor);
            if let Some(id) = self.ids.get(piece) {
                ids.push(id);
                if let Some(o) = offsets.as_deref_mut() {
                    o.push(range);
                }
                continue;
            }
            // Not a token, so never merged: one character. Spell it in bytes if every byte has a
            // token (llama.cpp aborts otherwise; Starling falls back to `unk`, or drops it).
            if piece.bytes().all(|b| self.bytes[usize::from(b)].is_some()) {
                let own_bytes = cursor - start == piece.len();
                for (k, b) in piece.bytes().enumerate() {
                    ids.extend(self.bytes[usize::from(b)]);
                    if let Some(o) = offsets.as_deref_mut() {
                        o.push(if own_bytes { (range.0 + k, range.0 + k + 1) } else { range });
                    }
                }
            } else if let Some(unk) = self.unk {
                ids.push(unk);
                if let Some(o) = offsets.as_deref_mut() {
                    o.push(range);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bigrams_pop_by_score_then_leftmost() {
        let mut q = BinaryHeap::new();
        for (score, left) in [(-2.0, 0), (-1.0, 5), (-1.0, 3), (-3.0, 1)] {
            q.push(Bigram { score, left, right: left + 1, size: 2 });
        }
        let order: Vec<u32> = std::iter::from_fn(|| q.pop().map(|b| b.left)).collect();
        assert_eq!(order, vec![3, 5, 0, 1]);
    }
}
