//! Splitting text at special tokens written out whole, llama.cpp's way
//! (`tokenizer_st_partition`): the longest special token is cut out everywhere first, left to
//! right, then the next longest in what remains, and so on. User-defined tokens are always cut
//! out; control and unknown tokens only when the caller parses special tokens.
//!
//! Longest-first is not leftmost-longest (with `ab` and `bcd`, `abcd` gives `a`, `bcd`), so the
//! tokens are tried one by one, as llama.cpp does. An Aho-Corasick pass first finds which
//! tokens occur in the text at all, so only those are tried: the cost is the text's length
//! times the number of *distinct* special tokens in it, not times the vocabulary's thousands.

use aho_corasick::AhoCorasick;

use crate::types::TokenId;

/// One piece of the input: plain text (a byte range of it) or a special token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text { start: usize, end: usize },
    Special { id: TokenId, start: usize, end: usize },
}

/// A token that can be matched in text, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Special {
    pub text: String,
    pub id: TokenId,
    /// Control and unknown tokens: matched only when parsing special tokens.
    pub needs_parse_special: bool,
    /// Drop the whitespace before it (C `isspace`).
    pub lstrip: bool,
    /// Drop the whitespace after it.
    pub rstrip: bool,
}

/// The special tokens matchable in text, longest first.
#[derive(Debug, Default)]
pub(crate) struct SpecialMatcher {
    tokens: Vec<Special>,
    /// Pattern `i` is `tokens[i]`; reports every (overlapping) occurrence.
    finder: Option<AhoCorasick>,
}

impl SpecialMatcher {
    pub fn new(mut tokens: Vec<Special>) -> Self {
        tokens.retain(|t| !t.text.is_empty());
        // llama.cpp's sort is unstable, so its order among equal lengths is unspecified.
        tokens.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        let finder = match tokens.is_empty() {
            true => None,
            // Building only fails past the automaton's size limits, far beyond any vocabulary;
            // without it every token is tried.
            false => AhoCorasick::new(tokens.iter().map(|t| t.text.as_bytes())).ok(),
        };
        SpecialMatcher { tokens, finder }
    }

    /// Cuts `text` into fragments; with no special token in it, it is one text fragment.
    pub fn split(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Text { start: 0, end: text.len() }];
        let present = self.present(text);
        for (i, tok) in self.tokens.iter().enumerate() {
            let absent = present.as_ref().is_some_and(|p| !p.has(i));
            if absent || (tok.needs_parse_special && !parse_special) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                match frag {
                    Fragment::Text { start, end } => cut(text, start, end, tok, &mut next),
                    special => next.push(special),
                }
            }
            frags = next;
        }
        frags
    }

    /// Which tokens occur anywhere in `text` (None: unknown, try them all).
    fn present(&self, text: &str) -> Option<BitSet> {
        let finder = self.finder.as_ref()?;
        let mut set = BitSet::new(self.tokens.len());
        for m in finder.find_overlapping_iter(text) {
            set.insert(m.pattern().as_usize());
        }
        Some(set)
    }
}

struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> Self {
        BitSet(vec![0; n.div_ceil(64)])
    }

    fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    fn has(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
}

/// C's `isspace` in the "C" locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Cuts every occurrence of `tok` out of `text[start..end]`, left to right, without overlap.
fn cut(text: &str, start: usize, end: usize, tok: &Special, out: &mut Vec<Fragment>) {
    let bytes = text.as_bytes();
    let mut pos = start;
    while let Some(found) = text[pos..end].find(tok.text.as_str()) {
        let at = pos + found;
        let mut left_end = at;
        if tok.lstrip {
            while left_end > pos && is_c_space(bytes[left_end - 1]) {
                left_end -= 1;
            }
        }
        if left_end > pos {
            out.push(Fragment::Text { start: pos, end: left_end });
        }
        out.push(Fragment::Special { id: tok.id, start: at, end: at + tok.text.len() });
        pos = at + tok.text.len();
        if tok.rstrip {
            while pos < end && is_c_space(bytes[pos]) {
                pos += 1;
            }
        }
    }
    if pos < end {
        out.push(Fragment::Text { start: pos, end });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn special(text: &str, id: TokenId, needs_parse_special: bool) -> Special {
        Special { text: text.into(), id, needs_parse_special, lstrip: false, rstrip: false }
    }

    #[test]
    fn longest_token_wins_and_text_between_is_kept() {
        let m = SpecialMatcher::new(vec![special("<a>", 1, true), special("<a><b>", 2, true), special("<b>", 3, true)]);
        let frags = m.split("x<a><b>y<a>", true);
        assert_eq!(
            frags,
            vec![
                Fragment::Text { start: 0, end: 1 },
                Fragment::Special { id: 2, start: 1, end: 7 },
                Fragment::Text { start: 7, end: 8 },
                Fragment::Special { id: 1, start: 8, end: 11 },
            ]
        );
    }

    #[test]
    fn longest_first_is_not_leftmost_first() {
        let m = SpecialMatcher::new(vec![special("ab", 1, false), special("bcd", 2, false)]);
        assert_eq!(
            m.split("abcd", false),
            vec![Fragment::Text { start: 0, end: 1 }, Fragment::Special { id: 2, start: 1, end: 4 }]
        );
    }

    #[test]
    fn control_tokens_need_parse_special_and_user_defined_do_not() {
        let m = SpecialMatcher::new(vec![special("<c>", 1, true), special("<u>", 2, false)]);
        let text = "<c><u>";
        assert_eq!(
            m.split(text, false),
            vec![Fragment::Text { start: 0, end: 3 }, Fragment::Special { id: 2, start: 3, end: 6 }]
        );
        assert_eq!(
            m.split(text, true),
            vec![Fragment::Special { id: 1, start: 0, end: 3 }, Fragment::Special { id: 2, start: 3, end: 6 }]
        );
    }

    #[test]
    fn rstrip_and_lstrip_drop_neighbouring_whitespace() {
        let mut tok = special("<t>", 7, true);
        tok.rstrip = true;
        tok.lstrip = true;
        let m = SpecialMatcher::new(vec![tok]);
        assert_eq!(
            m.split("a \n<t>\n b<t> ", true),
            vec![
                Fragment::Text { start: 0, end: 1 },
                Fragment::Special { id: 7, start: 3, end: 6 },
                Fragment::Text { start: 8, end: 9 },
                Fragment::Special { id: 7, start: 9, end: 12 },
            ]
        );
    }

    #[test]
    fn no_specials_is_one_fragment() {
        let m = SpecialMatcher::new(vec![special("", 0, false)]);
        assert_eq!(m.split("abc", true), vec![Fragment::Text { start: 0, end: 3 }]);
        assert!(m.split("", true).iter().all(|f| matches!(f, Fragment::Text { start: 0, end: 0 })));
    }
}
