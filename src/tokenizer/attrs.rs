//! Token attributes and the end-of-generation set, derived at load the way llama.cpp's
//! `llama_vocab::impl::load` derives them: the file's token types, then the tokens it
//! recognises by their text (promoted to control), the `unused` marking, and the name-based
//! Phi-3 hack that strips whitespace after special tokens.

use crate::types::TokenId;

use super::vocab::{TokenKind, VocabSpec};

/// A token's attribute bits, as llama.cpp's `llama_token_attr` (several may be set: a
/// user-defined `</s>` that ends generation is user-defined *and* control).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Attrs(u16);

impl Attrs {
    pub const UNKNOWN: Attrs = Attrs(1 << 0);
    pub const UNUSED: Attrs = Attrs(1 << 1);
    pub const NORMAL: Attrs = Attrs(1 << 2);
    pub const CONTROL: Attrs = Attrs(1 << 3);
    pub const USER_DEFINED: Attrs = Attrs(1 << 4);
    pub const BYTE: Attrs = Attrs(1 << 5);
    /// Whitespace before the token in the text is dropped when it is matched.
    pub const LSTRIP: Attrs = Attrs(1 << 7);
    /// Whitespace after the token in the text is dropped when it is matched.
    pub const RSTRIP: Attrs = Attrs(1 << 8);

    fn of(kind: TokenKind) -> Attrs {
        match kind {
            TokenKind::Normal => Attrs::NORMAL,
            TokenKind::Unknown => Attrs::UNKNOWN,
            TokenKind::Control => Attrs::CONTROL,
            TokenKind::UserDefined => Attrs::USER_DEFINED,
            TokenKind::Unused => Attrs::UNUSED,
            TokenKind::Byte => Attrs::BYTE,
        }
    }

    /// Whether any of `other`'s bits are set.
    pub fn any(self, other: Attrs) -> bool {
        self.0 & other.0 != 0
    }

    fn insert(&mut self, other: Attrs) {
        self.0 |= other.0;
    }

    fn remove(&mut self, other: Attrs) {
        self.0 &= !other.0;
    }
}

impl std::ops::BitOr for Attrs {
    type Output = Attrs;
    fn bitor(self, rhs: Attrs) -> Attrs {
        Attrs(self.0 | rhs.0)
    }
}

// Names llama.cpp recognises by text, in its order (`llama-vocab.cpp`, `impl::load`).
const EOT: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM: &[&str] = &["<|eom_id|>"];
const FIM_PRE: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP: &[&str] = &["<|file_sep|>"];
/// Tokens that end generation whatever their type (a match that is not control becomes control).
const EOG: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// What load derives from the vocabulary: every token's attributes and the sorted EOG ids.
pub(crate) struct Derived {
    pub attrs: Vec<Attrs>,
    pub eog: Vec<TokenId>,
}

/// The special ids of one role: the file's key if it names one, else the first token whose text
/// is on `names`, which is promoted to control. llama.cpp walks a hash map here, so when several
/// names match, which one it takes is unspecified; the lowest id is taken.
fn detect(spec: &VocabSpec, attrs: &mut [Attrs], key: Option<TokenId>, names: &[&str]) -> Option<TokenId> {
    if key.is_some() {
        return key;
    }
    let id = spec.tokens.iter().position(|t| names.contains(&t))?;
    attrs[id].insert(Attrs::CONTROL);
    Some(id as TokenId)
}

/// Derives attributes and the EOG set in llama.cpp's order (each step sees the previous ones).
pub(crate) fn derive(spec: &VocabSpec) -> Derived {
    let mut attrs: Vec<Attrs> = spec.kinds.iter().map(|&k| Attrs::of(k)).collect();
    let ids = &spec.ids;
    let eot = detect(spec, &mut attrs, ids.eot, EOT);
    let eom = detect(spec, &mut attrs, ids.eom, EOM);
    detect(spec, &mut attrs, ids.fim_pre, FIM_PRE);
    detect(spec, &mut attrs, ids.fim_suf, FIM_SUF);
    detect(spec, &mut attrs, ids.fim_mid, FIM_MID);
    let fim_pad = detect(spec, &mut attrs, ids.fim_pad, FIM_PAD);
    let fim_rep = detect(spec, &mut attrs, ids.fim_rep, FIM_REP);
    let fim_sep = detect(spec, &mut attrs, ids.fim_sep, FIM_SEP);
    // Control tokens named `unused…` are unused (and stay control).
    for (a, t) in attrs.iter_mut().zip(spec.tokens.iter()) {
        if a.any(Attrs::CONTROL) && t.contains("unused") {
            a.insert(Attrs::UNUSED);
        }
    }
    let mut eog: Vec<TokenId> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
    for (id, (a, t)) in attrs.iter_mut().zip(spec.tokens.iter()).enumerate() {
        if EOG.contains(&t) {
            eog.push(id as TokenId);
            a.insert(Attrs::CONTROL);
        }
    }
    eog.extend([ids.eos, eot, eom].into_iter().flatten());
    eog.sort_unstable();
    eog.dedup();
    drop_quirks(spec, &mut attrs, &mut eog);
    if spec.name.as_deref().is_some_and(is_phi3) {
        phi3_rstrip(spec, &mut attrs);
    }
    Derived { attrs, eog }
}

/// llama.cpp's two EOG exceptions: `<|end|>` does not end generation next to `<|return|>` and
/// `<|call|>` (or `<|calls|>` and `<|flush|>`); `</s>` does not next to `<|tool_response>`.
fn drop_quirks(spec: &VocabSpec, attrs: &mut [Attrs], eog: &mut Vec<TokenId>) {
    let find = |eog: &[TokenId], name: &str| eog.iter().copied().find(|&id| &spec.tokens[id as usize] == name);
    let has = |eog: &[TokenId], name: &str| find(eog, name).is_some();
    if let Some(end) = find(eog, "<|end|>") {
        let call = has(eog, "<|call|>") || has(eog, "<|calls|>");
        if call && (has(eog, "<|return|>") || has(eog, "<|flush|>")) {
            eog.retain(|&id| id != end);
            attrs[end as usize] = Attrs::USER_DEFINED;
        }
    }
    if let Some(s) = find(eog, "</s>")
        && has(eog, "<|tool_response>")
    {
        eog.retain(|&id| id != s);
        attrs[s as usize] = Attrs::NORMAL;
    }
}

fn is_phi3(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("phi-3") || name.contains("phi3")
}

/// Phi-3 files: every special token (and `</s>`) eats the whitespace after it, except `<unk>`,
/// `<s>` and `<|endoftext|>`. So the `\n` after `<|user|>` in a chat prompt is not tokenized.
fn phi3_rstrip(spec: &VocabSpec, attrs: &mut [Attrs]) {
    let special = Attrs::CONTROL | Attrs::USER_DEFINED | Attrs::UNKNOWN;
    for (a, t) in attrs.iter_mut().zip(spec.tokens.iter()) {
        if a.any(special) || t == "</s>" {
            a.insert(Attrs::RSTRIP);
        }
        if matches!(t, "<unk>" | "<s>" | "<|endoftext|>") {
            a.remove(Attrs::RSTRIP);
        }
    }
}
