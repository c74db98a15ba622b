//! LoRA: adapters in PEFT's format applied at load, their gradients and AdamW step against
//! PEFT on transformers' Janus (`tests/fixtures/hf-tiny/lora`, written by PEFT's
//! `save_pretrained`, and `expected/lora.safetensors`, `make_fixtures.py lora`), training them,
//! saving them as PEFT does, and merging them.

#![cfg(feature = "train")]

mod common;

use std::collections::BTreeSet;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Tensor;
use common::*;
use janus_core::load::adapter::{ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter};
use janus_core::pipeline::{Janus, LoadOptions};
use janus_core::train::{lora, losses, params, read_jsonl, score};
use janus_core::{ComputeDType, WeightFormat};

fn examples() -> Vec<janus_core::train::Example> {
    read_jsonl(&fixture("train").join("data.jsonl")).unwrap()
}

fn line_losses(janus: &Janus) -> Vec<f64> {
    losses(janus, &examples(), &mut |_, _| true).unwrap().losses
}

fn load_with_adapter(weights: WeightFormat, adapter: &std::path::Path) -> Janus {
    let options = LoadOptions {
        dtype: ComputeDType::F32,
        weights,
        lora: Some(adapter.to_path_buf()),
        ..LoadOptions::default()
    };
    Janus::load(&fixture("hf-tiny"), &options).unwrap()
}

/// The tensor names of an adapter file.
fn adapter_keys(dir: &std::path::Path) -> BTreeSet<String> {
    let bytes = std::fs::read(dir.join(ADAPTER_WEIGHTS)).unwrap();
    safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// PEFT's adapter applied at load gives the losses PEFT's model gives (unmerged, f32), which
/// differ from the base model's; quantized storage merges before quantizing.
#[test]
fn a_peft_adapter_gives_peft_losses() {
    let r = read_reference(&fixture("hf-tiny").join("expected/lora.safetensors"));
    let want = &r["line_losses"].values;
    let janus = load_with_adapter(WeightFormat::F32, &fixture("hf-tiny").join("lora"));
    let got = line_losses(&janus);
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-4 * w.abs(), "{g} against {w}");
    }
    let base = Janus::load_on(&fixture("hf-tiny"), &device(), ComputeDType::F32).unwrap();
    let plain = line_losses(&base);
    assert!(
        plain
            .iter()
            .zip(want)
            .any(|(p, w)| (p - w).abs() > 1e-3 * w),
        "the adapter changes the losses"
    );
    let q8 = line_losses(&load_with_adapter(
        WeightFormat::Q8_0,
        &fixture("hf-tiny").join("lora"),
    ));
    for (g, w) in q8.iter().zip(want) {
        assert!((g - w).abs() <= 2e-2 * w.abs(), "q8_0: {g} against {w}");
    }
}

/// The transformers module name of a janus-rs adapter parameter path
/// (`layers.0.q_proj.lora.a` → PEFT's key of `lora_A`).
fn peft_key(path: &str) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    let [_, layer, proj, _, ab] = parts[..] else {
        panic!("{path}")
    };
    let block = if matches!(proj, "q_proj" | "k_proj" | "v_proj" | "o_proj") {
        "self_attn"
    } else {
        "mlp"
    };
    let factor = if ab == "a" { "lora_A" } else { "lora_B" };
    format!("base_model.model.model.language_model.layers.{layer}.{block}.{proj}.{factor}.weight")
}

/// The adapters' gradients of the mean loss over the training samples, and one AdamW step, against
/// PyTorch autograd and `torch.optim.AdamW` on PEFT's model; the model's own weights get none.
#[test]
fn adapter_gradients_match_peft() {
    let r = read_reference(&fixture("hf-tiny").join("expected/lora.safetensors"));
    let mut janus =
        Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap();
    let adapter = LoraAdapter::open(&fixture("hf-tiny").join("lora")).unwrap();
    lora::attach_adapter(&mut janus, &adapter).unwrap();
    let all: Vec<Tensor<1>> = examples()
        .iter()
        .map(|e| score(&janus, e).unwrap().loss_tensor().unwrap())
        .collect();
    let loss = Tensor::cat(all, 0).mean();
    let value: f32 = loss.clone().into_scalar();
    assert!((f64::from(value) - r["loss"].values[0]).abs() <= 1e-5 * r["loss"].values[0]);
    let grads = loss.backward();
    let llm = janus.model().llm.clone();
    let got = params::gradients(&llm, &grads);
    let expected = r.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(got.len(), expected, "gradients of the adapters alone");
    let check = |got: &[params::HostParam], prefix: &str, tol: f64, relative: bool| {
        for p in got {
            let want = &r[&format!("{prefix}.{}", peft_key(&p.path))];
            let what = format!("{prefix} {}", p.path);
            assert_near_reference(&what, &p.shape, &p.values, want, tol, relative);
        }
    };
    check(&got, "grad", 1e-4, true);
    let optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1);
    let step = GradientsParams::from_grads(grads, &llm);
    let stepped = optim.init().step(1e-3, llm, step);
    let lora_values: Vec<_> = params::values(&stepped)
        .into_iter()
        .filter(|p| p.path.contains(".lora."))
        .collect();
    assert_eq!(lora_values.len(), expected);
    check(&lora_values, "after_adamw", 1e-5, false);
}

