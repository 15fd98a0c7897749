//! Chat messages rendered into a prompt with the model's own `tokenizer.chat_template`
//! (a Hugging Face Jinja template) through `minijinja`, set up the way llama-cpp-python's
//! `Jinja2ChatFormatter` sets up jinja2: `trim_blocks` and `lstrip_blocks`, loop controls
//! (`break`, `continue`), a Python `json.dumps` as `tojson` (`pyjson.rs`), `raise_exception`,
//! `strftime_now` (`strftime.rs`), Python's string and dict methods (`pycompat`), a no-op
//! `{% generation %}` tag, and the globals `bos_token`, `eos_token`, `add_generation_prompt`,
//! `tools`, `tool_choice`, `functions`, `function_call`.

mod pyjson;
pub mod sandbox;
mod strftime;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind as JinjaErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorKind};

/// One chat message as the template sees it (`content` flattened to text). Tool fields
/// are passed as Hugging Face's `apply_chat_template` passes them, and absent otherwise.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's calls: `[{"id", "type", "function": {"name", "arguments"}}]`,
    /// `arguments` as an object (templates print it with `tojson`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` message's answer to the call with this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` message's function name (some templates print it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Why a chat could not be rendered.
#[derive(Debug, thiserror::Error, Serialize, Deserialize)]
pub enum TemplateError {
    #[error("model `{0}` has no chat template; use /v1/completions with a plain prompt")]
    Missing(String),
    #[error("the model's chat template does not compile: {0}")]
    Compile(String),
    #[error("the chat template refused the messages: {0}")]
    Render(String),
    #[error("rendering the chat template {0}; the messages are too large for this model's template")]
    TooCostly(String),
    #[error("{0}")]
    Sandbox(String),
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> Self {
        match e {
            TemplateError::Missing(_) => {
                ApiError::new(ErrorKind::InvalidRequest, e.to_string()).with_code("no_chat_template")
            }
            TemplateError::Compile(_) | TemplateError::Sandbox(_) => ApiError::new(ErrorKind::Internal, e.to_string()),
            TemplateError::Render(_) => ApiError::new(ErrorKind::InvalidRequest, e.to_string()).with_param("messages"),
            TemplateError::TooCostly(_) => ApiError::new(ErrorKind::InvalidRequest, e.to_string())
                .with_param("messages")
                .with_code("template_limit"),
        }
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(JinjaErrorKind::InvalidOperation, message))
}

/// What the template receives besides the messages.
pub struct Specials<'a> {
    pub bos_token: &'a str,
    pub eos_token: &'a str,
    /// The request's tool definitions (OpenAI `tools`), if any; `none` in the template otherwise.
    pub tools: Option<&'a serde_json::Value>,
}

/// Limits on one render, so a hostile template cannot pin a worker or exhaust memory.
/// Fuel is MiniJinja's work budget: about one unit per instruction and per 64 bytes of data
/// created (output included), so it bounds both time and allocation. The fixed part covers
/// any real template on a short chat (they use a few thousand); the rest grows with the input.
const BASE_FUEL: u64 = 200_000;
/// Fuel added per byte of messages and tools given to the template.
const FUEL_PER_INPUT_BYTE: u64 = 1;
/// Deepest nesting MiniJinja allows (its default; a macro call takes about seven levels, so
/// this is some 70 nested calls, which real templates printing JSON schemas stay far below).
const RECURSION_LIMIT: usize = 500;
/// Largest prompt a template may write: a fixed allowance plus a multiple of its input.
const BASE_OUTPUT_BYTES: usize = 256 << 10;
const OUTPUT_PER_INPUT_BYTE: usize = 4;

