//! Training samples in JSONL, one object a line, image paths relative to the file's folder:
//!
//! ```text
//! {"task": "generate", "prompt": "a red fox in the snow", "image": "fox.png"}
//! {"task": "understand", "images": ["cat.png"], "question": "What is this?", "answer": "A cat asleep."}
//! {"task": "understand", "turns": [{"role": "user", "content": "What is this?", "images": ["cat.png"]}, {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Its color?"}, {"role": "assistant", "content": "Grey."}]}
//! {"task": "text", "text": "plain text for the language model"}
//! ```
//!
//! A multi-turn sample's turns are as `chat` takes them (optional system turns, then user and
//! assistant alternating from a user turn), ending with an assistant turn; `images` only on
//! user turns.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::processor::prompt::Role;

/// One turn of a multi-turn training sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnSample {
    /// The speaker.
    pub role: Role,
    /// The text.
    pub content: String,
    /// The turn's image files (user turns only).
    pub images: Vec<PathBuf>,
}

/// One training sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// Text to image: the model learns to produce the image's VQ codes after the prompt.
    Generate {
        /// What the image shows.
        prompt: String,
        /// The image file.
        image: PathBuf,
    },
    /// Image understanding: the model learns to give the answer to the question about the images.
    Understand {
        /// The image files, in the order they fill the prompt's image placeholders.
        images: Vec<PathBuf>,
        /// The question.
        question: String,
        /// The answer the model should give.
        answer: String,
    },
    /// A conversation: the model learns every assistant turn's answer.
    Conversation {
        /// The turns, ending with an assistant turn.
        turns: Vec<TurnSample>,
    },
    /// Plain text for the language model.
    Text {
        /// The text.
        text: String,
    },
}

impl Example {
    /// The task's name as the JSONL writes it.
    pub fn task(&self) -> &'static str {
        match self {
            Example::Generate { .. } => "generate",
            Example::Understand { .. } | Example::Conversation { .. } => "understand",
            Example::Text { .. } => "text",
        }
    }
}

/// The samples of a JSONL file, in file order (blank lines skipped), image paths resolved
/// against the file's folder.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; [`Error::InvalidInput`] naming the file and line
/// when a line is not a JSON object of a known task with its fields, or the file has no samples.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |message: String| {
            Error::InvalidInput(format!("{} line {}: {message}", path.display(), i + 1))
        };
        examples.push(parse_line(line, dir).map_err(at)?);
    }
    if examples.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: no samples",
            path.display()
        )));
    }
    Ok(examples)
}

/// One line's sample, or what is wrong with it.
fn parse_line(line: &str, dir: &Path) -> std::result::Result<Example, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(o) = value else {
        return Err("not a JSON object".into());
    };
    let text = |key: &str| -> std::result::Result<String, String> {
        match o.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("\"{key}\" is not a string")),
            None => Err(format!("no \"{key}\"")),
        }
    };
    let file = |s: String| -> std::result::Result<PathBuf, String> {
        if s.is_empty() {
            return Err("an empty image path".into());
        }
        Ok(dir.join(s))
    };
    let task = text("task")?;
    let multi_turn = task == "understand" && o.contains_key("turns");
    let known: &[&str] = match task.as_str() {
        "generate" => &["task", "prompt", "image"],
        "understand" if multi_turn => &["task", "turns"],
        "understand" => &["task", "images", "question", "answer"],
        "text" => &["task", "text"],
        other => {
            return Err(format!(
                "unknown task \"{other}\" (generate, understand or text)"
            ));
        }
    };
    if let Some(extra) = o.keys().find(|k| !known.contains(&k.as_str())) {
        let hint = if multi_turn {
            " (a multi-turn sample has only \"turns\")"
        } else {
            ""
        };
        return Err(format!(
            "unexpected key \"{extra}\" for task \"{task}\"{hint}"
        ));
    }
    let images = |v: Option<&Value>| -> std::result::Result<Vec<PathBuf>, String> {
        match v {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => file(s.clone()),
                    _ => Err("\"images\" holds a value that is not a string".into()),
                })
                .collect(),
            Some(_) => Err("\"images\" is not a list".into()),
            None => Ok(Vec::new()),
        }
    };
    if multi_turn {
        return Ok(Example::Conversation {
            turns: parse_turns(&o["turns"], &images)?,
        });
    }
    Ok(match task.as_str() {
        "generate" => Example::Generate {
            prompt: text("prompt")?,
            image: file(text("image")?)?,
        },
        "understand" => {
            let images = images(o.get("images"))?;
            Example::Understand {
                images,
                question: text("question")?,
                answer: text("answer")?,
            }
        }
        _ => Example::Text {
            text: text("text")?,
        },
    })
}

/// Reads a line's (or a turn's) `images` list into paths.
type ImageList<'a> = dyn Fn(Option<&Value>) -> std::result::Result<Vec<PathBuf>, String> + 'a;

