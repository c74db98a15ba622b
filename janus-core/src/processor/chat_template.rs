//! Hugging Face chat templates, rendered as transformers renders them.
//!
//! transformers compiles a checkpoint's template in a sandboxed Jinja2 environment with
//! `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps
//! non-ASCII text as is, and the globals `raise_exception` and `strftime_now`; templates call
//! Python's `str`, `list` and `dict` methods (`text.lstrip()`, `role.capitalize()`, …). Here the
//! same template runs on minijinja with the same settings, those globals, and Python's methods
//! from `minijinja_contrib::pycompat`. Message content is passed as transformers' processors pass
//! it: a list of typed parts, `{"type": "image"}` and `{"type": "text", "text": …}`.

use std::path::{Path, PathBuf};

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::error::{Error, Result};

/// One part of a message's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Part<'a> {
    /// An image's place.
    Image,
    /// Text.
    Text {
        /// The text.
        text: &'a str,
    },
}

/// One message of a conversation as a template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message<'a> {
    /// `user` or `assistant`.
    pub role: &'a str,
    /// The typed parts, in order.
    pub content: Vec<Part<'a>>,
}

/// A compiled chat template and where it came from.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    path: PathBuf,
    env: Environment<'static>,
    /// Variables transformers passes besides the messages: the tokenizer's special-token strings.
    tokens: Vec<(String, String)>,
}

const NAME: &str = "chat_template";

/// The work one render may do: about a million instructions, or 64 MB of text and values.
const TEMPLATE_FUEL: u64 = 1_000_000;

impl ChatTemplate {
    /// Compiles `source` (read from `path`, which names it in errors). `tokens` are the special
    /// tokens the template sees as variables (`bos_token`, `eos_token`, …), as transformers passes
    /// the tokenizer's `special_tokens_map`.
    pub fn new(path: &Path, source: &str, tokens: Vec<(String, String)>) -> Result<Self> {
        let err = |e: minijinja::Error| Error::config(path, format!("chat template: {e:#}"));
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(err)?;
        env.set_syntax(syntax);
        // A template from a model folder is untrusted: its work and the memory it may allocate
        // are bounded (about one fuel per instruction and per 64 bytes made), far above what
        // any real chat template needs for a long conversation.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())
            .map_err(err)?;
        Ok(ChatTemplate {
            path: path.to_path_buf(),
            env,
            tokens,
        })
    }

    /// The file the template was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renders `messages` (with the assistant's cue when `add_generation_prompt`).
    pub fn render(&self, messages: &[Message<'_>], add_generation_prompt: bool) -> Result<String> {
        let err = |e: minijinja::Error| Error::config(&self.path, format!("chat template: {e:#}"));
        let template = self.env.get_template(NAME).map_err(err)?;
        let mut vars: Vec<(String, Value)> = self
            .tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        vars.push((
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        ));
        vars.push(("tools".into(), Value::from(())));
        vars.push(("documents".into(), Value::from(())));
        vars.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        template.render(Value::from_pairs(vars)).map_err(err)
    }
}

/// `raise_exception(message)`: the template's own error, reported as such.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the local time formatted with Python's `strftime` directives.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let now = jiff::Zoned::now();
    jiff::fmt::strtime::format(format.as_bytes(), &now)
        .map(Value::from)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, so no HTML escaping, non-ASCII kept, Python's separators.
fn tojson(
    value: Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let bad = |msg: String| minijinja::Error::new(ErrorKind::InvalidOperation, msg);
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        Some(v) => indent_string(&v).map_err(bad)?,
        None => None,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        None => None,
        Some(v) => match v.as_slice() {
            [a, b] => Some((a.clone(), b.clone())),
            _ => return Err(bad("tojson: separators must be two strings".into())),
        },
    };
    // Always off here, as transformers' default: non-ASCII text stays as it is.
    let _ = kwargs.get::<Option<bool>>("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let (item, key) = separators.unwrap_or_else(|| {
        // Python's defaults: ", " without indent, "," with it.
        let item = if indent.is_some() { "," } else { ", " };
        (item.to_string(), ": ".to_string())
    });
    let json = JsonStyle {
        indent: indent.as_deref(),
        item: &item,
        key: &key,
        sort_keys,
    };
    let mut out = String::new();
    json.write(&mut out, &value, 0)?;
    Ok(Value::from_safe_string(out))
}

/// Python's `indent` argument: a count of spaces or the string itself; `None` for no newlines.
fn indent_string(v: &Value) -> std::result::Result<Option<String>, String> {
    if v.is_none() || v.is_undefined() {
        return Ok(None);
    }
    if let Some(s) = v.as_str() {
        return Ok(Some(s.to_string()));
    }
    match i64::try_from(v.clone()) {
        Ok(n) => Ok(Some(" ".repeat(n.max(0) as usize))),
        Err(_) => Err(format!(
            "tojson: indent must be a number or a string, not {v}"
        )),
    }
}

/// How `json.dumps` lays out its output.
struct JsonStyle<'a> {
    indent: Option<&'a str>,
    item: &'a str,
    key: &'a str,
    sort_keys: bool,
}

