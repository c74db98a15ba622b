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
    /// How special tokens are added: by `add_bos_token`/`add_eos_token` of the tokenizer config
    /// (transformers 4's Llama tokenizer), or, when the config names neither, by the
    /// post-processor of `tokenizer.json` (transformers 5).
    specials: AddSpecial,
    /// The special-token strings by their config names (`bos_token`, …, `image_token`), as
    /// transformers' `special_tokens_map` offers them to chat templates.
    named: Vec<(String, String)>,
}

impl std::fmt::Debug for JanusTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JanusTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("special", &self.special)
            .finish()
    }
}

/// Where the special tokens of an encoding come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AddSpecial {
    /// `add_bos_token` / `add_eos_token` of `tokenizer_config.json` (absent ones take the Llama
    /// tokenizer's defaults: BOS yes, EOS no).
    Flags { bos: bool, eos: bool },
    /// `tokenizer.json`'s post-processor.
    PostProcessor,
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
        if !path.exists() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                message: "no tokenizer.json".into(),
            });
        }
        let bytes = crate::files::read_bounded(&path, crate::config::MAX_JSON_BYTES, "tokenizer")?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let read = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if p.exists() {
                crate::config::read_json(&p).map(Some)
            } else {
                Ok(None)
            }
        };
        let tok_config = read("tokenizer_config.json")?;
        let special_map = read("special_tokens_map.json")?;
        // transformers 5 writes the image tokens as top-level keys; 4.x inside an
        // `extra_special_tokens` map.
        let named = |key: &str| -> Option<String> {
            let from = |c: &Option<Value>| {
                let c = c.as_ref()?;
                token_string(c.get(key))
                    .or_else(|| token_string(c.get("extra_special_tokens")?.get(key)))
            };
            from(&tok_config).or_else(|| from(&special_map))
        };
        let flag = |key: &str| -> Result<Option<bool>> {
            match tok_config.as_ref().and_then(|c| c.get(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(Error::config(
                    dir.join("tokenizer_config.json"),
                    format!("key `{key}`: expected true or false"),
                )),
            }
        };
        let specials = match (flag("add_bos_token")?, flag("add_eos_token")?) {
            (None, None) => AddSpecial::PostProcessor,
            (bos, eos) => AddSpecial::Flags {
                bos: bos.unwrap_or(true),
                eos: eos.unwrap_or(false),
            },
        };
        let id = |s: &str| inner.token_to_id(s);
        let require = |what: &str, s: &str| -> Result<u32> {
            id(s).ok_or_else(|| {
                Error::Tokenizer(format!("{}: no token `{s}` ({what})", path.display()))
            })
        };
        let bos_s = named("bos_token").unwrap_or_else(|| strings::BOS.to_string());
        let eos_s = named("eos_token").unwrap_or_else(|| strings::EOS.to_string());
        let image_s =
            named("image_token").unwrap_or_else(|| strings::IMAGE_PLACEHOLDER.to_string());
        let boi_s = named("boi_token").unwrap_or_else(|| strings::BEGIN_OF_IMAGE.to_string());
        let eoi_s = named("eoi_token").unwrap_or_else(|| strings::END_OF_IMAGE.to_string());
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
            image_placeholder: require("image placeholder", &image_s)?,
            begin_of_image: require("begin of image", &boi_s)?,
            end_of_image: require("end of image", &eoi_s)?,
            user: id(strings::USER),
            assistant: id(strings::ASSISTANT),
        };
        let mut named_tokens = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(v) = named(key) {
                named_tokens.push((key.to_string(), v));
            }
        }
        for (key, v) in [
            ("boi_token", boi_s),
            ("eoi_token", eoi_s),
            ("image_token", image_s),
        ] {
            named_tokens.push((key.to_string(), v));
        }
        Ok(JanusTokenizer {
            inner,
            special,
            specials,
            named: named_tokens,
        })
    }

    /// The special-token strings a chat template sees as variables (`bos_token`, `eos_token`,
    /// `pad_token`, `image_token`, …), as transformers passes its `special_tokens_map`.
    pub fn template_tokens(&self) -> Vec<(String, String)> {
        self.named.clone()
    }

    /// The string that stands for one image in a prompt (`<image_placeholder>`).
    pub fn image_token(&self) -> &str {
        self.named
            .iter()
            .find(|(k, _)| k == "image_token")
            .map_or(strings::IMAGE_PLACEHOLDER, |(_, v)| v.as_str())
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

    /// Token ids of `text`, with the special tokens the checkpoint's tokenizer adds when
    /// `add_special` is set (BOS first for every Janus tokenizer), as transformers encodes.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let post = add_special && self.specials == AddSpecial::PostProcessor;
        let enc = self
            .inner
            .encode(text, post)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        let flags = match self.specials {
            AddSpecial::Flags { bos, eos } if add_special => (bos, eos),
            _ => (false, false),
        };
        if flags.0 {
            ids.push(self.special.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        if flags.1 {
            ids.push(self.special.eos);
        }
        Ok(ids)
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
