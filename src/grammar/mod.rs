//! Constrained decoding: JSON schemas, regular expressions, Lark grammars and fixed choices
//! compiled by `llguidance` against a model's vocabulary.
//!
//! - [`Grammar`]: what a request asks for, before compilation.
//! - [`Grammars`]: one per loaded model: the token trie (built on first use), the parser
//!   factory with its limits, and a cache of compiled grammars keyed by a hash of their
//!   source. Compiling is blocking work: the gateway runs it on its own bounded pool.
//! - [`GrammarConstraint`]: a compiled grammar's per-request state, driven by the engine
//!   through [`crate::protocol::TokenConstraint`].

mod lazy;
mod state;
mod vocab;

pub use lazy::{CallStart, LazyConstraint};
pub use state::{GrammarConstraint, GrammarError};

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::InferenceCapabilities;
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::protocol::{Constraint, TokenConstraint};
use crate::tokenizer::GgufTokenizer;

/// A request's output constraint, before compilation.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON schema (`{"type": "object"}` for OpenAI's `json_object`).
    JsonSchema(Value),
    /// A regular expression the whole output must match (Rust `regex` syntax).
    Regex(String),
    /// A grammar in llguidance's Lark dialect (may embed `%json { schema }`).
    Lark(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

impl Grammar {
    /// The wire name of the kind (a metrics label).
    pub fn kind(&self) -> &'static str {
        match self {
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "lark",
            Grammar::Choice(_) => "choice",
        }
    }

    /// The source text compiled (its length is what size limits count).
    pub fn source(&self) -> String {
        match self {
            Grammar::JsonSchema(v) => v.to_string(),
            Grammar::Regex(s) | Grammar::Lark(s) => s.clone(),
            Grammar::Choice(v) => Value::from(v.clone()).to_string(),
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact_json(schema)),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Grammar::Choice(options) => {
                // JSON string literals are valid Lark literals (same escapes).
                let alts: Vec<String> = options.iter().map(|o| Value::from(o.as_str()).to_string()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
            }
        }
    }
}

