//! GGUF reader, llama validation, writer and inspect: valid files round-trip; broken
//! files (built with the writer, then corrupted) fail with the specific error, naming
//! the offset, key or tensor.

use std::path::{Path, PathBuf};

use starling::model::arch::describe as validate_llama;
use starling::model::desc::{Activation, ArchDesc, ArchError, LayerDesc, LayerRope, RopeFactors, RopeStyle};
use starling::model::ggml_type::GgmlType;
use starling::model::gguf::{GgufArray, GgufError, GgufFile, GgufHeader, GgufValue, parse_header};
use starling::model::gguf_writer::{
    GgufLayout, GgufWriter, TINY_BASE_VOCAB, TINY_EOS_ID, TinyLlamaSpec, f32_bytes, tiny_llama, tiny_llama_f32,
};
use starling::model::inspect::inspect;

fn model_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A small valid file: two keys (one an array), two F32 tensors.
fn small_file() -> (Vec<u8>, GgufLayout) {
    let mut w = GgufWriter::new(3);
    w.metadata("general.name", GgufValue::String("small".into()))
        .metadata("list", GgufValue::array(vec![GgufValue::U16(1), GgufValue::U16(2)]))
        .tensor("a", &[4, 2], GgmlType::F32, f32_bytes(&[0.5; 8]))
        .tensor("b", &[3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0]));
    w.to_bytes_with_layout()
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn parse_err(bytes: &[u8]) -> GgufError {
    match parse_header(bytes) {
        Ok(h) => panic!("expected an error, parsed {} tensors", h.tensors.len()),
        Err(e) => e,
    }
}

fn assert_names(err: &dyn std::fmt::Display, parts: &[&str]) {
    let msg = err.to_string();
    for p in parts {
        assert!(msg.contains(p), "message `{msg}` should name `{p}`");
    }
}

#[test]
fn small_file_parses_with_tensor_data_in_place() {
    let (bytes, layout) = small_file();
    let h = parse_header(&bytes).expect("valid");
    assert_eq!(h.version, 3);
    assert_eq!(h.alignment, 32);
    assert_eq!(h.data_offset, layout.data_offset as u64);
    let b = h.tensor("b").expect("tensor b");
    assert_eq!((b.dims.as_slice(), b.ggml_type, b.n_bytes, b.offset), ([3u64].as_slice(), GgmlType::F32, 12, 32));
    let at = (h.data_offset + b.offset) as usize;
    assert_eq!(&bytes[at..at + 12], f32_bytes(&[1.0, 2.0, 3.0]).as_slice());
}

#[test]
fn bad_magic_is_refused_at_byte_0() {
    let (mut bytes, _) = small_file();
    bytes[..4].copy_from_slice(b"GGML");
    let err = parse_err(&bytes);
    assert!(matches!(err, GgufError::BadMagic { found } if &found == b"GGML"), "{err:?}");
    assert_names(&err, &["bad magic", "byte 0"]);
}

#[test]
fn unsupported_versions_are_refused_at_byte_4() {
    for version in [0, 1, 4, u32::MAX] {
        let (mut bytes, _) = small_file();
        put_u32(&mut bytes, GgufLayout::VERSION_AT, version);
        let err = parse_err(&bytes);
        assert!(matches!(err, GgufError::UnsupportedVersion(v) if v == version), "{err:?}");
        assert_names(&err, &[&format!("version {version}"), "byte 4"]);
    }
}

#[test]
fn v2_and_v3_both_parse() {
    for version in [2, 3] {
        let mut w = GgufWriter::new(version);
        w.metadata("k", GgufValue::U64(7)).tensor("t", &[2], GgmlType::F32, f32_bytes(&[1.0, 2.0]));
        let h = parse_header(&w.to_bytes()).expect("valid");
        assert_eq!(h.version, version);
        assert_eq!(h.get_u64("k").ok(), Some(7));
    }
}

#[test]
fn truncated_header_fails_at_each_field_with_its_offset() {
    let (bytes, layout) = small_file();
    let list = layout.kv("list").expect("list");
    let b = layout.tensor("b").expect("b");
    let cases = [
        (2, "magic", 0),
        (6, "version", 4),
        (12, "tensor count", 8),
        (20, "metadata count", 16),
        (list.key_at + 3, "metadata key", list.key_at),
        (list.type_at + 2, "metadata value type", list.type_at),
        (list.value_at + 12 + 1, "u16 value", list.value_at + 12),
        (b.n_dims_at + 6, "tensor dimension", b.n_dims_at + 4),
        (b.offset_at + 1, "tensor offset", b.offset_at),
    ];
    for (cut, what, offset) in cases {
        let err = parse_err(&bytes[..cut]);
        match &err {
            GgufError::Truncated { what: w, offset: o, .. } => assert_eq!((*w, *o), (what, offset as u64), "{err}"),
            GgufError::CountTooLarge { .. } => {}
            other => panic!("cut at {cut}: expected Truncated for {what}, got {other:?}"),
        }
        if matches!(err, GgufError::Truncated { .. }) {
            assert_names(&err, &[what, &format!("at byte {offset}")]);
        }
    }
}

#[test]
fn every_prefix_of_a_valid_file_is_an_error_not_a_panic() {
    let (bytes, _) = small_file();
    for cut in 0..bytes.len() {
        let err = parse_err(&bytes[..cut]);
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. } | GgufError::CountTooLarge { .. } | GgufError::DataOutOfBounds { .. }
            ),
            "cut at {cut}: {err:?}"
        );
    }
}

