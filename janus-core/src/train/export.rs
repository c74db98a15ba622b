//! A trained model saved as a folder in its input's layout: the input's weight files rewritten
//! with the trained values (every other tensor's bytes as they were, each file's dtype kept),
//! and its other files (config, tokenizer, processor, chat template) copied, so that janus-rs
//! and the reference libraries load it as they load the input. Pickled weights
//! (`pytorch_model.bin`, as the original-layout checkpoints ship) are written as safetensors
//! (`model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with their index), never
//! as a pickle.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::params::{HostParam, values};
use crate::error::{Error, Result};
use crate::load::{Checkpoint, FileKeys, StoredDType};
use crate::pipeline::Janus;

/// Writes `janus`'s model into `out` (created if missing; never the folder it was loaded
/// from): each weight file of the input again under its name, the adaptors', heads' and
/// language model's parameters with their current values, in the dtype the file stores.
///
/// # Errors
/// [`Error::InvalidInput`] when `out` is the input folder; [`Error::Unsupported`] for a
/// pickled tensor of a dtype safetensors does not hold here; [`Error::Io`] for a file that
/// cannot be read or written.
pub fn save_model(janus: &Janus, out: &Path) -> Result<()> {
    let dir = janus.dir();
    check_out(dir, out)?;
    let ckpt = Checkpoint::open(dir)?;
    let files = ckpt.files().to_vec();
    let trained = trained_by_file_key(janus)?;
    let mut written = 0;
    if ckpt.is_pickled() {
        written += convert_pickled(&ckpt, out, &trained)?;
    } else {
        for file in &files {
            let name = file.file_name().expect("a weight file has a name");
            written += rewrite(file, &out.join(name), &trained)?;
        }
    }
    if written != trained.len() {
        return Err(Error::InvalidInput(format!(
            "{} trained tensors, {written} found in the weight files",
            trained.len()
        )));
    }
    // Everything else of the folder: configuration, tokenizer, processor, template, index.
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let weights = files.iter().any(|f| f == &path)
            || matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("safetensors" | "bin" | "pt" | "pth")
            )
            || name == "pytorch_model.bin.index.json"
            || name == "model.safetensors.index.json" && ckpt.is_pickled();
        if path.is_file() && !weights {
            let to = out.join(entry.file_name());
            std::fs::copy(&path, &to).map_err(|e| Error::io(&to, e))?;
        }
    }
    Ok(())
}

/// Creates `out` if missing, and checks that it is not the model folder `dir` (what
/// [`save_model`] does first; a command checks it before it trains).
///
/// # Errors
/// [`Error::InvalidInput`] when `out` is `dir`; [`Error::Io`] when `out` cannot be created.
pub fn check_out(dir: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let same = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?
        == std::fs::canonicalize(out).map_err(|e| Error::io(out, e))?;
    if same {
        return Err(Error::InvalidInput(format!(
            "{}: a trained model is not saved over the folder it was loaded from",
            out.display()
        )));
    }
    Ok(())
}

/// The trained parameters' values by the file key that holds each.
fn trained_by_file_key(janus: &Janus) -> Result<HashMap<String, HostParam>> {
    let model = janus.model();
    let keys = FileKeys::new(model.config.layout);
    let mut by_key = HashMap::new();
    for p in values(&model.heads).into_iter().chain(values(&model.llm)) {
        let Some(name) = model.param_names.get(&p.id) else {
            return Err(Error::InvalidInput(format!(
                "the parameter {} has no name in the checkpoint",
                p.path
            )));
        };
        match keys.file_keys(name).as_slice() {
            [key] => {
                by_key.insert(key.clone(), p);
            }
            many => {
                return Err(Error::Unsupported(format!(
                    "{name} is stored as {} tensors; saving it is not supported",
                    many.len()
                )));
            }
        }
    }
    Ok(by_key)
}

