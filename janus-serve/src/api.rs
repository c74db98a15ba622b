//! OpenAI's request shapes, read into the library's types: chat completions (messages with text
//! and image parts) and image generations. Unknown fields are ignored; a known field of the
//! wrong type or out of range is a 400 naming it. Omitted fields mean what `janus understand` /
//! `janus generate` default to.

use base64::Engine as _;
use janus_core::generate::image::ImageGenOptions;
use janus_core::generate::sampling::Sampling;
use janus_core::generate::text::TextGenOptions;
use janus_core::pipeline::{Role, Turn};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// What the request parser may do and accept.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most images in one request (`--max-images`).
    pub max_images: usize,
    /// Most pixels of one image (`--max-image-pixels`), checked from its header before it is
    /// decoded.
    pub max_image_pixels: u64,
    /// Whether `http(s)` image URLs are fetched.
    pub allow_remote_images: bool,
    /// Most bytes read for one remote image.
    pub max_image_bytes: usize,
}

/// A chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The conversation (system turns first, then user and assistant alternating).
    pub turns: Vec<Turn>,
    /// Decoding options.
    pub options: TextGenOptions,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Whether to answer as server-sent events.
    pub stream: bool,
    /// With `stream`: whether a last chunk carries `usage`.
    pub include_usage: bool,
    /// The request's `model`, echoed back.
    pub model: Option<String>,
}

/// An image generation request.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// What to draw.
    pub prompt: String,
    /// Generation options (`count` is the request's `n`).
    pub options: ImageGenOptions,
}

/// The JSON body as an object.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!("malformed JSON: {e}"))),
    }
}

/// A field, `None` when absent or null.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn wrong(name: &str, want: &str, got: &Value) -> ApiError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::bad_param(name, format!("`{name}` must be {want}, not {kind}"))
}

fn opt_bool(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    field(obj, name)
        .map(|v| v.as_bool().ok_or_else(|| wrong(name, "a boolean", v)))
        .transpose()
}

fn opt_uint(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, ApiError> {
    field(obj, name)
        .map(|v| v.as_u64().ok_or_else(|| wrong(name, "an integer ≥ 0", v)))
        .transpose()
}

fn opt_number(obj: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    field(obj, name)
        .map(|v| v.as_f64().ok_or_else(|| wrong(name, "a number", v)))
        .transpose()
}

fn opt_str<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ApiError> {
    field(obj, name)
        .map(|v| v.as_str().ok_or_else(|| wrong(name, "a string", v)))
        .transpose()
}

fn temperature(obj: &Map<String, Value>) -> Result<Option<f32>, ApiError> {
    match opt_number(obj, "temperature")? {
        Some(t) if !(t >= 0.0 && t.is_finite()) => Err(ApiError::bad_param(
            "temperature",
            format!("`temperature` must be ≥ 0, not {t}"),
        )),
        t => Ok(t.map(|t| t as f32)),
    }
}

fn top_p(obj: &Map<String, Value>) -> Result<Option<f32>, ApiError> {
    match opt_number(obj, "top_p")? {
        Some(p) if !(p > 0.0 && p <= 1.0) => Err(ApiError::bad_param(
            "top_p",
            format!("`top_p` must be in (0, 1], not {p}"),
        )),
        // 1 keeps every token: the same as no top-p.
        Some(p) if p >= 1.0 => Ok(None),
        p => Ok(p.map(|p| p as f32)),
    }
}

/// Reads a chat completion request. Images are decoded here (and fetched, when remote images are
/// allowed), so this runs off the async threads.
pub fn chat_request(body: &[u8], limits: &Limits) -> Result<ChatRequest, ApiError> {
    let obj = object(body)?;
    let model = opt_str(&obj, "model")?.map(str::to_string);
    let n = opt_uint(&obj, "n")?.unwrap_or(1);
    if n != 1 {
        return Err(ApiError::bad_param("n", "only `n` = 1 is served"));
    }
    let max_tokens = match (
        opt_uint(&obj, "max_completion_tokens")?,
        opt_uint(&obj, "max_tokens")?,
    ) {
        (Some(a), _) => Some(("max_completion_tokens", a)),
        (None, Some(b)) => Some(("max_tokens", b)),
        (None, None) => None,
    };
    let mut options = TextGenOptions::default();
    if let Some((name, v)) = max_tokens {
        if v == 0 {
            return Err(ApiError::bad_param(
                name,
                format!("`{name}` must be at least 1"),
            ));
        }
        options.max_new_tokens = usize::try_from(v)
            .ok()
            .filter(|&v| v <= options.max_context)
            .ok_or_else(|| {
                ApiError::bad_param(
                    name,
                    format!(
                        "`{name}` {v} is past the context of {}",
                        options.max_context
                    ),
                )
            })?;
    }
    options.sampling = Sampling {
        temperature: temperature(&obj)?.unwrap_or(0.0),
        top_k: None,
        top_p: top_p(&obj)?,
    };
    options.seed = opt_uint(&obj, "seed")?.unwrap_or(0);
    let stop = match field(&obj, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong("stop", "a string or an array of strings", v))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong("stop", "a string or an array of strings", v)),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_param(
            "stop",
            "`stop` takes up to 4 non-empty strings",
        ));
    }
    let stream = opt_bool(&obj, "stream")?.unwrap_or(false);
    let include_usage = match field(&obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")?.unwrap_or(false),
        Some(v) => return Err(wrong("stream_options", "an object", v)),
    };
    let turns = messages(&obj, limits)?;
    Ok(ChatRequest {
        turns,
        options,
        stop,
        stream,
        include_usage,
        model,
    })
}

