//! Chat messages rendered into a prompt with the model's own `tokenizer.chat_template`
//! (a Hugging Face Jinja template) through `minijinja`, with Python string methods
//! (`pycompat`) and `raise_exception` as Hugging Face's renderer provides them.

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
}

/// Renders `messages` with `template`, ending with the assistant's turn opened.
pub fn render_chat(
    model: &str,
    template: Option<&str>,
    messages: &[ChatMessage],
    specials: &Specials<'_>,
) -> Result<String, TemplateError> {
    let template = template.ok_or_else(|| TemplateError::Missing(model.to_owned()))?;
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    let compiled = env.template_from_str(template).map_err(|e| TemplateError::Compile(format!("{e:#}")))?;
    compiled
        .render(context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => true,
            bos_token => specials.bos_token,
            eos_token => specials.eos_token,
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

    const SPECIALS: Specials<'static> = Specials { bos_token: "<s>", eos_token: "</s>" };

    #[test]
    fn renders_chatml_with_python_string_methods() {
        let out = render_chat("m", Some(CHATML), &[msg("user", "  Hi  ")], &SPECIALS).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_a_render_error_naming_the_message() {
        let t = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}";
        let err = render_chat("m", Some(t), &[msg("assistant", "x")], &SPECIALS).unwrap_err();
        assert!(matches!(&err, TemplateError::Render(m) if m.contains("first must be user")), "{err}");
        assert_eq!(ApiError::from(err).status(), 400);
    }

    #[test]
    fn missing_and_broken_templates_are_typed_errors() {
        assert!(matches!(render_chat("m", None, &[], &SPECIALS), Err(TemplateError::Missing(_))));
        assert!(matches!(render_chat("m", Some("{% for %}"), &[], &SPECIALS), Err(TemplateError::Compile(_))));
    }
}
