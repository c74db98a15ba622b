//! Training checkpoints: everything a run needs to continue exactly where it stopped — the
//! trained parameters (values and ids), each AdamW's state, the sample order and its random
//! stream, the condition-drop stream, the step and the sample count — in one folder:
//!
//! - `params.safetensors`: the trained parameters as f32, by module path (`heads.…`, `llm.…`),
//!   their ids in the metadata (the optimizers' states are keyed by them);
//! - `optimizer_heads.bpk`, `optimizer_llm.bpk`: Burn's records of the two AdamW states;
//! - `state.json`: step, samples, order, streams, and the options and data the run had (a resume
//!   with other options or other data would not continue the same run, and is refused).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Value, json};

use super::data::Example;
use super::order::Order;
use super::trainer::TrainOptions;
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::model::JanusModel;

const PARAMS: &str = "params.safetensors";
const STATE: &str = "state.json";
const OPTIM_HEADS: &str = "optimizer_heads.bpk";
const OPTIM_LLM: &str = "optimizer_llm.bpk";

/// Where a run is.
pub(crate) struct RunState {
    /// Updates done.
    pub step: usize,
    /// Samples seen.
    pub samples: usize,
    /// The sample order.
    pub order: Order,
    /// The condition-drop stream.
    pub drops: rand_chacha::ChaCha8Rng,
}

