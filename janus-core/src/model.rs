//! The whole Janus model: language model, vision encoder, heads and VQ codec, loaded from a
//! model folder onto a device.

use std::collections::HashMap;
use std::path::Path;

use burn::module::ParamId;
use burn::tensor::Device;

use crate::config::JanusConfig;
use crate::error::{Error, Result};
use crate::load::adapter::LoraAdapter;
use crate::load::{Checkpoint, ComputeDType, WeightStorage, Weights, check_weight_format};
use crate::nn::heads::Heads;
use crate::nn::llm::Llm;
use crate::nn::siglip::SigLip;
use crate::nn::vq::VqModel;
use crate::nn::weight::WeightFormat;

/// All of a Janus checkpoint's networks, in the compute dtype on one device.
#[derive(Debug, Clone)]
pub struct JanusModel {
    /// The configuration the model was built from.
    pub config: JanusConfig,
    /// The language model.
    pub llm: Llm,
    /// The understanding vision encoder.
    pub vision: SigLip,
    /// Aligners, generation embedding and head.
    pub heads: Heads,
    /// The VQ image tokenizer.
    pub vq: VqModel,
    /// How the weights are held in memory.
    pub storage: WeightStorage,
    /// The compute dtype (never [`ComputeDType::Auto`]: what it resolved to).
    pub dtype: ComputeDType,
    /// The canonical name of each parameter (what saving a trained model writes).
    pub(crate) param_names: HashMap<ParamId, String>,
}

impl JanusModel {
    /// Reads `config.json` and the weights of a model folder (either layout), with the
    /// default weight storage ([`WeightFormat::Auto`]).
    pub fn load(dir: &Path, device: &Device, dtype: ComputeDType) -> Result<Self> {
        Self::load_with(dir, device, dtype, WeightFormat::Auto)
    }

    /// [`load`](Self::load) with a chosen weight storage.
    pub fn load_with(
        dir: &Path,
        device: &Device,
        dtype: ComputeDType,
        weights: WeightFormat,
    ) -> Result<Self> {
        Self::load_adapted(dir, device, dtype, weights, None)
    }

    /// [`load_with`](Self::load_with), with a LoRA adapter merged into the weights it adapts.
    pub fn load_adapted(
        dir: &Path,
        device: &Device,
        dtype: ComputeDType,
        weights: WeightFormat,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Self> {
        check_weight_format(weights, device, dtype)?;
        let config = JanusConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint_adapted(config, &ckpt, device, dtype, weights, adapter)
    }

    /// Builds the model from an opened checkpoint: first checks that the files hold exactly the
    /// tensors the configuration describes (all problems reported together), then reads them.
    pub fn from_checkpoint(
        config: JanusConfig,
        ckpt: &Checkpoint,
        device: &Device,
        dtype: ComputeDType,
        weights: WeightFormat,
    ) -> Result<Self> {
        Self::from_checkpoint_adapted(config, ckpt, device, dtype, weights, None)
    }

    /// [`from_checkpoint`](Self::from_checkpoint) with a LoRA adapter merged into the weights
    /// it adapts as they are read; an adapter layer that names no linear layer of the model is
    /// an error.
    pub fn from_checkpoint_adapted(
        config: JanusConfig,
        ckpt: &Checkpoint,
        device: &Device,
        dtype: ComputeDType,
        weights: WeightFormat,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Self> {
        check_declared_sizes(&config, ckpt)?;
        let dtype = dtype.resolve(device, weights, ckpt);
        check_weight_format(weights, device, dtype)?;
        let mut plan =
            Weights::new(ckpt, config.layout, device, dtype, weights, true).with_adapter(adapter);
        let _ = Self::build(&mut plan, &config);
        plan.finish()?;
        let mut load =
            Weights::new(ckpt, config.layout, device, dtype, weights, false).with_adapter(adapter);
        let mut model = Self::build(&mut load, &config);
        model.param_names = load.take_names();
        model.storage = load.finish()?;
        model.dtype = dtype;
        Ok(model)
    }

    fn build(w: &mut Weights<'_>, config: &JanusConfig) -> Self {
        JanusModel {
            llm: Llm::load(w, &config.text),
            vision: SigLip::load(w, &config.vision),
            heads: Heads::load(w, config),
            vq: VqModel::load(w, &config.vq),
            config: config.clone(),
            storage: WeightStorage::default(),
            dtype: ComputeDType::F32,
            param_names: HashMap::new(),
        }
    }
}

/// Refuses a configuration that declares more layers than the checkpoint holds tensors for,
/// before the module tree (sized by the declared counts) is built: every decoder layer has at
/// least 9 tensors, every vision layer 16, every VQ resnet block 6, every aligner layer 2.
fn check_declared_sizes(config: &JanusConfig, ckpt: &Checkpoint) -> Result<()> {
    let held = ckpt.tensor_names().len() as u128;
    let vq = &config.vq;
    let stacks = [
        (
            "text num_hidden_layers",
            config.text.num_hidden_layers,
            9u128,
        ),
        (
            "vision num_hidden_layers",
            config.vision.num_hidden_layers,
            16,
        ),
        ("aligner depth", config.aligner.depth, 2),
        ("generation aligner depth", config.gen_aligner.depth, 2),
        (
            "VQ resnet blocks (channel_multiplier × num_res_blocks)",
            vq.channel_multiplier
                .len()
                .saturating_mul(vq.num_res_blocks),
            12,
        ),
    ];
    let least: u128 = stacks.iter().map(|(_, n, per)| *n as u128 * per).sum();
    if least > held {
        let declared: Vec<String> = stacks
            .iter()
            .map(|(name, n, _)| format!("{name} {n}"))
            .collect();
        return Err(Error::config(
            "config.json",
            format!(
                "declares {} — at least {least} tensors — but the checkpoint holds {held}",
                declared.join(", ")
            ),
        ));
    }
    Ok(())
}