#[test]
fn truncated_data_names_the_tensor_and_the_range() {
    let (bytes, layout) = small_file();
    let b = layout.tensor("b").expect("b");
    let err = parse_err(&bytes[..bytes.len() - 1]);
    match &err {
        GgufError::DataOutOfBounds { name, start, end, file_len } => {
            assert_eq!((name.as_str(), *start, *end), ("b", b.data_at as u64, b.data_at as u64 + 12));
            assert_eq!(*file_len, bytes.len() as u64 - 1);
        }
        other => panic!("expected DataOutOfBounds, got {other:?}"),
    }
    assert_names(&err, &["`b`", &format!("{} bytes", bytes.len() - 1)]);
}

#[test]
fn overflowing_counts_are_refused_before_allocating() {
    let (bytes, layout) = small_file();
    let list = layout.kv("list").expect("list");
    let cases = [
        (GgufLayout::TENSOR_COUNT_AT, "tensor"),
        (GgufLayout::METADATA_COUNT_AT, "metadata"),
        (list.value_at + 4, "array element"),
    ];
    for (at, what) in cases {
        let mut bad = bytes.clone();
        put_u64(&mut bad, at, u64::MAX);
        let err = parse_err(&bad);
        match &err {
            GgufError::CountTooLarge { what: w, count, offset, .. } => {
                assert_eq!((*w, *count, *offset), (what, u64::MAX, at as u64), "{err}")
            }
            other => panic!("{what}: expected CountTooLarge, got {other:?}"),
        }
        assert_names(&err, &[what, &u64::MAX.to_string(), &format!("byte {at}")]);
    }
}

#[test]
fn overflowing_string_lengths_are_truncation_errors() {
    let (bytes, layout) = small_file();
    let name = layout.kv("general.name").expect("name");
    let b = layout.tensor("b").expect("b");
    let cases = [(name.key_at, "metadata key"), (name.value_at, "string value"), (b.name_at, "tensor name")];
    for (at, what) in cases {
        let mut bad = bytes.clone();
        put_u64(&mut bad, at, u64::MAX);
        let err = parse_err(&bad);
        match &err {
            GgufError::Truncated { what: w, needed, offset, .. } => {
                assert_eq!((*w, *needed, *offset), (what, u64::MAX, at as u64 + 8), "{err}")
            }
            other => panic!("{what}: expected Truncated, got {other:?}"),
        }
        assert_names(&err, &[what, &format!("byte {}", at + 8)]);
    }
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let (mut bytes, layout) = small_file();
    put_u32(&mut bytes, layout.tensor("b").expect("b").type_at, 99);
    let err = parse_err(&bytes);
    assert!(matches!(&err, GgufError::UnknownTensorType { name, type_id: 99 } if name == "b"), "{err:?}");
    assert_names(&err, &["`b`", "99"]);
}

#[test]
fn unknown_metadata_value_type_names_the_key_and_offset() {
    let (bytes, layout) = small_file();
    let list = layout.kv("list").expect("list");
    for (at, type_id) in [(list.type_at, 13), (list.value_at, 42)] {
        let mut bad = bytes.clone();
        put_u32(&mut bad, at, type_id);
        let err = parse_err(&bad);
        let ok = matches!(&err, GgufError::UnknownValueType { key, type_id: t, offset }
            if key == "list" && *t == type_id && *offset == at as u64);
        assert!(ok, "{err:?}");
        assert_names(&err, &["`list`", &type_id.to_string(), &format!("byte {at}")]);
    }
}

#[test]
fn misaligned_tensor_offset_is_refused() {
    let (mut bytes, layout) = small_file();
    put_u64(&mut bytes, layout.tensor("b").expect("b").offset_at, 36);
    let err = parse_err(&bytes);
    assert!(matches!(&err, GgufError::Misaligned { name, offset: 36, alignment: 32 } if name == "b"), "{err:?}");
    assert_names(&err, &["`b`", "36", "32"]);
}

#[test]
fn overlapping_tensors_are_refused() {
    let (mut bytes, layout) = small_file();
    put_u64(&mut bytes, layout.tensor("b").expect("b").offset_at, 0);
    let err = parse_err(&bytes);
    assert!(matches!(&err, GgufError::Overlap { first, second, .. } if first == "a" && second == "b"), "{err:?}");
    assert_names(&err, &["`a`", "`b`"]);
}

#[test]
fn duplicate_keys_and_tensors_are_refused() {
    let mut w = GgufWriter::new(3);
    w.metadata("dup.key", GgufValue::U8(1)).metadata("dup.key", GgufValue::U8(2));
    let err = parse_err(&w.to_bytes());
    assert!(matches!(&err, GgufError::Duplicate { what: "metadata key", name } if name == "dup.key"), "{err:?}");
    assert_names(&err, &["`dup.key`"]);

    let mut w = GgufWriter::new(3);
    w.tensor("t", &[1], GgmlType::F32, vec![0; 4]).tensor("t", &[1], GgmlType::F32, vec![0; 4]);
    let err = parse_err(&w.to_bytes());
    assert!(matches!(&err, GgufError::Duplicate { what: "tensor", name } if name == "t"), "{err:?}");
    assert_names(&err, &["duplicate tensor `t`"]);
}

