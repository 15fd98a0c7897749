//! The tokenizer metadata of a GGUF file, read once into plain owned values.

use std::sync::Arc;

use crate::model::gguf::{GgufHeader, GgufValue, StrList};
use crate::types::TokenId;

use super::error::TokenizerError;

/// What kind of vocabulary `tokenizer.ggml.model` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VocabKind {
    /// Byte-level BPE with merges (`gpt2`).
    ByteBpe,
    /// SentencePiece-style BPE driven by scores (`llama`).
    SentencePiece,
    /// WordPiece as BERT embedding models ship it (`bert`).
    WordPiece,
}

/// A token's role, as `tokenizer.ggml.token_type` states it (llama.cpp's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_code(code: i64) -> Self {
        match code {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }
}

/// Everything under `tokenizer.*` that the tokenizer needs.
pub(crate) struct VocabSpec {
    pub kind: VocabKind,
    pub pre: Option<String>,
    pub tokens: Arc<StrList>,
    pub kinds: Vec<TokenKind>,
    pub scores: Option<Vec<f32>>,
    pub merges: Vec<String>,
    pub ids: SpecialIds,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub lowercase: bool,
    pub strip_accents: bool,
    pub chat_template: Option<String>,
    /// `general.name`: llama.cpp changes token attributes by it (the Phi-3 hack).
    pub name: Option<String>,
}

/// The special token ids the metadata names (`tokenizer.ggml.*_token_id`), with llama.cpp's
/// defaults for SentencePiece files (bos 1, eos 2, unk 0) where a key is absent.
#[derive(Clone, Debug, Default)]
pub(crate) struct SpecialIds {
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    pub unk: Option<TokenId>,
    pub pad: Option<TokenId>,
    pub eot: Option<TokenId>,
    pub eom: Option<TokenId>,
    pub fim_pre: Option<TokenId>,
    pub fim_suf: Option<TokenId>,
    pub fim_mid: Option<TokenId>,
    pub fim_pad: Option<TokenId>,
    pub fim_rep: Option<TokenId>,
    pub fim_sep: Option<TokenId>,
}

fn opt_bool(h: &GgufHeader, key: &str) -> Result<Option<bool>, TokenizerError> {
    match h.get(key) {
        None => Ok(None),
        Some(_) => Ok(Some(h.get_bool(key)?)),
    }
}

