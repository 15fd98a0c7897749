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
    assert_eq!(tok.eog_ids(), &[0, 2], "<|endoftext|> and <|im_end|> end generation");
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    assert_eq!(tok.token_text(1).unwrap(), "<|im_start|>");
    assert!(tok.is_special(1) && !tok.is_special(19556));
    assert_eq!(tok.token_text(2899).unwrap(), "Ġleading");
    assert_eq!(tok.token_bytes(2899).unwrap(), b" leading");
    assert_eq!(tok.token_bytes(198).unwrap(), b"\n");
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
        assert!(out.len() <= i + 1 && out.len() + 3 >= i + 1, "holds at most 3 bytes");
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
