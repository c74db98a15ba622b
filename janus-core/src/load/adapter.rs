//! LoRA adapters in PEFT's format: a folder with `adapter_config.json` and
//! `adapter_model.safetensors`, whose tensors are named
//! `base_model.model.{module}.lora_A.weight` (`[r, in]`) and `….lora_B.weight` (`[out, r]`), with
//! `{module}` the adapted layer's name in the model PEFT wrapped (transformers'
//! `JanusForConditionalGeneration`, or the official `MultiModalityCausalLM`): the name of its
//! weight in the checkpoint files, less `.weight`.
//!
//! Loading a model with an adapter adds `s·B·A` to each adapted weight as it is read, before the
//! weight takes its storage (so a quantized weight is quantized once, merged). Only plain LoRA is
//! read: DoRA, trained biases, extra trained modules and per-layer rank or alpha patterns are
//! refused by name rather than ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{Error, Result};

/// The prefix PEFT gives every key of a saved adapter.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// One adapted layer's factors, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFactors {
    /// `[rank, d_in]`, row-major.
    pub a: Vec<f32>,
    /// `[d_out, rank]`, row-major.
    pub b: Vec<f32>,
    /// The rank.
    pub rank: usize,
    /// The layer's input width.
    pub d_in: usize,
    /// The layer's output width.
    pub d_out: usize,
}

impl LoraFactors {
    /// `scale·B·A`, `[d_out, d_in]` row-major.
    pub fn delta(&self, scale: f64) -> Vec<f32> {
        use rayon::prelude::*;
        let (r, d_in) = (self.rank, self.d_in);
        let mut out = vec![0f32; self.d_out * d_in];
        out.par_chunks_mut(d_in).enumerate().for_each(|(o, row)| {
            for k in 0..r {
                let coef = (f64::from(self.b[o * r + k]) * scale) as f32;
                for (y, &a) in row.iter_mut().zip(&self.a[k * d_in..(k + 1) * d_in]) {
                    *y += coef * a;
                }
            }
        });
        out
    }
}

/// A LoRA adapter read from a PEFT folder.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// The folder it was read from.
    pub dir: PathBuf,
    /// `r` of the configuration.
    pub rank: usize,
    /// `lora_alpha` of the configuration.
    pub alpha: f64,
    /// `α / r` (or `α / √r` with `use_rslora`).
    pub scale: f64,
    /// The factors by the adapted layer's module name.
    pub layers: BTreeMap<String, LoraFactors>,
}

/// The configuration file's name.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The weights file's name.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

impl LoraAdapter {
    /// Reads an adapter folder.
    ///
    /// # Errors
    /// [`Error::MissingFile`] without `adapter_config.json` or `adapter_model.safetensors`;
    /// [`Error::Config`] for a configuration that is not LoRA's or lacks `r`/`lora_alpha`;
    /// [`Error::Unsupported`] for LoRA variants this reader does not apply (named);
    /// [`Error::Checkpoint`] for a weights file that is malformed or whose tensors do not pair
    /// up into `[r, in]` and `[out, r]` factors of the configuration's rank.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        if !config_path.is_file() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                message: format!("no {ADAPTER_CONFIG}: not a PEFT adapter folder"),
            });
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let (rank, alpha, scale) = read_config(&config_path, &text)?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        if !weights.is_file() {
            let pickled = dir.join("adapter_model.bin").is_file();
            return Err(if pickled {
                Error::Unsupported(format!(
                    "{}: pickled adapters (adapter_model.bin) are not read; save the adapter \
                     with safetensors (PEFT's default)",
                    dir.display()
                ))
            } else {
                Error::MissingFile {
                    dir: dir.to_path_buf(),
                    message: format!("no {ADAPTER_WEIGHTS}"),
                }
            });
        }
        let bytes = std::fs::read(&weights).map_err(|e| Error::io(&weights, e))?;
        let layers = read_factors(&weights, &bytes, rank)?;
        Ok(LoraAdapter {
            dir: dir.to_path_buf(),
            rank,
            alpha,
            scale,
            layers,
        })
    }
}

