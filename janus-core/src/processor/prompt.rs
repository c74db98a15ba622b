//! Prompt text in the checkpoint's own chat format.
//!
//! * Original layout: the official `deepseek` SFT format (`{role}: {text}\n\n…{assistant}:`).
//!   Role names are the caller's in the official code; here they default to `<|User|>` /
//!   `<|Assistant|>` when the tokenizer defines those tokens (Janus-Pro) and to `User` /
//!   `Assistant` otherwise (Janus-1.3B), and can be overridden.
//! * Hugging Face layout: the chat template saved with the checkpoint (`chat_template.jinja`,
//!   `chat_template.json`, `processor_config.json` or `tokenizer_config.json`), rendered as
//!   transformers renders it ([`chat_template`](super::chat_template)), with each turn's content
//!   as a list of typed parts; without a template, the SFT format.
//!
//! A turn's text becomes typed parts this way: without `<image_placeholder>` tags, one image part
//! per image and then the text; with tags, the text is split at each tag into text and image parts
//! in order. Each text part is trimmed (so whitespace next to a tag is dropped: the template puts
//! images on lines of their own) and empty ones are left out. A rendered prompt that lost any of
//! the text parts, or whose image placeholders do not match the images, is an error.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chat_template::{ChatTemplate, Message, Part};
use crate::config::{Layout, read_json};
use crate::error::{Error, Result};
use crate::tokenizer::{JanusTokenizer, strings};

/// The system prompt of the reference processors for understanding (the same for Janus and
/// Janus-Pro).
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";

/// The checkpoint's way of writing a conversation.
#[derive(Debug, Clone)]
pub struct PromptFormat {
    template: Option<ChatTemplate>,
    /// The tokenizer's image placeholder string.
    image_token: String,
    user: String,
    assistant: String,
    /// The system prompt put before understanding prompts (empty: none).
    system: String,
}

/// Where a chat template is kept, by the transformers version that saved it.
fn find_template(dir: &Path) -> Result<Option<(PathBuf, String)>> {
    let jinja = dir.join("chat_template.jinja");
    // `exists`, not `is_file`: a template that is there but not a regular file is an error
    // (from the bounded read), never silently skipped.
    if jinja.exists() {
        let bytes =
            crate::files::read_bounded(&jinja, crate::config::MAX_JSON_BYTES, "chat template")?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::config(&jinja, "the chat template is not UTF-8 text"))?;
        return Ok(Some((jinja, text)));
    }
    for name in [
        "chat_template.json",
        "processor_config.json",
        "tokenizer_config.json",
    ] {
        let path = dir.join(name);
        if !path.exists() {
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
            Layout::HuggingFace => match find_template(dir)? {
                Some((path, source)) => Some(ChatTemplate::new(
                    &path,
                    &source,
                    tokenizer.template_tokens(),
                )?),
                None => None,
            },
            Layout::Original => None,
        };
        // The official processor always uses its system prompt for understanding; transformers'
        // only when `use_default_system_prompt` says so.
        let system = match layout {
            Layout::Original => DEFAULT_SYSTEM_PROMPT.to_string(),
            Layout::HuggingFace => {
                let path = dir.join("processor_config.json");
                let on = if path.exists() {
                    match read_json(&path)?.get("use_default_system_prompt") {
                        None | Some(Value::Null) => false,
                        Some(Value::Bool(b)) => *b,
                        Some(_) => {
                            return Err(Error::config(
                                &path,
                                "key `use_default_system_prompt`: expected true or false",
                            ));
                        }
                    }
                } else {
                    false
                };
                if on {
                    DEFAULT_SYSTEM_PROMPT.to_string()
                } else {
                    String::new()
                }
            }
        };
        let special = tokenizer.special();
        let (user, assistant) = if special.user.is_some() && special.assistant.is_some() {
            (strings::USER, strings::ASSISTANT)
        } else {
            ("User", "Assistant")
        };
        Ok(PromptFormat {
            template,
            image_token: tokenizer.image_token().to_string(),
            user: user.into(),
            assistant: assistant.into(),
            system,
        })
    }

    /// Uses other role names in the SFT format.
    pub fn with_roles(mut self, user: &str, assistant: &str) -> Self {
        self.user = user.into();
        self.assistant = assistant.into();
        self
    }

    /// Uses another system prompt for understanding (empty: none).
    pub fn with_system_prompt(mut self, system: &str) -> Self {
        self.system = system.into();
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
            Some(template) => {
                let messages = [Message {
                    role: "user",
                    content: vec![Part::Text { text: prompt }],
                }];
                let text = template.render(&messages, true)?;
                self.check_rendered(template, &text, &messages, None)?;
                Ok(text)
            }
            None => Ok(format!("{}: {prompt}\n\n{}:", self.user, self.assistant)),
        }
    }
}

