//! Prompt text in the checkpoint's own chat format.
//!
//! * Original layout: the official `deepseek` SFT format (`{role}: {text}\n\n…{assistant}:`).
//!   Role names are the caller's in the official code; here they default to `<|User|>` /
//!   `<|Assistant|>` when the tokenizer defines those tokens (Janus-Pro) and to `User` /
//!   `Assistant` otherwise (Janus-1.3B), and can be overridden.
//! * Hugging Face layout: the chat template saved with the checkpoint (`chat_template.jinja`,
//!   `chat_template.json`, `processor_config.json` or `tokenizer_config.json`), rendered as is;
//!   without one, the SFT format.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::{Layout, read_json};
use crate::error::{Error, Result};
use crate::tokenizer::{JanusTokenizer, strings};

/// The checkpoint's way of writing a conversation.
#[derive(Debug, Clone)]
pub struct PromptFormat {
    template: Option<(PathBuf, String)>,
    user: String,
    assistant: String,
}

/// Where a chat template is kept, by the transformers version that saved it.
fn find_template(dir: &Path) -> Result<Option<(PathBuf, String)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
        return Ok(Some((jinja, text)));
    }
    for name in [
        "chat_template.json",
        "processor_config.json",
        "tokenizer_config.json",
    ] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let value = read_json(&path)?;
        match value.get("chat_template") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => return Ok(Some((path, s.clone()))),
            // A list of named templates: take the default one.
            Some(Value::Array(items)) => {
                let found = items
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or(items.first());
                if let Some(s) = found.and_then(|t| t["template"].as_str()) {
                    return Ok(Some((path, s.to_string())));
                }
            }
            Some(_) => {
                return Err(Error::config(
                    &path,
                    "key `chat_template`: expected a string",
                ));
            }
        }
    }
    Ok(None)
}

impl PromptFormat {
    /// Reads the chat format of a model folder.
    pub fn from_dir(dir: &Path, layout: Layout, tokenizer: &JanusTokenizer) -> Result<Self> {
        let template = match layout {
            Layout::HuggingFace => find_template(dir)?,
            Layout::Original => None,
        };
        let special = tokenizer.special();
        let (user, assistant) = if special.user.is_some() && special.assistant.is_some() {
            (strings::USER, strings::ASSISTANT)
        } else {
            ("User", "Assistant")
        };
        Ok(PromptFormat {
            template,
            user: user.into(),
            assistant: assistant.into(),
        })
    }

    /// Uses other role names in the SFT format.
    pub fn with_roles(mut self, user: &str, assistant: &str) -> Self {
        self.user = user.into();
        self.assistant = assistant.into();
        self
    }

    /// The role names of the SFT format.
    pub fn roles(&self) -> (&str, &str) {
        (&self.user, &self.assistant)
    }

    /// The text before `<begin_of_image>` for generating an image of `prompt`: one user turn and
    /// the assistant's cue, no system prompt.
    pub fn generation_prompt(&self, prompt: &str) -> Result<String> {
        let prompt = prompt.trim();
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        match &self.template {
            Some((path, source)) => {
                let messages = serde_json::json!([{"role": "user", "content": prompt}]);
                render(path, source, &messages, true)
            }
            None => Ok(format!("{}: {prompt}\n\n{}:", self.user, self.assistant)),
        }
    }
}

/// Renders a chat template as transformers does (`messages`, `add_generation_prompt`, the special
/// token strings as variables).
fn render(
    path: &Path,
    source: &str,
    messages: &Value,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::config(path, format!("chat template: {e}")))?;
    env.set_syntax(syntax);
    env.add_template("chat", source)
        .map_err(|e| Error::config(path, format!("chat template: {e}")))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::config(path, format!("chat template: {e}")))?;
    tmpl.render(minijinja::context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => strings::BOS,
        eos_token => strings::EOS,
    })
    .map_err(|e| Error::config(path, format!("chat template: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sft_generation_prompt() {
        let f = PromptFormat {
            template: None,
            user: "<|User|>".into(),
            assistant: "<|Assistant|>".into(),
        };
        assert_eq!(
            f.generation_prompt("  a cat \n").unwrap(),
            "<|User|>: a cat\n\n<|Assistant|>:"
        );
        let f = f.with_roles("User", "Assistant");
        assert_eq!(
            f.generation_prompt("a cat").unwrap(),
            "User: a cat\n\nAssistant:"
        );
        assert!(matches!(
            f.generation_prompt(" \n"),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn templates_render_and_bad_ones_are_config_errors() {
        let f = PromptFormat {
            template: Some((
                "t.jinja".into(),
                "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | trim }}{% endfor %}{% if add_generation_prompt %}>{% endif %}".into(),
            )),
            user: String::new(),
            assistant: String::new(),
        };
        assert_eq!(f.generation_prompt("hi").unwrap(), "[user]hi>");
        let f = PromptFormat {
            template: Some(("t.jinja".into(), "{% for m in messages %}".into())),
            user: String::new(),
            assistant: String::new(),
        };
        assert!(matches!(
            f.generation_prompt("hi"),
            Err(Error::Config { .. })
        ));
    }
}
