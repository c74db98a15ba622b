//! The training objective under Burn's autodiff (feature `train`): the model runs unchanged on an
//! autodiff device, gives the same losses, and its gradients are the derivatives of the loss.

#![cfg(feature = "train")]

mod common;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Distribution, Tensor};
use common::*;
use janus_core::ComputeDType;
use janus_core::pipeline::Janus;
use janus_core::train::{language_scored, losses, params, read_jsonl, score};

#[test]
fn losses_on_an_autodiff_device_are_the_losses() {
    let examples = read_jsonl(&fixture("train").join("data.jsonl")).unwrap();
    let plain = Janus::load_on(&fixture("hf-tiny"), &device(), ComputeDType::F32).unwrap();
    let tracked =
        Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap();
    let want = losses(&plain, &examples, &mut |_, _| true).unwrap();
    let got = losses(&tracked, &examples, &mut |_, _| true).unwrap();
    for (g, w) in got.losses.iter().zip(&want.losses) {
        assert!((g - w).abs() <= 1e-5 * w, "{g} against {w}");
    }
}

/// The gradient of a text sample's loss with respect to its input embeddings, along a random
/// direction, against central differences of the loss (they agree to 1e-3 for steps from 1e-3
/// to 3e-2; with the CPU backend's host shortcuts taken under autodiff, the SwiGLU's activation
/// left the graph and the two differed by half).
#[test]
fn gradients_are_the_derivatives_of_the_loss() {
    let janus =
        Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap();
    let ids = janus
        .tokenizer()
        .encode("The quick brown fox jumps over the lazy dog.", true)
        .unwrap();
    let targets = ids[1..].to_vec();
    let llm = &janus.model().llm;
    let x = llm.embed(std::slice::from_ref(&ids)).unwrap();
    let loss_at = |x: Tensor<3>| -> f64 {
        language_scored(&janus, x, 0, targets.clone())
            .unwrap()
            .loss()
            .unwrap()
    };
    let tracked = x.clone().require_grad();
    let loss = language_scored(&janus, tracked.clone(), 0, targets.clone())
        .unwrap()
        .loss_tensor()
        .unwrap();
    let grads = loss.backward();
    let g = tracked.grad(&grads).expect("the embeddings' gradient");
    let u = Tensor::<3>::random(x.dims(), Distribution::Normal(0.0, 1.0), &x.device());
    let u = u.clone() / u.clone().powi_scalar(2).sum().sqrt().unsqueeze::<3>();
    let along: f32 = (g * u.clone().inner()).sum().into_scalar();
    let eps = 1e-2;
    let plus = loss_at(x.clone() + u.clone() * eps);
    let minus = loss_at(x - u * eps);
    let differences = (plus - minus) / (2.0 * eps);
    assert!(
        (f64::from(along) - differences).abs() <= 2e-2 * differences.abs().max(1e-2),
        "gradient along u {along}, central differences {differences}"
    );
}

/// The mean loss over the training samples (`tests/fixtures/train/data.jsonl`), the batch loss
/// of `make_fixtures.py grads`.
fn batch_loss(janus: &Janus) -> Tensor<1> {
    let examples = read_jsonl(&fixture("train").join("data.jsonl")).unwrap();
    let losses: Vec<Tensor<1>> = examples
        .iter()
        .map(|e| score(janus, e).unwrap().loss_tensor().unwrap())
        .collect();
    Tensor::cat(losses, 0).mean()
}

/// `got` (janus-rs's parameters by path) against the reference's tensors `{prefix}.{name}`, for
/// the pairs of `names` (janus-rs's path, transformers' name), in order: the largest difference
/// at most `tol` times the reference tensor's norm (`relative`) or `tol`.
fn compare(
    got: &[params::HostParam],
    names: &[(&str, &str)],
    r: &std::collections::HashMap<String, RefTensor>,
    prefix: &str,
    tol: f64,
    relative: bool,
) {
    let paths: Vec<&str> = got.iter().map(|p| p.path.as_str()).collect();
    for (ours, theirs) in names {
        let p = &got[paths
            .iter()
            .position(|p| p == ours)
            .unwrap_or_else(|| panic!("no {ours} among {paths:?}"))];
        let want = &r[&format!("{prefix}.{theirs}")];
        let what = format!("{prefix}.{theirs}");
        assert_near_reference(&what, &p.shape, &p.values, want, tol, relative);
    }
}