/// JSON output is written compactly (`, ` and `: `, no free whitespace): a small model
/// given free whitespace can spend its whole budget on newlines. Numbers are bounded
/// ([`bound_numbers`]). Also for `%json` values embedded in Lark grammars.
pub fn compact_json(schema: &Value) -> Value {
    let mut schema = schema.clone();
    bound_numbers(&mut schema);
    if let Value::Object(map) = &mut schema
        && !map.contains_key("x-guidance")
    {
        map.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// A schema for JSON the model writes in its own layout (a tool call it started in `auto`
/// mode): numbers bounded ([`bound_numbers`]), whitespace as the model likes it.
pub fn bounded_json(schema: &Value) -> Value {
    let mut schema = schema.clone();
    bound_numbers(&mut schema);
    schema
}

/// The largest integer a double holds exactly (2^53 - 1).
const MAX_SAFE_INTEGER: i64 = 9_007_199_254_740_991;

/// Caps every `number` and `integer` subschema near what a double represents: within
/// ±(2^53 - 1) where the schema gives no bound (unless its other bound lies beyond), and at
/// most 8 digits after the point where it gives no `multipleOf`; never where it lists the
/// values (`enum`, `const`) (llguidance 1.9's decimal `multipleOf` overflows from 1e-9 on).
/// llama.cpp's JSON grammars bound digits the same way (16 per part). Every output still validates against the schema as sent; the
/// cap only ends numbers that a small model would otherwise extend digit by digit until
/// `max_tokens` (seen at temperature 1: 3,000 digits of one `number`).
fn bound_numbers(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let is = |map: &serde_json::Map<String, Value>, t: &str| match map.get("type") {
                Some(Value::String(s)) => s == t,
                Some(Value::Array(types)) => types.iter().any(|v| v == t),
                _ => false,
            };
            let number = is(map, "number");
            let literal = map.contains_key("enum") || map.contains_key("const");
            if (number || is(map, "integer")) && !literal {
                let bound = |map: &serde_json::Map<String, Value>, keys: [&str; 2]| {
                    keys.iter().filter_map(|k| map.get(*k)?.as_f64()).next()
                };
                let low = bound(map, ["minimum", "exclusiveMinimum"]);
                let high = bound(map, ["maximum", "exclusiveMaximum"]);
                let safe = MAX_SAFE_INTEGER as f64;
                // A bound the schema gives beyond the cap wins: the cap never empties a range.
                if low.is_none() && high.is_none_or(|h| h > -safe) {
                    map.insert("minimum".into(), json!(-MAX_SAFE_INTEGER));
                }
                if high.is_none() && low.is_none_or(|l| l < safe) {
                    map.insert("maximum".into(), json!(MAX_SAFE_INTEGER));
                }
                if number && !map.contains_key("multipleOf") {
                    map.insert("multipleOf".into(), json!(1e-8));
                }
            }
            for (key, value) in map.iter_mut() {
                // Literal values are data, not schemas.
                if !matches!(key.as_str(), "const" | "enum" | "default" | "examples") {
                    bound_numbers(value);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_numbers),
        _ => {}
    }
}

/// Bounds on what one grammar may cost.
#[derive(Clone, Copy, Debug)]
pub struct GrammarLimits {
    /// Largest grammar source accepted, in bytes.
    pub max_bytes: usize,
    /// Compiled grammars kept for reuse.
    pub cache_entries: usize,
    /// A grammar that took longer to compile is refused (llguidance's fuel bounds the work;
    /// this catches what the fuel lets through on a slow or busy machine).
    pub max_compile: Duration,
}

impl Default for GrammarLimits {
    fn default() -> Self {
        GrammarLimits { max_bytes: 64 * 1024, cache_entries: 64, max_compile: Duration::from_secs(5) }
    }
}

/// A compiled grammar ready to constrain one request, and what compiling it cost.
pub struct Compiled<C> {
    pub constraint: C,
    /// Served from the cache (no compilation).
    pub cached: bool,
    /// Time spent compiling (zero on a cache hit).
    pub compile_time: Duration,
    /// Bytes of the grammar's source.
    pub bytes: usize,
}

impl<C: TokenConstraint + 'static> Compiled<C> {
    /// The same compilation with its constraint boxed for a request.
    pub fn boxed(self) -> Compiled<Constraint> {
        let Compiled { constraint, cached, compile_time, bytes } = self;
        Compiled { constraint: Constraint(Box::new(constraint)), cached, compile_time, bytes }
    }
}

/// Compiled grammars of one model.
pub struct Grammars {
    tokenizer: Arc<GgufTokenizer>,
    limits: GrammarLimits,
    factory: OnceLock<Result<ParserFactory, String>>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    parsers: HashMap<[u8; 32], TokenParser>,
    order: VecDeque<[u8; 32]>,
}

impl Grammars {
    pub fn new(tokenizer: Arc<GgufTokenizer>, limits: GrammarLimits) -> Self {
        Grammars { tokenizer, limits, factory: OnceLock::new(), cache: Mutex::new(Cache::default()) }
    }

    /// The parser factory; the token trie is built on first use (tens of milliseconds for
    /// a 50k vocabulary), so models that never see a grammar never pay for it.
    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        let built = self.factory.get_or_init(|| {
            let env = vocab::token_env(&self.tokenizer)?;
            let mut f = ParserFactory::new(&env, InferenceCapabilities::default(), &[]).map_err(|e| e.to_string())?;
            f.quiet();
            *f.limits_mut() = ParserLimits { max_grammar_size: 200_000, ..ParserLimits::default() };
            Ok(f)
        });
        built.as_ref().map_err(|e| GrammarError::Vocabulary(e.clone()))
    }

    /// Compiles `grammar` (or reuses a cached compilation). Blocking: run it off the
    /// engine and async threads.
    pub fn compile(&self, grammar: &Grammar) -> Result<Compiled<GrammarConstraint>, GrammarError> {
        let (parser, info) = self.parser(grammar)?;
        let constraint = GrammarConstraint::new(Matcher::new(Ok(parser)))?;
        Ok(Compiled { constraint, cached: info.cached, compile_time: info.compile_time, bytes: info.bytes })
    }

    /// [`compile`](Self::compile) for a grammar that applies only from where a tool call
    /// starts (`start`) to its end.
    pub fn compile_lazy(&self, grammar: &Grammar, start: CallStart) -> Result<Compiled<LazyConstraint>, GrammarError> {
        let (parser, info) = self.parser(grammar)?;
        let constraint = LazyConstraint::new(self.tokenizer.clone(), parser, start)?;
        Ok(Compiled { constraint, cached: info.cached, compile_time: info.compile_time, bytes: info.bytes })
    }

    fn parser(&self, grammar: &Grammar) -> Result<(TokenParser, Compiled<()>), GrammarError> {
        let source = grammar.source();
        let kind = grammar.kind();
        if source.len() > self.limits.max_bytes {
            return Err(GrammarError::TooLarge { kind, bytes: source.len(), limit: self.limits.max_bytes });
        }
        let key: [u8; 32] = Sha256::new().chain_update(kind).chain_update([0]).chain_update(&source).finalize().into();
        let factory = self.factory()?;
        let hit = self.cache.lock().unwrap_or_else(|p| p.into_inner()).parsers.get(&key).map(TokenParser::deep_clone);
        let (parser, cached, compile_time) = match hit {
            Some(p) => (p, true, Duration::ZERO),
            None => {
                let started = Instant::now();
                let parser = factory.create_parser(grammar.top_level()).map_err(|e| {
                    let mut message = first_part(&e.to_string());
                    if let Grammar::JsonSchema(schema) = grammar
                        && let Some(path) = locate(factory, schema, &message)
                    {
                        message = format!("at {path}: {message}");
                    }
                    GrammarError::Invalid { kind, message }
                })?;
                let took = started.elapsed();
                if took > self.limits.max_compile {
                    let (seconds, limit) = (took.as_secs_f64(), self.limits.max_compile.as_secs_f64());
                    return Err(GrammarError::TooCostly { kind, seconds, limit });
                }
                self.remember(key, parser.deep_clone());
                (parser, false, took)
            }
        };
        Ok((parser, Compiled { constraint: (), cached, compile_time, bytes: source.len() }))
    }

    fn remember(&self, key: [u8; 32], parser: TokenParser) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.parsers.insert(key, parser).is_none() {
            cache.order.push_back(key);
        }
        while cache.order.len() > self.limits.cache_entries {
            if let Some(old) = cache.order.pop_front() {
                cache.parsers.remove(&old);
            }
        }
    }
}

