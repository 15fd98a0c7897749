//! Chat messages rendered into a prompt with the model's own `tokenizer.chat_template`
//! (a Hugging Face Jinja template) through `minijinja`, set up the way llama-cpp-python's
//! `Jinja2ChatFormatter` sets up jinja2: `trim_blocks` and `lstrip_blocks`, loop controls
//! (`break`, `continue`), a Python `json.dumps` as `tojson` (`pyjson.rs`), `raise_exception`,
//! `strftime_now` (`strftime.rs`), Python's string and dict methods (`pycompat`), a no-op
//! `{% generation %}` tag, and the globals `bos_token`, `eos_token`, `add_generation_prompt`,
//! `tools`, `tool_choice`, `functions`, `function_call`.

mod pyjson;
mod strftime;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind as JinjaErrorKind, Value, context};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorKind};

/// One chat message as the template sees it (`content` flattened to text).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Why a chat could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("model `{0}` has no chat template; use /v1/completions with a plain prompt")]
    Missing(String),
    #[error("the model's chat template does not compile: {0}")]
    Compile(String),
    #[error("the chat template refused the messages: {0}")]
    Render(String),
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> Self {
        match e {
            TemplateError::Missing(_) => {
                ApiError::new(ErrorKind::InvalidRequest, e.to_string()).with_code("no_chat_template")
            }
            TemplateError::Compile(_) => ApiError::new(ErrorKind::Internal, e.to_string()),
            TemplateError::Render(_) => ApiError::new(ErrorKind::InvalidRequest, e.to_string()).with_param("messages"),
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

/// The environment every chat template renders in.
fn environment<'s>() -> Result<Environment<'s>, Error> {
    let mut env = Environment::new();
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
    let env = environment().map_err(compile_error)?;
    let compiled = env.template_from_str(&source).map_err(compile_error)?;
    compiled
        .render(context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => true,
            bos_token => specials.bos_token,
            eos_token => specials.eos_token,
            tools => specials.tools.map(|t| Value::from(Serde(t))),
            tool_choice => (),
            functions => (),
            function_call => (),
        })
        .map_err(|e| TemplateError::Render(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}\
{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
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