/// The heads' parameters: janus-rs's fields (an MLP's layers counted without the activations
/// between them) and transformers' names.
const HEADS: [(&str, &str); 13] = [
    ("aligner.layers.0.weight", "model.aligner.fc1.weight"),
    ("aligner.layers.0.bias", "model.aligner.fc1.bias"),
    (
        "aligner.layers.1.weight",
        "model.aligner.hidden_layers.0.weight",
    ),
    (
        "aligner.layers.1.bias",
        "model.aligner.hidden_layers.0.bias",
    ),
    ("gen_embed", "model.generation_embeddings.weight"),
    (
        "gen_aligner.layers.0.weight",
        "model.generation_aligner.fc1.weight",
    ),
    (
        "gen_aligner.layers.0.bias",
        "model.generation_aligner.fc1.bias",
    ),
    (
        "gen_aligner.layers.1.weight",
        "model.generation_aligner.hidden_layers.0.weight",
    ),
    (
        "gen_aligner.layers.1.bias",
        "model.generation_aligner.hidden_layers.0.bias",
    ),
    (
        "gen_head.output_mlp_projector.weight",
        "model.generation_head.proj_out.weight",
    ),
    (
        "gen_head.output_mlp_projector.bias",
        "model.generation_head.proj_out.bias",
    ),
    (
        "gen_head.vision_head.weight",
        "model.generation_head.vision_head.weight",
    ),
    (
        "gen_head.vision_head.bias",
        "model.generation_head.vision_head.bias",
    ),
];

/// Language-model parameters the reference records.
const LLM: [(&str, &str); 5] = [
    (
        "layers.0.q_proj.weight",
        "model.language_model.layers.0.self_attn.q_proj.weight",
    ),
    (
        "layers.1.down_proj.weight",
        "model.language_model.layers.1.mlp.down_proj.weight",
    ),
    (
        "layers.0.input_layernorm.weight",
        "model.language_model.layers.0.input_layernorm.weight",
    ),
    ("embed_tokens", "model.language_model.embed_tokens.weight"),
    ("lm_head.weight", "lm_head.weight"),
];

/// One step of Burn's AdamW with `torch.optim.AdamW`'s settings in the reference.
fn adamw() -> burn::optim::ModuleOptimizer {
    AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(0.1)
        .init()
}

/// The first training stage's gradients (the aligners, the generation embedding and the image
/// head; the language model frozen but on the gradient's path) of the mean loss over the
/// training samples, against PyTorch autograd on transformers' Janus
/// (`tests/fixtures/hf-tiny/expected/grads.safetensors`, `make_fixtures.py grads`), and one
/// AdamW step against `torch.optim.AdamW`'s.
#[test]
fn stage_one_gradients_match_pytorch() {
    let mut janus =
        Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap();
    let heads = janus.model().heads.clone().set_require_grad(true);
    janus.model_mut().heads = heads;
    let r = read_reference(&fixture("hf-tiny").join("expected/grads.safetensors"));
    let loss = batch_loss(&janus);
    let value: f32 = loss.clone().into_scalar();
    assert!((f64::from(value) - r["loss"].values[0]).abs() <= 1e-5 * r["loss"].values[0]);
    let grads = loss.backward();
    let got = params::gradients(&janus.model().heads, &grads);
    let paths: Vec<&str> = got.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, HEADS.map(|(ours, _)| ours), "the stage's parameters");
    compare(&got, &HEADS, &r, "grad", 1e-4, true);
    // The frozen language model has no gradient.
    assert!(params::gradients(&janus.model().llm, &grads).is_empty());
    let heads = janus.model().heads.clone();
    let step = GradientsParams::from_grads(grads, &heads);
    let stepped = params::values(&adamw().step(1e-3, heads, step));
    compare(&stepped, &HEADS, &r, "after_adamw", 1e-6, false);
}

/// With the language model trained too (the second stage), its gradients and AdamW step.
#[test]
fn stage_two_gradients_match_pytorch() {
    let mut janus =
        Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap();
    let model = janus.model_mut();
    model.heads = model.heads.clone().set_require_grad(true);
    model.llm = model.llm.clone().set_require_grad(true);
    let r = read_reference(&fixture("hf-tiny").join("expected/grads.safetensors"));
    let grads = batch_loss(&janus).backward();
    let llm = janus.model().llm.clone();
    compare(
        &params::gradients(&llm, &grads),
        &LLM,
        &r,
        "grad",
        1e-4,
        true,
    );
    compare(
        &params::gradients(&janus.model().heads, &grads),
        &HEADS,
        &r,
        "grad",
        1e-4,
        true,
    );
    let step = GradientsParams::from_grads(grads, &llm);
    let stepped = params::values(&adamw().step(1e-3, llm, step));
    // A step of about lr = 1e-3 an element (AdamW's first step is near g/|g|), within 1 % of one:
    // where |g| is near ε = 1e-8 the step turns on the gradient's last digits (the reference's
    // own f32 and f64 gradients give steps 1.6e-6 apart).
    compare(&stepped, &LLM, &r, "after_adamw", 1e-5, false);
}

