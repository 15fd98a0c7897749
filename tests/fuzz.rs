//! Property tests over the parsers that take hostile input, run in CI for a bounded number of
//! cases: GGUF bytes (the reader, the architecture description and the tokenizer built from
//! the file's vocabulary), vocabularies written directly as metadata, and HTTP request bodies
//! sent to a running server. Each must answer with a value or a typed error, never a panic,
//! and the server must keep serving. Chat templates have theirs beside the renderer
//! (`gateway::template` unit tests), since the renderer is private to the gateway.

use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use starling::model::arch::describe;
use starling::model::families::FAMILIES;
use starling::model::gguf::{GgufHeader, GgufValue, parse_header};
use starling::model::gguf_writer::{TinyModelSpec, tiny_model};
use starling::tokenizer::GgufTokenizer;

use crate::support::TestServer;

/// Tiny models of every family, written once.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(|| FAMILIES.iter().map(|f| tiny_model(&TinyModelSpec::family(f.name))).collect())
}

/// How far a case got: a description built, a tokenizer built.
#[derive(Default, Debug)]
struct Reached {
    cases: usize,
    parsed: usize,
    described: usize,
    tokenizers: usize,
}

/// Everything a file's header feeds: the architecture description and the tokenizer, which
/// is then used on text and ids. Counts in `reached` what built.
fn exercise(h: &GgufHeader, text: &str, ids: &[u32], reached: &mut Reached) {
    reached.described += usize::from(describe(h).is_ok());
    if let Ok(tok) = GgufTokenizer::from_gguf(h) {
        reached.tokenizers += 1;
        for special in [false, true] {
            if let Ok(enc) = tok.encode_with_offsets(text, special) {
                assert_eq!(enc.ids.len(), enc.offsets.len());
                let _ = tok.decode(&enc.ids, false);
            }
        }
        let _ = tok.decode(ids, true);
        let _ = tok.decode(ids, false);
        let _ = tok.encode_prompt(text, true);
    }
}

/// Runs `cases` cases of `strategy` through `test` with a fresh [`Reached`] tally, and
/// returns the tally.
fn run_counted<S: Strategy>(
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value, &mut Reached) -> Result<(), TestCaseError>,
) -> Reached {
    let reached = std::sync::Mutex::new(Reached::default());
    let config = ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() };
    proptest::test_runner::TestRunner::new(config)
        .run(&strategy, |v| {
            let mut r = reached.lock().unwrap();
            r.cases += 1;
            test(v, &mut r)
        })
        .unwrap();
    reached.into_inner().unwrap()
}

/// A byte edit of a seed file: overwrite, insert, delete or truncate at a position.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Edit::Insert(i, v)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

/// Positions weighted toward the header, where the structure is.
fn apply(bytes: &mut Vec<u8>, e: &Edit, header_len: usize) {
    let at =
        |i: usize, len: usize| if i.is_multiple_of(4) { i % len.max(1) } else { i % header_len.clamp(1, len.max(1)) };
    match e {
        Edit::Set(i, b) => {
            let i = at(*i, bytes.len());
            if let Some(x) = bytes.get_mut(i) {
                *x = *b;
            }
        }
        Edit::Insert(i, v) => {
            let i = at(*i, bytes.len());
            bytes.splice(i..i, v.iter().copied());
        }
        Edit::Delete(i, n) => {
            let i = at(*i, bytes.len());
            let end = (i + n).min(bytes.len());
            bytes.drain(i..end);
        }
        Edit::Truncate(i) => bytes.truncate(at(*i, bytes.len())),
    }
}

/// Token texts that stress the vocabulary builders: byte tokens (some malformed), special
/// markers, empty and whitespace tokens, the SentencePiece space, long runs, odd scripts.
fn token_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z]{1,6}",
        1 => "(▁|Ġ|Ċ)?[a-zé日]{0,4}",
        1 => "<0x[0-9A-FZ]{1,3}>",
        1 => "<\\|?[a-z_]{0,10}\\|?>",
        1 => Just(String::new()),
        1 => "[ \t\n]{1,3}",
        1 => "\\PC{1,8}",
        1 => "[a-z ]{40,80}",
    ]
}

