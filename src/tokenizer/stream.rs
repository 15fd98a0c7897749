//! Incremental detokenization for streaming: text goes out only as whole UTF-8 characters.

use crate::types::TokenId;

use super::error::TokenizerError;
use super::gguf::GgufTokenizer;

/// Streaming detokenizer: feed ids one at a time, get the text that is complete UTF-8 so far.
///
/// Bytes of a character split across tokens are held until the character is complete, so
/// nothing is dropped and nothing broken is emitted. Bytes that can never become a valid
/// character come out as U+FFFD as soon as that is certain. One decoder per sequence.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    /// Bytes of an unfinished character (at most 3), waiting for the next token.
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder that drops control tokens (BOS, EOS, chat markers) when `skip_special`.
    pub fn new(skip_special: bool) -> Self {
        StreamDecoder { skip_special, pending: Vec::with_capacity(8) }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &GgufTokenizer, id: TokenId) -> Result<String, TokenizerError> {
        let bytes = tok.token_bytes(id)?;
        if self.skip_special && tok.is_control(id) {
            return Ok(String::new());
        }
        if self.pending.is_empty() {
            // Fast path: the token is whole characters on its own.
            match std::str::from_utf8(bytes) {
                Ok(s) => return Ok(s.to_owned()),
                Err(_) => self.pending.extend_from_slice(bytes),
            }
        } else {
            self.pending.extend_from_slice(bytes);
        }
        Ok(self.drain_complete())
    }

    /// Flushes whatever is held; an unfinished character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Moves every complete character out of `pending`, replacing invalid bytes with U+FFFD
    /// and keeping only an unfinished (possibly still valid) tail.
    fn drain_complete(&mut self) -> String {
        let mut out = String::with_capacity(self.pending.len());
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let start = self.pending.len() - keep;
        self.pending.copy_within(start.., 0);
        self.pending.truncate(keep);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_decoder_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<StreamDecoder>();
    }
}
