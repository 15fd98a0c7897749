//! Tokenizer: llama.cpp parity on the real model, round trips, offsets, streaming, and small
//! SentencePiece / WordPiece vocabularies built here.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use starling::model::gguf::{GgufFile, GgufHeader, GgufValue};
use starling::tokenizer::{GgufTokenizer, StreamDecoder, TokenizerError};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn smollm_header() -> &'static GgufHeader {
    static H: OnceLock<GgufHeader> = OnceLock::new();
    H.get_or_init(|| {
        let path = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        GgufFile::open(&path).expect("default model in models/").header
    })
}

fn smollm() -> &'static GgufTokenizer {
    static T: OnceLock<GgufTokenizer> = OnceLock::new();
    T.get_or_init(|| GgufTokenizer::from_gguf(smollm_header()).expect("SmolLM2 tokenizer builds"))
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

#[test]
fn smollm_reproduces_every_llama_cpp_fixture_line() {
    let fixture = std::fs::read_to_string(root().join("tests/fixtures/smollm2/tokenize.jsonl")).unwrap();
    let tok = smollm();
    let mut checked = [0usize; 2];
    for line in fixture.lines().filter(|l| !l.trim().is_empty()) {
        let case: Case = serde_json::from_str(line).unwrap();
        let ids = tok.encode(&case.text, case.parse_special).unwrap();
        assert_eq!(ids, case.ids, "text {:?} parse_special {}", case.text, case.parse_special);
        // add_bos_token is false for this model: the prompt form is the same.
        assert_eq!(tok.encode_prompt(&case.text, case.parse_special).unwrap(), case.ids);
        checked[usize::from(case.parse_special)] += 1;
    }
    assert!(checked[0] >= 25 && checked[1] >= 25, "both settings covered: {checked:?}");
}

#[test]
fn smollm_metadata_is_exposed() {
    let tok = smollm();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos());
    // <|endoftext|> and <|im_end|> by name, and <reponame> as llama.cpp's FIM repo token
    // (llama-cpp-python 0.3.36's `llama_vocab_is_eog` is true for exactly these three).
    assert_eq!(tok.eog_ids(), &[0, 2, 4]);
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(tok.token_text(1).unwrap(), "<|im_start|>");
    assert!(tok.is_special(1) && !tok.is_special(19556));
    assert_eq!(tok.token_text(2899).unwrap(), "Ġleading");
    assert_eq!(tok.token_bytes(2899).unwrap(), b" leading");
    assert_eq!(tok.token_bytes(198).unwrap(), b"\n");
}

/// The real Gemma 3 270M file (a 262,144-token SentencePiece vocabulary).
fn gemma() -> &'static GgufTokenizer {
    static T: OnceLock<GgufTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = root().join("models/gemma-3-270m-q4_k_m.gguf");
        assert!(path.exists(), "{} is missing: run `scripts/fetch-model.sh gemma3-270m`", path.display());
        GgufTokenizer::open(&path).expect("Gemma 3 tokenizer builds")
    })
}