/// Who speaks a turn of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions for the model, before the first user turn: in the SFT format they replace
    /// the default system prompt; a chat template gets them as a `system` message.
    System,
    /// The person asking.
    User,
    /// The model.
    Assistant,
}

/// One turn of a conversation as the prompt sees it: who speaks, the text, and how many images
/// the turn carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnText<'a> {
    /// The speaker.
    pub role: Role,
    /// The text, possibly with `<image_placeholder>` tags.
    pub content: &'a str,
    /// Images attached to this turn.
    pub images: usize,
}

impl<'a> TurnText<'a> {
    /// Checks the turn: not empty, and as many tags as images when it has tags.
    fn check(&self, index: usize) -> Result<()> {
        let content = self.content.trim();
        let tags = content.matches(strings::IMAGE_PLACEHOLDER).count();
        if tags > 0 && tags != self.images {
            return Err(Error::InvalidInput(format!(
                "turn {index} has {tags} image placeholders but {} images",
                self.images
            )));
        }
        if content.is_empty() && self.images == 0 {
            return Err(Error::InvalidInput(format!("turn {index} is empty")));
        }
        Ok(())
    }

    /// The turn as typed parts (the rule in the module documentation).
    fn parts(&self, index: usize) -> Result<Vec<Part<'a>>> {
        self.check(index)?;
        let text = |t: &'a str| {
            let t = t.trim();
            (!t.is_empty()).then_some(Part::Text { text: t })
        };
        let mut parts = Vec::new();
        if self.content.contains(strings::IMAGE_PLACEHOLDER) {
            for (i, piece) in self.content.split(strings::IMAGE_PLACEHOLDER).enumerate() {
                if i > 0 {
                    parts.push(Part::Image);
                }
                parts.extend(text(piece));
            }
        } else {
            parts.extend(std::iter::repeat_n(Part::Image, self.images));
            parts.extend(text(self.content));
        }
        Ok(parts)
    }

    /// The turn's text with one placeholder per image: its own tags when it has any (their count
    /// must equal the images'), otherwise one placeholder per image, each on its own line, before
    /// the text.
    fn placed(&self, index: usize) -> Result<String> {
        self.check(index)?;
        let content = self.content.trim();
        let tags = content.matches(strings::IMAGE_PLACEHOLDER).count();
        Ok(if tags > 0 {
            content.to_string()
        } else {
            let tags = format!("{}\n", strings::IMAGE_PLACEHOLDER).repeat(self.images);
            format!("{tags}{content}").trim().to_string()
        })
    }
}

impl PromptFormat {
    /// The prompt for a question about `images` images, ending with the assistant's cue.
    /// `<image_placeholder>` tags in the question are the images' places (their count must equal
    /// `images`); without tags, each image gets one placeholder on its own line before the
    /// question. With a chat template, the question becomes typed parts as the module
    /// documentation says.
    pub fn understanding_prompt(&self, question: &str, images: usize) -> Result<String> {
        self.conversation_prompt(&[TurnText {
            role: Role::User,
            content: question,
            images,
        }])
    }