#[test]
fn bad_dimension_counts_and_shapes_name_the_tensor() {
    let (bytes, layout) = small_file();
    for n_dims in [0, 5] {
        let mut bad = bytes.clone();
        put_u32(&mut bad, layout.tensor("a").expect("a").n_dims_at, n_dims);
        let err = parse_err(&bad);
        assert!(matches!(&err, GgufError::TooManyDims { name, n_dims: n } if name == "a" && *n == n_dims), "{err:?}");
    }
    let shapes: [(&[u64], GgmlType); 3] =
        [(&[0, 4], GgmlType::F32), (&[33, 1], GgmlType::Q4_1), (&[u64::MAX, u64::MAX], GgmlType::F32)];
    for (dims, ty) in shapes {
        let mut w = GgufWriter::new(3);
        w.tensor("odd", dims, ty, vec![0; 64]);
        let err = parse_err(&w.to_bytes());
        assert!(matches!(&err, GgufError::BadShape { name, .. } if name == "odd"), "{dims:?}: {err:?}");
        assert_names(&err, &["`odd`", ty.name()]);
    }
}

#[test]
fn bad_utf8_in_a_key_is_refused_with_its_offset() {
    let (mut bytes, layout) = small_file();
    let name = layout.kv("general.name").expect("name");
    bytes[name.key_at + 8] = 0xFF;
    let err = parse_err(&bytes);
    assert!(matches!(err, GgufError::BadUtf8 { what: "metadata key", offset } if offset == name.key_at as u64 + 8));
    assert_names(&err, &["metadata key", &format!("byte {}", name.key_at + 8)]);
}

#[test]
fn alignment_is_honoured_and_bad_alignments_refused() {
    let mut w = GgufWriter::new(3);
    w.alignment(64).tensor("a", &[3], GgmlType::F32, vec![0; 12]).tensor("b", &[3], GgmlType::F32, vec![0; 12]);
    let h = parse_header(&w.to_bytes()).expect("valid");
    assert_eq!(h.alignment, 64);
    assert_eq!(h.data_offset % 64, 0);
    assert_eq!(h.tensor("b").map(|t| t.offset), Some(64));

    for a in [0, 3, 48] {
        let mut w = GgufWriter::new(3);
        w.metadata("general.alignment", GgufValue::U32(a));
        let err = parse_err(&w.to_bytes());
        assert!(matches!(err, GgufError::BadAlignment(x) if x == u64::from(a)), "{err:?}");
        assert_names(&err, &["general.alignment", &a.to_string()]);
    }
    let mut w = GgufWriter::new(3);
    w.metadata("general.alignment", GgufValue::String("32".into()));
    let err = parse_err(&w.to_bytes());
    assert!(matches!(&err, GgufError::WrongType { key, found: "string", .. } if key == "general.alignment"));
}

fn every_value_type() -> Vec<(&'static str, GgufValue)> {
    vec![
        ("u8", GgufValue::U8(200)),
        ("i8", GgufValue::I8(-100)),
        ("u16", GgufValue::U16(60000)),
        ("i16", GgufValue::I16(-30000)),
        ("u32", GgufValue::U32(4_000_000_000)),
        ("i32", GgufValue::I32(-2_000_000_000)),
        ("f32", GgufValue::F32(-1.5e-5)),
        ("bool.true", GgufValue::Bool(true)),
        ("bool.false", GgufValue::Bool(false)),
        ("string", GgufValue::String("héllo, wörld ✓".into())),
        ("string.empty", GgufValue::String(String::new())),
        ("u64", GgufValue::U64(u64::MAX)),
        ("i64", GgufValue::I64(i64::MIN)),
        ("f64", GgufValue::F64(std::f64::consts::PI)),
        ("array.empty", GgufValue::array(vec![])),
        ("array.str", GgufValue::array(vec![GgufValue::String("a".into()), GgufValue::String("bc".into())])),
        ("array.f64", GgufValue::array(vec![GgufValue::F64(1.0), GgufValue::F64(-2.5)])),
        ("array.u8", GgufValue::array(vec![GgufValue::U8(0), GgufValue::U8(255)])),
        ("array.i8", GgufValue::array(vec![GgufValue::I8(-128), GgufValue::I8(7)])),
        ("array.u16", GgufValue::array(vec![GgufValue::U16(65535), GgufValue::U16(1)])),
        ("array.i16", GgufValue::array(vec![GgufValue::I16(-32768), GgufValue::I16(2)])),
        ("array.u32", GgufValue::array(vec![GgufValue::U32(u32::MAX), GgufValue::U32(3)])),
        ("array.i32", GgufValue::array(vec![GgufValue::I32(i32::MIN), GgufValue::I32(4)])),
        ("array.f32", GgufValue::array(vec![GgufValue::F32(-0.0), GgufValue::F32(1e-30)])),
        ("array.bool", GgufValue::array(vec![GgufValue::Bool(true), GgufValue::Bool(false)])),
        ("array.u64", GgufValue::array(vec![GgufValue::U64(u64::MAX), GgufValue::U64(5)])),
        ("array.i64", GgufValue::array(vec![GgufValue::I64(i64::MIN), GgufValue::I64(6)])),
        ("array.str.empty", GgufValue::array(vec![GgufValue::String(String::new()), GgufValue::String("é".into())])),
    ]
}