fn value_i32() -> impl Strategy<Value = GgufValue> {
    any::<i32>().prop_map(GgufValue::I32)
}

/// A `tokenizer.*` metadata section: some keys right, some missing, some wrong.
fn vocab_metadata() -> impl Strategy<Value = Vec<(String, GgufValue)>> {
    let model = prop_oneof![
        Just("llama".to_owned()),
        Just("gpt2".to_owned()),
        Just("bert".to_owned()),
        Just("t5".to_owned()),
        Just("none".to_owned()),
        "[a-z0-9]{0,6}",
    ];
    let pre = prop_oneof![
        Just("default".to_owned()),
        Just("llama-bpe".to_owned()),
        Just("qwen2".to_owned()),
        Just("smollm".to_owned()),
        Just("gpt-4o".to_owned()),
        "[a-z0-9-]{0,8}",
    ];
    (
        model,
        pre,
        prop::collection::vec(token_text(), 0..48),
        prop::collection::vec(prop_oneof![3 => (1i32..=6).prop_map(GgufValue::I32), 1 => value_i32()], 0..56),
        prop::collection::vec(prop_oneof![4 => -20f32..0.0, 1 => any::<f32>()], 0..56),
        prop::collection::vec("[a-zĠ▁]{1,3} [a-zĠ▁]{1,3}|[a-z]{0,4}", 0..24),
        prop::collection::vec((0usize..6, prop_oneof![0u32..64, any::<u32>()]), 0..5),
        any::<u8>(),
        prop::bool::weighted(0.6),
    )
        .prop_map(|(model, pre, tokens, mut types, mut scores, merges, mut ids, present, consistent)| {
            // Most cases are consistent enough to build (lists of one length, types and ids
            // in range), so the tokenizer is exercised, not only its refusals.
            if consistent && !tokens.is_empty() {
                let n = tokens.len();
                types.resize(n, GgufValue::I32(1));
                types.iter_mut().for_each(|t| {
                    if !matches!(t, GgufValue::I32(1..=6)) {
                        *t = GgufValue::I32(1);
                    }
                });
                scores.resize(n, -1.0);
                ids.iter_mut().for_each(|(_, id)| *id %= n as u32);
            }
            let strings = |v: Vec<String>| GgufValue::array(v.into_iter().map(GgufValue::String).collect());
            let mut kv = vec![("tokenizer.ggml.model".to_owned(), GgufValue::String(model))];
            let optional = [
                ("tokenizer.ggml.pre", GgufValue::String(pre)),
                ("tokenizer.ggml.tokens", strings(tokens)),
                ("tokenizer.ggml.token_type", GgufValue::array(types)),
                ("tokenizer.ggml.scores", GgufValue::array(scores.into_iter().map(GgufValue::F32).collect())),
                ("tokenizer.ggml.merges", strings(merges)),
            ];
            for (bit, (k, v)) in optional.into_iter().enumerate() {
                // Each key is left out in about one case in eight.
                if present.rotate_left(bit as u32) & 7 != 0 || k == "tokenizer.ggml.tokens" {
                    kv.push((k.to_owned(), v));
                }
            }
            const ID_KEYS: [&str; 6] = ["bos", "eos", "unknown", "padding", "eot", "sep"];
            for (which, id) in ids {
                kv.push((format!("tokenizer.ggml.{}_token_id", ID_KEYS[which]), GgufValue::U32(id)));
            }
            kv
        })
}

fn header(kv: Vec<(String, GgufValue)>) -> GgufHeader {
    GgufHeader { version: 3, metadata: kv.into_iter().collect(), tensors: Vec::new(), alignment: 32, data_offset: 0 }
}