    /// The prompt for a conversation, ending with the assistant's cue: turns alternate between
    /// user and assistant, starting and ending with the user. Each turn places its images as
    /// [`understanding_prompt`](Self::understanding_prompt) does. In the SFT format a user turn
    /// ends with a blank line and an assistant turn with the end-of-sentence token, as in the
    /// official `deepseek` template.
    ///
    /// System turns may come first (before the first user turn, without images): in the SFT
    /// format their texts, joined by blank lines, replace the default system prompt; a chat
    /// template gets them as `system` messages, after the default system prompt (transformers'
    /// processor prepends it to every text-mode prompt).
    pub fn conversation_prompt(&self, turns: &[TurnText<'_>]) -> Result<String> {
        let lead = turns.iter().take_while(|t| t.role == Role::System).count();
        let (system_turns, turns) = turns.split_at(lead);
        if let Some(t) = system_turns.iter().find(|t| t.images > 0) {
            return Err(Error::InvalidInput(format!(
                "a system turn carries {} images; images go in user turns",
                t.images
            )));
        }
        if turns.is_empty() {
            return Err(Error::InvalidInput(
                "the conversation has no user turn".into(),
            ));
        }
        for (i, turn) in turns.iter().enumerate() {
            let want = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            if turn.role != want {
                return Err(Error::InvalidInput(format!(
                    "turn {} is a {:?} turn: after the system turns, turns must alternate user, \
                     assistant, user, …",
                    i + lead,
                    turn.role
                )));
            }
        }
        if turns.len().is_multiple_of(2) {
            return Err(Error::InvalidInput(
                "the conversation must end with a user turn".into(),
            ));
        }
        let body = match &self.template {
            Some(template) => {
                let mut messages = Vec::with_capacity(lead + turns.len());
                for (i, turn) in system_turns.iter().chain(turns).enumerate() {
                    let role = match turn.role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    messages.push(Message {
                        role,
                        content: turn.parts(i)?,
                    });
                }
                let text = template.render(&messages, true)?;
                let images = turns.iter().map(|t| t.images).sum();
                self.check_rendered(template, &text, &messages, Some(images))?;
                text
            }
            None => {
                let mut out = String::new();
                for (i, turn) in turns.iter().enumerate() {
                    let (role, sep) = match turn.role {
                        Role::User => (&self.user, "\n\n"),
                        Role::Assistant | Role::System => (&self.assistant, strings::EOS),
                    };
                    out.push_str(&format!("{role}: {}{sep}", turn.placed(i)?));
                }
                out.push_str(&self.assistant);
                out.push(':');
                out
            }
        };
        let system = if lead == 0 || self.template.is_some() {
            // With a template the system turns are its messages, and the default system prompt
            // still leads, as transformers' processor prepends it to every text-mode prompt.
            self.system.clone()
        } else {
            let texts: Vec<&str> = system_turns.iter().map(|t| t.content.trim()).collect();
            texts.join("\n\n")
        };
        Ok(if system.is_empty() {
            body
        } else {
            format!("{system}\n\n{body}")
        })
    }
}

impl PromptFormat {
    /// Fails when the rendered prompt lost input: every text part must appear, in order, and
    /// (when `images` is given) the prompt must hold exactly one image placeholder per image.
    fn check_rendered(
        &self,
        template: &ChatTemplate,
        rendered: &str,
        messages: &[Message<'_>],
        images: Option<usize>,
    ) -> Result<()> {
        let lost = |what: String| {
            Error::config(
                template.path(),
                format!("chat template: the rendered prompt lost part of the input ({what})"),
            )
        };
        let mut rest = rendered;
        for (i, message) in messages.iter().enumerate() {
            for part in &message.content {
                if let Part::Text { text } = part {
                    match rest.find(text) {
                        Some(at) => rest = &rest[at + text.len()..],
                        None => return Err(lost(format!("the text of turn {i}: {text:?}"))),
                    }
                }
            }
        }
        if let Some(images) = images {
            let found = rendered.matches(self.image_token.as_str()).count();
            if found != images {
                return Err(lost(format!(
                    "{found} `{}` for {images} images",
                    self.image_token
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sft(system: &str) -> PromptFormat {
        PromptFormat {
            template: None,
            image_token: strings::IMAGE_PLACEHOLDER.into(),
            user: "<|User|>".into(),
            assistant: "<|Assistant|>".into(),
            system: system.into(),
        }
    }

    #[test]
    fn sft_understanding_prompt_and_placeholders() {
        let f = sft("SYS");
        assert_eq!(
            f.understanding_prompt("What is it?", 1).unwrap(),
            "SYS\n\n<|User|>: <image_placeholder>\nWhat is it?\n\n<|Assistant|>:"
        );
        assert_eq!(
            f.understanding_prompt("<image_placeholder> vs <image_placeholder>?", 2)
                .unwrap(),
            "SYS\n\n<|User|>: <image_placeholder> vs <image_placeholder>?\n\n<|Assistant|>:"
        );
        let bad = |r: Result<String>| matches!(r, Err(Error::InvalidInput(_)));
        assert!(bad(f.understanding_prompt("<image_placeholder> only", 2)));
        assert!(bad(f.understanding_prompt(
            "<image_placeholder> <image_placeholder>",
            1
        )));
        assert!(bad(f.understanding_prompt("  ", 0)));
    }

    #[test]
    fn sft_conversation_prompt_follows_the_deepseek_template() {
        let f = sft("SYS");
        let turns = [
            TurnText {
                role: Role::User,
                content: " Describe this. ",
                images: 1,
            },
            TurnText {
                role: Role::Assistant,
                content: "A disc.",
                images: 0,
            },
            TurnText {
                role: Role::User,
                content: "And <image_placeholder>?",
                images: 1,
            },
        ];
        assert_eq!(
            f.conversation_prompt(&turns).unwrap(),
            format!(
                "SYS\n\n<|User|>: <image_placeholder>\nDescribe this.\n\n<|Assistant|>: A disc.{}<|User|>: And <image_placeholder>?\n\n<|Assistant|>:",
                strings::EOS
            )
        );
        let bad = |t: &[TurnText]| matches!(f.conversation_prompt(t), Err(Error::InvalidInput(_)));
        assert!(bad(&[]));
        assert!(bad(&turns[..2]), "ends with the assistant");
        assert!(bad(&turns[1..]), "starts with the assistant");
        assert!(
            bad(&[turns[0], turns[0], turns[2]]),
            "two user turns in a row"
        );
        let mut wrong = turns;
        wrong[2].images = 2;
        assert!(bad(&wrong), "tag count differs from the turn's images");
    }

    #[test]
    fn sft_generation_prompt() {
        let f = sft("");
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

    /// The template of a Hugging Face-layout fixture written by transformers from the template
    /// of its Janus conversion script (see tests/reference/README.md).
    fn hf_template_format(system: &str) -> PromptFormat {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/hf-tiny/chat_template.jinja"
        ));
        let source = std::fs::read_to_string(path).unwrap();
        with_template(path, &source, system)
    }

    fn with_template(path: &Path, source: &str, system: &str) -> PromptFormat {
        let tokens = vec![
            ("bos_token".to_string(), strings::BOS.to_string()),
            ("eos_token".to_string(), strings::EOS.to_string()),
        ];
        PromptFormat {
            template: Some(ChatTemplate::new(path, source, tokens).unwrap()),
            ..sft(system)
        }
    }

    #[test]
    fn the_conversion_scripts_template_renders_typed_parts() {
        let f = hf_template_format("SYS");
        assert_eq!(
            f.understanding_prompt("  What is it? ", 1).unwrap(),
            "SYS\n\n<|User|>: <image_placeholder>\nWhat is it?\n\n<|Assistant|>:"
        );
        assert_eq!(
            f.understanding_prompt("Compare <image_placeholder> \n with <image_placeholder>", 2)
                .unwrap(),
            "SYS\n\n<|User|>: Compare\n<image_placeholder>\nwith\n<image_placeholder>\n\n<|Assistant|>:"
        );
        let turns = [
            TurnText {
                role: Role::User,
                content: "Describe this.",
                images: 1,
            },
            TurnText {
                role: Role::Assistant,
                content: "A disc.",
                images: 0,
            },
            TurnText {
                role: Role::User,
                content: "<image_placeholder>\nAnd this?",
                images: 1,
            },
        ];
        assert_eq!(
            f.conversation_prompt(&turns).unwrap(),
            format!(
                "SYS\n\n<|User|>: <image_placeholder>\nDescribe this.\n\n<|Assistant|>: A disc.{}<|User|>: <image_placeholder>\nAnd this?\n\n<|Assistant|>:",
                strings::EOS
            )
        );
    }

    /// System turns replace the default system prompt in the SFT format; with a template they
    /// reach it as `system` messages (which the conversion script's template writes as
    /// `System: …`) after the default system prompt, which transformers' processor prepends to
    /// every text-mode prompt.
    #[test]
    fn system_turns_lead_the_conversation() {
        let system = |content| TurnText {
            role: Role::System,
            content,
            images: 0,
        };
        let user = TurnText {
            role: Role::User,
            content: "Hi.",
            images: 0,
        };
        assert_eq!(
            sft("SYS")
                .conversation_prompt(&[system(" Be brief. "), system("Be kind."), user])
                .unwrap(),
            "Be brief.\n\nBe kind.\n\n<|User|>: Hi.\n\n<|Assistant|>:"
        );
        let templated = hf_template_format("SYS")
            .conversation_prompt(&[system("Be brief."), user])
            .unwrap();
        assert_eq!(
            templated,
            format!(
                "SYS\n\nSystem: Be brief.{}<|User|>: Hi.\n\n<|Assistant|>:",
                strings::EOS
            )
        );
        let bad =
            |t: &[TurnText]| matches!(sft("").conversation_prompt(t), Err(Error::InvalidInput(_)));
        assert!(bad(&[system("Only a system turn.")]));
        assert!(bad(&[user, system("Too late.")]));
        assert!(bad(&[
            TurnText {
                images: 1,
                ..system("With an image.")
            },
            user
        ]));
    }

    #[test]
    fn the_generation_prompt_carries_the_users_text() {
        let f = hf_template_format("");
        let a = f.generation_prompt(" a red fox ").unwrap();
        assert_eq!(a, "<|User|>: a red fox\n\n<|Assistant|>:");
        assert_ne!(a, f.generation_prompt("a blue bird").unwrap());
    }

    #[test]
    fn a_template_that_loses_the_input_is_an_error() {
        let path = Path::new("t.jinja");
        // Content as a plain string only: typed parts render to nothing.
        let strings_only = with_template(
            path,
            "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% endif %}{% endfor %}",
            "",
        );
        for r in [
            strings_only.generation_prompt("a red fox"),
            strings_only.understanding_prompt("What is it?", 0),
        ] {
            let err = r.unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{err:?}");
            assert!(err.to_string().contains("lost"), "{err}");
        }
        // Text kept, images dropped.
        let no_images = with_template(
            path,
            "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}",
            "",
        );
        assert_eq!(no_images.understanding_prompt("hi", 0).unwrap(), "hi");
        let err = no_images.understanding_prompt("hi", 1).unwrap_err();
        assert!(
            err.to_string()
                .contains("0 `<image_placeholder>` for 1 images"),
            "{err}"
        );
    }

    #[test]
    fn bad_templates_are_config_errors() {
        let err =
            ChatTemplate::new("t.jinja".as_ref(), "{% for m in messages %}", vec![]).unwrap_err();
        assert!(matches!(err, Error::Config { .. }));
        let f = with_template(
            "t.jinja".as_ref(),
            "{{ messages[0]['content'].nope() }}",
            "",
        );
        assert!(matches!(
            f.generation_prompt("hi"),
            Err(Error::Config { .. })
        ));
    }
}