/// Parsed arrays keep one typed vector per array: every element reads back as the value it
/// was written as, strings from one shared buffer; a list of mixed types is no GGUF array.
#[test]
fn arrays_are_typed_and_their_elements_read_back() {
    let mut w = GgufWriter::new(3);
    for (k, v) in every_value_type() {
        w.metadata(k, v);
    }
    let h = parse_header(&w.to_bytes()).expect("valid");
    for (k, v) in every_value_type() {
        let GgufValue::Array(want) = v else { continue };
        let got = h.get_array(k).expect(k);
        assert_eq!(got.elem_type_id(), want.elem_type_id(), "{k}");
        let items: Vec<GgufValue> = got.values().collect();
        assert_eq!(items.len(), want.len(), "{k}");
        for (i, item) in items.iter().enumerate() {
            assert_eq!(Some(item), want.get(i).as_ref(), "{k}[{i}]");
            assert_eq!(item.type_name(), got.elem_type_name(), "{k}[{i}]");
        }
        assert_eq!(got.get(got.len()), None, "{k}: past the end");
    }
    let strs = h.get_str_array("array.str.empty").expect("strings");
    assert_eq!(strs.iter().collect::<Vec<_>>(), ["", "é"]);
    assert_eq!((strs.get(1), strs.get(2)), (Some("é"), None));
    let err = h.get_str_array("array.f64").expect_err("not strings");
    assert!(matches!(err, GgufError::WrongType { found: "f64", .. }), "{err:?}");
    assert_eq!(GgufArray::from_values(vec![GgufValue::U8(1), GgufValue::I8(1)]), None);
    assert_eq!(GgufArray::from_values(vec![]).map(|a| a.elem_type_name()), Some("u8"));
}

#[test]
fn every_metadata_value_type_round_trips() {
    let values = every_value_type();
    let mut w = GgufWriter::new(3);
    for (k, v) in &values {
        w.metadata(k, v.clone());
    }
    let h = parse_header(&w.to_bytes()).expect("valid");
    let got: Vec<(&str, &GgufValue)> = h.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let want: Vec<(&str, &GgufValue)> = values.iter().map(|(k, v)| (*k, v)).collect();
    assert_eq!(got, want);
}

#[test]
fn arrays_of_arrays_round_trip_and_depth_is_bounded() {
    let inner = |n: u32| GgufValue::array((0..n).map(GgufValue::U32).collect());
    let nested = GgufValue::array(vec![inner(2), inner(0), inner(3)]);
    let deeper = GgufValue::array(vec![GgufValue::array(vec![nested.clone()])]);
    let mut w = GgufWriter::new(3);
    w.metadata("nested", nested.clone()).metadata("deeper", deeper.clone());
    let h = parse_header(&w.to_bytes()).expect("valid");
    assert_eq!(h.get("nested"), Some(&nested));
    assert_eq!(h.get("deeper"), Some(&deeper));

    let mut v = GgufValue::U8(1);
    for _ in 0..20 {
        v = GgufValue::array(vec![v]);
    }
    let mut w = GgufWriter::new(3);
    w.metadata("abyss", v);
    let err = parse_err(&w.to_bytes());
    assert!(matches!(&err, GgufError::TooDeep { key, .. } if key == "abyss"), "{err:?}");
    assert_names(&err, &["`abyss`", "byte"]);
}

#[test]
fn typed_getters_name_the_key_on_mismatch() {
    let mut w = GgufWriter::new(3);
    w.metadata("s", GgufValue::String("x".into())).metadata("n", GgufValue::I32(-1));
    let h = parse_header(&w.to_bytes()).expect("valid");
    assert!(matches!(h.get_u32("s"), Err(GgufError::WrongType { key, found: "string", .. }) if key == "s"));
    assert!(matches!(h.get_u64("n"), Err(GgufError::WrongType { key, .. }) if key == "n"));
    assert!(matches!(h.get_str("missing"), Err(GgufError::MissingKey(k)) if k == "missing"));
}

#[test]
fn opening_a_missing_file_names_the_path() {
    let path = Path::new("/nonexistent/dir/model.gguf");
    let err = GgufFile::open(path).expect_err("missing");
    assert!(matches!(&err, GgufError::Io { path: p, .. } if p == path));
    assert_names(&err, &["/nonexistent/dir/model.gguf"]);
}

// ---- llama validation ----

fn tiny_header(spec: &TinyLlamaSpec) -> GgufHeader {
    parse_header(&tiny_llama_f32(spec)).expect("tiny model parses")
}

fn llama_err(h: &GgufHeader) -> ArchError {
    match validate_llama(h) {
        Ok(hp) => panic!("expected an error, got {hp:?}"),
        Err(e) => e,
    }
}

/// Rebuilds a parsed tiny model with `edit` applied to its metadata and tensors.
fn rebuild(
    spec: &TinyLlamaSpec,
    edit: impl FnOnce(&mut Vec<(String, GgufValue)>, &mut Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>),
) -> GgufHeader {
    let bytes = tiny_llama_f32(spec);
    let h = parse_header(&bytes).expect("tiny model parses");
    let mut metadata = h.metadata.clone();
    let mut tensors: Vec<_> = h
        .tensors
        .iter()
        .map(|t| {
            let at = (h.data_offset + t.offset) as usize;
            (t.name.clone(), t.dims.clone(), t.ggml_type, bytes[at..at + t.n_bytes as usize].to_vec())
        })
        .collect();
    edit(&mut metadata, &mut tensors);
    let mut w = GgufWriter::new(3);
    for (k, v) in metadata {
        w.metadata(&k, v);
    }
    for (name, dims, ty, data) in tensors {
        w.tensor(&name, &dims, ty, data);
    }
    parse_header(&w.to_bytes()).expect("rebuilt model parses")
}

fn set_key(metadata: &mut [(String, GgufValue)], key: &str, value: GgufValue) {
    let slot = metadata.iter_mut().find(|(k, _)| k == key).expect("key present");
    slot.1 = value;
}