/// Edited GGUF files of every family: the reader returns a header or an error, a header's
/// tensors lie inside the file, and the description and tokenizer built from it never panic.
/// Enough edits leave the file whole that every stage is reached.
#[test]
fn edited_gguf_files_parse_or_fail_cleanly() {
    let strategy = (
        0..FAMILIES.len(),
        prop::collection::vec(edit(), 1..6),
        "\\PC{0,40}",
        prop::collection::vec(any::<u32>(), 0..8),
    );
    let reached = run_counted(192, strategy, |(which, edits, text, ids), reached| {
        let seed = &seeds()[which];
        let header_len = parse_header(seed).unwrap().data_offset as usize;
        let mut bytes = seed.clone();
        for e in &edits {
            apply(&mut bytes, e, header_len);
        }
        if let Ok(h) = parse_header(&bytes) {
            reached.parsed += 1;
            for t in &h.tensors {
                prop_assert!(
                    h.data_offset + t.offset + t.n_bytes <= bytes.len() as u64,
                    "tensor {} outside the file",
                    t.name
                );
            }
            exercise(&h, &text, &ids, reached);
        }
        Ok(())
    });
    println!("edited GGUF files: {reached:?}");
    assert!(reached.parsed > 0 && reached.described > 0 && reached.tokenizers > 0, "{reached:?}");
}

/// Vocabularies written as metadata, of every kind and with keys missing, mismatched in
/// length or out of range: the tokenizer builds or refuses, and one that builds encodes and
/// decodes any text and ids without panicking. Some of them build.
#[test]
fn arbitrary_vocabularies_build_or_fail_cleanly() {
    let strategy = (
        vocab_metadata(),
        "\\PC{0,40}|<\\|[a-z_]{0,8}\\|>[a-z ]{0,8}",
        prop::collection::vec(prop_oneof![0u32..64, any::<u32>()], 0..8),
    );
    let reached = run_counted(192, strategy, |(kv, text, ids), reached| {
        exercise(&header(kv), &text, &ids, reached);
        Ok(())
    });
    println!("arbitrary vocabularies: {reached:?}");
    assert!(reached.tokenizers > 0, "{reached:?}");
}

// ---------- HTTP request bodies ----------

/// Any JSON value, a few levels deep, with the awkward cases of each kind.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop_oneof![-3i64..70, any::<i64>()].prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![-2.0f64..3.0, any::<f64>().prop_filter("finite", |f| f.is_finite())].prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        "[\u{0}-\u{1f}\u{7f}]{1,4}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The fields each route knows, its required one first.
const ROUTES: &[(&str, &[&str])] = &[
    (
        "/v1/generate",
        &[
            "prompt",
            "tokens",
            "model",
            "stream",
            "parse_special",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "seed",
            "max_tokens",
            "ignore_eos",
            "stop",
            "logit_bias",
            "session_id",
        ],
    ),
    (
        "/v1/completions",
        &["prompt", "model", "max_tokens", "temperature", "top_p", "stream", "stop", "seed", "logprobs", "n"],
    ),
    (
        "/v1/chat/completions",
        &[
            "messages",
            "model",
            "max_tokens",
            "temperature",
            "top_p",
            "stream",
            "stop",
            "seed",
            "tools",
            "response_format",
        ],
    ),
    ("/v1/tokenize", &["text", "model", "parse_special", "add_special"]),
    ("/v1/detokenize", &["tokens", "model", "skip_special"]),
];