impl VocabSpec {
    /// Reads and cross-checks the `tokenizer.ggml.*` keys.
    pub fn read(h: &GgufHeader) -> Result<Self, TokenizerError> {
        let model = h.get_str("tokenizer.ggml.model")?;
        let kind = match model {
            "gpt2" => VocabKind::ByteBpe,
            "llama" => VocabKind::SentencePiece,
            "bert" => VocabKind::WordPiece,
            other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
        };
        let tokens = Arc::new(h.get_str_array("tokenizer.ggml.tokens")?.clone());
        let n = tokens.len();
        if n == 0 || u32::try_from(n).is_err() {
            return Err(TokenizerError::BadVocabSize(n));
        }
        let kinds = read_kinds(h, n)?;
        let scores = read_scores(h, n)?;
        let merges = match h.get("tokenizer.ggml.merges") {
            Some(_) => h.get_str_array("tokenizer.ggml.merges")?.iter().map(str::to_owned).collect(),
            None => Vec::new(),
        };
        let id = |key: &'static str| read_id(h, key, n);
        let is_wpm = kind == VocabKind::WordPiece;
        // llama.cpp's SentencePiece defaults, dropped when outside the vocabulary.
        let spm_default =
            |default: TokenId| Some(default).filter(|&d| kind == VocabKind::SentencePiece && (d as usize) < n);
        let eos = match id("tokenizer.ggml.eos_token_id")? {
            None if is_wpm => id("tokenizer.ggml.seperator_token_id")?,
            None => spm_default(2),
            other => other,
        };
        let bos = match id("tokenizer.ggml.bos_token_id")? {
            None if is_wpm => id("tokenizer.ggml.cls_token_id")?,
            None => spm_default(1),
            other => other,
        };
        let ids = SpecialIds {
            bos,
            eos,
            unk: id("tokenizer.ggml.unknown_token_id")?.or_else(|| spm_default(0)),
            pad: id("tokenizer.ggml.padding_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            eom: id("tokenizer.ggml.eom_token_id")?,
            fim_pre: id("tokenizer.ggml.fim_pre_token_id")?,
            fim_suf: id("tokenizer.ggml.fim_suf_token_id")?,
            fim_mid: id("tokenizer.ggml.fim_mid_token_id")?,
            fim_pad: id("tokenizer.ggml.fim_pad_token_id")?,
            fim_rep: id("tokenizer.ggml.fim_rep_token_id")?,
            fim_sep: id("tokenizer.ggml.fim_sep_token_id")?,
        };
        // llama.cpp's defaults when a flag is absent.
        let add_bos = opt_bool(h, "tokenizer.ggml.add_bos_token")?.unwrap_or(kind != VocabKind::ByteBpe);
        let add_eos = match opt_bool(h, "tokenizer.ggml.add_eos_token")? {
            Some(v) => v,
            None => is_wpm && opt_bool(h, "tokenizer.ggml.add_sep_token")?.unwrap_or(true),
        };
        let add_space_prefix =
            opt_bool(h, "tokenizer.ggml.add_space_prefix")?.unwrap_or(kind == VocabKind::SentencePiece);
        let lowercase = opt_bool(h, "tokenizer.ggml.do_lower_case")?.unwrap_or(true);
        let strip_accents = opt_bool(h, "tokenizer.ggml.strip_accents")?.unwrap_or(lowercase);
        let chat_template = match h.get("tokenizer.chat_template") {
            Some(_) => Some(h.get_str("tokenizer.chat_template")?.to_owned()),
            None => None,
        };
        Ok(VocabSpec {
            kind,
            pre: h.get("tokenizer.ggml.pre").and_then(GgufValue::as_str).map(str::to_owned),
            tokens,
            kinds,
            scores,
            merges,
            ids,
            add_bos,
            add_eos,
            add_space_prefix,
            lowercase,
            strip_accents,
            chat_template,
            name: h.get("general.name").and_then(GgufValue::as_str).map(str::to_owned),
        })
    }
}

fn read_kinds(h: &GgufHeader, n: usize) -> Result<Vec<TokenKind>, TokenizerError> {
    const KEY: &str = "tokenizer.ggml.token_type";
    let Some(_) = h.get(KEY) else {
        return Ok(vec![TokenKind::Normal; n]);
    };
    let arr = h.get_array(KEY)?;
    if arr.len() != n {
        return Err(TokenizerError::LengthMismatch { key: KEY, found: arr.len(), expected: n });
    }
    arr.values()
        .map(|v| {
            v.as_i64().map(TokenKind::from_code).ok_or(TokenizerError::BadValue { key: KEY, expected: "integers" })
        })
        .collect()
}

fn read_scores(h: &GgufHeader, n: usize) -> Result<Option<Vec<f32>>, TokenizerError> {
    const KEY: &str = "tokenizer.ggml.scores";
    let Some(_) = h.get(KEY) else {
        return Ok(None);
    };
    let arr = h.get_array(KEY)?;
    if arr.len() != n {
        return Err(TokenizerError::LengthMismatch { key: KEY, found: arr.len(), expected: n });
    }
    let scores = arr
        .values()
        .map(|v| v.as_f64().map(|x| x as f32).ok_or(TokenizerError::BadValue { key: KEY, expected: "floats" }))
        .collect::<Result<Vec<f32>, _>>()?;
    Ok(Some(scores))
}

/// An optional token id key; present but outside the vocabulary is an error. llama.cpp writes
/// `-1` (or `u32::MAX`) for "none", which reads as absent.
fn read_id(h: &GgufHeader, key: &'static str, n: usize) -> Result<Option<TokenId>, TokenizerError> {
    let Some(v) = h.get(key) else {
        return Ok(None);
    };
    let Some(raw) = v.as_i64() else {
        return Err(TokenizerError::BadValue { key, expected: "an integer token id" });
    };
    if raw < 0 || raw == i64::from(u32::MAX) {
        return Ok(None);
    }
    match u32::try_from(raw) {
        Ok(id) if (id as usize) < n => Ok(Some(id)),
        _ => Err(TokenizerError::BadSpecialId { key, id: raw, vocab_size: n }),
    }
}