fn gemma_cases() -> Vec<Case> {
    let fixture = std::fs::read_to_string(root().join("tests/fixtures/gemma3/tokenize.jsonl")).unwrap();
    fixture.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `tests/fixtures/gemma3/tokenize.jsonl` is llama.cpp's output (made by
/// `tools/fixtures/gemma3_tokenize.py`), without BOS.
#[test]
fn gemma3_reproduces_every_llama_cpp_fixture_line() {
    let tok = gemma();
    let mut checked = [0usize; 2];
    let mut wrong = Vec::new();
    for case in gemma_cases() {
        let ids = tok.encode(&case.text, case.parse_special).unwrap();
        if ids != case.ids {
            wrong.push(format!(
                "{:?} parse_special {}: got {ids:?}, llama.cpp {:?}",
                case.text, case.parse_special, case.ids
            ));
        }
        checked[usize::from(case.parse_special)] += 1;
    }
    assert!(wrong.is_empty(), "{} lines differ:\n{}", wrong.len(), wrong.join("\n"));
    assert!(checked[0] >= 40 && checked[1] >= 40, "both settings covered: {checked:?}");
}

#[test]
fn gemma3_offsets_partition_the_text_and_decode_round_trips() {
    let tok = gemma();
    for case in gemma_cases() {
        let enc = tok.encode_with_offsets(&case.text, case.parse_special).unwrap();
        assert_eq!(enc.ids, case.ids);
        // No leading space is added (add_space_prefix is false): the tokens spell the text.
        let mut pos = 0;
        for (&id, &(start, end)) in enc.ids.iter().zip(&enc.offsets) {
            assert_eq!(start, pos, "{:?}: contiguous offsets", case.text);
            // A literal `▁` in the text decodes as a space, as in llama.cpp.
            if !case.text.contains('\u{2581}') {
                assert_eq!(&case.text.as_bytes()[start..end], tok.token_bytes(id).unwrap(), "{:?}", case.text);
            }
            pos = end;
        }
        assert_eq!(pos, case.text.len());
        if !case.text.contains('\u{2581}') {
            assert_eq!(tok.decode(&enc.ids, false).unwrap(), case.text);
        }
    }
}

#[test]
fn gemma3_metadata_bos_and_end_of_generation() {
    let tok = gemma();
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.unk_id(), tok.pad_id()), (Some(2), Some(1), Some(3), Some(0)));
    assert!(tok.add_bos() && !tok.add_eos());
    assert_eq!(tok.encode_prompt("Hello world", false).unwrap(), vec![2, 9259, 1902]);
    assert_eq!(tok.encode_prompt("", true).unwrap(), vec![2]);
    // <eos>, <end_of_turn>, and the user-defined `</s>` llama.cpp ends on by its text.
    assert_eq!(tok.eog_ids(), &[1, 106, 212]);
    assert!(tok.is_control(212) && tok.is_special(212) && !tok.is_control(168), "`</s>` promoted, `<table>` not");
    assert!(tok.is_unused(6) && tok.is_control(6) && tok.is_unused(256_001) && !tok.is_unused(105));
    let chat = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n", true).unwrap();
    assert_eq!(chat, vec![105, 2364, 107, 10979, 106, 107]);
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nHi\n");
    assert_eq!(tok.chat_template(), None, "the base model ships no template");
}

#[test]
fn unknown_ids_are_errors_naming_the_id() {
    let tok = smollm();
    for err in [
        tok.decode(&[19556, 49152], false).unwrap_err(),
        tok.token_bytes(u32::MAX).unwrap_err(),
        tok.token_text(50_000).unwrap_err(),
        StreamDecoder::new(false).push(tok, 49152).unwrap_err(),
    ] {
        assert!(matches!(err, TokenizerError::UnknownId { vocab_size: 49152, .. }), "{err:?}");
        assert!(err.to_string().contains("outside the vocabulary of 49152"), "{err}");
    }
    assert!(!tok.is_special(u32::MAX));
}

#[test]
fn decode_skips_control_tokens_only_when_asked() {
    let tok = smollm();
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", true).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>user\nhi<|im_end|>");
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}

#[test]
fn offsets_point_at_specials_and_text() {
    let tok = smollm();
    let text = "<|im_start|>user\nhi 🚀";
    let enc = tok.encode_with_offsets(text, true).unwrap();
    assert_eq!(enc.ids[0], 1);
    assert_eq!(enc.offsets[0], (0, 12));
    assert_eq!(enc.pieces[0], "<|im_start|>");
    assert_eq!(enc.offsets.last().unwrap().1, text.len());
    assert_eq!(enc.ids, tok.encode(text, true).unwrap());
    assert_eq!(enc.pieces[1], "user");
}