/// `(r, lora_alpha, scale)` of an adapter configuration.
fn read_config(path: &Path, text: &str) -> Result<(usize, f64, f64)> {
    let bad = |m: String| Error::Config {
        file: path.to_path_buf(),
        message: m,
    };
    let json: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    match json.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "{}: a {other} adapter; only LoRA adapters are read",
                path.display()
            )));
        }
        None => return Err(bad("no \"peft_type\"".into())),
    }
    let rank = json
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("\"r\" must be a positive integer".into()))? as usize;
    let alpha = json
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite())
        .ok_or_else(|| bad("\"lora_alpha\" must be a number".into()))?;
    let flag = |key: &str| json.get(key).and_then(Value::as_bool).unwrap_or(false);
    let unsupported = |what: &str| {
        Err(Error::Unsupported(format!(
            "{}: {what} is not supported (plain LoRA only)",
            path.display()
        )))
    };
    if flag("use_dora") {
        return unsupported("DoRA (\"use_dora\": true)");
    }
    if flag("fan_in_fan_out") {
        return unsupported("\"fan_in_fan_out\": true");
    }
    if json
        .get("bias")
        .and_then(Value::as_str)
        .is_some_and(|b| b != "none")
    {
        return unsupported("training biases (\"bias\" other than \"none\")");
    }
    let non_empty = |key: &str| match json.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    for (key, what) in [
        (
            "modules_to_save",
            "\"modules_to_save\" (extra trained modules)",
        ),
        ("rank_pattern", "\"rank_pattern\" (per-layer ranks)"),
        ("alpha_pattern", "\"alpha_pattern\" (per-layer alphas)"),
        ("layer_replication", "\"layer_replication\""),
    ] {
        if non_empty(key) {
            return unsupported(what);
        }
    }
    let scale = if flag("use_rslora") {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    };
    Ok((rank, alpha, scale))
}

/// The factor pairs of an adapter's weights file, by module name.
fn read_factors(path: &Path, bytes: &[u8], rank: usize) -> Result<BTreeMap<String, LoraFactors>> {
    let bad = |m: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message: m,
    };
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let mut a_of = BTreeMap::new();
    let mut b_of = BTreeMap::new();
    for (name, view) in st.tensors() {
        let Some(module) = name.strip_prefix(PEFT_PREFIX) else {
            return Err(bad(format!(
                "{name}: an adapter key must start with {PEFT_PREFIX:?}"
            )));
        };
        let (module, into) = if let Some(m) = module.strip_suffix(".lora_A.weight") {
            (m, &mut a_of)
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            (m, &mut b_of)
        } else {
            return Err(Error::Unsupported(format!(
                "{}: {name}: only lora_A / lora_B weights of linear layers are read",
                path.display()
            )));
        };
        let shape = view.shape().to_vec();
        if shape.len() != 2 {
            return Err(bad(format!("{name} is {shape:?}, not a matrix")));
        }
        let values = decode(view.dtype(), view.data())
            .ok_or_else(|| bad(format!("{name}: {:?} tensors are not read", view.dtype())))?;
        into.insert(module.to_string(), (shape, values));
    }
    if a_of.is_empty() {
        return Err(bad("no lora_A / lora_B tensors".into()));
    }
    let mut layers = BTreeMap::new();
    for (module, (a_shape, a)) in a_of {
        let Some((b_shape, b)) = b_of.remove(&module) else {
            return Err(bad(format!("{module} has lora_A but no lora_B")));
        };
        if a_shape[0] != rank || b_shape[1] != rank {
            return Err(bad(format!(
                "{module}: lora_A {a_shape:?} and lora_B {b_shape:?} are not of rank {rank} \
                 (the configuration's \"r\")"
            )));
        }
        layers.insert(
            module,
            LoraFactors {
                a,
                b,
                rank,
                d_in: a_shape[1],
                d_out: b_shape[0],
            },
        );
    }
    if let Some(module) = b_of.keys().next() {
        return Err(bad(format!("{module} has lora_B but no lora_A")));
    }
    Ok(layers)
}