#[test]
fn tiny_llama_validates_with_its_spec() {
    let spec = TinyLlamaSpec { tied_output: false, ..TinyLlamaSpec::default() };
    let hp = validate_llama(&tiny_header(&spec)).expect("valid");
    let layer = LayerDesc {
        sliding: false,
        rope: LayerRope { freq_base: 10000.0, freq_scale: 1.0 },
        fused_qkv: false,
        fused_gate_up: false,
    };
    let want = ArchDesc {
        family: "llama",
        n_vocab: TINY_BASE_VOCAB,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        n_ff: 128,
        n_ctx_train: 256,
        rms_eps: 1e-5,
        activation: Activation::Silu,
        qk_norm: false,
        post_norms: false,
        embed_scale: None,
        attn_scale: 0.25,
        rope_style: RopeStyle::Adjacent,
        rope_dim: 16,
        rope_factors: RopeFactors::None,
        rope_magnitude: 1.0,
        sliding_window: None,
        layers: vec![layer; 2],
        logit_softcap: None,
        tied_output: false,
        extra_tensors: vec![],
    };
    assert_eq!(hp, want);
    let tied = validate_llama(&tiny_header(&TinyLlamaSpec::default())).expect("valid");
    assert!(tied.tied_output);
}

#[test]
fn tiny_llama_is_deterministic_per_seed_and_carries_a_gpt2_vocab() {
    let spec = TinyLlamaSpec { n_vocab: TINY_BASE_VOCAB + 5, ..TinyLlamaSpec::default() };
    let a = tiny_llama_f32(&spec);
    assert_eq!(a, tiny_llama_f32(&spec));
    assert_ne!(a, tiny_llama_f32(&TinyLlamaSpec { seed: 1, ..spec.clone() }));
    let h = parse_header(&a).expect("valid");
    assert_eq!(h.get_str("tokenizer.ggml.model").ok(), Some("gpt2"));
    assert_eq!(h.get_str("tokenizer.ggml.pre").ok(), Some("default"));
    let tokens = h.get_str_array("tokenizer.ggml.tokens").expect("tokens");
    assert_eq!(tokens.len(), TINY_BASE_VOCAB + 5);
    assert_eq!((&tokens[32], &tokens[b'a' as usize]), ("Ġ", "a"));
    assert_eq!(&tokens[TINY_EOS_ID as usize], "<|endoftext|>");
    assert_eq!(h.get_u32("tokenizer.ggml.eos_token_id").ok(), Some(TINY_EOS_ID));
    assert_eq!(h.get_array("tokenizer.ggml.token_type").map(|t| t.len()).ok(), Some(tokens.len()));
    assert_eq!(&h.get_str_array("tokenizer.ggml.merges").expect("merges")[0], "Ġ t");
    let hp = validate_llama(&h).expect("valid");
    assert_eq!(hp.n_vocab, TINY_BASE_VOCAB + 5);
}

