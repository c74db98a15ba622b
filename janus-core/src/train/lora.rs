//! LoRA fine-tuning of the language model: adapters on every decoder layer's `q, k, v, o, gate,
//! up, down` projections ([`crate::nn::lora::Lora`]), saved in PEFT's format under the module
//! names of the model PEFT would wrap (transformers' Janus for the Hugging Face layout, the
//! official model for the original one), or merged into the weights.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;

use crate::error::{Error, Result};
use crate::generate::sampling::stream;
use crate::load::FileKeys;
use crate::load::adapter::{LoraAdapter, LoraFactors, write_adapter};
use crate::nn::llm::Llm;
use crate::nn::lora::Lora;
use crate::nn::weight::Matrix;
use crate::pipeline::Janus;

/// The adapters' shape: rank `r` and `α` (the term is scaled by `α / r`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraOptions {
    /// The rank.
    pub rank: usize,
    /// `α`; [`LoraOptions::new`] takes `α = r` (scale 1).
    pub alpha: f64,
}

impl LoraOptions {
    /// Rank `rank`, `α = rank`.
    pub fn new(rank: usize) -> Self {
        LoraOptions {
            rank,
            alpha: rank as f64,
        }
    }

    /// Whether the options are in range.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a zero rank or an `α` that is not a positive number.
    pub fn check(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidInput(
                "the LoRA rank must be at least 1".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::InvalidInput(
                "the LoRA alpha must be a positive number".into(),
            ));
        }
        Ok(())
    }
}

/// Whether the language model carries adapters.
pub fn has_adapters(janus: &Janus) -> bool {
    janus
        .model()
        .llm
        .projections()
        .iter()
        .any(|(_, _, l)| l.lora().is_some())
}

/// Puts a fresh adapter (PEFT's initialisation: `A` uniform in `±1/√in`, `B` zero, drawn from
/// `seed`) on every projection of the language model, replacing any it had. The model is
/// unchanged until the adapters train.
///
/// # Errors
/// [`Error::InvalidInput`] for options out of range.
pub fn attach(janus: &mut Janus, options: &LoraOptions, seed: u64) -> Result<()> {
    options.check()?;
    let device = janus.device().clone();
    let mut rng = stream(seed, 2);
    for (_, _, layer) in janus.model_mut().llm.projections_mut() {
        let [out, d_in] = layer.weight().dims();
        let lora = Lora::new(d_in, out, options.rank, options.alpha, &mut rng, &device);
        layer.set_lora(Some(lora));
    }
    Ok(())
}

/// Puts `adapter`'s factors (read from a PEFT folder, [`LoraAdapter::open`]) on the
/// projections they adapt, as trainable adapters (to train further, or to compare with the
/// reference's gradients); projections it does not adapt keep none.
///
/// # Errors
/// [`Error::InvalidInput`] when the adapter names a layer that is not one of the language
/// model's projections, or its widths do not fit the layer.
pub fn attach_adapter(janus: &mut Janus, adapter: &LoraAdapter) -> Result<()> {
    let keys = FileKeys::new(janus.model().config.layout);
    let device = janus.device().clone();
    let mut used = 0;
    let mut lorae = Vec::new();
    for (i, name, layer) in janus.model().llm.projections() {
        let module = module_name(&keys, i, name)?;
        let Some(f) = adapter.layers.get(&module) else {
            lorae.push(None);
            continue;
        };
        let [out, d_in] = layer.weight().dims();
        if (f.d_in, f.d_out) != (d_in, out) {
            return Err(Error::InvalidInput(format!(
                "the adapter of {module} maps {} to {}, the layer {d_in} to {out}",
                f.d_in, f.d_out
            )));
        }
        used += 1;
        lorae.push(Some(Lora::from_values(
            (f.a.clone(), f.rank, f.d_in),
            (f.b.clone(), f.d_out),
            adapter.scale,
            &device,
        )));
    }
    if used != adapter.layers.len() {
        return Err(Error::InvalidInput(format!(
            "{}: {} of the adapter's {} layers are not projections of this model's language \
             model",
            adapter.dir.display(),
            adapter.layers.len() - used,
            adapter.layers.len()
        )));
    }
    for ((_, _, layer), lora) in janus
        .model_mut()
        .llm
        .projections_mut()
        .into_iter()
        .zip(lorae)
    {
        layer.set_lora(lora);
    }
    Ok(())
}