/// `src` written to `dst` (through a temporary file renamed at the end), the tensors named in
/// `trained` replaced. Returns how many were.
fn rewrite(src: &Path, dst: &Path, trained: &HashMap<String, HostParam>) -> Result<usize> {
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    let bad = |m: String| Error::Checkpoint {
        path: src.to_path_buf(),
        message: m,
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut replaced = 0;
    for (name, view) in st.tensors() {
        let data = match trained.get(&name) {
            Some(p) => {
                if p.shape != view.shape() {
                    return Err(bad(format!(
                        "{name} is {:?} in the file, {:?} in the model",
                        view.shape(),
                        p.shape
                    )));
                }
                replaced += 1;
                encode(&p.values, view.dtype()).ok_or_else(|| {
                    bad(format!(
                        "{name}: saving {:?} tensors is not supported",
                        view.dtype()
                    ))
                })?
            }
            None => view.data().to_vec(),
        };
        owned.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let partial = dst.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, metadata.metadata().clone(), &partial)
        .map_err(|e| bad(format!("writing {}: {e}", partial.display())))?;
    std::fs::rename(&partial, dst).map_err(|e| Error::io(dst, e))?;
    Ok(replaced)
}

/// A tensor to write: name, dtype, shape, bytes.
type Entry<'a> = (String, Dtype, Vec<usize>, std::borrow::Cow<'a, [u8]>);

/// The safetensors file that holds a pickled weight file's tensors: `pytorch_model.bin` →
/// `model.safetensors`, `pytorch_model-00001-of-00002.bin` → `model-00001-of-00002.safetensors`.
fn safetensors_name(pickled: &Path) -> String {
    let stem = pickled
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("pytorch_model");
    let rest = stem.strip_prefix("pytorch_model").unwrap_or(stem);
    format!("model{rest}.safetensors")
}

/// A pickled checkpoint written as safetensors into `out`, file for file (with an index when
/// sharded), the tensors named in `trained` replaced; every tensor keeps its name, shape and
/// dtype. Returns how many were replaced.
fn convert_pickled(
    ckpt: &Checkpoint,
    out: &Path,
    trained: &HashMap<String, HostParam>,
) -> Result<usize> {
    let files = ckpt.files();
    let mut replaced = 0;
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, file) in files.iter().enumerate() {
        let name = safetensors_name(file);
        let dst = out.join(&name);
        let bad = |m: String| Error::Checkpoint {
            path: file.clone(),
            message: m,
        };
        let mut owned: Vec<Entry<'_>> = Vec::new();
        for (key, dtype, shape, bytes) in ckpt.file_tensors(i)? {
            let dtype = match dtype {
                StoredDType::F32 => Dtype::F32,
                StoredDType::F16 => Dtype::F16,
                StoredDType::BF16 => Dtype::BF16,
                StoredDType::F64 => Dtype::F64,
                StoredDType::Other(d) => {
                    return Err(Error::Unsupported(format!(
                        "{}: tensor {key} is {d}; writing it as safetensors is not supported",
                        file.display()
                    )));
                }
            };
            let data = match trained.get(&key) {
                Some(p) => {
                    if p.shape != shape {
                        return Err(bad(format!(
                            "{key} is {shape:?} in the file, {:?} in the model",
                            p.shape
                        )));
                    }
                    replaced += 1;
                    std::borrow::Cow::Owned(encode(&p.values, dtype).ok_or_else(|| {
                        bad(format!("{key}: saving {dtype:?} tensors is not supported"))
                    })?)
                }
                None => bytes,
            };
            total += data.len();
            weight_map.insert(key.clone(), serde_json::Value::String(name.clone()));
            owned.push((key, dtype, shape, data));
        }
        let views = owned
            .iter()
            .map(|(key, dtype, shape, data)| {
                TensorView::new(*dtype, shape.clone(), data)
                    .map(|v| (key.clone(), v))
                    .map_err(|e| bad(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let partial = dst.with_extension("safetensors.partial");
        safetensors::serialize_to_file(views, Some(metadata), &partial)
            .map_err(|e| bad(format!("writing {}: {e}", partial.display())))?;
        std::fs::rename(&partial, &dst).map_err(|e| Error::io(&dst, e))?;
    }
    if files.len() > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let text = serde_json::to_string_pretty(&index).expect("a JSON value serializes");
        crate::files::write_atomic(&out.join("model.safetensors.index.json"), text.as_bytes())?;
    }
    Ok(replaced)
}

/// f32 values as a file dtype's little-endian bytes (f32, bf16 or f16, rounded to nearest).
fn encode(values: &[f32], dtype: Dtype) -> Option<Vec<u8>> {
    Some(match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        _ => return None,
    })
}
