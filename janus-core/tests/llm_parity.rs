//! The language model against the reference implementations' logits, for every checkpoint
//! layout and file format: prefill, incremental decoding with the KV cache, and one full pass.

mod common;

use std::path::Path;

use burn::tensor::Tensor;
use common::*;
use janus_core::nn::kernels::Bf16Gemm;
use janus_core::{ComputeDType, Error, JanusModel, WeightFormat};

/// f32 logits must match the reference this closely.
const TOL: f64 = 1e-4;

/// `q8_0` logits against the reference: the cosine over all logits of a pass at least this, and
/// no logit further than this fraction of the largest reference logit (8-bit weights and
/// activations, 32 values a scale).
const Q8_COSINE: f64 = 0.999;
const Q8_REL: f64 = 0.05;

fn is_cpu() -> bool {
    std::env::var("JANUS_TEST_DEVICE").map_or(true, |d| d == "cpu")
}

fn check(dir: &Path, expected: &Path) {
    check_with(dir, expected, WeightFormat::Auto);
}

/// The logits of the model loaded with `weights` against the reference's: within [`TOL`] for
/// float storages, within the `q8_0` bounds for quantized ones.
fn check_with(dir: &Path, expected: &Path, weights: WeightFormat) {
    let device = device();
    let model = JanusModel::load_with(dir, &device, ComputeDType::F32, weights)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let quantized = matches!(weights, WeightFormat::Q8_0 | WeightFormat::Q4_0);
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
    let mut passes = vec![("prefill logits", l, "prefill_logits")];

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
    passes.push(("step logits", l, "step_logits"));

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
    passes.push(("full logits", l, "full_logits"));

    println!(
        "{} ({weights} → {}): max |Δ| hidden {d_hidden:.2e}, prefill logits {d_prefill:.2e}, step logits {d_steps:.2e}, full logits {d_full:.2e}",
        dir.display(),
        model.storage.format
    );
    if quantized {
        for (what, got, key) in passes {
            let want = &r[key].values;
            let dot: f64 = got.iter().zip(want).map(|(a, b)| a * b).sum();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let cosine = dot / (norm(&got) * norm(want));
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(want)
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            println!("  {what}: cosine {cosine:.6}, max |Δ| {worst:.3e} of {scale:.3e}");
            assert!(
                cosine >= Q8_COSINE,
                "{}: {what} cosine {cosine}",
                dir.display()
            );
            assert!(
                worst <= Q8_REL * scale,
                "{}: {what} differ by {worst:e}",
                dir.display()
            );
        }
        return;
    }
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

/// `auto` keeps the half precision a checkpoint stores on the CPU (the kernels widen it in
/// registers) and f32 files in f32; the parity tests above run with it.
#[test]
fn auto_keeps_the_stored_precision() {
    let device = device();
    for (dir, stored) in [
        ("hf-tiny", WeightFormat::F32),
        ("hf-tiny-bf16-sharded", WeightFormat::Bf16),
    ] {
        let model = JanusModel::load(&fixture(dir), &device, ComputeDType::F32).unwrap();
        let expected = if is_cpu() { stored } else { WeightFormat::F32 };
        assert_eq!(model.storage.format, expected, "{dir}");
        assert!(model.storage.bytes > 0);
        assert_eq!(
            model.storage.by_format.iter().map(|f| f.1).sum::<usize>(),
            model.storage.bytes
        );
    }
}

/// bf16 files widened to f32 at load: the dense path, same logits.
#[test]
fn hf_bf16_files_as_f32_weights() {
    check_with(
        &fixture("hf-tiny-bf16-sharded"),
        &fixture("hf-tiny-bf16-sharded/expected/llm.safetensors"),
        WeightFormat::F32,
    );
}

/// `q8_0` from an f32 file and from a bf16 one (q/k/v split in the transformers layout,
/// quantized part by part into one matrix), within the documented bounds.
#[test]
fn q8_0_weights_stay_close_to_the_reference() {
    if !is_cpu() {
        return;
    }
    for dir in ["hf-tiny", "hf-tiny-bf16-sharded"] {
        check_with(
            &fixture(dir),
            &fixture(dir).join("expected/llm.safetensors"),
            WeightFormat::Q8_0,
        );
    }
    check_with(
        &original_checkpoint("safetensors"),
        &fixture("original-tiny/expected/llm.safetensors"),
        WeightFormat::Q8_0,
    );
}

/// Storages the compute dtype or the backend cannot use are typed errors before any read.
#[test]
fn impossible_storages_are_typed_errors() {
    let device = device();
    let dir = fixture("hf-tiny");
    if is_cpu() {
        for (dtype, weights) in [
            (ComputeDType::BF16, WeightFormat::Q8_0),
            (ComputeDType::F16, WeightFormat::Q4_0),
            (ComputeDType::BF16, WeightFormat::F32),
        ] {
            let got = JanusModel::load_with(&dir, &device, dtype, weights);
            assert!(
                matches!(got, Err(Error::InvalidInput(_))),
                "{dtype:?} with {weights}: {got:?}"
            );
        }
    } else {
        let got = JanusModel::load_with(&dir, &device, ComputeDType::F32, WeightFormat::Q8_0);
        assert!(matches!(got, Err(Error::Unsupported(_))), "{got:?}");
    }
}

/// `--dtype bf16` on the CPU (bf16 weights, prompt products with bf16 operands and f32 sums,
/// everything else in f32) against PyTorch's bf16 model (`expected/llm-bf16.safetensors`, every
/// weight and activation in bf16) over the full pass of `llm.safetensors`. PyTorch's bf16 logits
/// are `d_ref` = max |bf16 − f32| from its f32 ones; ours must be at least as close to the f32
/// ones (no less exact than the reference's bf16 path; measured: about half as far), and pick
/// the bf16 reference's greedy token wherever the two references agree on it with a top-2 margin
/// above [`BF16_MARGIN`] in each. Where this machine has a bf16 instruction path the result must
/// differ from the exact one, or the path did not run.
#[test]
fn bf16_compute_against_pytorch_bf16() {
    if !is_cpu() {
        return;
    }
    let dir = fixture("hf-tiny-bf16-sharded");
    let f32_ref = read_reference(&dir.join("expected/llm.safetensors"));
    let bf16_ref = read_reference(&dir.join("expected/llm-bf16.safetensors"));
    let device = device();
    let model = JanusModel::load(&dir, &device, ComputeDType::BF16).unwrap();
    let llm = &model.llm;
    let full = full_rows(&f32_ref);
    let mut cache = llm.new_cache(full[0].len());
    let h = llm.forward(llm.embed(&full).unwrap(), &mut cache).unwrap();
    let (shape, got) = values(llm.logits(h));
    let (d_ref, d_bf16, d_f32, checked, equal) = against_references(
        &shape,
        &got,
        &bf16_ref["full_logits"],
        &f32_ref["full_logits"],
    );
    println!(
        "bf16 compute: max |Δ| to PyTorch bf16 {d_bf16:.3e}, to f32 {d_f32:.3e} (PyTorch bf16 to f32 {d_ref:.3e}); greedy {equal}/{checked}"
    );
    assert!(d_f32 <= d_ref, "{d_f32:e} from f32, PyTorch bf16 {d_ref:e}");
    assert!(checked > 0 && equal == checked, "greedy {equal}/{checked}");
    if Bf16Gemm::selected().unwrap().is_some() {
        assert!(d_f32 > TOL, "bf16 products did not run: {d_f32:e} from f32");
    } else {
        assert!(d_f32 <= TOL, "no bf16 path: the exact products, {d_f32:e}");
    }
}

/// See [`bf16_compute_against_pytorch_bf16`].
const BF16_MARGIN: f64 = 1e-2;

/// The references' ids of a full pass (prompt then steps), each row.
fn full_rows(f32_ref: &std::collections::HashMap<String, RefTensor>) -> Vec<Vec<u32>> {
    id_rows(&f32_ref["input_ids"])
        .iter()
        .zip(id_rows(&f32_ref["step_ids"]))
        .map(|(a, b)| a.iter().chain(&b).copied().collect())
        .collect()
}

/// Logits `got` (shape `shape`) of a full pass against PyTorch's bf16 (`want`) and f32 (`exact`)
/// ones: (max |Δ| of bf16 to f32, of `got` to bf16, of `got` to f32, positions where both
/// references pick the same greedy token with a top-2 margin above [`BF16_MARGIN`], and how many
/// of them `got` picks too).
fn against_references(
    shape: &[usize],
    got: &[f64],
    want: &RefTensor,
    exact: &RefTensor,
) -> (f64, f64, f64, usize, usize) {
    let d_ref = max_abs_diff(shape, &exact.values, want);
    let d_bf16 = max_abs_diff(shape, got, want);
    let d_f32 = max_abs_diff(shape, got, exact);
    let vocab = *shape.last().unwrap();
    let (mut checked, mut equal) = (0, 0);
    for p in 0..got.len() / vocab {
        let at = |v: &[f64]| top2(&v[p * vocab..(p + 1) * vocab]);
        let ((tb, mb), (tf, mf), (tg, _)) = (at(&want.values), at(&exact.values), at(got));
        if tb == tf && mb > BF16_MARGIN && mf > BF16_MARGIN {
            checked += 1;
            equal += usize::from(tg == tb);
        }
    }
    (d_ref, d_bf16, d_f32, checked, equal)
}

/// Half-precision compute on a GPU (f16, and bf16 where the adapter has it; each skipped with the
/// reason where it does not): the logits of a full pass no further from the f32 reference than
/// PyTorch's bf16 logits are (f16 keeps 3 more mantissa bits than bf16), twice that for bf16
/// (every tensor rounded, as PyTorch's, but summed in another order), and the greedy token equal to the references' wherever they
/// agree on it with a top-2 margin above [`BF16_MARGIN`].
#[test]
fn half_compute_on_a_gpu() {
    if is_cpu() {
        return;
    }
    let dir = fixture("hf-tiny-bf16-sharded");
    let f32_ref = read_reference(&dir.join("expected/llm.safetensors"));
    let bf16_ref = read_reference(&dir.join("expected/llm-bf16.safetensors"));
    let device = device();
    let full = full_rows(&f32_ref);
    for dtype in [ComputeDType::F16, ComputeDType::BF16] {
        if !device.supports_dtype(dtype.burn()) {
            println!("{}: skipped, this adapter does not offer it", dtype.name());
            match JanusModel::load(&dir, &device, dtype) {
                Err(Error::Unsupported(why)) => println!("  (loading says: {why})"),
                other => panic!("{}: expected Unsupported, got {other:?}", dtype.name()),
            }
            continue;
        }
        let model = JanusModel::load(&dir, &device, dtype).unwrap();
        let llm = &model.llm;
        let mut cache = llm.new_cache(full[0].len());
        let h = llm.forward(llm.embed(&full).unwrap(), &mut cache).unwrap();
        let (shape, got) = values(llm.logits(h));
        let (d_ref, _, d_f32, checked, equal) = against_references(
            &shape,
            &got,
            &bf16_ref["full_logits"],
            &f32_ref["full_logits"],
        );
        println!(
            "{} on the GPU: max |Δ| to f32 {d_f32:.3e} (PyTorch bf16 to f32 {d_ref:.3e}); greedy {equal}/{checked}",
            dtype.name()
        );
        assert!(d_f32 > 0.0, "{}: the half path did not run", dtype.name());
        let bound = match dtype {
            ComputeDType::F16 => d_ref,
            _ => 2.0 * d_ref,
        };
        assert!(d_f32 <= bound, "{}: {d_f32:e} from f32", dtype.name());
        assert!(checked > 0 && equal == checked, "greedy {equal}/{checked}");
    }
}

/// The best index of `v` and its margin over the second best.
fn top2(v: &[f64]) -> (usize, f64) {
    let (mut best, mut second) = ((0, f64::MIN), f64::MIN);
    for (i, &x) in v.iter().enumerate() {
        if x > best.1 {
            second = best.1;
            best = (i, x);
        } else if x > second {
            second = x;
        }
    }
    (best.0, best.1 - second)
}

/// bf16 safetensors are read in place (the matrices borrow the mapped files' pages), the same
/// tensors pickled are copied; both give the same logits, bit for bit (the tests above check
/// each against the reference).
#[test]
fn bf16_safetensors_are_read_in_place() {
    if !is_cpu() {
        return;
    }
    let device = device();
    let load = |dir: &str| {
        JanusModel::load_with(
            &fixture(dir),
            &device,
            ComputeDType::F32,
            WeightFormat::Auto,
        )
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
    };
    let mapped = load("hf-tiny-bf16-sharded");
    let copied = load("hf-tiny-bin-sharded-bf16");
    assert_eq!(copied.storage.mapped, 0, "a pickled checkpoint is copied");
    if janus_core::load::in_place() {
        assert!(
            mapped.storage.mapped > 0 && mapped.storage.mapped <= mapped.storage.bytes,
            "{:?}",
            mapped.storage
        );
    } else {
        assert_eq!(mapped.storage.mapped, 0, "JANUS_MMAP=0 copies");
    }
    let r = read_reference(&fixture("hf-tiny-bf16-sharded").join("expected/llm.safetensors"));
    let ids = id_rows(&r["input_ids"]);
    let logits = |m: &JanusModel| {
        let mut cache = m.llm.new_cache(ids[0].len());
        let h = m
            .llm
            .forward(m.llm.embed(&ids).unwrap(), &mut cache)
            .unwrap();
        values(m.llm.logits(h)).1
    };
    assert_eq!(logits(&mapped), logits(&copied));
}