#[test]
fn tiny_llama_weights_are_small_and_norms_near_one() {
    let bytes = tiny_llama_f32(&TinyLlamaSpec::default());
    let file = parse_header(&bytes).expect("valid");
    let values = |name: &str| -> Vec<f32> {
        let t = file.tensor(name).expect(name);
        let at = (file.data_offset + t.offset) as usize;
        bytes[at..at + t.n_bytes as usize]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let q = values("blk.0.attn_q.weight");
    let std = (q.iter().map(|x| x * x).sum::<f32>() / q.len() as f32).sqrt();
    assert!((0.015..0.025).contains(&std), "std {std}");
    assert!(values("blk.1.ffn_norm.weight").iter().all(|x| (0.9..=1.1).contains(x)));
}

#[test]
fn tiny_llama_stores_matrices_as_encode_chooses() {
    let encode = |name: &str, dims: &[u64], values: &[f32]| {
        assert_eq!(dims.iter().product::<u64>() as usize, values.len(), "{name}");
        let bytes = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        (GgmlType::F16, bytes)
    };
    let h = parse_header(&tiny_llama(&TinyLlamaSpec::default(), &encode)).expect("valid");
    assert_eq!(h.tensor("blk.1.ffn_down.weight").map(|t| t.ggml_type), Some(GgmlType::F16));
    assert_eq!(h.tensor("token_embd.weight").map(|t| t.ggml_type), Some(GgmlType::F16));
    assert_eq!(h.tensor("blk.1.ffn_norm.weight").map(|t| t.ggml_type), Some(GgmlType::F32), "norms stay F32");
    validate_llama(&h).expect("valid");
}

#[test]
fn other_architectures_are_unsupported() {
    let h =
        rebuild(&TinyLlamaSpec::default(), |m, _| set_key(m, "general.architecture", GgufValue::String("gpt2".into())));
    let err = llama_err(&h);
    assert!(matches!(&err, ArchError::UnsupportedArchitecture { found, .. } if found == "gpt2"), "{err:?}");
    assert_names(&err, &["`gpt2`", "llama, qwen2, qwen3, gemma3, phi3"]);
}

#[test]
fn wrong_tensor_shapes_name_the_tensor_and_both_shapes() {
    let h = rebuild(&TinyLlamaSpec::default(), |_, t| {
        let k = t.iter_mut().find(|t| t.0 == "blk.1.attn_k.weight").expect("attn_k");
        k.1 = vec![64, 64];
        k.3 = vec![0; 64 * 64 * 4];
    });
    let err = llama_err(&h);
    let ok = matches!(&err, ArchError::WrongShape { name, expected, found }
        if name == "blk.1.attn_k.weight" && expected == &[64, 32] && found == &[64, 64]);
    assert!(ok, "{err:?}");
    assert_names(&err, &["blk.1.attn_k.weight", "[64, 64]", "[64, 32]"]);

    let h = rebuild(&TinyLlamaSpec::default(), |_, t| {
        let e = t.iter_mut().find(|t| t.0 == "token_embd.weight").expect("embd");
        e.1 = vec![TINY_BASE_VOCAB as u64, 64];
    });
    assert!(matches!(llama_err(&h), ArchError::WrongShape { name, .. } if name == "token_embd.weight"));
}

#[test]
fn trailing_unit_dims_are_the_same_shape() {
    let h = rebuild(&TinyLlamaSpec::default(), |_, t| {
        t.iter_mut().find(|t| t.0 == "output_norm.weight").expect("norm").1 = vec![64, 1];
    });
    validate_llama(&h).expect("[64, 1] is [64]");
}

#[test]
fn missing_tensors_are_named() {
    let h = rebuild(&TinyLlamaSpec::default(), |_, t| t.retain(|t| t.0 != "blk.1.ffn_down.weight"));
    let err = llama_err(&h);
    assert!(matches!(&err, ArchError::MissingTensor { name, .. } if name == "blk.1.ffn_down.weight"), "{err:?}");
    assert_names(&err, &["blk.1.ffn_down.weight", "[128, 64]"]);
}

#[test]
fn a_huge_block_count_is_refused_before_anything_per_layer_is_allocated() {
    let h = rebuild(&TinyLlamaSpec::default(), |m, _| set_key(m, "llama.block_count", GgufValue::U32(u32::MAX)));
    let err = llama_err(&h);
    assert!(matches!(&err, ArchError::BadValue { key, .. } if key == "llama.block_count"), "{err:?}");
    assert_names(&err, &["llama.block_count", "at most 3 for a file of 20 tensors"]);
    // A count the file could hold fails at its first missing layer.
    let h = rebuild(&TinyLlamaSpec::default(), |m, _| set_key(m, "llama.block_count", GgufValue::U32(3)));
    let err = llama_err(&h);
    assert!(matches!(&err, ArchError::MissingTensor { name, .. } if name == "blk.2.attn_norm.weight"), "{err:?}");
}

#[test]
fn norms_must_be_f32_and_matrices_need_kernels() {
    let h = rebuild(&TinyLlamaSpec::default(), |_, t| {
        let n = t.iter_mut().find(|t| t.0 == "blk.0.attn_norm.weight").expect("norm");
        (n.2, n.3) = (GgmlType::F16, vec![0; 64 * 2]);
    });
    let err = llama_err(&h);
    let ok = matches!(&err, ArchError::WrongType { name, expected: "F32", found: GgmlType::F16 }
        if name == "blk.0.attn_norm.weight");
    assert!(ok, "{err:?}");
    assert_names(&err, &["blk.0.attn_norm.weight", "F16", "F32"]);

    let h = rebuild(&TinyLlamaSpec::default(), |_, t| {
        let q = t.iter_mut().find(|t| t.0 == "blk.0.attn_q.weight").expect("q");
        (q.2, q.3) = (GgmlType::Q8_1, vec![0; 64 * 2 * 36]);
    });
    let err = llama_err(&h);
    assert!(matches!(&err, ArchError::WrongType { name, found: GgmlType::Q8_1, .. } if name == "blk.0.attn_q.weight"));
}

#[test]
fn inconsistent_head_counts_name_the_keys() {
    let cases: [(TinyLlamaSpec, &str, &str); 2] = [
        (TinyLlamaSpec { n_head: 5, ..TinyLlamaSpec::default() }, "llama.embedding_length", "head_count"),
        (TinyLlamaSpec { n_head_kv: 3, ..TinyLlamaSpec::default() }, "llama.attention.head_count", "head_count_kv"),
    ];
    for (spec, key, expected_part) in cases {
        let err = llama_err(&tiny_header(&spec));
        assert!(matches!(&err, ArchError::BadValue { key: k, .. } if k == key), "{spec:?}: {err:?}");
        assert_names(&err, &[key, expected_part]);
    }
    // Zero heads would divide by zero: refused as a bad value, never a panic.
    for key in ["llama.attention.head_count", "llama.attention.head_count_kv"] {
        let h = rebuild(&TinyLlamaSpec::default(), |m, _| set_key(m, key, GgufValue::U32(0)));
        let err = llama_err(&h);
        assert!(matches!(&err, ArchError::BadValue { key: k, .. } if k == key), "{err:?}");
        assert_names(&err, &[key, "positive", "found 0"]);
    }
}

#[test]
fn rope_dimension_must_be_even_and_fit_the_head() {
    for dims in [15u32, 18] {
        let h =
            rebuild(&TinyLlamaSpec::default(), |m, _| set_key(m, "llama.rope.dimension_count", GgufValue::U32(dims)));
        let err = llama_err(&h);
        assert!(
            matches!(&err, ArchError::BadValue { key, found, .. }
            if key == "llama.rope.dimension_count" && *found == dims.to_string()),
            "{err:?}"
        );
        assert_names(&err, &["head size 16", &dims.to_string()]);
    }
}

#[test]
fn optional_keys_take_their_defaults() {
    let h = rebuild(&TinyLlamaSpec::default(), |m, _| {
        let optional =
            ["llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size"];
        m.retain(|(k, _)| !optional.contains(&k.as_str()));
        set_key(m, "llama.attention.head_count", GgufValue::U32(2));
    });
    // With head_count_kv absent it equals head_count, so attn_k is [64, 64] now: fix the file.
    let err = llama_err(&h);
    assert!(
        matches!(&err, ArchError::WrongShape { name, expected, .. }
        if name == "blk.0.attn_k.weight" && expected == &[64, 64]),
        "{err:?}"
    );

    let h = rebuild(&TinyLlamaSpec { n_head_kv: 4, ..TinyLlamaSpec::default() }, |m, _| {
        let optional =
            ["llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count", "llama.vocab_size"];
        m.retain(|(k, _)| !optional.contains(&k.as_str()));
    });
    let hp = validate_llama(&h).expect("valid");
    assert_eq!((hp.n_head_kv, hp.layers[0].rope.freq_base, hp.rope_dim), (4, 10000.0, 16));
    assert_eq!(hp.n_vocab, TINY_BASE_VOCAB, "vocab from tokenizer.ggml.tokens");
}

#[test]
fn missing_or_mistyped_required_keys_are_named() {
    let h = rebuild(&TinyLlamaSpec::default(), |m, _| m.retain(|(k, _)| k != "llama.attention.layer_norm_rms_epsilon"));
    let err = llama_err(&h);
    assert!(
        matches!(&err, ArchError::Metadata(GgufError::MissingKey(k)) if k == "llama.attention.layer_norm_rms_epsilon")
    );
    assert_names(&err, &["llama.attention.layer_norm_rms_epsilon"]);

    let h = rebuild(&TinyLlamaSpec::default(), |m, _| set_key(m, "llama.block_count", GgufValue::String("two".into())));
    let err = llama_err(&h);
    assert!(matches!(&err, ArchError::Metadata(GgufError::WrongType { key, .. }) if key == "llama.block_count"));

    let h = rebuild(&TinyLlamaSpec::default(), |m, _| {
        set_key(m, "llama.attention.layer_norm_rms_epsilon", GgufValue::F32(-1.0))
    });
    assert!(
        matches!(llama_err(&h), ArchError::BadValue { key, .. } if key == "llama.attention.layer_norm_rms_epsilon")
    );
}

#[test]
fn extra_tensors_outside_layers_are_allowed_and_listed() {
    let h = rebuild(&TinyLlamaSpec::default(), |_, t| {
        t.push(("cls_out.weight".into(), vec![8], GgmlType::F32, vec![0; 32]));
    });
    let hp = validate_llama(&h).expect("valid");
    assert_eq!(hp.extra_tensors, vec!["cls_out.weight".to_owned()]);
}

#[test]
fn a_layer_tensor_the_pass_would_skip_is_refused() {
    let h = rebuild(&TinyLlamaSpec::default(), |_, t| {
        t.push(("blk.0.ffn_up.bias".into(), vec![128], GgmlType::F32, vec![0; 512]));
    });
    let err = llama_err(&h);
    assert!(matches!(&err, ArchError::UnusedLayerTensor { name, .. } if name == "blk.0.ffn_up.bias"), "{err:?}");
}

// ---- the real model ----

#[test]
fn smollm2_validates_with_the_known_hparams() {
    let file = GgufFile::open(&model_path()).expect("model opens");
    let hp = validate_llama(&file.header).expect("valid llama");
    assert_eq!(
        (hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff),
        (49152, 576, 30, 9, 3, 64, 1536)
    );
    assert!(hp.tied_output);
    assert_eq!(hp.rope_dim, 64);
    assert!(hp.rms_eps > 0.0 && hp.layers[0].rope.freq_base > 0.0);
    let t = file.header.tensor("blk.0.ffn_down.weight").expect("ffn_down");
    assert_eq!((t.ggml_type, t.dims.as_slice()), (GgmlType::Q4_1, [1536u64, 576].as_slice()));
    assert_eq!(file.tensor_data(t).len() as u64, 1536 * 576 / 32 * 20);
    let e = file.header.tensor("token_embd.weight").expect("embd");
    assert_eq!(e.ggml_type, GgmlType::Q8_0);
}

#[test]
fn inspect_reports_the_real_model() {
    let file = GgufFile::open(&model_path()).expect("model opens");
    let report = inspect(&file);
    assert_eq!(report.tensors.len(), file.header.tensors.len());
    assert_eq!(report.file_size, std::fs::metadata(model_path()).expect("stat").len());
    let q41 = report.totals.iter().find(|t| t.ggml_type == "Q4_1").expect("Q4_1 total");
    assert_eq!(q41.tensors, 30 * 7);
    let total: u64 = report.totals.iter().map(|t| t.n_bytes).sum();
    assert_eq!(total, file.header.tensors.iter().map(|t| t.n_bytes).sum::<u64>());
    let tokens = report.metadata.iter().find(|m| m.key == "tokenizer.ggml.tokens").expect("tokens");
    assert_eq!((tokens.value_type.as_str(), tokens.len), ("array<string>", Some(49152)));
    assert_eq!(tokens.value.as_array().map(Vec::len), Some(5));
    assert_eq!(report.architecture.as_ref().map(|h| h.n_layer), Some(30));

    let json = serde_json::to_value(&report).expect("serializes");
    assert_eq!(json["architecture"]["n_embd"], 576);
    assert_eq!(json["validation_error"], serde_json::Value::Null);
    let text = report.to_string();
    for part in ["GGUF v3", "blk.29.ffn_down.weight", "Q4_1", "layers 30", "tied to token_embd"] {
        assert!(text.contains(part), "missing `{part}` in\n{text}");
    }
}

#[test]
fn inspect_reports_why_validation_failed() {
    let path = std::env::temp_dir().join(format!("starling-inspect-{}.gguf", std::process::id()));
    let mut w = GgufWriter::new(2);
    w.metadata("general.architecture", GgufValue::String("mamba".into()))
        .metadata("long", GgufValue::String("x".repeat(500)))
        .tensor("t", &[2], GgmlType::F32, f32_bytes(&[1.0, 2.0]));
    w.write(&path).expect("write");
    let file = GgufFile::open(&path).expect("opens");
    let report = inspect(&file);
    std::fs::remove_file(&path).expect("cleanup");
    assert!(report.architecture.is_none());
    assert!(report.validation_error.as_deref().is_some_and(|e| e.contains("`mamba`")));
    let long = report.metadata.iter().find(|m| m.key == "long").expect("long");
    assert!(long.value.as_str().is_some_and(|s| s.ends_with("…(420 more chars)")));
    assert!(report.to_string().contains("not a runnable model"));
}

#[test]
fn tiny_vocab_loads_as_a_byte_level_bpe() {
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    let h = tiny_header(&TinyLlamaSpec::default());
    let tokens = h.get_str_array("tokenizer.ggml.tokens").expect("tokens");
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let merges = h.get_str_array("tokenizer.ggml.merges").expect("merges");
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).expect("merge pair"))
        .collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().expect("valid BPE");
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    let enc = tok.encode(" the hello\n", false).expect("encodes");
    assert_eq!(enc.get_tokens(), ["Ġthe", "Ġ", "he", "ll", "o", "Ċ"]);
    assert_eq!(enc.get_ids()[0], 256 + 3);
}