/// The adapters as PEFT names them: by the adapted layer's module name in the layout the model
/// was loaded from.
///
/// # Errors
/// [`Error::InvalidInput`] when the model carries no adapters.
pub fn adapter_factors(janus: &Janus) -> Result<BTreeMap<String, LoraFactors>> {
    let model = janus.model();
    let keys = FileKeys::new(model.config.layout);
    let mut out = BTreeMap::new();
    for (i, name, layer) in model.llm.projections() {
        let Some(lora) = layer.lora() else { continue };
        let module = module_name(&keys, i, name)?;
        let host = |p: &Param<burn::tensor::Tensor<2>>| -> Vec<f32> {
            p.val()
                .into_data()
                .convert::<f32>()
                .try_into_vec()
                .expect("a tensor converted to f32 reads back as f32")
        };
        let [out_w, d_in] = layer.weight().dims();
        out.insert(
            module,
            LoraFactors {
                a: host(&lora.a),
                b: host(&lora.b),
                rank: lora.rank(),
                d_in,
                d_out: out_w,
            },
        );
    }
    if out.is_empty() {
        return Err(Error::InvalidInput(
            "the model carries no LoRA adapters".into(),
        ));
    }
    Ok(out)
}

/// The module name (the checkpoint key of its weight, less `.weight`) of layer `i`'s
/// projection `name` in `keys`' layout.
fn module_name(keys: &FileKeys, i: usize, name: &str) -> Result<String> {
    let canonical = format!("language_model.model.layers.{i}.{name}.weight");
    match keys.file_keys(&canonical).as_slice() {
        [key] => Ok(key
            .strip_suffix(".weight")
            .expect("a weight's key ends with .weight")
            .to_string()),
        _ => Err(Error::Unsupported(format!(
            "{canonical} is stored in parts; its adapter cannot be named"
        ))),
    }
}

/// The regular expression PEFT's `target_modules` gets: every decoder layer's projections, and
/// nothing of the vision encoder (whose attention also has `q_proj`, `k_proj`, `v_proj` in the
/// Hugging Face layout).
fn target_modules(janus: &Janus) -> Result<String> {
    let keys = FileKeys::new(janus.model().config.layout);
    let first = module_name(&keys, 0, Llm::PROJECTIONS[0])?;
    let prefix = first
        .strip_suffix(&format!("0.{}", Llm::PROJECTIONS[0]))
        .expect("layer 0's module name ends with its projection");
    Ok(format!(
        r"{}\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        prefix.replace('.', r"\.")
    ))
}

/// Writes the model's adapters as a PEFT adapter folder (`adapter_config.json` +
/// `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained` loads onto the reference
/// model of the input's layout, and [`LoadOptions::lora`](crate::pipeline::LoadOptions) applies.
///
/// # Errors
/// [`Error::InvalidInput`] when the model carries no adapters or they differ in rank or scale;
/// [`Error::Io`] when a file cannot be written.
pub fn save_adapter(janus: &Janus, out: &Path) -> Result<()> {
    let layers = adapter_factors(janus)?;
    let (rank, scale) = {
        let projections = janus.model().llm.projections();
        let first = projections
            .iter()
            .find_map(|(_, _, l)| l.lora())
            .expect("adapter_factors found one");
        (first.rank(), first.scale)
    };
    if janus
        .model()
        .llm
        .projections()
        .iter()
        .filter_map(|(_, _, l)| l.lora())
        .any(|l| l.rank() != rank || l.scale != scale)
    {
        return Err(Error::InvalidInput(
            "the adapters differ in rank or scale; one adapter file holds one of each".into(),
        ));
    }
    let base = janus.dir().display().to_string();
    write_adapter(
        out,
        &base,
        rank,
        scale * rank as f64,
        &target_modules(janus)?,
        &layers,
    )
}

/// Adds each adapter's `s·B·A` to its layer's weight and removes the adapters: the model then
/// computes what it computed with them, without them.
///
/// # Errors
/// [`Error::Unsupported`] for an adapted layer whose weight is held in a compact storage (a
/// model for training holds them as tensors).
pub fn merge(janus: &mut Janus) -> Result<()> {
    for (i, name, layer) in janus.model_mut().llm.projections_mut() {
        let Some(lora) = layer.lora() else { continue };
        let Matrix::Dense(w) = layer.weight() else {
            return Err(Error::Unsupported(format!(
                "layer {i} {name}: merging an adapter into compact weights (load the model with \
                 --weights f32)"
            )));
        };
        let delta = lora.delta().cast(w.val().dtype()).detach();
        let merged = Param::initialized(w.id, (w.val() + delta).detach()).set_require_grad(false);
        layer.set_weight(Matrix::Dense(merged));
        layer.set_lora(None);
    }
    Ok(())
}

/// Sets whether the adapters' parameters take gradients (the rest of the model is left as it
/// is).
#[cfg(feature = "train")]
pub(crate) fn adapters_require_grad(llm: &mut Llm, require: bool) {
    for (_, _, layer) in llm.projections_mut() {
        if let Some(lora) = layer.lora() {
            let lora = Lora {
                a: lora.a.clone(),
                b: lora.b.clone(),
                scale: lora.scale,
            };
            let lora = burn::module::Module::set_require_grad(lora, require);
            layer.set_lora(Some(lora));
        }
    }
}
