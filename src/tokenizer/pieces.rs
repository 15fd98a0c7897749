//! The raw bytes every token stands for, computed once at load.

use super::build::PieceStyle;
use super::vocab::{TokenKind, VocabKind, VocabSpec};

/// GPT-2's byte-level alphabet: printable bytes stand for themselves, the other 68 bytes are
/// shifted to U+0100.. in order. Returns the byte a symbol char stands for.
fn byte_level_inverse() -> std::collections::HashMap<char, u8> {
    let mut map = std::collections::HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
}

/// `<0xNN>` → the byte NN.
pub(crate) fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Every token's bytes, packed in one buffer.
#[derive(Debug)]
pub(crate) struct TokenBytes {
    buf: Vec<u8>,
    /// `ends[i]` is where token `i` ends in `buf` (it starts where token `i - 1` ends).
    ends: Vec<usize>,
}

impl TokenBytes {
    pub fn build(spec: &VocabSpec, style: PieceStyle) -> Self {
        let inverse = byte_level_inverse();
        let mut buf = Vec::with_capacity(spec.tokens.iter().map(str::len).sum());
        let mut ends = Vec::with_capacity(spec.tokens.len());
        for (text, kind) in spec.tokens.iter().zip(&spec.kinds) {
            push_token(&mut buf, text, *kind, spec.kind, &inverse, style);
            ends.push(buf.len());
        }
        TokenBytes { buf, ends }
    }

    pub fn get(&self, id: usize) -> Option<&[u8]> {
        let end = *self.ends.get(id)?;
        let start = if id == 0 { 0 } else { self.ends[id - 1] };
        Some(&self.buf[start..end])
    }
}

fn push_token(
    buf: &mut Vec<u8>,
    text: &str,
    kind: TokenKind,
    vocab: VocabKind,
    inverse: &std::collections::HashMap<char, u8>,
    style: PieceStyle,
) {
    if matches!(kind, TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown | TokenKind::Unused) {
        buf.extend_from_slice(text.as_bytes());
        return;
    }
    match vocab {
        VocabKind::ByteBpe => {
            let mut tmp = [0u8; 4];
            for c in text.chars() {
                match inverse.get(&c) {
                    Some(b) => buf.push(*b),
                    None => buf.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes()),
                }
            }
        }
        VocabKind::SentencePiece => match byte_token(text).filter(|_| kind == TokenKind::Byte) {
            Some(b) => buf.push(b),
            None => buf.extend_from_slice(text.replace('\u{2581}', " ").as_bytes()),
        },
        VocabKind::WordPiece => match style {
            PieceStyle::Phantom => buf.extend_from_slice(text.replace('\u{2581}', " ").as_bytes()),
            PieceStyle::Hashes => match text.strip_prefix("##") {
                Some(rest) => buf.extend_from_slice(rest.as_bytes()),
                None => {
                    buf.push(b' ');
                    buf.extend_from_slice(text.as_bytes());
                }
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_is_a_bijection_over_all_bytes() {
        let inv = byte_level_inverse();
        assert_eq!(inv.len(), 256);
        assert_eq!(inv[&'Ġ'], b' ');
        assert_eq!(inv[&'Ċ'], b'\n');
        assert_eq!(inv[&'a'], b'a');
    }

    #[test]
    fn byte_tokens_parse_only_two_hex_digits() {
        assert_eq!(byte_token("<0x0A>"), Some(10));
        assert_eq!(byte_token("<0xE6>"), Some(0xE6));
        assert_eq!(byte_token("<0x100>"), None);
        assert_eq!(byte_token("0x0A"), None);
    }
}
