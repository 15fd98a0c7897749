//! Turning a byte-level BPE or WordPiece [`VocabSpec`] into a Hugging Face
//! `tokenizers::Tokenizer` for plain text (special tokens are split out before the text reaches
//! it, see `special.rs`; SentencePiece is `spm.rs`).

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::error::TokenizerError;
use super::vocab::{TokenKind, VocabSpec};

/// The GPT-2 split, as llama.cpp writes it (the final `\s+` alternative is implied: text no
/// pattern matches is kept as its own piece).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regex splits `tokenizer.ggml.pre` names, applied in order (each splits the pieces the
/// previous one left), and whether whole words found in the vocabulary skip the merges.
fn pre_splits(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    let splits = match pre {
        "default" => vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => vec![GPT2],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => vec![r"\p{N}", GPT2],
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => return Some((vec![LLAMA3], true)),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => vec![QWEN2],
        _ => return None,
    };
    Some((splits, false))
}

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

/// Byte-level BPE with the pre-tokenizer `pre` names (absent means `default`).
pub(crate) fn byte_bpe(spec: &VocabSpec) -> Result<Tokenizer, TokenizerError> {
    let pre = spec.pre.as_deref().unwrap_or("default");
    let (splits, ignore_merges) = pre_splits(pre).ok_or_else(|| TokenizerError::UnknownPre(pre.to_owned()))?;
    let vocab = vocab_map(spec.tokens.iter());
    let merges = spec
        .merges
        .iter()
        .enumerate()
        .map(|(index, line)| match line.split_once(' ') {
            Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
            None => Err(TokenizerError::BadMerge { index, merge: line.clone() }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let model =
        BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(ignore_merges).build().map_err(build_err)?;
    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(splits.len() + 1);
    for pattern in splits {
        let split = Split::new(SplitPattern::Regex(pattern.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(build_err)?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());
    let mut tk = Tokenizer::new(model);
    tk.with_pre_tokenizer(Some(Sequence::new(steps)));
    Ok(tk)
}

/// Later ids win nothing: the first id of a duplicated string is the one text maps to.
fn vocab_map<'a>(tokens: impl Iterator<Item = &'a str>) -> Vocab {
    let mut vocab = Vocab::default();
    for (id, t) in tokens.enumerate() {
        vocab.entry(t.to_owned()).or_insert(id as u32);
    }
    vocab
}

/// How WordPiece pieces are written in a GGUF vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceStyle {
    /// llama.cpp's converter: word-initial pieces start with `▁`, continuations are bare.
    Phantom,
    /// Hugging Face's own: continuations start with `##`, word-initial pieces are bare.
    Hashes,
}

/// Which style a WordPiece vocabulary uses: any normal piece starting with `▁` means phantom.
pub(crate) fn piece_style(spec: &VocabSpec) -> PieceStyle {
    let phantom =
        spec.tokens.iter().zip(&spec.kinds).any(|(t, k)| *k == TokenKind::Normal && t.starts_with('\u{2581}'));
    if phantom { PieceStyle::Phantom } else { PieceStyle::Hashes }
}

/// WordPiece with BERT's normalizer and splitter; the vocabulary is rewritten to `##` style.
pub(crate) fn wordpiece(spec: &VocabSpec) -> Result<Tokenizer, TokenizerError> {
    let style = piece_style(spec);
    let mut vocab = Vocab::default();
    for (id, (t, k)) in spec.tokens.iter().zip(&spec.kinds).enumerate() {
        let text = match (style, k) {
            (PieceStyle::Phantom, TokenKind::Normal) => match t.strip_prefix('\u{2581}') {
                Some(word_start) => word_start.to_owned(),
                None => format!("##{t}"),
            },
            _ => t.to_owned(),
        };
        vocab.entry(text).or_insert(id as u32);
    }
    let unk_id = spec.ids.unk.ok_or(TokenizerError::MissingUnknown)?;
    let unk = spec.tokens[unk_id as usize].to_owned();
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token(unk)
        .continuing_subword_prefix("##".to_owned())
        .max_input_chars_per_word(usize::MAX)
        .build()
        .map_err(build_err)?;
    let mut tk = Tokenizer::new(model);
    tk.with_normalizer(Some(BertNormalizer::new(true, true, Some(spec.strip_accents), spec.lowercase)))
        .map_err(build_err)?;
    tk.with_pre_tokenizer(Some(BertPreTokenizer));
    Ok(tk)
}
