//! The language model against the reference implementations' logits, for every checkpoint
//! layout and file format: prefill, incremental decoding with the KV cache, and one full pass.

mod common;

use std::path::Path;

use burn::tensor::Tensor;
use common::*;
use janus_core::{ComputeDType, JanusModel};

/// f32 logits must match the reference this closely.
const TOL: f64 = 1e-4;

fn check(dir: &Path, expected: &Path) {
    let device = device();
    let model = JanusModel::load(dir, &device, ComputeDType::F32)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let r = read_reference(expected);
    let llm = &model.llm;
    let ids = id_rows(&r["input_ids"]);
    let steps = id_rows(&r["step_ids"]);

    // Prefill, with a cache smaller than needed so that it has to grow.
    let mut cache = llm.new_cache(4);
    let hidden = llm.forward(llm.embed(&ids).unwrap(), &mut cache).unwrap();
    let (shape, h) = values(hidden.clone());
    let d_hidden = max_abs_diff(&shape, &h, &r["prefill_hidden"]);
    let (shape, l) = values(llm.logits(hidden));
    let d_prefill = max_abs_diff(&shape, &l, &r["prefill_logits"]);

    // One token per step after the prefill.
    let mut step_logits = Vec::new();
    for s in 0..steps[0].len() {
        let col: Vec<Vec<u32>> = steps.iter().map(|row| vec![row[s]]).collect();
        let h = llm.forward(llm.embed(&col).unwrap(), &mut cache).unwrap();
        step_logits.push(llm.logits(h));
    }
    assert_eq!(cache.len(), ids[0].len() + steps[0].len());
    let (shape, l) = values(Tensor::cat(step_logits, 1));
    let d_steps = max_abs_diff(&shape, &l, &r["step_logits"]);

    // The whole sequence at once.
    let full: Vec<Vec<u32>> = ids
        .iter()
        .zip(&steps)
        .map(|(a, b)| a.iter().chain(b).copied().collect())
        .collect();
    let mut cache = llm.new_cache(full[0].len());
    let h = llm.forward(llm.embed(&full).unwrap(), &mut cache).unwrap();
    let (shape, l) = values(llm.logits(h));
    let d_full = max_abs_diff(&shape, &l, &r["full_logits"]);

    println!(
        "{}: max |Δ| hidden {d_hidden:.2e}, prefill logits {d_prefill:.2e}, step logits {d_steps:.2e}, full logits {d_full:.2e}",
        dir.display()
    );
    for (what, d) in [
        ("hidden", d_hidden),
        ("prefill logits", d_prefill),
        ("step logits", d_steps),
        ("full logits", d_full),
    ] {
        assert!(d <= TOL, "{}: {what} differ by {d:e}", dir.display());
    }
}

fn hf(dir: &str, expected_from: &str) {
    check(
        &fixture(dir),
        &fixture(expected_from).join("expected/llm.safetensors"),
    );
}

fn original(variant: &str) {
    check(
        &original_checkpoint(variant),
        &fixture("original-tiny/expected/llm.safetensors"),
    );
}

#[test]
fn hf_safetensors_f32() {
    hf("hf-tiny", "hf-tiny");
}

#[test]
fn hf_safetensors_bf16_sharded() {
    hf("hf-tiny-bf16-sharded", "hf-tiny-bf16-sharded");
}

/// The files of transformers 4.x (`rope_theta`, `preprocessor_config.json`, …) holding the
/// tensors of `hf-tiny-bf16-sharded`.
#[test]
fn hf_transformers_4_files() {
    hf("hf-tiny-v4", "hf-tiny-bf16-sharded");
}

#[test]
fn hf_pickle_f32() {
    hf("hf-tiny-bin", "hf-tiny");
}

#[test]
fn hf_pickle_bf16_sharded() {
    hf("hf-tiny-bin-sharded-bf16", "hf-tiny-bf16-sharded");
}

#[test]
fn original_pickle_bf16() {
    original("bin");
}

#[test]
fn original_pickle_bf16_sharded() {
    original("bin-sharded");
}

#[test]
fn original_safetensors_bf16() {
    original("safetensors");
}