/// Strings that stress a byte-level vocabulary: emoji with ZWJ, combining marks, CJK, RTL,
/// control characters, long whitespace runs, digits, and arbitrary scalar values.
fn nasty_text() -> impl Strategy<Value = String> {
    let parts = prop_oneof![
        Just("👩‍👩‍👧‍👦".to_owned()),
        Just("e\u{301}\u{308}".to_owned()),
        Just("日本語".to_owned()),
        Just("مرحبا".to_owned()),
        Just("\u{0}\u{7}\r\n\t".to_owned()),
        Just("          \n\n   ".to_owned()),
        Just("<|im_end|>".to_owned()),
        "[0-9]{1,6}".prop_map(|s| s),
        "[a-zA-Z' ]{1,12}".prop_map(|s| s),
        any::<String>(),
    ];
    prop::collection::vec(parts, 0..8).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn byte_level_round_trip_and_offsets_partition_the_text(s in nasty_text(), parse_special in any::<bool>()) {
        let tok = smollm();
        let enc = tok.encode_with_offsets(&s, parse_special).unwrap();
        prop_assert_eq!(tok.decode(&enc.ids, false).unwrap(), s.clone());
        prop_assert_eq!(enc.ids.len(), enc.offsets.len());
        prop_assert_eq!(enc.ids.len(), enc.pieces.len());
        let mut pos = 0;
        for (&id, &(start, end)) in enc.ids.iter().zip(&enc.offsets) {
            prop_assert_eq!(start, pos, "offsets are contiguous and monotonic");
            prop_assert!(end > start);
            prop_assert_eq!(&s.as_bytes()[start..end], tok.token_bytes(id).unwrap());
            pos = end;
        }
        prop_assert_eq!(pos, s.len());
    }

    #[test]
    fn stream_decoder_matches_decode(s in nasty_text()) {
        let tok = smollm();
        let ids = tok.encode(&s, false).unwrap();
        let mut dec = StreamDecoder::new(false);
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&dec.push(tok, id).unwrap());
        }
        out.push_str(&dec.finish());
        prop_assert_eq!(out, s);
    }

    #[test]
    fn gemma3_offsets_partition_any_text_and_decode_round_trips(s in nasty_text(), parse_special in any::<bool>()) {
        let tok = gemma();
        let enc = tok.encode_with_offsets(&s, parse_special).unwrap();
        prop_assert_eq!(&enc.ids, &tok.encode(&s, parse_special).unwrap());
        let mut pos = 0;
        for &(start, end) in &enc.offsets {
            prop_assert_eq!(start, pos, "no leading space is added: offsets are contiguous");
            prop_assert!(end > start);
            pos = end;
        }
        prop_assert_eq!(pos, s.len());
        // A literal `▁` decodes as a space, as in llama.cpp.
        if !s.contains('\u{2581}') {
            prop_assert_eq!(tok.decode(&enc.ids, false).unwrap(), s);
        }
    }

    #[test]
    fn spm_offsets_stay_in_order_inside_the_text(s in nasty_text()) {
        // Leading space added, byte tokens, `unk` for characters without them.
        for byte_fallback in [true, false] {
            let tok = spm(SPM_PIECES, byte_fallback, vec![]);
            let enc = tok.encode_with_offsets(&s, true).unwrap();
            prop_assert_eq!(enc.ids.len(), enc.offsets.len());
            let mut pos = 0;
            for &(start, end) in &enc.offsets {
                prop_assert!(start >= pos && end >= start && end <= s.len(), "{:?}", enc.offsets);
                pos = start;
            }
        }
    }
}

/// A text whose characters span 1–4 bytes, fed to the stream decoder one byte token at a time:
/// every split point inside every character is exercised.
#[test]
fn stream_decoder_handles_a_split_at_every_byte_boundary() {
    let tok = smollm();
    let text = "aé中🚀👩‍👧 ok";
    // The byte-level vocabulary has one token per byte: find them.
    let byte_ids: Vec<u32> = text
        .bytes()
        .map(|b| (0..tok.vocab_size() as u32).find(|&id| tok.token_bytes(id).unwrap() == [b]).unwrap())
        .collect();
    let mut dec = StreamDecoder::new(true);
    let mut out = String::new();
    for (i, &id) in byte_ids.iter().enumerate() {
        let piece = dec.push(tok, id).unwrap();
        // Whatever came out so far is a prefix of the text ending on a char boundary.
        out.push_str(&piece);
        assert!(text.starts_with(&out), "after byte {i}: {out:?}");
        assert!(out.len() <= i + 1 && out.len() + 3 > i, "holds at most 3 bytes");
    }
    assert_eq!(dec.finish(), "");
    assert_eq!(out, text);
}