/// The conversation: consecutive messages of one role become one turn (texts joined by a line
/// break, images kept in order).
fn messages(obj: &Map<String, Value>, limits: &Limits) -> Result<Vec<Turn>, ApiError> {
    let list = match field(obj, "messages") {
        None => return Err(ApiError::bad_param("messages", "`messages` is required")),
        Some(Value::Array(list)) if list.is_empty() => {
            return Err(ApiError::bad_param("messages", "`messages` is empty"));
        }
        Some(Value::Array(list)) => list,
        Some(v) => return Err(wrong("messages", "an array", v)),
    };
    let mut turns: Vec<Turn> = Vec::new();
    let mut images = 0;
    for (i, m) in list.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(wrong(&param, "an object", m));
        };
        let role = match opt_str(m, "role").map_err(|e| ApiError {
            param: Some(format!("{param}.role")),
            ..e
        })? {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(ApiError::bad_param(
                    &format!("{param}.role"),
                    format!("role {other:?} is not served (system, user or assistant)"),
                ));
            }
            None => {
                return Err(ApiError::bad_param(
                    &format!("{param}.role"),
                    "a message needs a `role`",
                ));
            }
        };
        let (text, pictures) = content(m.get("content"), &param, limits)?;
        if !pictures.is_empty() && role != Role::User {
            return Err(ApiError::bad_param(
                &format!("{param}.content"),
                "images go in user messages",
            ));
        }
        images += pictures.len();
        if images > limits.max_images {
            return Err(ApiError::bad_param(
                &format!("{param}.content"),
                format!(
                    "more than {} images in one request (--max-images)",
                    limits.max_images
                ),
            ));
        }
        match turns.last_mut() {
            Some(last) if last.role == role => {
                if !text.is_empty() {
                    if !last.content.is_empty() {
                        last.content.push('\n');
                    }
                    last.content.push_str(&text);
                }
                last.images.extend(pictures);
            }
            _ => turns.push(Turn {
                role,
                content: text,
                images: pictures,
            }),
        }
    }
    Ok(turns)
}

/// A message's text (its text parts joined by line breaks) and images.
fn content(
    value: Option<&Value>,
    param: &str,
    limits: &Limits,
) -> Result<(String, Vec<image::RgbImage>), ApiError> {
    let param = format!("{param}.content");
    match value {
        Some(Value::String(s)) => Ok((s.clone(), Vec::new())),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            let mut images = Vec::new();
            for (k, part) in parts.iter().enumerate() {
                let here = format!("{param}[{k}]");
                let Value::Object(part) = part else {
                    return Err(wrong(&here, "an object", part));
                };
                match opt_str(part, "type")? {
                    Some("text") => match field(part, "text") {
                        Some(Value::String(t)) => texts.push(t.clone()),
                        Some(v) => return Err(wrong(&format!("{here}.text"), "a string", v)),
                        None => {
                            return Err(ApiError::bad_param(&here, "a text part needs `text`"));
                        }
                    },
                    Some("image_url") => {
                        let url = match field(part, "image_url") {
                            Some(Value::Object(o)) => opt_str(o, "url")?,
                            Some(Value::String(s)) => Some(s.as_str()),
                            Some(v) => {
                                return Err(wrong(&format!("{here}.image_url"), "an object", v));
                            }
                            None => None,
                        };
                        let url = url.ok_or_else(|| {
                            ApiError::bad_param(&here, "an image_url part needs `image_url.url`")
                        })?;
                        images.push(load_image(url, &here, limits)?);
                    }
                    Some(other) => {
                        return Err(ApiError::bad_param(
                            &here,
                            format!("content parts of type {other:?} are not served"),
                        ));
                    }
                    None => return Err(ApiError::bad_param(&here, "a content part needs `type`")),
                }
            }
            Ok((texts.join("\n"), images))
        }
        Some(Value::Null) | None => Err(ApiError::bad_param(&param, "a message needs `content`")),
        Some(v) => Err(wrong(&param, "a string or an array of parts", v)),
    }
}

