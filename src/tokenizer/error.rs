//! The tokenizer's one error type.

use crate::model::gguf::GgufError;
use crate::types::TokenId;

/// Why a tokenizer could not be built, or an encode/decode was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] GgufError),
    #[error("unsupported tokenizer model `{0}` (supported: gpt2, llama, bert)")]
    UnsupportedModel(String),
    #[error(
        "unknown pre-tokenizer `{0}` in tokenizer.ggml.pre (supported: default, gpt2, smollm, llama3, qwen2 and aliases)"
    )]
    UnknownPre(String),
    #[error("vocabulary of {0} tokens is empty or does not fit 32-bit ids")]
    BadVocabSize(usize),
    #[error("`{key}` has {found} entries, but the vocabulary has {expected} tokens")]
    LengthMismatch { key: &'static str, found: usize, expected: usize },
    #[error("`{key}` must hold {expected}")]
    BadValue { key: &'static str, expected: &'static str },
    #[error("`{key}` = {id} is outside the vocabulary of {vocab_size} tokens")]
    BadSpecialId { key: &'static str, id: i64, vocab_size: usize },
    #[error("merge #{index} `{merge}` is not two pieces separated by a space")]
    BadMerge { index: usize, merge: String },
    #[error("a `llama` (SentencePiece) vocabulary needs tokenizer.ggml.scores")]
    MissingScores,
    #[error("a `bert` (WordPiece) vocabulary needs tokenizer.ggml.unknown_token_id")]
    MissingUnknown,
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
    #[error("cannot encode the text: {0}")]
    Encode(String),
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownId { id: TokenId, vocab_size: usize },
}