#[test]
fn stream_decoder_flushes_a_broken_tail_lossily() {
    let tok = smollm();
    let first_byte_of_rocket = (0..tok.vocab_size() as u32).find(|&id| tok.token_bytes(id).unwrap() == [0xF0]).unwrap();
    let mut dec = StreamDecoder::new(false);
    assert_eq!(dec.push(tok, first_byte_of_rocket).unwrap(), "");
    // A new character start proves the held byte broken: it is replaced, not dropped.
    let a = tok.encode("a", false).unwrap()[0];
    assert_eq!(dec.push(tok, first_byte_of_rocket).unwrap(), "\u{FFFD}");
    assert_eq!(dec.push(tok, a).unwrap(), "\u{FFFD}a");
    assert_eq!(dec.push(tok, first_byte_of_rocket).unwrap(), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(dec.finish(), "");
}

// ---------- small vocabularies built in the test ----------

fn header(kv: Vec<(&str, GgufValue)>) -> GgufHeader {
    GgufHeader {
        version: 3,
        metadata: kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        tensors: Vec::new(),
        alignment: 32,
        data_offset: 0,
    }
}

fn strs(v: &[&str]) -> GgufValue {
    GgufValue::array(v.iter().map(|s| GgufValue::String((*s).to_owned())).collect())
}

fn s(v: &str) -> GgufValue {
    GgufValue::String(v.to_owned())
}

/// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, optionally the 256 byte tokens, then
/// `pieces` with their scores.
fn spm(pieces: &[(&str, f32)], byte_fallback: bool, extra: Vec<(&str, GgufValue)>) -> GgufTokenizer {
    let typed: Vec<(&str, f32, i32)> = pieces.iter().map(|&(p, sc)| (p, sc, 1)).collect();
    spm_typed(&typed, byte_fallback, extra)
}

/// As [`spm`], with each piece's `tokenizer.ggml.token_type` (1 normal, 3 control, 4 user-defined).
fn spm_typed(pieces: &[(&str, f32, i32)], byte_fallback: bool, extra: Vec<(&str, GgufValue)>) -> GgufTokenizer {
    let mut tokens = vec!["<unk>".to_owned(), "<s>".to_owned(), "</s>".to_owned()];
    let mut types = vec![2, 3, 3];
    if byte_fallback {
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
    }
    let mut scores = vec![0.0f32; tokens.len()];
    for &(p, sc, ty) in pieces {
        tokens.push(p.to_owned());
        types.push(ty);
        scores.push(sc);
    }
    let mut kv = vec![
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.tokens", GgufValue::array(tokens.into_iter().map(GgufValue::String).collect())),
        ("tokenizer.ggml.token_type", GgufValue::array(types.into_iter().map(GgufValue::I32).collect())),
        ("tokenizer.ggml.scores", GgufValue::array(scores.into_iter().map(GgufValue::F32).collect())),
        ("tokenizer.ggml.unknown_token_id", GgufValue::U32(0)),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(2)),
    ];
    kv.extend(extra);
    GgufTokenizer::from_gguf(&header(kv)).unwrap()
}

fn id_of(tok: &GgufTokenizer, text: &str) -> u32 {
    (0..tok.vocab_size() as u32).find(|&i| tok.token_text(i).unwrap() == text).unwrap()
}

const SPM_PIECES: &[(&str, f32)] = &[
    ("▁", -1.0),
    ("h", -2.0),
    ("e", -2.0),
    ("l", -2.0),
    ("o", -2.0),
    ("w", -2.0),
    ("r", -2.0),
    ("d", -2.0),
    ("▁h", -3.0),
    ("ll", -3.0),
    ("llo", -4.0),
    ("▁he", -4.0),
    ("▁hello", -5.0),
    ("▁w", -3.0),
    ("or", -3.0),
    ("ld", -3.0),
    ("▁wor", -5.0),
    ("▁world", -6.0),
];