impl JsonStyle<'_> {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    /// Writes `v`, maps in their own order (insertion order, as Python's dicts).
    fn write(
        &self,
        out: &mut String,
        v: &Value,
        depth: usize,
    ) -> std::result::Result<(), minijinja::Error> {
        use minijinja::value::ValueKind as K;
        let string = |s: &str| serde_json::to_string(s).unwrap_or_default();
        match v.kind() {
            K::Undefined | K::None => out.push_str("null"),
            K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            K::Number => {
                if v.is_integer() {
                    out.push_str(&v.to_string());
                } else {
                    out.push_str(&python_float(f64::try_from(v.clone())?));
                }
            }
            K::String => out.push_str(&string(v.as_str().unwrap_or_default())),
            K::Seq | K::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, x) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, x, depth + 1)?;
                }
                self.newline(out, depth);
                out.push(']');
            }
            K::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item);
                    }
                    self.newline(out, depth + 1);
                    match k.as_str() {
                        Some(s) => out.push_str(&string(s)),
                        None => out.push_str(&string(&k.to_string())),
                    }
                    out.push_str(self.key);
                    self.write(out, &v.get_item(k)?, depth + 1)?;
                }
                self.newline(out, depth);
                out.push('}');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::BadSerialization,
                    format!("tojson: cannot write a {} value", v.kind()),
                ));
            }
        }
        Ok(())
    }
}

/// A float as Python's `json.dumps` writes it (always with a fraction or an exponent).
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    if s.contains(['.', 'e', 'E']) {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(
            "t.jinja".as_ref(),
            source,
            vec![("bos_token".into(), "<s>".into())],
        )
        .unwrap()
    }

    #[test]
    fn runaway_templates_stop_with_an_error() {
        // Found by fuzzing: 10^10 loop iterations, and ~300 GB of output.
        for source in [
            "{%for a in range(99999)%}{%for b in range(99999)%}{%endfor%}{%endfor%}",
            "{%for a in range(99999)%}{{\"x\"*99999999}}{%endfor%}",
        ] {
            let started = std::time::Instant::now();
            let e = template(source).render(&[], true).unwrap_err();
            assert!(e.to_string().contains("fuel"), "{e}");
            assert!(started.elapsed().as_secs() < 10);
        }
    }

    fn user(parts: Vec<Part<'_>>) -> Message<'_> {
        Message {
            role: "user",
            content: parts,
        }
    }

    #[test]
    fn python_string_methods_and_scoped_set_work() {
        // The constructs of transformers' Janus template: `set` inside `if` inside `for`, Python
        // string methods, `+` on strings, indexing the content list by `loop.index0`.
        let t = template(
            "{%for m in messages%}{{m['role'].capitalize()}}:{%for c in m['content']%}\
             {%if c['type']=='text'%}{%set text=c['text']%}{%if loop.first%}{%set text=text.lstrip()%}{%endif%}\
             {%if loop.last%}{%set text=text.rstrip()%}{%endif%}\
             {%if not loop.first and m['content'][loop.index0-1]['type']=='text'%}{{' '+text}}{%else%}{{text}}{%endif%}\
             {%else%}[img]{%endif%}{%endfor%}{%endfor%}{{bos_token}}",
        );
        let out = t
            .render(
                &[user(vec![
                    Part::Text { text: "  a " },
                    Part::Text { text: "b" },
                    Part::Image,
                    Part::Text { text: " c  " },
                ])],
                false,
            )
            .unwrap();
        assert_eq!(out, "User:a  b[img] c<s>");
    }

    #[test]
    fn trim_and_lstrip_blocks_as_transformers_sets_them() {
        let t = template("{% for m in messages %}\n  {{ m['role'] }}\n{% endfor %}");
        let out = t.render(&[user(vec![]), user(vec![])], false).unwrap();
        assert_eq!(out, "  user\n  user\n");
    }

    #[test]
    fn raise_exception_is_a_config_error_with_its_message() {
        let t = template("{{ raise_exception('only user turns') }}");
        let err = t.render(&[user(vec![])], false).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(err.to_string().contains("only user turns"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = template(
            "{{ messages | tojson }}|{{ {'b': 1.0, 'a': [1, 'é<'] } | tojson(indent=2, sort_keys=true) }}",
        );
        let out = t
            .render(&[user(vec![Part::Image, Part::Text { text: "ü" }])], false)
            .unwrap();
        assert_eq!(
            out,
            "[{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", \"text\": \"ü\"}]}]|\
             {\n  \"a\": [\n    1,\n    \"é<\"\n  ],\n  \"b\": 1.0\n}"
        );
    }

    #[test]
    fn loop_controls_and_strftime_now() {
        let t = template(
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}\
             {{ strftime_now('%Y') | length }}",
        );
        assert_eq!(
            t.render(&[user(vec![]), user(vec![])], false).unwrap(),
            "user4"
        );
    }

    #[test]
    fn syntax_errors_are_config_errors_at_compile_time() {
        let err =
            ChatTemplate::new("t.jinja".as_ref(), "{% for m in messages %}", vec![]).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
    }
}