/// A value for `field`: plausible for it (which may still be out of range) or any JSON.
fn field_value(field: &'static str, plausible: bool) -> BoxedStrategy<Value> {
    if !plausible {
        return json_value().boxed();
    }
    match field {
        "prompt" | "text" => "[a-zA-Z ]{0,16}".prop_map(Value::from).boxed(),
        "messages" => prop::collection::vec(
            ("system|user|assistant|tool|[a-z]{1,5}", "\\PC{0,12}")
                .prop_map(|(role, content)| json!({"role": role, "content": content})),
            0..3,
        )
        .prop_map(Value::from)
        .boxed(),
        "max_tokens" | "top_k" | "n" => (-1i64..6).prop_map(Value::from).boxed(),
        "temperature" | "top_p" | "min_p" => (-0.5f64..2.5).prop_map(Value::from).boxed(),
        "stream" | "ignore_eos" | "logprobs" | "add_special" | "parse_special" | "skip_special" => {
            any::<bool>().prop_map(Value::from).boxed()
        }
        "tokens" => prop::collection::vec(prop_oneof![0u32..50_000, any::<u32>()], 0..6).prop_map(|v| json!(v)).boxed(),
        "stop" => prop::collection::vec("[a-z.]{0,3}", 0..5).prop_map(|v| json!(v)).boxed(),
        "model" => prop_oneof![Just("smollm2-135m".to_owned()), "\\PC{0,10}"].prop_map(Value::from).boxed(),
        "seed" => any::<u32>().prop_map(Value::from).boxed(),
        _ => json_value().boxed(),
    }
}

/// A route and a body for it: its required field most of the time, a few of its other
/// fields, mostly with plausible values, and now and then a field it does not know.
fn routed_body() -> impl Strategy<Value = (usize, Value)> {
    (0..ROUTES.len(), any::<bool>(), prop::collection::vec((any::<prop::sample::Index>(), 0u8..16), 0..5))
        .prop_flat_map(|(route, with_required, picks)| {
            let fields = ROUTES[route].1;
            let mut parts: Vec<BoxedStrategy<(String, Value)>> = Vec::new();
            let mut add = |name: &'static str, plausible: bool| {
                parts.push(field_value(name, plausible).prop_map(move |v| (name.to_owned(), v)).boxed())
            };
            if with_required {
                add(fields[0], true);
            }
            for (i, roll) in picks {
                match roll {
                    0 => add("unknown_field", true),
                    1 | 2 => add(fields[i.index(fields.len())], false),
                    _ => add(fields[i.index(fields.len())], true),
                }
            }
            (Just(route), parts.prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())))
        })
}

/// Random bodies against every route that parses a generation or tokenizer request: each
/// answer is a success or a 4xx JSON error naming the problem (never a 5xx, a reset or a
/// hang), and the server keeps serving a well-formed request afterwards.
#[test]
fn arbitrary_request_bodies_get_an_answer_and_the_server_keeps_serving() {
    let server = TestServer::start(|c| c.limits.max_tokens_cap = 4);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 160,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    runner
        .run(&routed_body(), |(route, body)| {
            let r = crate::support::request(
                server.addr,
                "POST",
                ROUTES[route].0,
                &[("Content-Type", "application/json")],
                body.to_string().as_bytes(),
            );
            *statuses.lock().unwrap().entry(r.status).or_default() += 1;
            prop_assert!(
                r.status == 200 || (400..500).contains(&r.status),
                "{} {body}: {} {}",
                ROUTES[route].0,
                r.status,
                r.text()
            );
            if r.status != 200 {
                let e = r.json();
                prop_assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}: {}", r.text());
            }
            Ok(())
        })
        .unwrap();
    let statuses = statuses.into_inner().unwrap();
    println!("statuses over random bodies: {statuses:?}");
    assert!(statuses.get(&200).copied().unwrap_or(0) > 0 && statuses.keys().any(|&s| s == 400), "{statuses:?}");
    let ok = crate::support::post_json(
        server.addr,
        "/v1/generate",
        &json!({"prompt": "Hello", "max_tokens": 2, "stream": false}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    let (status, took) = crate::hostile::probe(server.addr, "/healthz");
    assert!(status == 200 && took < Duration::from_secs(1), "health {status} in {took:?}");
}