/// A GGUF v3 header with the given metadata entries (already encoded as key, type, value)
/// and no tensors.
fn raw_metadata_file(n_kv: u64, entries: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend_from_slice(entries);
    b
}

fn raw_key(b: &mut Vec<u8>, key: &str) {
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
}

/// A u8 array costs 32 bytes of RAM per byte on disk once parsed, so the count of
/// metadata values is capped ([`MAX_METADATA_VALUES`]) and the cap is checked before the
/// array is allocated, whether one array or several cross it.
#[test]
fn metadata_past_the_value_cap_is_refused_before_it_is_allocated() {
    use starling::model::gguf::MAX_METADATA_VALUES;
    let array = |b: &mut Vec<u8>, key: &str, len: u64| {
        raw_key(b, key);
        b.extend(9u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(len.to_le_bytes());
        b.extend(std::iter::repeat_n(7u8, len as usize));
    };
    let mut one = vec![];
    array(&mut one, "big", MAX_METADATA_VALUES + 1);
    let err = parse_err(&raw_metadata_file(1, &one));
    assert!(matches!(err, GgufError::MetadataTooLarge { .. }), "{err:?}");
    assert_names(&err, &["more than 4194304 values"]);

    // Each array counts as one value besides its elements: two of half the cap less one
    // reach it exactly, and one element more is refused.
    let half = MAX_METADATA_VALUES / 2 - 1;
    let mut two = vec![];
    array(&mut two, "a", half);
    array(&mut two, "b", half);
    let h = parse_header(&raw_metadata_file(2, &two)).expect("exactly at the cap parses");
    assert_eq!(h.get_array("b").unwrap().len() as u64, half);
    let mut three = two.clone();
    array(&mut three, "c", 1);
    assert!(matches!(parse_err(&raw_metadata_file(3, &three)), GgufError::MetadataTooLarge { .. }));
}

/// Duplicate checks are linear: half a million distinct keys and as many tensors parse
/// (checking each against all before it would take minutes), and a duplicate at the very
/// end is still found.
#[test]
fn duplicate_checks_scale_to_half_a_million_keys_and_tensors() {
    const N: u64 = 500_000;
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(N.to_le_bytes());
    b.extend(N.to_le_bytes());
    for i in 0..N {
        raw_key(&mut b, &format!("key.{i:07}"));
        b.extend(4u32.to_le_bytes());
        b.extend((i as u32).to_le_bytes());
    }
    let tensors_at = b.len();
    for i in 0..N {
        raw_key(&mut b, &format!("t.{i:07}"));
        b.extend(1u32.to_le_bytes());
        b.extend(8u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend((i * 32).to_le_bytes());
    }
    let data_at = b.len().div_ceil(32) * 32;
    b.resize(data_at + N as usize * 32, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let parse = |bytes: Vec<u8>| {
        let tx = tx.clone();
        std::thread::spawn(move || tx.send(parse_header(&bytes).map(|h| (h.metadata.len(), h.tensors.len()))));
        rx.recv_timeout(std::time::Duration::from_secs(60)).expect("parsing is not quadratic")
    };
    assert_eq!(parse(b.clone()).unwrap(), (N as usize, N as usize));
    // Rename the last tensor to the first one's name.
    let last = b[tensors_at..].windows(9).rposition(|w| w == b"t.0499999").unwrap() + tensors_at;
    b[last..last + 9].copy_from_slice(b"t.0000000");
    let err = parse(b).unwrap_err();
    assert!(matches!(&err, GgufError::Duplicate { what: "tensor", name } if name == "t.0000000"), "{err:?}");
}