#[test]
fn spm_adds_the_leading_space_and_merges_whole_words() {
    let tok = spm(SPM_PIECES, true, vec![]);
    let ids = tok.encode("hello world", false).unwrap();
    assert_eq!(ids, vec![id_of(&tok, "▁hello"), id_of(&tok, "▁world")]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
    let enc = tok.encode_with_offsets("hello world", false).unwrap();
    assert_eq!(enc.offsets, vec![(0, 5), (5, 11)], "the added space has no bytes in the text");
    assert_eq!(enc.pieces, vec!["▁hello", "▁world"]);
    assert!(tok.add_bos(), "llama vocabularies add BOS unless the file says otherwise");
    assert_eq!(tok.encode_prompt("hello", false).unwrap(), vec![1, id_of(&tok, "▁hello")]);
}

#[test]
fn spm_text_after_a_special_token_gets_the_leading_space_again() {
    let tok = spm(SPM_PIECES, true, vec![]);
    let ids = tok.encode("hello</s>world", true).unwrap();
    assert_eq!(ids, vec![id_of(&tok, "▁hello"), 2, id_of(&tok, "▁world")]);
    // Without parse_special the marker is text: `<`, `/`, `s`, `>` have no pieces and fall
    // back to bytes.
    let plain = tok.encode("</s>", false).unwrap();
    assert_eq!(plain[0], id_of(&tok, "▁"));
    assert_eq!(plain[1..], [3 + b'<' as u32, 3 + b'/' as u32, 3 + b's' as u32, 3 + b'>' as u32]);
}

#[test]
fn spm_byte_fallback_spells_unknown_characters_as_bytes() {
    let tok = spm(SPM_PIECES, true, vec![]);
    let text = "hé🚀";
    let enc = tok.encode_with_offsets(text, false).unwrap();
    let mut want = vec![id_of(&tok, "▁h")];
    want.extend("é🚀".bytes().map(|b| 3 + u32::from(b)));
    assert_eq!(enc.ids, want);
    assert_eq!(tok.token_bytes(want[1]).unwrap(), [0xC3]);
    assert_eq!(tok.decode(&enc.ids, false).unwrap(), text);
    // Each byte token covers exactly its byte.
    assert_eq!(enc.offsets[1..3], [(1, 2), (2, 3)]);
    let mut dec = StreamDecoder::new(false);
    let streamed: String = enc.ids.iter().map(|&id| dec.push(&tok, id).unwrap()).collect();
    assert_eq!(streamed, " hé🚀", "the stream keeps the leading space of the first token");
}

#[test]
fn spm_without_byte_tokens_maps_unknown_characters_to_unk() {
    let tok = spm(SPM_PIECES, false, vec![]);
    assert_eq!(tok.encode("hé", false).unwrap(), vec![id_of(&tok, "▁h"), 0]);
}

#[test]
fn spm_merges_follow_scores_not_vocabulary_order() {
    let base = [("a", -1.0), ("b", -1.0), ("c", -1.0)];
    let no_prefix = || vec![("tokenizer.ggml.add_space_prefix", GgufValue::Bool(false))];
    let bc_first = spm(&[base[0], base[1], base[2], ("ab", -2.0), ("bc", -1.5)], false, no_prefix());
    assert_eq!(bc_first.encode("abc", false).unwrap(), vec![id_of(&bc_first, "a"), id_of(&bc_first, "bc")]);
    let ab_first = spm(&[base[0], base[1], base[2], ("ab", -1.5), ("bc", -2.0)], false, no_prefix());
    assert_eq!(ab_first.encode("abc", false).unwrap(), vec![id_of(&ab_first, "ab"), id_of(&ab_first, "c")]);
    assert_eq!(ab_first.decode(&ab_first.encode("abc", false).unwrap(), false).unwrap(), "abc");
}

// The expectations below were checked against llama.cpp (llama-cpp-python 0.3.36) on the same
// vocabularies written as GGUF files.

#[test]
fn spm_equal_scores_merge_the_leftmost_pair_first() {
    // `bc` has the lower id, which is what a rank-ordered BPE merge list would prefer.
    let pieces = [("a", -1.0), ("b", -1.0), ("c", -1.0), ("bc", -2.0), ("ab", -2.0)];
    let tok = spm(&pieces, false, vec![("tokenizer.ggml.add_space_prefix", GgufValue::Bool(false))]);
    let [ab, bc, c] = ["ab", "bc", "c"].map(|t| id_of(&tok, t));
    assert_eq!(tok.encode("abc", false).unwrap(), vec![ab, c]);
    assert_eq!(tok.encode("abcbc", false).unwrap(), vec![ab, c, bc]);
}

#[test]
fn spm_merges_characters_that_are_not_tokens_themselves() {
    // `x` is not in the vocabulary, `▁x` is: llama.cpp merges before falling back to bytes.
    let tok = spm(&[("▁", -1.0), ("▁x", -3.0), ("y", -1.0)], true, vec![]);
    let (x, y) = (id_of(&tok, "▁x"), id_of(&tok, "y"));
    assert_eq!(tok.encode("x", false).unwrap(), vec![x]);
    assert_eq!(tok.encode("xy", false).unwrap(), vec![x, y]);
}

#[test]
fn spm_merges_can_spell_a_control_token_and_a_missing_space_piece_is_bytes() {
    let pieces = [("<c", -5.0, 1), ("<ct", -5.0, 1), ("<ctl", -5.0, 1), ("<ctl>", -1000.0, 3)];
    let tok = spm_typed(&pieces, true, vec![]);
    let ctl = id_of(&tok, "<ctl>");
    // No `▁` token: the added leading space is spelled as its three UTF-8 bytes, with no bytes
    // of the text behind them.
    let enc = tok.encode_with_offsets("<ctl>", false).unwrap();
    assert_eq!(enc.ids, vec![3 + 0xE2, 3 + 0x96, 3 + 0x81, ctl]);
    assert_eq!(enc.offsets, vec![(0, 0), (0, 0), (0, 0), (0, 5)]);
    assert_eq!(tok.encode("<ctl>", true).unwrap(), vec![ctl]);
}

#[test]
fn spm_user_defined_tokens_are_cut_out_even_without_parse_special() {
    let pieces = [("▁", -1.0, 1), ("a", -2.0, 1), ("b", -2.0, 1), ("▁a", -1.5, 1), ("▁b", -1.5, 1), ("<u>", 0.0, 4)];
    let tok = spm_typed(&pieces, true, vec![]);
    let want = vec![id_of(&tok, "▁a"), id_of(&tok, "<u>"), id_of(&tok, "▁b")];
    assert_eq!(tok.encode("a<u>b", false).unwrap(), want, "the text after it gets the leading space again");
    assert_eq!(tok.encode("a<u>b", true).unwrap(), want);
    let enc = tok.encode_with_offsets("a<u>b", false).unwrap();
    assert_eq!(enc.offsets, vec![(0, 1), (1, 4), (4, 5)]);
}

const PHI3_PIECES: &[(&str, f32, i32)] = &[
    ("▁", -1.0, 1),
    ("h", -2.0, 1),
    ("i", -2.0, 1),
    ("hi", -1.8, 1),
    ("▁hi", -1.0, 1),
    ("<|user|>", 0.0, 3),
    ("<|end|>", 0.0, 3),
    ("<|endoftext|>", 0.0, 3),
];

#[test]
fn phi3_special_tokens_eat_the_whitespace_after_them() {
    let name = |n: &str| vec![("general.name", s(n))];
    let phi = spm_typed(PHI3_PIECES, true, name("Phi-3 mini tiny"));
    let [user, end, eot, hi, space] = ["<|user|>", "<|end|>", "<|endoftext|>", "▁hi", "▁"].map(|t| id_of(&phi, t));
    assert_eq!(phi.encode("<|user|>\nhi<|end|>\n", true).unwrap(), vec![user, hi, end]);
    // `<|endoftext|>` keeps the space after it.
    assert_eq!(phi.encode("<|user|> \t\nhi <|endoftext|> hi", true).unwrap(), vec![user, hi, space, eot, space, hi]);
    let other = spm_typed(PHI3_PIECES, true, name("tiny"));
    let hi_bare = id_of(&other, "hi");
    let newline = 3 + u32::from(b'\n');
    assert_eq!(
        other.encode("<|user|>\nhi<|end|>\n", true).unwrap(),
        vec![user, space, newline, hi_bare, end, space, newline]
    );
}

#[test]
fn eog_set_and_attributes_follow_llama_cpp() {
    let pieces = [
        ("▁", -1.0, 1),
        ("x", -2.0, 1),
        ("▁x", -1.0, 1),
        ("<end_of_turn>", 0.0, 4),
        ("<|fim_pad|>", 0.0, 1),
        ("<unused7>", 0.0, 3),
    ];
    let x = 3 + 256 + 1;
    let tok = spm_typed(&pieces, true, vec![("tokenizer.ggml.eot_token_id", GgufValue::U32(x))]);
    let [eot, pad, unused, sx] = ["<end_of_turn>", "<|fim_pad|>", "<unused7>", "▁x"].map(|t| id_of(&tok, t));
    // `</s>` (eos and by name), `x` (the eot key), `<end_of_turn>` (by name, though
    // user-defined), `<|fim_pad|>` (the FIM pad, though normal).
    assert_eq!(tok.eog_ids(), &[2, x, eot, pad]);
    // A user-defined token that ends generation is promoted to control, so it is matched
    // only with parse_special.
    assert!(tok.is_control(eot) && tok.is_special(eot) && tok.is_control(pad));
    let mut spelled = vec![sx];
    spelled.extend("<end_of_turn>".bytes().map(|b| 3 + u32::from(b)));
    assert_eq!(tok.encode("x<end_of_turn>", false).unwrap(), spelled);
    assert_eq!(tok.encode("x<end_of_turn>", true).unwrap(), vec![sx, eot]);
    // A control token named `unused` is unused and still control (still matched as text).
    assert!(tok.is_unused(unused) && tok.is_control(unused) && !tok.is_unused(eot));
    assert_eq!(tok.encode("<unused7>", true).unwrap(), vec![unused]);
}

#[test]
fn spm_special_ids_default_as_in_llama_cpp() {
    let tokens = ["<pad>", "<go>", "<stop>", "▁", "a", "▁a"];
    let tok = GgufTokenizer::from_gguf(&header(vec![
        ("tokenizer.ggml.model", s("llama")),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        ("tokenizer.ggml.token_type", GgufValue::array([3, 3, 3, 1, 1, 1].map(GgufValue::I32).to_vec())),
        ("tokenizer.ggml.scores", GgufValue::array([0.0, 0.0, 0.0, -1.0, -2.0, -1.0].map(GgufValue::F32).to_vec())),
    ]))
    .unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id(), tok.unk_id()), (Some(1), Some(2), Some(0)));
    assert_eq!(tok.eog_ids(), &[2]);
    assert_eq!(tok.encode_prompt("a", false).unwrap(), vec![1, 5]);
}

