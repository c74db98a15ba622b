//! JSON access that names the file and the key path in every error.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub(crate) struct Obj<'a> {
    pub(crate) file: &'a Path,
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    pub(crate) fn root(file: &'a Path, value: &'a Value) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Obj {
                file,
                path: String::new(),
                map,
            }),
            _ => Err(Error::config(
                file,
                "expected a JSON object at the top level",
            )),
        }
    }

    pub(crate) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(crate) fn err(&self, key: &str, msg: &str) -> Error {
        Error::config(self.file, format!("key `{}`: {msg}", self.key_path(key)))
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    pub(crate) fn obj(&self, key: &str) -> Result<Obj<'a>> {
        self.opt_obj(key)?
            .ok_or_else(|| self.err(key, "missing (expected an object)"))
    }

    pub(crate) fn opt_obj(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj {
                file: self.file,
                path: self.key_path(key),
                map,
            })),
            Some(_) => Err(self.err(key, "expected an object")),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a non-negative integer")),
        }
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(key, "missing (expected an integer)"))
    }

    pub(crate) fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(key, "expected an integer")),
        }
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a finite number")),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(key, "expected true or false")),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(self.err(key, "expected a string")),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?
            .ok_or_else(|| self.err(key, "missing (expected a string)"))
    }

    pub(crate) fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.err(key, "expected a list of non-negative integers")),
            Some(_) => Err(self.err(key, "expected a list")),
        }
    }

    /// A list of three finite numbers.
    pub(crate) fn opt_triple(&self, key: &str) -> Result<Option<[f64; 3]>> {
        let Some(v) = self.map.get(key).filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let bad = || self.err(key, "expected a list of 3 numbers");
        let list = v.as_array().ok_or_else(bad)?;
        if list.len() != 3 {
            return Err(bad());
        }
        let mut out = [0f64; 3];
        for (o, x) in out.iter_mut().zip(list) {
            *o = x.as_f64().filter(|f| f.is_finite()).ok_or_else(bad)?;
        }
        Ok(Some(out))
    }

    /// transformers' `size`: an integer, or `{"height": S, "width": S}`.
    pub(crate) fn opt_square_size(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.map.get(key).filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        if v.is_number() {
            return self.opt_usize(key);
        }
        let size = self.obj(key)?;
        let (h, w) = (size.opt_usize("height")?, size.opt_usize("width")?);
        match (h, w) {
            (Some(h), Some(w)) if h == w => Ok(Some(h)),
            (Some(h), Some(w)) => Err(Error::Unsupported(format!(
                "{}: {} is {h}x{w}; the Janus image processor needs a square size",
                self.file.display(),
                self.key_path(key)
            ))),
            _ => Err(self.err(
                key,
                "expected an integer or {\"height\": S, \"width\": S} (the Janus image processor needs both)",
            )),
        }
    }

    /// A positive size: zero is as wrong as a missing key.
    pub(crate) fn positive(&self, key: &str, value: usize) -> Result<usize> {
        if value == 0 {
            Err(self.err(key, "must be positive"))
        } else {
            Ok(value)
        }
    }
}

/// The largest JSON file of a model folder read (configs, shard indexes, processor and
/// tokenizer configs are kilobytes to a few megabytes).
pub(crate) const MAX_JSON_BYTES: u64 = 64 << 20;

/// Reads and parses a JSON file (a regular file of at most [`MAX_JSON_BYTES`]), naming the file
/// in any error.
pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let bytes = crate::files::read_bounded(path, MAX_JSON_BYTES, "JSON file")?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| Error::config(path, format!("not UTF-8 text: {e}")))?;
    serde_json::from_str(text).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))
}
