//! The model's vocabulary as llguidance sees it: a token trie of each id's bytes.
//!
//! Control tokens are marked with toktrie's `0xFF` prefix, so a grammar never produces them
//! by spelling out their text, and a Lark grammar can still name them (`<|im_end|>`).

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenizerEnv};

use crate::tokenizer::GgufTokenizer;
use crate::types::TokenId;

struct Vocab {
    trie: TokTrie,
    tokenizer: Arc<GgufTokenizer>,
}

impl TokenizerEnv for Vocab {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Builds the trie of `tokenizer`'s vocabulary.
pub fn token_env(tokenizer: &Arc<GgufTokenizer>) -> Result<TokEnv, String> {
    let n = tokenizer.vocab_size();
    let mut words = Vec::with_capacity(n);
    for id in 0..n as TokenId {
        let bytes = tokenizer.token_bytes(id).map_err(|e| e.to_string())?;
        // Control tokens (`<|im_end|>`) only: a user-defined token such as Qwen's
        // `</tool_call>` is text a grammar may write as a literal.
        if tokenizer.is_control(id) {
            let mut w = Vec::with_capacity(bytes.len() + 1);
            w.push(TokTrie::SPECIAL_TOKEN_MARKER);
            w.extend_from_slice(bytes);
            words.push(w);
        } else {
            words.push(bytes.to_vec());
        }
    }
    let eos = tokenizer
        .eos_id()
        .or_else(|| tokenizer.eog_ids().first().copied())
        .ok_or("the vocabulary has no end-of-generation token")?;
    let mut info = TokRxInfo::new(n as u32, eos);
    info.tok_bos = tokenizer.bos_id();
    info.tok_unk = tokenizer.unk_id();
    info.tok_pad = tokenizer.pad_id();
    let trie = TokTrie::from(&info, &words);
    Ok(Arc::new(Vocab { trie, tokenizer: tokenizer.clone() }))
}