/// A WordPiece vocabulary as llama.cpp's converter writes it (`▁` marks word starts).
fn bert(tokens: &[&str], extra: Vec<(&str, GgufValue)>) -> GgufTokenizer {
    let types: Vec<GgufValue> = tokens.iter().map(|t| GgufValue::I32(if t.starts_with('[') { 3 } else { 1 })).collect();
    let mut kv = vec![
        ("tokenizer.ggml.model", s("bert")),
        ("tokenizer.ggml.tokens", strs(tokens)),
        ("tokenizer.ggml.token_type", GgufValue::array(types)),
        ("tokenizer.ggml.unknown_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.cls_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.seperator_token_id", GgufValue::U32(3)),
    ];
    kv.extend(extra);
    GgufTokenizer::from_gguf(&header(kv)).unwrap()
}

const BERT_PHANTOM: &[&str] =
    &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "▁hello", "▁world", "▁un", "aff", "able", "▁!", "▁cafe", "▁日"];

#[test]
fn wordpiece_splits_words_into_continuation_pieces() {
    let tok = bert(BERT_PHANTOM, vec![]);
    let ids = tok.encode("Hello unaffable World!", false).unwrap();
    assert_eq!(ids, vec![4, 6, 7, 8, 5, 9]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "hello unaffable world !");
    let enc = tok.encode_with_offsets("Hello unaffable World!", false).unwrap();
    assert_eq!(enc.offsets, vec![(0, 5), (6, 8), (8, 11), (11, 15), (16, 21), (21, 22)]);
    assert_eq!(tok.encode_prompt("hello", false).unwrap(), vec![2, 4, 3], "[CLS] text [SEP]");
}