/// A short run of the recipe on the training samples (condition never dropped) drives their mean
/// loss down at least five times, and the model then draws a training image's codes greedily
/// from its prompt.
#[test]
fn training_learns_the_samples() {
    use janus_core::generate::image::ImageGenOptions;
    use janus_core::generate::sampling::Sampling;
    use janus_core::processor::image::open_image;
    use janus_core::train::Example;
    use janus_core::train::trainer::{Stage, TrainOptions, train};

    let mut janus =
        Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap();
    let examples = read_jsonl(&fixture("train").join("data.jsonl")).unwrap();
    let before = losses(&janus, &examples, &mut |_, _| true).unwrap().mean;
    let options = TrainOptions {
        stage: Stage::Two,
        lr: 1e-2,
        steps: 60,
        batch_size: 2,
        warmup: 5,
        cfg_drop: 0.0,
        ..TrainOptions::default()
    };
    let mut log = Vec::new();
    train(&mut janus, &examples, &options, &mut |r| {
        log.push(r.clone());
        true
    })
    .unwrap();
    let after = losses(&janus, &examples, &mut |_, _| true).unwrap().mean;
    assert_eq!(log.len(), 60);
    assert_eq!(log.last().unwrap().samples, 120);
    assert!(after * 5.0 <= before, "mean loss {before} -> {after}");
    let Example::Generate { prompt, image } = &examples[0] else {
        panic!("the first sample generates")
    };
    let want = janus.encode_image(&open_image(image).unwrap()).unwrap().ids;
    // Guidance weight 1 is the conditional model alone (the unconditional prompt was never
    // trained with the condition kept in every sample).
    let greedy = ImageGenOptions {
        sampling: Sampling::GREEDY,
        cfg_weight: 1.0,
        ..ImageGenOptions::default()
    };
    let got = janus.generate(prompt, &greedy).unwrap();
    assert_eq!(got[0].tokens.ids, want);
}

#[test]
fn training_without_autodiff_or_samples_is_an_error() {
    use janus_core::Error;
    use janus_core::train::trainer::{TrainOptions, train};
    let examples = read_jsonl(&fixture("train").join("data.jsonl")).unwrap();
    let options = TrainOptions::default();
    let mut plain = Janus::load_on(&fixture("hf-tiny"), &device(), ComputeDType::F32).unwrap();
    let err = train(&mut plain, &examples, &options, &mut |_| true).unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput(ref m) if m.contains("autodiff")),
        "{err}"
    );
    let mut tracked =
        Janus::load_on(&fixture("hf-tiny"), &device().autodiff(), ComputeDType::F32).unwrap();
    let err = train(&mut tracked, &[], &options, &mut |_| true).unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
}

