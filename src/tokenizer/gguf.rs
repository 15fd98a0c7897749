//! [`GgufTokenizer`]: a GGUF file's vocabulary as llama.cpp tokenizes it, with the special
//! tokens, BOS/EOS rules, end-of-generation set and chat template the file declares.

use std::path::Path;
use std::sync::Arc;

use crate::model::gguf::StrList;

use super::attrs::{self, Attrs};
use super::build;
use super::error::TokenizerError;
use super::pieces::TokenBytes;
use super::special::{Fragment, Special, SpecialMatcher};
use super::spm::{self, Spm};
use super::vocab::{VocabKind, VocabSpec};
use crate::model::gguf::{GgufFile, GgufHeader};
use crate::types::TokenId;

/// Token ids with where each came from in the text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoding {
    pub ids: Vec<TokenId>,
    /// Byte offsets `[start, end)` into the encoded text, one per id, in order. A token the
    /// model adds without text behind it (SentencePiece's leading space) has an empty range.
    pub offsets: Vec<(usize, usize)>,
    /// The vocabulary string of each token (`Ġworld`, `▁the`, `<0xE6>`, `<|im_end|>`).
    pub pieces: Vec<String>,
}

/// The model that encodes plain text between special tokens.
enum TextModel {
    /// Byte-level BPE and WordPiece, through Hugging Face `tokenizers`.
    Hf(Box<tokenizers::Tokenizer>),
    /// SentencePiece, written out as llama.cpp runs it.
    Spm(Spm),
}

/// A GGUF file's own tokenizer. Immutable once built: `Send + Sync`, share it behind an `Arc`.
pub struct GgufTokenizer {
    kind: VocabKind,
    model: TextModel,
    tokens: Arc<StrList>,
    attrs: Vec<Attrs>,
    bytes: TokenBytes,
    specials: SpecialMatcher,
    bos: Option<TokenId>,
    eos: Option<TokenId>,
    unk: Option<TokenId>,
    pad: Option<TokenId>,
    eog: Vec<TokenId>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl GgufTokenizer {
    /// Opens a GGUF file and builds its tokenizer (the tensors are not touched).
    pub fn open(path: &Path) -> Result<Self, TokenizerError> {
        Self::from_gguf(&GgufFile::open(path)?.header)
    }

    /// Builds the tokenizer from a GGUF header's `tokenizer.*` metadata.
    pub fn from_gguf(h: &GgufHeader) -> Result<Self, TokenizerError> {
        let spec = VocabSpec::read(h)?;
        let style = build::piece_style(&spec);
        let model = match spec.kind {
            VocabKind::ByteBpe => TextModel::Hf(Box::new(build::byte_bpe(&spec)?)),
            VocabKind::SentencePiece => TextModel::Spm(Spm::new(&spec)?),
            VocabKind::WordPiece => TextModel::Hf(Box::new(build::wordpiece(&spec)?)),
        };
        let bytes = TokenBytes::build(&spec, style);
        let attrs::Derived { attrs, eog } = attrs::derive(&spec);
        let matchable = Attrs::CONTROL | Attrs::USER_DEFINED | Attrs::UNKNOWN;
        let specials = SpecialMatcher::new(
            spec.tokens
                .iter()
                .zip(&attrs)
                .enumerate()
                .filter(|(_, (_, a))| a.any(matchable))
                .map(|(id, (t, a))| Special {
                    text: t.to_owned(),
                    id: id as TokenId,
                    needs_parse_special: a.any(Attrs::CONTROL | Attrs::UNKNOWN),
                    lstrip: a.any(Attrs::LSTRIP),
                    rstrip: a.any(Attrs::RSTRIP),
                })
                .collect(),
        );
        Ok(GgufTokenizer {
            kind: spec.kind,
            model,
            bytes,
            specials,
            bos: spec.ids.bos,
            eos: spec.ids.eos,
            unk: spec.ids.unk,
            pad: spec.ids.pad,
            eog,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
            add_space_prefix: spec.add_space_prefix && spec.kind == VocabKind::SentencePiece,
            chat_template: spec.chat_template,
            tokens: spec.tokens,
            attrs,
        })
    }

    /// Number of tokens in the vocabulary; valid ids are `0..vocab_size()`.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<TokenId> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<TokenId> {
        self.eos
    }

    pub fn unk_id(&self) -> Option<TokenId> {
        self.unk
    }

    pub fn pad_id(&self) -> Option<TokenId> {
        self.pad
    }

    /// End-of-generation ids, as llama.cpp builds the set: the FIM pad/repo/separator tokens,
    /// every token named like `<|im_end|>`, `<end_of_turn>`, `</s>` whatever its type (llama.cpp's
    /// list), and the eos/eot/eom ids. Sorted, no duplicates.
    pub fn eog_ids(&self) -> &[TokenId] {
        &self.eog
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether prompts end with EOS (`tokenizer.ggml.add_eos_token`).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// `tokenizer.chat_template`, if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Plain encode, no BOS/EOS added.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>, TokenizerError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, parse_special, &mut ids, None)?;
        Ok(ids)
    }