/// An image from a `data:image/…;base64,` URL, or (when allowed) an `http(s)` URL.
fn load_image(url: &str, param: &str, limits: &Limits) -> Result<image::RgbImage, ApiError> {
    let bytes = if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::bad_param(param, "a data URL without a comma"))?;
        if !meta.starts_with("image/") || !meta.ends_with(";base64") {
            return Err(ApiError::bad_param(
                param,
                "image data URLs must be `data:image/<type>;base64,…`",
            ));
        }
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::bad_param(param, format!("bad base64 in the image: {e}")))?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        if !limits.allow_remote_images {
            return Err(ApiError::bad_param(
                param,
                "remote image URLs are refused (start the server with --allow-remote-images); \
                 send the image as a data:image/…;base64 URL",
            ));
        }
        fetch(url, limits.max_image_bytes)
            .map_err(|e| ApiError::bad_param(param, format!("fetching {url}: {e}")))?
    } else {
        return Err(ApiError::bad_param(
            param,
            "an image must be a data:image/…;base64 URL (local paths are never read)",
        ));
    };
    let within = janus_core::Limits {
        max_image_pixels: limits.max_image_pixels,
        ..janus_core::Limits::default()
    };
    janus_core::processor::image::decode_image_within(&bytes, &within)
        .map_err(|e| ApiError::bad_param(param, format!("not a readable image: {e}")))
}

/// Reads a remote image, at most `limit` bytes.
fn fetch(url: &str, limit: usize) -> Result<Vec<u8>, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(limit as u64)
        .read_to_vec()
        .map_err(|e| e.to_string())
}

