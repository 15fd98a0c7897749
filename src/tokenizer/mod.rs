//! GGUF vocabularies tokenized as llama.cpp tokenizes them, plus a streaming detokenizer.
//!
//! [`GgufTokenizer::from_gguf`] reads `tokenizer.ggml.*` and builds the model the file names:
//! byte-level BPE (`gpt2`, Hugging Face `tokenizers`) with the pre-tokenizer
//! `tokenizer.ggml.pre` names, SentencePiece (`llama`, hand-written in `spm.rs`) with byte
//! fallback and the leading-space rule, or WordPiece (`bert`, Hugging Face). Token attributes
//! and the end-of-generation set are derived as llama.cpp derives them (`attrs.rs`). Special
//! tokens are cut out of the text first, longest first (`special.rs`): user-defined ones always,
//! control ones with `parse_special`; the rest goes to the model.
//!
//! All offsets in this module are **byte offsets** into the `&str` given to encode, as
//! half-open ranges `[start, end)`. A byte-level token may hold part of a character, so an
//! offset can fall inside a character: slice `text.as_bytes()`, not `text`.

mod attrs;
mod build;
mod error;
mod gguf;
mod pieces;
mod special;
mod spm;
mod stream;
mod vocab;

pub use error::TokenizerError;
pub use gguf::{Encoding, GgufTokenizer};
pub use stream::StreamDecoder;