    /// Encode as a prompt for the model: adds BOS/EOS where add_bos_token/add_eos_token say so.
    pub fn encode_prompt(&self, text: &str, parse_special: bool) -> Result<Vec<TokenId>, TokenizerError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if let (true, Some(bos)) = (self.add_bos, self.bos) {
            ids.push(bos);
        }
        self.encode_into(text, parse_special, &mut ids, None)?;
        if let (true, Some(eos)) = (self.add_eos, self.eos) {
            ids.push(eos);
        }
        Ok(ids)
    }

    /// Ids, byte offsets `[start, end)` into `text`, and the vocabulary string of each token.
    pub fn encode_with_offsets(&self, text: &str, parse_special: bool) -> Result<Encoding, TokenizerError> {
        let mut ids = Vec::new();
        let mut offsets = Vec::new();
        self.encode_into(text, parse_special, &mut ids, Some(&mut offsets))?;
        let pieces = ids.iter().map(|&id| self.tokens[id as usize].to_owned()).collect();
        Ok(Encoding { ids, offsets, pieces })
    }

    fn encode_into(
        &self,
        text: &str,
        parse_special: bool,
        ids: &mut Vec<TokenId>,
        mut offsets: Option<&mut Vec<(usize, usize)>>,
    ) -> Result<(), TokenizerError> {
        let mut scratch = spm::Scratch::default();
        for frag in self.specials.split(text, parse_special) {
            match frag {
                Fragment::Special { id, start, end } => {
                    ids.push(id);
                    if let Some(o) = offsets.as_deref_mut() {
                        o.push((start, end));
                    }
                }
                Fragment::Text { start, end } if start < end => {
                    let seg = &text[start..end];
                    match &self.model {
                        // Every text fragment is either the first or follows a special token,
                        // which is exactly when llama.cpp adds SentencePiece's leading space.
                        TextModel::Spm(spm) => spm.encode(seg, start, ids, offsets.as_deref_mut(), &mut scratch)?,
                        TextModel::Hf(hf) => self.encode_hf(hf, seg, start, ids, offsets.as_deref_mut())?,
                    }
                }
                Fragment::Text { .. } => {}
            }
        }
        Ok(())
    }

    /// Runs a Hugging Face model over one stretch of plain text starting at byte `base`.
    fn encode_hf(
        &self,
        hf: &tokenizers::Tokenizer,
        seg: &str,
        base: usize,
        ids: &mut Vec<TokenId>,
        offsets: Option<&mut Vec<(usize, usize)>>,
    ) -> Result<(), TokenizerError> {
        let enc = hf.encode(seg, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let first = ids.len();
        ids.extend_from_slice(enc.get_ids());
        let Some(offsets) = offsets else { return Ok(()) };
        if self.kind == VocabKind::ByteBpe {
            // Byte-level tokens spell the input exactly: offsets are running byte counts.
            let mut pos = base;
            for &id in &ids[first..] {
                let len = self.bytes.get(id as usize).map_or(0, <[u8]>::len);
                offsets.push((pos, pos + len));
                pos += len;
            }
        } else {
            offsets.extend(enc.get_offsets().iter().map(|&(s, e)| (base + s, base + e)));
        }
        Ok(())
    }

    fn check(&self, id: TokenId) -> Result<usize, TokenizerError> {
        let i = id as usize;
        if i < self.tokens.len() { Ok(i) } else { Err(TokenizerError::UnknownId { id, vocab_size: self.tokens.len() }) }
    }

    /// Text for `ids`. `skip_special` drops control tokens (BOS, EOS, chat markers);
    /// user-defined tokens are always text. SentencePiece and WordPiece drop the leading
    /// space their first word carries. Bytes that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[TokenId], skip_special: bool) -> Result<String, TokenizerError> {
        let mut out: Vec<u8> = Vec::with_capacity(ids.len() * 4);
        let strip_first_space = self.add_space_prefix || self.kind == VocabKind::WordPiece;
        for &id in ids {
            let bytes = self.token_bytes(id)?;
            if skip_special && self.is_control(id) {
                continue;
            }
            let bytes = match bytes.split_first() {
                Some((b' ', rest)) if out.is_empty() && strip_first_space && !self.is_special(id) => rest,
                _ => bytes,
            };
            out.extend_from_slice(bytes);
        }
        Ok(match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The raw bytes a token stands for (byte-level symbols mapped back to bytes; SPM `▁` to space;
    /// `<0xNN>` to the byte; special tokens to their text).
    pub fn token_bytes(&self, id: TokenId) -> Result<&[u8], TokenizerError> {
        let i = self.check(id)?;
        self.bytes.get(i).ok_or(TokenizerError::UnknownId { id, vocab_size: self.tokens.len() })
    }

    /// The vocabulary string of a token, exactly as the GGUF file spells it.
    pub fn token_text(&self, id: TokenId) -> Result<&str, TokenizerError> {
        Ok(&self.tokens[self.check(id)?])
    }

    fn has(&self, id: TokenId, attrs: Attrs) -> bool {
        self.attrs.get(id as usize).is_some_and(|a| a.any(attrs))
    }

    /// Control and user-defined tokens (false for ids outside the vocabulary).
    pub fn is_special(&self, id: TokenId) -> bool {
        self.has(id, Attrs::CONTROL | Attrs::USER_DEFINED)
    }

    /// Control tokens only: the ones `skip_special` drops from decoded text. Includes tokens
    /// llama.cpp promotes to control because of their text (a user-defined `</s>`).
    pub fn is_control(&self, id: TokenId) -> bool {
        self.has(id, Attrs::CONTROL)
    }

    /// Unused tokens: typed unused in the file, or control tokens whose text contains `unused`
    /// (Gemma's `<unused0>`…), which stay control as well.
    pub fn is_unused(&self, id: TokenId) -> bool {
        self.has(id, Attrs::UNUSED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<GgufTokenizer>();
    }
}