/// An llguidance error without the backtrace it appends to an internal panic, at most
/// 1,000 bytes (it is sent back to the client).
fn first_part(message: &str) -> String {
    let head = message.split("\n<backtrace>").next().unwrap_or_default().trim_end();
    head[..head.floor_char_boundary(1000)].to_owned()
}

/// Subschemas compiled alone while looking for the part of a schema an error is about.
const LOCATE_BUDGET: usize = 64;

/// The JSON pointer of the deepest subschema of `schema` that fails alone with the same
/// `message`; `None` when the root is the culprit (or the search runs out of budget).
fn locate(factory: &ParserFactory, schema: &Value, message: &str) -> Option<String> {
    let mut budget = LOCATE_BUDGET;
    let mut at = schema;
    let mut path = String::new();
    'descend: loop {
        for (segment, child) in subschemas(at) {
            if budget == 0 {
                break 'descend;
            }
            budget -= 1;
            let alone = factory.create_parser(TopLevelGrammar::from_json_schema(compact_json(child)));
            if alone.is_err_and(|e| first_part(&e.to_string()) == message) {
                path.push('/');
                path.push_str(&segment);
                at = child;
                continue 'descend;
            }
        }
        break;
    }
    (!path.is_empty()).then_some(path)
}

/// The subschemas directly inside `schema`, each with its JSON pointer segment(s), map
/// keys escaped (RFC 6901).
fn subschemas(schema: &Value) -> Vec<(String, &Value)> {
    let Value::Object(map) = schema else { return vec![] };
    let mut out = vec![];
    for (key, v) in map {
        match (key.as_str(), v) {
            ("properties" | "patternProperties" | "$defs" | "definitions", Value::Object(m)) => {
                let escaped = |k: &str| k.replace('~', "~0").replace('/', "~1");
                out.extend(m.iter().filter(|(_, c)| c.is_object()).map(|(k, c)| (format!("{key}/{}", escaped(k)), c)));
            }
            ("anyOf" | "oneOf" | "allOf" | "prefixItems", Value::Array(items)) => {
                out.extend(
                    items.iter().enumerate().filter(|(_, c)| c.is_object()).map(|(i, c)| (format!("{key}/{i}"), c)),
                );
            }
            ("items" | "additionalProperties" | "contains" | "not" | "if" | "then" | "else", c @ Value::Object(_)) => {
                out.push((key.clone(), c));
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_capped_only_where_the_schema_leaves_them_open() {
        let capped = compact_json(&json!({"type": "number"}));
        assert_eq!(capped["maximum"], json!(MAX_SAFE_INTEGER));
        assert_eq!(capped["multipleOf"], json!(1e-8));
        let nested = compact_json(&json!({"type": "object", "properties": {"n": {"type": ["integer", "null"]}}}));
        assert_eq!(nested["properties"]["n"]["minimum"], json!(-MAX_SAFE_INTEGER));
        assert!(nested["properties"]["n"].get("multipleOf").is_none(), "integers need no fraction cap");
        let beyond = compact_json(&json!({"type": "integer", "minimum": 1e16}));
        assert!(beyond.get("maximum").is_none(), "a bound beyond the cap is not emptied: {beyond}");
        let listed = compact_json(&json!({"type": "number", "enum": [0.123456789012]}));
        assert!(listed.get("multipleOf").is_none() && listed.get("maximum").is_none(), "{listed}");
        let own = compact_json(&json!({"type": "number", "multipleOf": 0.5, "maximum": 3}));
        assert_eq!((own["multipleOf"].clone(), own["maximum"].clone()), (json!(0.5), json!(3)));
        let data = compact_json(&json!({"const": {"type": "number"}}));
        assert_eq!(data["const"], json!({"type": "number"}), "literal values are not schemas");
    }
}