/// Training adapters lowers the loss and leaves every weight of the model as it was; the adapter
/// saved in PEFT's format (PEFT's key names and target modules, as in PEFT's own file) loads
/// back at load time to the same losses, and merging gives them too, as a full model folder.
#[test]
fn trained_adapters_save_load_and_merge() {
    use janus_core::train::export::save_model;
    use janus_core::train::trainer::{TrainOptions, train};

    let mut janus =
        Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap();
    let weights_before = params::values(&janus.model().llm);
    let heads_before = params::values(&janus.model().heads);
    let before = line_losses(&janus);
    let options = TrainOptions {
        lr: 1e-2,
        steps: 8,
        batch_size: 2,
        cfg_drop: 0.0,
        lora: Some(lora::LoraOptions {
            rank: 4,
            alpha: 8.0,
        }),
        ..TrainOptions::default()
    };
    train(&mut janus, &examples(), &options, &mut |_| true).unwrap();
    let trained = line_losses(&janus);
    let (b, t) = (mean(&before), mean(&trained));
    assert!(t < 0.8 * b, "mean loss {b} -> {t}");
    // The model's own weights did not move.
    let weights_after: Vec<_> = params::values(&janus.model().llm)
        .into_iter()
        .filter(|p| !p.path.contains(".lora."))
        .collect();
    assert_eq!(weights_after, weights_before);
    assert_eq!(params::values(&janus.model().heads), heads_before);

    let out = tempfile::tempdir().unwrap();
    lora::save_adapter(&janus, out.path()).unwrap();
    let peft = fixture("hf-tiny").join("lora");
    assert_eq!(adapter_keys(out.path()), adapter_keys(&peft));
    let config = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(ADAPTER_CONFIG)).unwrap()).unwrap()
    };
    let (ours, theirs) = (config(out.path()), config(&peft));
    for key in [
        "peft_type",
        "target_modules",
        "bias",
        "use_dora",
        "fan_in_fan_out",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert_eq!(ours["r"], 4);
    assert_eq!(ours["lora_alpha"], 8.0);

    let reloaded = line_losses(&load_with_adapter(WeightFormat::F32, out.path()));
    close(&reloaded, &trained, 1e-5, "adapter applied at load");

    lora::merge(&mut janus).unwrap();
    assert!(!lora::has_adapters(&janus));
    close(&line_losses(&janus), &trained, 1e-5, "merged");
    let merged = tempfile::tempdir().unwrap();
    save_model(&janus, merged.path()).unwrap();
    let saved = Janus::load_on(merged.path(), &device(), ComputeDType::F32).unwrap();
    close(&line_losses(&saved), &trained, 1e-5, "merged and saved");
}

/// An adapter of another model (or layout) is an error naming what does not fit, not an
/// adapter silently left out.
#[test]
fn an_adapter_that_does_not_fit_is_an_error() {
    use janus_core::Error;
    let dir = tempfile::tempdir().unwrap();
    let peft = fixture("hf-tiny").join("lora");
    std::fs::copy(peft.join(ADAPTER_CONFIG), dir.path().join(ADAPTER_CONFIG)).unwrap();
    // The same factors under the original layout's module names.
    let bytes = std::fs::read(peft.join(ADAPTER_WEIGHTS)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n.replace("model.model.language_model.", "model.language_model.model."),
                v,
            )
        })
        .collect();
    safetensors::serialize_to_file(renamed, None, &dir.path().join(ADAPTER_WEIGHTS)).unwrap();
    let options = LoadOptions {
        dtype: ComputeDType::F32,
        lora: Some(dir.path().to_path_buf()),
        ..LoadOptions::default()
    };
    let err = Janus::load(&fixture("hf-tiny"), &options).unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint { message, .. } if message.contains("does not have")),
        "{err}"
    );
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= tol * w.abs().max(1.0),
            "{what}: {g} vs {w}"
        );
    }
}