#[test]
fn wordpiece_unknown_words_become_unk_and_accents_are_stripped() {
    let tok = bert(BERT_PHANTOM, vec![]);
    assert_eq!(tok.encode("Café xyz 日", false).unwrap(), vec![10, 1, 11]);
    let enc = tok.encode_with_offsets("Café", false).unwrap();
    assert_eq!(enc.offsets, vec![(0, 5)], "offsets cover the original accented bytes");
    let cased = bert(BERT_PHANTOM, vec![("tokenizer.ggml.do_lower_case", GgufValue::Bool(false))]);
    assert_eq!(cased.encode("Hello hello", false).unwrap(), vec![1, 4]);
}

#[test]
fn wordpiece_accepts_hash_prefixed_vocabularies() {
    let tok = bert(&["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "play", "##ing"], vec![]);
    let ids = tok.encode("unaffable playing", false).unwrap();
    assert_eq!(ids, vec![4, 5, 6, 7, 8]);
    assert_eq!(tok.token_bytes(5).unwrap(), b"aff");
    assert_eq!(tok.decode(&ids, false).unwrap(), "unaffable playing");
    assert_eq!(tok.encode("unplay", false).unwrap(), vec![1], "no `##play` piece: the whole word is unknown");
}

// ---------- byte-level pre-tokenizers ----------

/// Every byte symbol, plus digit merges `1 2`, `12 3`, `123 4` and a `hello` token with no merges.
fn byte_level(pre: &str) -> Result<GgufTokenizer, TokenizerError> {
    let mut tokens: Vec<String> = (0..=255u8).map(byte_symbol).collect();
    tokens.extend(["12", "123", "1234", "hello"].map(str::to_owned));
    let merges = strs(&["1 2", "12 3", "123 4"]);
    GgufTokenizer::from_gguf(&header(vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s(pre)),
        ("tokenizer.ggml.tokens", GgufValue::array(tokens.into_iter().map(GgufValue::String).collect())),
        ("tokenizer.ggml.merges", merges),
    ]))
}