/// A digest of the samples (FNV-1a over their debug form): a resume checks it sees the same data.
fn digest(examples: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{examples:?}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The options that decide a run's numbers (all of them but the number of updates, which a
/// resumed run may extend).
fn options_json(o: &TrainOptions) -> Value {
    json!({
        "stage": format!("{:?}", o.stage),
        "lr": o.lr,
        "batch_size": o.batch_size,
        "grad_accum": o.grad_accum,
        "warmup": o.warmup,
        "weight_decay": o.weight_decay,
        "clip": o.clip,
        "cfg_drop": o.cfg_drop,
        "seed": o.seed,
        "mix": o.mix,
        "lora": o.lora.map(|l| json!({"rank": l.rank, "alpha": l.alpha})),
    })
}

/// The trained parameters of a module (those that take gradients), by `prefix.path`.
fn trained(prefix: &str, m: &impl Module) -> Vec<(String, ParamId, Vec<usize>, Vec<f32>)> {
    super::params::trained_values(m)
        .into_iter()
        .map(|p| (format!("{prefix}.{}", p.path), p.id, p.shape, p.values))
        .collect()
}

/// Writes a checkpoint of the run into `dir` (created if missing; each file through a temporary
/// file renamed at the end).
pub(crate) fn save(
    dir: &Path,
    model: &JanusModel,
    optims: (&ModuleOptimizer, &ModuleOptimizer),
    state: &RunState,
    options: &TrainOptions,
    examples: &[Example],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let params: Vec<_> = trained("heads", &model.heads)
        .into_iter()
        .chain(trained("llm", &model.llm))
        .collect();
    let ids: BTreeMap<&str, String> = params
        .iter()
        .map(|(k, id, _, _)| (k.as_str(), id.val().to_string()))
        .collect();
    let bytes: Vec<Vec<u8>> = params
        .iter()
        .map(|(_, _, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let path = dir.join(PARAMS);
    let bad = |p: &Path, m: String| Error::Checkpoint {
        path: p.to_path_buf(),
        message: m,
    };
    let views = params
        .iter()
        .zip(&bytes)
        .map(|((k, _, shape, _), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| bad(&path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([(
        "ids".to_string(),
        serde_json::to_string(&ids).expect("a map of strings serializes"),
    )]);
    let st =
        safetensors::serialize(views, Some(metadata)).map_err(|e| bad(&path, e.to_string()))?;
    write_atomic(&path, &st)?;
    for (optim, name) in [(optims.0, OPTIM_HEADS), (optims.1, OPTIM_LLM)] {
        let path = dir.join(name);
        let bytes = optim
            .into_bytes()
            .map_err(|e| bad(&path, format!("the optimizer state: {e:?}")))?;
        write_atomic(&path, &bytes)?;
    }
    let state = json!({
        "step": state.step,
        "samples": state.samples,
        "order": state.order.state(),
        "drops_word_pos": state.drops.get_word_pos().to_string(),
        "options": options_json(options),
        "examples": examples.len(),
        "examples_digest": digest(examples),
    });
    let text = serde_json::to_string_pretty(&state).expect("a JSON value serializes");
    write_atomic(&dir.join(STATE), text.as_bytes())
}

/// Puts saved values (and ids) on a module's parameters by path; records the id changes.
struct Restore<'a> {
    prefix: String,
    path: Vec<String>,
    saved: &'a HashMap<String, (ParamId, Vec<usize>, Vec<f32>)>,
    used: usize,
    renamed: Vec<(ParamId, ParamId)>,
    error: Option<String>,
}

impl ModuleMapper for Restore<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = format!("{}.{}", self.prefix, self.path.join("."));
        let Some((id, shape, values)) = self.saved.get(&key) else {
            return param;
        };
        let t = param.val();
        if t.dims().as_slice() != shape.as_slice() {
            self.error.get_or_insert(format!(
                "{key} is {shape:?} in the checkpoint, {:?} in the model",
                t.dims()
            ));
            return param;
        }
        self.used += 1;
        let require = t.is_require_grad();
        let device = t.device();
        let value = Tensor::<D>::from_data(
            TensorData::new(values.clone(), shape.clone()),
            (&device, t.dtype()),
        );
        self.renamed.push((param.id, *id));
        Param::initialized(*id, value).set_require_grad(require)
    }
}

/// Continues a run from a checkpoint: the trained parameters get their saved values and ids
/// (the model's parameter names follow), the optimizers their states; returns where the run
/// was.
pub(crate) fn load(
    dir: &Path,
    model: &mut JanusModel,
    optims: (ModuleOptimizer, ModuleOptimizer),
    options: &TrainOptions,
    examples: &[Example],
) -> Result<(ModuleOptimizer, ModuleOptimizer, RunState)> {
    let state_path = dir.join(STATE);
    if !state_path.is_file() {
        return Err(Error::MissingFile {
            dir: dir.to_path_buf(),
            message: format!("no {STATE}: not a training checkpoint"),
        });
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let bad_state = |m: String| Error::Config {
        file: state_path.clone(),
        message: m,
    };
    let state: Value = serde_json::from_str(&text).map_err(|e| bad_state(e.to_string()))?;
    if state["options"] != options_json(options) {
        return Err(Error::InvalidInput(format!(
            "{}: the checkpoint was made with other training options ({}); a resumed run takes \
             the options it was started with (only --steps/--epochs may change)",
            dir.display(),
            state["options"]
        )));
    }
    if state["examples"] != json!(examples.len())
        || state["examples_digest"] != json!(digest(examples))
    {
        return Err(Error::InvalidInput(format!(
            "{}: the checkpoint was made on other training data",
            dir.display()
        )));
    }
    let num = |key: &str| -> Result<usize> {
        state[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad_state(format!("no \"{key}\"")))
    };
    let pos = |key: &str| -> Result<u128> {
        state[key]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_state(format!("no \"{key}\"")))
    };
    let mut run = RunState {
        step: num("step")?,
        samples: num("samples")?,
        order: Order::new(examples, options.mix, options.seed)?,
        drops: super::trainer::drop_stream(options.seed),
    };
    run.order
        .restore(&state["order"])
        .map_err(|m| bad_state(format!("\"order\": {m}")))?;
    run.drops.set_word_pos(pos("drops_word_pos")?);

    // The parameters.
    let path = dir.join(PARAMS);
    let bad = |m: String| Error::Checkpoint {
        path: path.clone(),
        message: m,
    };
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let ids: BTreeMap<String, String> = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("ids"))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("no parameter ids in the metadata".into()))?;
    let mut saved = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("{name} is not f32")));
        }
        let id = ids
            .get(&name)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad(format!("{name} has no id")))?;
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        saved.insert(name, (ParamId::from(id), view.shape().to_vec(), values));
    }
    let restore = |prefix: &str| Restore {
        prefix: prefix.into(),
        path: Vec::new(),
        saved: &saved,
        used: 0,
        renamed: Vec::new(),
        error: None,
    };
    let mut heads = restore("heads");
    model.heads = model.heads.clone().map(&mut heads);
    let mut llm = restore("llm");
    model.llm = model.llm.clone().map(&mut llm);
    if let Some(e) = heads.error.or(llm.error) {
        return Err(bad(e));
    }
    if heads.used + llm.used != saved.len() {
        return Err(bad(format!(
            "{} of its {} parameters are not in the model (a checkpoint of another model, or of \
             a run with or without adapters?)",
            saved.len() - heads.used - llm.used,
            saved.len()
        )));
    }
    for (old, new) in heads.renamed.into_iter().chain(llm.renamed) {
        if let Some(name) = model.param_names.remove(&old) {
            model.param_names.insert(new, name);
        }
    }

    // The optimizers.
    let load_optim = |optim: ModuleOptimizer, name: &str| -> Result<ModuleOptimizer> {
        let path = dir.join(name);
        let record = OptimizerRecord::load(&path).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            message: format!("the optimizer state: {e:?}"),
        })?;
        Ok(optim.load_record(record))
    };
    let heads_optim = load_optim(optims.0, OPTIM_HEADS)?;
    let llm_optim = load_optim(optims.1, OPTIM_LLM)?;
    Ok((heads_optim, llm_optim, run))
}