/// A run stopped after some updates and continued from its checkpoint gives, bit for bit, the
/// losses and parameters of the run that was never stopped: the full second stage (batches,
/// accumulation, conditions dropped) and adapters with a mix of tasks.
#[test]
fn a_resumed_run_continues_bit_for_bit() {
    use janus_core::train::trainer::{Checkpoints, Stage, TrainOptions, train_with};

    let examples = examples();
    for (lora, mix) in [
        (None, None),
        (Some(lora::LoraOptions::new(2)), Some([1.0, 2.0, 1.0])),
    ] {
        let options = TrainOptions {
            stage: Stage::Two,
            lr: 1e-2,
            steps: 5,
            batch_size: 2,
            grad_accum: 2,
            warmup: 2,
            cfg_drop: 0.5,
            seed: 7,
            lora,
            mix,
            ..TrainOptions::default()
        };
        let fresh = || {
            Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap()
        };
        let run = |janus: &mut Janus, checkpoints: &Checkpoints, stop_after: usize| {
            let mut log = Vec::new();
            let end = train_with(janus, &examples, &options, checkpoints, &mut |r| {
                log.push((r.step, r.loss.to_bits(), r.samples));
                r.step != stop_after
            })
            .unwrap();
            (log, end)
        };
        let mut whole = fresh();
        let (want, end) = run(&mut whole, &Checkpoints::default(), 0);
        assert_eq!((end.steps, end.stopped), (5, false));

        let tmp = tempfile::tempdir().unwrap();
        let checkpoints = Checkpoints {
            dir: Some(tmp.path().to_path_buf()),
            ..Checkpoints::default()
        };
        let mut first = fresh();
        let (head, end) = run(&mut first, &checkpoints, 2);
        assert_eq!((end.steps, end.stopped), (2, true));
        let mut second = fresh();
        let resume = Checkpoints {
            resume: Some(tmp.path().to_path_buf()),
            ..Checkpoints::default()
        };
        let (tail, end) = run(&mut second, &resume, 0);
        assert_eq!((end.steps, end.stopped), (5, false));
        assert_eq!([head, tail].concat(), want, "lora {lora:?}");
        let values = |j: &Janus| {
            let mut all = params::values(&j.model().llm);
            all.extend(params::values(&j.model().heads));
            all.into_iter()
                .map(|p| {
                    (
                        p.path,
                        p.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert!(
            values(&second) == values(&whole),
            "lora {lora:?}: parameters differ"
        );

        // Other options, or other data, do not continue this run.
        let other = TrainOptions {
            lr: 2e-2,
            ..options.clone()
        };
        let err = train_with(&mut fresh(), &examples, &other, &resume, &mut |_| true).unwrap_err();
        assert!(err.to_string().contains("other training options"), "{err}");
        let err = train_with(&mut fresh(), &examples[1..], &options, &resume, &mut |_| {
            true
        })
        .unwrap_err();
        assert!(err.to_string().contains("other training data"), "{err}");
    }
}

/// In the original layout the adapter is named for the official model's modules
/// (`language_model.model.layers.…`, as PEFT names them on `MultiModalityCausalLM`) and applies
/// at load to the same losses as the adapters in memory.
#[test]
fn original_layout_adapters_take_the_official_module_names() {
    use janus_core::train::Example;
    let model = original_checkpoint("safetensors");
    let mut janus = Janus::load_on(&model, &device().autodiff(), ComputeDType::F32).unwrap();
    lora::attach(
        &mut janus,
        &lora::LoraOptions {
            rank: 2,
            alpha: 4.0,
        },
        1,
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    lora::save_adapter(&janus, out.path()).unwrap();
    let adapter = LoraAdapter::open(out.path()).unwrap();
    // Non-zero B, so that the adapters change the model.
    let mut layers = adapter.layers.clone();
    for f in layers.values_mut() {
        for (i, b) in f.b.iter_mut().enumerate() {
            *b = ((i * 7919 % 113) as f32 / 113.0 - 0.5) * 0.2;
        }
    }
    janus_core::load::adapter::write_adapter(out.path(), "base", 2, 4.0, "x", &layers).unwrap();
    let keys = adapter_keys(out.path());
    assert!(
        keys.contains(
            "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"
        )
    );
    assert_eq!(keys.len(), 2 * 7 * janus.config().text.num_hidden_layers);
    let adapter = LoraAdapter::open(out.path()).unwrap();
    lora::attach_adapter(&mut janus, &adapter).unwrap();
    let text = [Example::Text {
        text: "The quick brown fox jumps over the lazy dog.".into(),
    }];
    let in_memory = losses(&janus, &text, &mut |_, _| true).unwrap().losses;
    // f32 storage: bf16 storage would round each merged weight to bf16 (as a merge into a bf16
    // model does in PEFT), a difference of ~1e-4 in this loss.
    let options = LoadOptions {
        dtype: ComputeDType::F32,
        weights: WeightFormat::F32,
        lora: Some(out.path().to_path_buf()),
        ..LoadOptions::default()
    };
    let applied = losses(
        &Janus::load(&model, &options).unwrap(),
        &text,
        &mut |_, _| true,
    )
    .unwrap()
    .losses;
    let base = losses(
        &Janus::load_on(&model, &device(), ComputeDType::F32).unwrap(),
        &text,
        &mut |_, _| true,
    )
    .unwrap()
    .losses;
    close(&applied, &in_memory, 1e-5, "original layout");
    assert!(
        (applied[0] - base[0]).abs() > 1e-3,
        "the adapter changes the loss"
    );
}