/// A tensor's little-endian values as f32 (f32, bf16 or f16).
fn decode(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Writes an adapter folder PEFT loads: `adapter_config.json` (LoRA of rank `rank` and
/// `alpha`, targeting the modules matched by the regular expression `target_modules`, over the
/// model `base`) and `adapter_model.safetensors` with `layers`' factors as f32, each file
/// through a temporary file renamed at the end.
///
/// # Errors
/// [`Error::Io`] when a file cannot be written.
pub fn write_adapter(
    dir: &Path,
    base: &str,
    rank: usize,
    alpha: f64,
    target_modules: &str,
    layers: &BTreeMap<String, LoraFactors>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    crate::files::write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())?;

    let mut owned = Vec::with_capacity(2 * layers.len());
    for (module, f) in layers {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        owned.push((
            format!("{PEFT_PREFIX}{module}.lora_A.weight"),
            vec![f.rank, f.d_in],
            bytes(&f.a),
        ));
        owned.push((
            format!("{PEFT_PREFIX}{module}.lora_B.weight"),
            vec![f.d_out, f.rank],
            bytes(&f.b),
        ));
    }
    let path = dir.join(ADAPTER_WEIGHTS);
    let views = owned
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Checkpoint {
                    path: path.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        message: e.to_string(),
    })?;
    crate::files::write_atomic(&path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors(rank: usize, d_in: usize, d_out: usize, seed: usize) -> LoraFactors {
        let value = |i: usize| ((i * 7919 + seed) % 113) as f32 / 113.0 - 0.5;
        LoraFactors {
            a: (0..rank * d_in).map(value).collect(),
            b: (0..d_out * rank).map(|i| value(i + 50)).collect(),
            rank,
            d_in,
            d_out,
        }
    }

    #[test]
    fn an_adapter_written_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let layers = BTreeMap::from([
            ("model.layers.0.q_proj".to_string(), factors(4, 8, 6, 1)),
            ("model.layers.1.down_proj".to_string(), factors(4, 5, 8, 2)),
        ]);
        write_adapter(dir.path(), "base", 4, 8.0, "x", &layers).unwrap();
        let read = LoraAdapter::open(dir.path()).unwrap();
        assert_eq!((read.rank, read.alpha, read.scale), (4, 8.0, 2.0));
        assert_eq!(read.layers, layers);
    }

    #[test]
    fn the_delta_is_scaled_b_times_a() {
        let f = factors(3, 4, 2, 7);
        let d = f.delta(0.5);
        for o in 0..2 {
            for i in 0..4 {
                let want: f32 = (0..3).map(|k| 0.5 * f.b[o * 3 + k] * f.a[k * 4 + i]).sum();
                assert!((d[o * 4 + i] - want).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn variants_and_bad_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let layers = BTreeMap::from([("m.q_proj".to_string(), factors(2, 3, 3, 1))]);
        write_adapter(dir.path(), "base", 2, 2.0, "x", &layers).unwrap();
        let config = dir.path().join(ADAPTER_CONFIG);
        let original = std::fs::read_to_string(&config).unwrap();
        let with = |key: &str, value: Value| {
            let mut json: Value = serde_json::from_str(&original).unwrap();
            json[key] = value;
            std::fs::write(&config, json.to_string()).unwrap();
            LoraAdapter::open(dir.path())
        };
        for (key, value) in [
            ("use_dora", Value::Bool(true)),
            ("bias", Value::String("all".into())),
            ("modules_to_save", serde_json::json!(["lm_head"])),
            ("rank_pattern", serde_json::json!({"q_proj": 8})),
            ("peft_type", Value::String("IA3".into())),
        ] {
            let err = with(key, value).unwrap_err();
            assert!(
                matches!(&err, Error::Unsupported(m) if m.contains(if key == "peft_type" { "IA3" } else { key })),
                "{key}: {err}"
            );
        }
        let err = with("r", serde_json::json!(3)).unwrap_err();
        assert!(matches!(&err, Error::Checkpoint { message, .. } if message.contains("rank 3")));
        assert!(matches!(
            with("r", Value::Null).unwrap_err(),
            Error::Config { .. }
        ));
        let rs = with("use_rslora", Value::Bool(true)).unwrap();
        assert!((rs.scale - 2.0 / 2f64.sqrt()).abs() < 1e-12);
        std::fs::write(&config, &original).unwrap();
        std::fs::remove_file(dir.path().join(ADAPTER_WEIGHTS)).unwrap();
        assert!(matches!(
            LoraAdapter::open(dir.path()).unwrap_err(),
            Error::MissingFile { .. }
        ));
        assert!(matches!(
            LoraAdapter::open(&dir.path().join("nothing")).unwrap_err(),
            Error::MissingFile { .. }
        ));
    }
}