/// A trained model saved in its input's layout loads again with the trained values: f32 files
/// give the same losses; bf16 shards (with their index) hold the trained values rounded to bf16;
/// every tensor training does not touch keeps its bytes; the folder's other files are copied.
#[test]
fn trained_models_save_in_their_layout() {
    use janus_core::train::export::save_model;
    use janus_core::train::trainer::{Stage, TrainOptions, train};

    let examples = read_jsonl(&fixture("train").join("data.jsonl")).unwrap();
    let options = TrainOptions {
        stage: Stage::Two,
        lr: 1e-2,
        steps: 3,
        cfg_drop: 0.0,
        ..TrainOptions::default()
    };
    for dir in ["hf-tiny", "hf-tiny-bf16-sharded"] {
        let input = fixture(dir);
        let mut janus = Janus::load_on(&input, &device().autodiff(), ComputeDType::F32).unwrap();
        train(&mut janus, &examples, &options, &mut |_| true).unwrap();
        let out = tempfile::tempdir().unwrap();
        save_model(&janus, out.path()).unwrap();
        assert!(save_model(&janus, &input).is_err(), "never over the input");
        // (On an autodiff device every weight is a dense parameter, whatever the file stores.)
        let saved = Janus::load_on(out.path(), &device().autodiff(), ComputeDType::F32).unwrap();
        let trained = params::values(&janus.model().llm);
        let reloaded = params::values(&saved.model().llm);
        let bf16 = dir.ends_with("sharded");
        for (t, r) in trained.iter().zip(&reloaded) {
            assert_eq!(t.path, r.path);
            for (a, b) in t.values.iter().zip(&r.values) {
                let want = if bf16 {
                    f32::from(half::bf16::from_f32(*a))
                } else {
                    *a
                };
                assert_eq!(want.to_bits(), b.to_bits(), "{dir}: {}", t.path);
            }
        }
        if !bf16 {
            let got = losses(&saved, &examples, &mut |_, _| true).unwrap();
            let want = losses(&janus, &examples, &mut |_, _| true).unwrap();
            for (g, w) in got.losses.iter().zip(&want.losses) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{dir}: {g} vs {w}"
                );
            }
        }
        // The vision tower was not trained: its tensors' bytes are the input's.
        let tensors = |d: &std::path::Path| {
            let mut all = std::collections::HashMap::new();
            for f in std::fs::read_dir(d).unwrap() {
                let p = f.unwrap().path();
                if p.extension().is_some_and(|e| e == "safetensors") {
                    let bytes = std::fs::read(&p).unwrap();
                    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                    for (n, v) in st.tensors() {
                        all.insert(n, v.data().to_vec());
                    }
                }
            }
            all
        };
        let (before, after) = (tensors(&input), tensors(out.path()));
        assert_eq!(before.len(), after.len(), "{dir}");
        let vision = before.keys().filter(|k| k.contains("vision_model")).count();
        assert!(vision > 0);
        for (k, v) in &before {
            if k.contains("vision_model") || k.contains("vqmodel") {
                assert_eq!(v, &after[k], "{dir}: {k}");
            }
        }
        for f in std::fs::read_dir(&input).unwrap() {
            let path = f.unwrap().path();
            let name = path.file_name().unwrap();
            if path.is_file() {
                assert!(
                    out.path().join(name).is_file(),
                    "{dir}: {name:?} not written"
                );
            }
        }
    }
}

/// Pickled inputs (`pytorch_model.bin`, sharded or not; the original layout ships them) are
/// saved as safetensors, shard for shard with an index: the trained values (in the file's
/// dtype), every other tensor as it was, and no pickle in the output.
#[test]
fn pickled_models_save_as_safetensors() {
    use janus_core::train::export::save_model;
    use janus_core::train::trainer::{Stage, TrainOptions, train};

    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.jsonl");
    std::fs::write(
        &text,
        "{\"task\": \"text\", \"text\": \"The quick brown fox jumps over the lazy dog.\"}\n",
    )
    .unwrap();
    let examples = read_jsonl(&text).unwrap();
    let options = TrainOptions {
        stage: Stage::Two,
        lr: 1e-2,
        steps: 2,
        ..TrainOptions::default()
    };
    // (folder, shards, stored in bf16)
    for (input, shards, bf16) in [
        (fixture("hf-tiny-bin"), 1, false),
        (fixture("hf-tiny-bin-sharded-bf16"), 3, true),
        (original_checkpoint("bin-sharded"), 2, true),
    ] {
        let mut janus = Janus::load_on(&input, &device().autodiff(), ComputeDType::F32).unwrap();
        train(&mut janus, &examples, &options, &mut |_| true).unwrap();
        let out = tmp.path().join(format!("out-{shards}"));
        save_model(&janus, &out).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("model"))
            .collect();
        names.sort();
        let want: Vec<String> = if shards == 1 {
            vec!["model.safetensors".into()]
        } else {
            let mut w: Vec<String> = (1..=shards)
                .map(|i| format!("model-{i:05}-of-{shards:05}.safetensors"))
                .collect();
            w.push("model.safetensors.index.json".into());
            w
        };
        assert_eq!(names, want, "{}", input.display());
        let saved = Janus::load_on(&out, &device().autodiff(), ComputeDType::F32).unwrap();
        let trained = params::values(&janus.model().llm);
        let reloaded = params::values(&saved.model().llm);
        for (t, r) in trained.iter().zip(&reloaded) {
            assert_eq!(t.path, r.path);
            for (a, b) in t.values.iter().zip(&r.values) {
                let want = if bf16 {
                    f32::from(half::bf16::from_f32(*a))
                } else {
                    *a
                };
                assert_eq!(
                    want.to_bits(),
                    b.to_bits(),
                    "{}: {}",
                    input.display(),
                    t.path
                );
            }
        }
        // Every tensor of the input is in the output, with its shape.
        let (a, b) = (
            janus_core::Checkpoint::open(&input).unwrap(),
            janus_core::Checkpoint::open(&out).unwrap(),
        );
        assert_eq!(a.tensor_names(), b.tensor_names());
        for n in a.tensor_names() {
            assert_eq!(a.shape(n), b.shape(n), "{n}");
        }
    }
}