/// The turns of a multi-turn sample: objects with a role, a content and (user turns) images;
/// after optional system turns, user and assistant alternate from a user turn, and the last turn
/// is the assistant's.
fn parse_turns(
    value: &Value,
    images: &ImageList<'_>,
) -> std::result::Result<Vec<TurnSample>, String> {
    let Value::Array(items) = value else {
        return Err("\"turns\" is not a list".into());
    };
    let mut turns = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(t) = item else {
            return Err(format!("turn {i} is not a JSON object"));
        };
        if let Some(extra) = t
            .keys()
            .find(|k| !["role", "content", "images"].contains(&k.as_str()))
        {
            return Err(format!("turn {i}: unexpected key \"{extra}\""));
        }
        let role = match t.get("role").and_then(Value::as_str) {
            Some("system") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(format!(
                    "turn {i}: unknown role \"{other}\" (system, user or assistant)"
                ));
            }
            None => return Err(format!("turn {i}: no \"role\" string")),
        };
        let content = match t.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(format!("turn {i}: no \"content\" string")),
        };
        let files = images(t.get("images")).map_err(|e| format!("turn {i}: {e}"))?;
        if role != Role::User && !files.is_empty() {
            return Err(format!("turn {i}: only user turns carry images"));
        }
        if role == Role::Assistant && content.trim().is_empty() {
            return Err(format!(
                "turn {i}: an empty assistant turn has nothing to learn"
            ));
        }
        turns.push(TurnSample {
            role,
            content,
            images: files,
        });
    }
    match turns.last() {
        Some(t) if t.role == Role::Assistant => Ok(turns),
        Some(_) => Err("the last turn must be the assistant's (the answer learned)".into()),
        None => Err("\"turns\" is empty".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> std::result::Result<Example, String> {
        parse_line(line, Path::new("/data"))
    }

    #[test]
    fn each_task_reads_with_paths_beside_the_file() {
        assert_eq!(
            parse(r#"{"task": "generate", "prompt": "a fox", "image": "fox.png"}"#).unwrap(),
            Example::Generate {
                prompt: "a fox".into(),
                image: "/data/fox.png".into()
            }
        );
        assert_eq!(
            parse(r#"{"task":"understand","images":["a.png","b/c.png"],"question":"Q?","answer":"A."}"#)
                .unwrap(),
            Example::Understand {
                images: vec!["/data/a.png".into(), "/data/b/c.png".into()],
                question: "Q?".into(),
                answer: "A.".into()
            }
        );
        assert_eq!(
            parse(
                r#"{"task": "understand", "turns": [{"role": "user", "content": "Q?", "images": ["a.png"]}, {"role": "assistant", "content": "A."}]}"#
            )
            .unwrap(),
            Example::Conversation {
                turns: vec![
                    TurnSample {
                        role: Role::User,
                        content: "Q?".into(),
                        images: vec!["/data/a.png".into()],
                    },
                    TurnSample {
                        role: Role::Assistant,
                        content: "A.".into(),
                        images: vec![],
                    },
                ]
            }
        );
        assert_eq!(
            parse(r#"{"task": "text", "text": "hello"}"#).unwrap(),
            Example::Text {
                text: "hello".into()
            }
        );
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        for (line, says) in [
            ("{", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"prompt": "x"}"#, "no \"task\""),
            (r#"{"task": "draw"}"#, "unknown task"),
            (r#"{"task": "text"}"#, "no \"text\""),
            (r#"{"task": "text", "text": 3}"#, "not a string"),
            (
                r#"{"task": "text", "text": "x", "answer": "y"}"#,
                "unexpected key \"answer\"",
            ),
            (r#"{"task": "understand", "turns": []}"#, "empty"),
            (
                r#"{"task": "understand", "turns": [{"role": "user", "content": "q"}]}"#,
                "the last turn must be the assistant's",
            ),
            (
                r#"{"task": "understand", "turns": [{"role": "bot", "content": "q"}]}"#,
                "unknown role",
            ),
            (
                r#"{"task": "understand", "turns": [{"role": "assistant", "content": "a", "images": ["x.png"]}]}"#,
                "only user turns",
            ),
            (
                r#"{"task": "understand", "turns": [], "question": "q"}"#,
                "only \"turns\"",
            ),
            (
                r#"{"task": "understand", "images": "a.png", "question": "q", "answer": "a"}"#,
                "not a list",
            ),
            (
                r#"{"task": "generate", "prompt": "p", "image": ""}"#,
                "empty image path",
            ),
        ] {
            let err = parse(line).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
    }

    #[test]
    fn files_name_the_line_at_fault() {
        let dir = std::env::temp_dir().join(format!("janus-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.jsonl");
        std::fs::write(
            &path,
            "{\"task\": \"text\", \"text\": \"a\"}\n\n{\"task\": 1}\n",
        )
        .unwrap();
        let err = read_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        std::fs::write(&path, "\n  \n").unwrap();
        assert!(
            read_jsonl(&path)
                .unwrap_err()
                .to_string()
                .contains("no samples")
        );
        std::fs::write(&path, "{\"task\": \"text\", \"text\": \"a\"}\n").unwrap();
        assert_eq!(read_jsonl(&path).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