/// An output that refuses to grow past its limit.
struct Capped {
    out: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The environment every chat template renders in.
fn environment<'s>() -> Result<Environment<'s>, Error> {
    let mut env = Environment::new();
    env.set_recursion_limit(RECURSION_LIMIT);
    env.set_syntax(SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", pyjson::tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", |format: String| strftime::strftime_now(&format));
    Ok(env)
}

/// Hugging Face's `{% generation %}…{% endgeneration %}` marks assistant text for training and
/// renders its body unchanged: it becomes `{% if true %}…{% endif %}` (whitespace control kept).
fn without_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..end];
        let (lead, inner) = inner.strip_prefix('-').map_or(("", inner), |i| ("-", i));
        let (inner, trail) = inner.strip_suffix('-').map_or((inner, ""), |i| (i, "-"));
        match inner.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Renders `messages` with `template`, ending with the assistant's turn opened.
pub fn render_chat(
    model: &str,
    template: Option<&str>,
    messages: &[ChatMessage],
    specials: &Specials<'_>,
) -> Result<String, TemplateError> {
    let template = template.ok_or_else(|| TemplateError::Missing(model.to_owned()))?;
    let source = without_generation_tags(template);
    let compile_error = |e: Error| TemplateError::Compile(format!("{e:#}"));
    let mut env = environment().map_err(compile_error)?;
    let input_bytes = messages
        .iter()
        .map(|m| m.role.len() + m.content.len() + m.tool_calls.as_ref().map_or(0, |t| t.to_string().len()))
        .sum::<usize>()
        + specials.tools.map_or(0, |t| t.to_string().len());
    env.set_fuel(Some(BASE_FUEL + FUEL_PER_INPUT_BYTE * input_bytes as u64));
    let compiled = env.template_from_str(&source).map_err(compile_error)?;
    let limit = BASE_OUTPUT_BYTES + OUTPUT_PER_INPUT_BYTE * input_bytes;
    let mut out = Capped { out: Vec::new(), limit, overflowed: false };
    let rendered = compiled.render_captured_to(
        context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => true,
            bos_token => specials.bos_token,
            eos_token => specials.eos_token,
            tools => specials.tools.map(|t| Value::from(Serde(t))),
            tool_choice => (),
            functions => (),
            function_call => (),
        },
        &mut out,
    );
    match rendered {
        Ok(_) => String::from_utf8(out.out).map_err(|_| TemplateError::Render("the output is not UTF-8".into())),
        Err(e) => Err(match e.kind() {
            JinjaErrorKind::OutOfFuel => TemplateError::TooCostly("ran out of its work budget".into()),
            JinjaErrorKind::WriteFailure if out.overflowed => {
                TemplateError::TooCostly(format!("would write more than {limit} bytes"))
            }
            JinjaErrorKind::InvalidOperation if e.detail() == Some("recursion limit exceeded") => {
                TemplateError::TooCostly(format!("recursed deeper than {RECURSION_LIMIT} levels"))
            }
            _ => TemplateError::Render(e.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}\
{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }

    const SPECIALS: Specials<'static> = Specials { bos_token: "<s>", eos_token: "</s>", tools: None };

    fn render(template: &str, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        render_chat("m", Some(template), messages, &SPECIALS)
    }

    #[test]
    fn renders_chatml_with_python_string_methods() {
        let out = render(CHATML, &[msg("user", "  Hi  ")]).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_render_error_naming_the_message() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}";
        let err = render(t, &[msg("assistant", "x")]).unwrap_err();
        assert!(matches!(&err, TemplateError::Render(m) if m.contains("first must be user")), "{err}");
        assert_eq!(ApiError::from(err).status(), 400);
    }

    #[test]
    fn missing_and_broken_templates_are_typed_errors() {
        assert!(matches!(render_chat("m", None, &[], &SPECIALS), Err(TemplateError::Missing(_))));
        assert!(matches!(render("{% for %}", &[]), Err(TemplateError::Compile(_))));
    }

    /// Templates stitched from pieces of real templates and hostile ones (unbalanced tags,
    /// huge ranges, string growth, deep recursion, bad filters), over any messages: each
    /// render returns a prompt within the output cap or a typed error, never a panic.
    /// (List doubling is left out: see the limits' note above.)
    mod arbitrary {
        use super::*;
        use proptest::prelude::*;

        const PIECES: &[&str] = &[
            "{% for m in messages %}",
            "{% endfor %}",
            "{% if loop.first %}",
            "{% if m.role == 'user' %}",
            "{% elif m.role == 'system' %}",
            "{% else %}",
            "{% endif %}",
            "{{ m.content }}",
            "{{ m['role'] }}",
            "{{ messages[0].content | trim }}",
            "{{ messages | length }}",
            "{{ bos_token }}",
            "{{ m.content | tojson }}",
            "{{ tools | tojson }}",
            "<|im_start|>",
            "\n",
            "{% if add_generation_prompt %}assistant:{% endif %}",
            "{{ raise_exception('no') }}",
            "{% set ns = namespace(s='ab') %}",
            "{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
            "{% for i in range(1000000) %}{% endfor %}",
            "{{ 'x' * 200000 }}",
            "{{ m.content * 1000 }}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{{ m.content.split(' ') | join('|') }}",
            "{{ m.content | upper }}{{ m.content.startswith('a') }}",
            "{{ strftime_now('%Y') }}",
            "{{ undefined_thing.field }}",
            "{{ 1 / 0 }}",
            "{% for %}",
            "{{",
            "}}",
            "{% break %}",
            "{{ messages[-1]['content'][::-1] }}",
        ];

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn any_template_renders_within_its_limits_or_fails_cleanly(
                picks in prop::collection::vec(0..PIECES.len(), 0..12),
                messages in prop::collection::vec(("user|assistant|system|tool|[a-z]{0,4}", "\\PC{0,40}"), 0..4),
            ) {
                let template: String = picks.iter().map(|&i| PIECES[i]).collect();
                let messages: Vec<ChatMessage> = messages.iter().map(|(r, c)| msg(r, c)).collect();
                let input: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum();
                match render(&template, &messages) {
                    Ok(out) => prop_assert!(out.len() <= BASE_OUTPUT_BYTES + OUTPUT_PER_INPUT_BYTE * input),
                    Err(e) => {
                        let api = ApiError::from(e);
                        prop_assert!((400..=500).contains(&api.status()) && !api.message.is_empty(), "{api:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn block_tags_eat_their_line_and_loops_break() {
        let t = "{% for m in messages %}\n  {% if m.role == 'stop' %}\n    {% break %}\n  {% endif %}\n{{ m.content }}\n{% endfor %}";
        let out = render(t, &[msg("user", "a"), msg("user", "b"), msg("stop", ""), msg("user", "c")]).unwrap();
        assert_eq!(out, "a\nb\n");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = "{{ messages[0] | tojson }}|{{ {'b': [1, 2.5, none, true], 'a': {}} | tojson(indent=2) }}|\
{{ 'é<&>' | tojson(ensure_ascii=true) }}|{{ {'k': 'v', 'a': 1} | tojson(separators=(',', ':'), sort_keys=true) }}";
        let out = render(t, &[msg("user", "Zürich <b>&</b> 'q' \"d\"\n🚀")]).unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"Zürich <b>&</b> 'q' \\\"d\\\"\\n🚀\"}|\
{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": {}\n}|\
\"\\u00e9<&>\"|{\"a\":1,\"k\":\"v\"}"
        );
        assert!(matches!(render("{{ nope | tojson }}", &[]), Err(TemplateError::Render(_))));
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        assert_eq!(render(t, &[msg("assistant", "hi"), msg("assistant", "yo")]).unwrap(), "hiyo");
        assert_eq!(without_generation_tags("{% if x %}{% generation %}"), "{% if x %}{% if true %}");
    }

    #[test]
    fn strftime_now_and_tools_are_globals() {
        let year = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        assert_eq!(year.len(), 4);
        assert_eq!(render("{{ tools is none }} {{ tool_choice is none }}", &[]).unwrap(), "True True");
        let tools = serde_json::json!([{"type": "function"}]);
        let specials = Specials { tools: Some(&tools), ..SPECIALS };
        let out = render_chat("m", Some("{{ tools[0].type }}"), &[], &specials).unwrap();
        assert_eq!(out, "function");
    }

    /// One case of `tests/fixtures/templates/expected.json`, written by
    /// `tools/fixtures/chat_templates.py` with llama-cpp-python's jinja2 renderer.
    #[derive(Deserialize)]
    struct Case {
        template: String,
        case: String,
        bos_token: String,
        eos_token: String,
        messages: Vec<ChatMessage>,
        tools: Option<serde_json::Value>,
        prompt: Option<String>,
        error: Option<String>,
    }

    /// Each hostile template fails that render alone with a `template_limit` error, quickly
    /// and without a large allocation; a long chat through a real template still renders.
    #[test]
    fn hostile_templates_hit_their_limits() {
        let hostile = [
            ("nested loops", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"),
            (
                "string doubling",
                "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            ),
            ("huge repeat", "{{ 'x' * 10000000000 }}"),
            // Not covered: doubling a list with `+` 33 times. MiniJinja 3.1 keeps list
            // concatenation lazy and uncharged, then materializes 2^33 items at once; see
            // docs/ARCHITECTURE.md (chat templates).
            ("endless recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
            ("output flood", "{{ 'x' * 300000 }}"),
        ];
        for (what, t) in hostile {
            let err = render(t, &[msg("user", "hi")]).unwrap_err();
            assert!(matches!(err, TemplateError::TooCostly(_)), "{what}: {err:?}");
            let api = ApiError::from(err);
            assert_eq!(api.code, Some("template_limit"), "{what}");
        }
        let err = render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", &[]).unwrap_err();
        assert!(err.to_string().contains("recursed deeper than 500"), "{err}");
        let err = render("{{ 'x' * 300000 }}", &[]).unwrap_err();
        assert!(err.to_string().contains("more than 262144 bytes"), "{err}");
        // Recursion within the limit and a 1 MiB message are fine.
        let t = "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{% else %}{{ n }}{% endif %}{% endmacro %}{{ f(0) }}";
        assert_eq!(render(t, &[]).unwrap(), "40");
        let long = "word ".repeat(200_000);
        let many: Vec<ChatMessage> =
            (0..200).map(|i| msg(if i % 2 == 0 { "user" } else { "assistant" }, &long[..5000])).collect();
        for messages in [vec![msg("user", &long)], many] {
            let out = render(CHATML, &messages).unwrap();
            assert!(out.len() > messages.iter().map(|m| m.content.len()).sum::<usize>());
        }
    }

    #[test]
    fn real_templates_render_as_jinja2_renders_them() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates");
        let cases: Vec<Case> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let mut templates = std::collections::BTreeSet::new();
        for c in &cases {
            let template = std::fs::read_to_string(dir.join(&c.template)).unwrap();
            let specials = Specials { bos_token: &c.bos_token, eos_token: &c.eos_token, tools: c.tools.as_ref() };
            let what = format!("{} / {}", c.template, c.case);
            match (render_chat("m", Some(&template), &c.messages, &specials), &c.prompt, &c.error) {
                (Ok(out), Some(want), _) => assert_eq!(&out, want, "{what}"),
                (Err(TemplateError::Render(msg)), None, Some(want)) => {
                    assert!(msg.contains(want.as_str()), "{what}: {msg}")
                }
                (got, _, _) => panic!("{what}: got {got:?}, jinja2 gave {:?} / {:?}", c.prompt, c.error),
            }
            templates.insert(c.template.as_str());
        }
        assert_eq!(templates.len(), 5, "{templates:?}");
        assert!(cases.iter().any(|c| c.tools.is_some() && c.template.starts_with("qwen2.5")));
    }
}