fn byte_symbol(b: u8) -> String {
    let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        char::from(b).to_string()
    } else {
        let rank = (0..b).filter(|x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)).count() as u32;
        char::from_u32(256 + rank).unwrap().to_string()
    }
}

#[test]
fn pre_tokenizer_names_change_how_digits_split() {
    // `default` is llama.cpp's fallback split, which cuts digit runs into threes.
    let d = |c: u8| u32::from(c);
    let cases: [(&str, Vec<u32>); 5] = [
        ("gpt2", vec![258]),
        ("default", vec![257, d(b'4')]),
        ("smollm", vec![d(b'1'), d(b'2'), d(b'3'), d(b'4')]),
        ("llama3", vec![257, d(b'4')]),
        ("qwen2", vec![d(b'1'), d(b'2'), d(b'3'), d(b'4')]),
    ];
    for (pre, want) in cases {
        let tok = byte_level(pre).unwrap();
        assert_eq!(tok.encode("1234", false).unwrap(), want, "pre = {pre}");
    }
    // llama3 takes a whole word found in the vocabulary without merging; gpt2 spells it.
    assert_eq!(byte_level("llama-bpe").unwrap().encode("hello", false).unwrap(), vec![259]);
    assert_eq!(byte_level("gpt2").unwrap().encode("hello", false).unwrap(), b"hello".map(u32::from).to_vec());
}

#[test]
fn unknown_pre_tokenizer_is_a_load_error() {
    let err = byte_level("mystery-pre").unwrap_err();
    assert!(matches!(&err, TokenizerError::UnknownPre(p) if p == "mystery-pre"), "{err:?}");
    assert!(err.to_string().contains("mystery-pre"));
}

#[test]
fn bad_metadata_is_a_clear_load_error() {
    let base = |model: &str| vec![("tokenizer.ggml.model", s(model)), ("tokenizer.ggml.tokens", strs(&["a", "b"]))];
    let err = |kv| GgufTokenizer::from_gguf(&header(kv)).unwrap_err();
    assert!(matches!(err(base("t5")), TokenizerError::UnsupportedModel(m) if m == "t5"));
    assert!(matches!(err(base("llama")), TokenizerError::MissingScores));
    let mut kv = base("gpt2");
    kv.push(("tokenizer.ggml.token_type", GgufValue::array(vec![GgufValue::I32(1)])));
    assert!(matches!(err(kv), TokenizerError::LengthMismatch { found: 1, expected: 2, .. }));
    let mut kv = base("gpt2");
    kv.push(("tokenizer.ggml.eos_token_id", GgufValue::U32(7)));
    let e = err(kv);
    assert!(matches!(e, TokenizerError::BadSpecialId { id: 7, vocab_size: 2, .. }), "{e:?}");
    let mut kv = base("gpt2");
    kv.push(("tokenizer.ggml.merges", strs(&["ab"])));
    assert!(matches!(err(kv), TokenizerError::BadMerge { index: 0, .. }));
    assert!(matches!(err(vec![]), TokenizerError::Metadata(_)));
}
