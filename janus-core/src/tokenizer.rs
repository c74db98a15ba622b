//! The checkpoint's tokenizer (`tokenizer.json`) and its special tokens, every id looked up from
//! the files (Janus-Pro-1B and -7B use different ids).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Strings of the special tokens Janus uses, as the official code names them.
pub mod strings {
    /// Beginning of sentence.
    pub const BOS: &str = "<｜begin▁of▁sentence｜>";
    /// End of sentence (the stop token).
    pub const EOS: &str = "<｜end▁of▁sentence｜>";
    /// Padding; also fills the unconditional row of classifier-free guidance.
    pub const PAD: &str = "<｜▁pad▁｜>";
    /// Stands for one image in a prompt.
    pub const IMAGE_PLACEHOLDER: &str = "<image_placeholder>";
    /// Opens an image's tokens.
    pub const BEGIN_OF_IMAGE: &str = "<begin_of_image>";
    /// Closes an image's tokens.
    pub const END_OF_IMAGE: &str = "<end_of_image>";
    /// Janus-Pro's user role token.
    pub const USER: &str = "<|User|>";
    /// Janus-Pro's assistant role token.
    pub const ASSISTANT: &str = "<|Assistant|>";
}

/// Ids of the special tokens, read from the tokenizer files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sentence.
    pub bos: u32,
    /// End of sentence.
    pub eos: u32,
    /// Padding (`<｜▁pad▁｜>`).
    pub pad: u32,
    /// `<image_placeholder>`.
    pub image_placeholder: u32,
    /// `<begin_of_image>`.
    pub begin_of_image: u32,
    /// `<end_of_image>`.
    pub end_of_image: u32,
    /// `<|User|>`, when the tokenizer defines it as a token (Janus-Pro).
    pub user: Option<u32>,
    /// `<|Assistant|>`, when the tokenizer defines it as a token (Janus-Pro).
    pub assistant: Option<u32>,
}

/// A Janus tokenizer: `tokenizers` on `tokenizer.json`, with the special ids and BOS rule of the
/// checkpoint's `tokenizer_config.json`.
#[derive(Clone)]
pub struct JanusTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    add_bos: bool,
}

impl std::fmt::Debug for JanusTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JanusTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("special", &self.special)
            .finish()
    }
}

/// A token named in a config file: a plain string or `{"content": "..."}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl JanusTokenizer {
    /// Loads `tokenizer.json` and the special-token settings of a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                message: "no tokenizer.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let read = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if p.is_file() {
                crate::config::read_json(&p).map(Some)
            } else {
                Ok(None)
            }
        };
        let tok_config = read("tokenizer_config.json")?;
        let special_map = read("special_tokens_map.json")?;
        let named = |key: &str| -> Option<String> {
            token_string(tok_config.as_ref().and_then(|c| c.get(key)))
                .or_else(|| token_string(special_map.as_ref().and_then(|c| c.get(key))))
        };
        let add_bos = tok_config
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let id = |s: &str| inner.token_to_id(s);
        let require = |what: &str, s: &str| -> Result<u32> {
            id(s).ok_or_else(|| {
                Error::Tokenizer(format!("{}: no token `{s}` ({what})", path.display()))
            })
        };
        let bos_s = named("bos_token").unwrap_or_else(|| strings::BOS.to_string());
        let eos_s = named("eos_token").unwrap_or_else(|| strings::EOS.to_string());
        // The reference fills CFG rows with `<｜▁pad▁｜>` whatever `pad_token` says.
        let pad = match id(strings::PAD) {
            Some(p) => p,
            None => {
                let s = named("pad_token")
                    .ok_or_else(|| Error::Tokenizer(format!("{}: no pad token", path.display())))?;
                require("pad", &s)?
            }
        };
        let special = SpecialTokens {
            bos: require("beginning of sentence", &bos_s)?,
            eos: require("end of sentence", &eos_s)?,
            pad,
            image_placeholder: require("image placeholder", strings::IMAGE_PLACEHOLDER)?,
            begin_of_image: require("begin of image", strings::BEGIN_OF_IMAGE)?,
            end_of_image: require("end of image", strings::END_OF_IMAGE)?,
            user: id(strings::USER),
            assistant: id(strings::ASSISTANT),
        };
        Ok(JanusTokenizer {
            inner,
            special,
            add_bos,
        })
    }

    /// The special token ids.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of `text`, with BOS first when `add_special` is set and the checkpoint's
    /// tokenizer config asks for it (as transformers' Llama tokenizer does).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special && self.add_bos {
            ids.push(self.special.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