/// Reads an image generation request; `size` is the model's image side.
pub fn image_request(body: &[u8], size: usize) -> Result<ImageRequest, ApiError> {
    let obj = object(body)?;
    let prompt = match opt_str(&obj, "prompt")? {
        Some(p) if !p.trim().is_empty() => p.to_string(),
        _ => return Err(ApiError::bad_param("prompt", "`prompt` is required")),
    };
    let want = format!("{size}x{size}");
    if let Some(s) = opt_str(&obj, "size")?
        && s != want
    {
        return Err(ApiError::bad_param(
            "size",
            format!("this model draws {want} images, not {s}"),
        ));
    }
    match opt_str(&obj, "response_format")? {
        None | Some("b64_json") => {}
        Some(other) => {
            return Err(ApiError::bad_param(
                "response_format",
                format!("only `b64_json` is served, not {other:?}"),
            ));
        }
    }
    let mut options = ImageGenOptions::default();
    let n = opt_uint(&obj, "n")?.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::bad_param("n", "`n` must be 1 to 16"));
    }
    options.count = n as usize;
    options.seed = opt_uint(&obj, "seed")?.unwrap_or(0);
    if let Some(w) = opt_number(&obj, "cfg_weight")? {
        if !w.is_finite() {
            return Err(ApiError::bad_param(
                "cfg_weight",
                "`cfg_weight` must be finite",
            ));
        }
        options.cfg_weight = w as f32;
    }
    if let Some(t) = temperature(&obj)? {
        options.sampling.temperature = t;
    }
    options.sampling.top_p = top_p(&obj)?;
    options.sampling.top_k = match opt_uint(&obj, "top_k")? {
        Some(0) => return Err(ApiError::bad_param("top_k", "`top_k` must be at least 1")),
        k => k.map(|k| k as usize),
    };
    Ok(ImageRequest { prompt, options })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_images: 2,
            max_image_pixels: 50_000_000,
            allow_remote_images: false,
            max_image_bytes: 1 << 20,
        }
    }

    fn png_url() -> String {
        let img = image::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(out.into_inner())
        )
    }

    fn chat(body: Value) -> Result<ChatRequest, ApiError> {
        chat_request(body.to_string().as_bytes(), &limits())
    }

    #[test]
    fn a_chat_request_becomes_turns_and_options() {
        let r = chat(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": png_url()}},
                    {"type": "text", "text": "What is it?"}
                ]},
                {"role": "user", "content": "And the colour?"},
            ],
            "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
            "stop": "END", "stream": true, "stream_options": {"include_usage": true},
            "unknown_field": [1, 2]
        }))
        .unwrap();
        assert_eq!(r.turns.len(), 2);
        assert_eq!(r.turns[0].role, Role::System);
        assert_eq!(r.turns[1].content, "What is it?\nAnd the colour?");
        assert_eq!(r.turns[1].images.len(), 1);
        assert_eq!(r.turns[1].images[0].dimensions(), (3, 2));
        assert_eq!(r.options.max_new_tokens, 7);
        assert_eq!(r.options.sampling.temperature, 0.5);
        assert_eq!(r.options.sampling.top_p, Some(0.9));
        assert_eq!(r.options.seed, 3);
        assert_eq!(r.stop, ["END"]);
        assert!(r.stream && r.include_usage);
        let d = chat(serde_json::json!({"messages": [{"role": "user", "content": "Hi"}]})).unwrap();
        assert_eq!(
            d.options,
            TextGenOptions::default(),
            "omitted fields are the defaults"
        );
        assert!(!d.stream);
    }

    #[test]
    fn bad_chat_requests_name_the_field() {
        let param = |body: Value| chat(body).unwrap_err().param;
        let user = serde_json::json!([{"role": "user", "content": "Hi"}]);
        assert_eq!(param(serde_json::json!({})), Some("messages".into()));
        assert_eq!(
            param(serde_json::json!({"messages": user, "max_tokens": "5"})),
            Some("max_tokens".into())
        );
        assert_eq!(
            param(serde_json::json!({"messages": user, "temperature": -1})),
            Some("temperature".into())
        );
        assert_eq!(
            param(serde_json::json!({"messages": user, "n": 2})),
            Some("n".into())
        );
        assert_eq!(
            param(serde_json::json!({"messages": user, "stop": [1]})),
            Some("stop".into())
        );
        assert_eq!(
            param(serde_json::json!({"messages": [{"role": "tool", "content": "x"}]})),
            Some("messages[0].role".into())
        );
        let image = |url: &str| {
            serde_json::json!({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}]})
        };
        for url in [
            "https://example.com/a.png",
            "/etc/passwd",
            "file:///etc/passwd",
            "data:image/png;base64,@@@",
            "data:image/png;base64,aGVsbG8=",
            "data:text/plain;base64,aGVsbG8=",
        ] {
            let e = chat(image(url)).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{url}");
            assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"), "{url}");
        }
        let three = serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_url()}},
            {"type": "image_url", "image_url": {"url": png_url()}},
            {"type": "image_url", "image_url": {"url": png_url()}}]}]});
        assert!(chat(three).unwrap_err().message.contains("--max-images"));
        let e = chat_request(b"{not json", &limits()).unwrap_err();
        assert!(e.message.starts_with("malformed JSON"));
    }

    #[test]
    fn an_image_request_becomes_options() {
        let r = image_request(
            br#"{"prompt": "a fox", "n": 2, "size": "384x384", "response_format": "b64_json",
                 "seed": 9, "cfg_weight": 4.5, "temperature": 0, "top_k": 5}"#,
            384,
        )
        .unwrap();
        assert_eq!(r.prompt, "a fox");
        assert_eq!(r.options.count, 2);
        assert_eq!(r.options.seed, 9);
        assert_eq!(r.options.cfg_weight, 4.5);
        assert!(r.options.sampling.is_greedy());
        assert_eq!(r.options.sampling.top_k, Some(5));
        let d = image_request(br#"{"prompt": "a fox"}"#, 384).unwrap();
        assert_eq!(d.options, ImageGenOptions::default());
        let param = |b: &[u8]| image_request(b, 384).unwrap_err().param;
        assert_eq!(
            param(br#"{"prompt": "x", "size": "512x512"}"#),
            Some("size".into())
        );
        assert_eq!(
            param(br#"{"prompt": "x", "response_format": "url"}"#),
            Some("response_format".into())
        );
        assert_eq!(param(br#"{"prompt": ""}"#), Some("prompt".into()));
        assert_eq!(param(br#"{"prompt": "x", "n": 0}"#), Some("n".into()));
        assert_eq!(
            param(br#"{"prompt": "x", "seed": -1}"#),
            Some("seed".into())
        );
    }
}
