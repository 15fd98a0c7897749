//! Splitting text at special tokens written out whole, llama.cpp's way: the longest special
//! token is cut out everywhere first, then the next longest in what remains, and so on.

use crate::types::TokenId;

/// One piece of the input: plain text (a byte range of it) or a special token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text { start: usize, end: usize },
    Special { id: TokenId, start: usize, end: usize },
}

/// The special tokens matchable in text, longest first.
#[derive(Debug, Default)]
pub(crate) struct SpecialMatcher {
    tokens: Vec<(String, TokenId)>,
}

impl SpecialMatcher {
    pub fn new(mut tokens: Vec<(String, TokenId)>) -> Self {
        tokens.retain(|(t, _)| !t.is_empty());
        tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        SpecialMatcher { tokens }
    }

    /// Cuts `text` into fragments; with no special tokens it is one text fragment.
    pub fn split(&self, text: &str) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Text { start: 0, end: text.len() }];
        for (tok, id) in &self.tokens {
            if !text.contains(tok.as_str()) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for frag in frags {
                match frag {
                    Fragment::Text { start, end } => cut(text, start, end, tok, *id, &mut next),
                    special => next.push(special),
                }
            }
            frags = next;
        }
        frags
    }
}

fn cut(text: &str, start: usize, end: usize, tok: &str, id: TokenId, out: &mut Vec<Fragment>) {
    let mut pos = start;
    while let Some(found) = text[pos..end].find(tok) {
        let at = pos + found;
        if at > pos {
            out.push(Fragment::Text { start: pos, end: at });
        }
        out.push(Fragment::Special { id, start: at, end: at + tok.len() });
        pos = at + tok.len();
    }
    if pos < end {
        out.push(Fragment::Text { start: pos, end });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_token_wins_and_text_between_is_kept() {
        let m = SpecialMatcher::new(vec![("<a>".into(), 1), ("<a><b>".into(), 2), ("<b>".into(), 3)]);
        let frags = m.split("x<a><b>y<a>");
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
    fn no_specials_is_one_fragment() {
        let m = SpecialMatcher::new(vec![("".into(), 0)]);
        assert_eq!(m.split("abc"), vec![Fragment::Text { start: 0, end: 3 }]);
        assert!(m.split("").iter().all(|f| matches!(f, Fragment::Text { start: 0, end: 0 })));
    }
}
