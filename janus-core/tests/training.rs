//! The training objective against transformers' Janus: each sample's token ids, VQ codes and
//! cross-entropy (`tests/fixtures/hf-tiny/expected/losses.json`, written by
//! `tests/reference/make_fixtures.py loss` from `tests/fixtures/train/data.jsonl`).

mod common;

use common::*;
use janus_core::pipeline::Janus;
use janus_core::processor::image::open_image;
use janus_core::train::{Example, generation_loss, losses, read_jsonl};
use janus_core::{ComputeDType, Error};
use serde_json::Value;

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-4 * want.abs(),
        "{what}: {got} against {want}"
    );
}

/// Every sample of `tests/fixtures/train/data.jsonl` through `janus` against the reference's
/// record `expected` (`losses.json`): the ids fed, the targets, the VQ codes (but at the
/// positions the record lists as near ties of the quantizer), each loss and the mean.
/// `codes_key`: the record's codes janus-rs must give (its quantizer is the official one).
fn check_losses(janus: &Janus, expected: &Value, codes_key: &str) {
    let examples = read_jsonl(&fixture("train").join("data.jsonl")).unwrap();
    let cases = expected["examples"].as_array().unwrap();
    assert_eq!(examples.len(), cases.len());
    let tokenizer = janus.tokenizer();
    let eos = tokenizer.special().eos;
    let mut same_codes = true;
    for (i, (example, case)) in examples.iter().zip(cases).enumerate() {
        assert_eq!(case["task"], example.task(), "sample {i}");
        // The ids the reference fed, built as janus-rs builds them.
        let (want_ids, want_targets) = (ids(&case["input_ids"]), ids(&case["targets"]));
        match example {
            Example::Generate { prompt, image } => {
                assert_eq!(
                    janus.generation_ids(prompt).unwrap(),
                    want_ids,
                    "sample {i}"
                );
                let codes = janus.encode_image(&open_image(image).unwrap()).unwrap().ids;
                let want = ids(&case[codes_key]);
                let ties: Vec<usize> = case
                    .get("near_tie_positions")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|v| v.as_u64().unwrap() as usize).collect())
                    .unwrap_or_default();
                assert_eq!(codes.len(), want.len(), "sample {i}");
                for (j, (g, w)) in codes.iter().zip(&want).enumerate() {
                    assert!(
                        g == w || ties.contains(&j),
                        "sample {i}, code {j}: {g} vs {w}"
                    );
                }
                same_codes &= codes == want;
                // The loss of the reference's own codes (its `targets`), whichever they are.
                let loss = generation_loss(janus, prompt, &want_targets).unwrap();
                close(loss, case["loss"].as_f64().unwrap(), &format!("sample {i}"));
            }
            Example::Understand {
                images,
                question,
                answer,
            } => {
                let mut built = janus.understanding_ids(question, images.len()).unwrap();
                let mut answer_ids = tokenizer.encode(answer, false).unwrap();
                answer_ids.push(eos);
                assert_eq!(answer_ids, want_targets, "sample {i}");
                built.extend(answer_ids);
                assert_eq!(built, want_ids, "sample {i}");
            }
            Example::Text { text } => {
                let built = tokenizer.encode(text, true).unwrap();
                assert_eq!(built[1..], want_targets[..], "sample {i}");
                assert_eq!(built, want_ids, "sample {i}");
            }
            Example::Conversation { .. } => panic!("data.jsonl has no multi-turn sample"),
        }
    }
    // Each sample's loss as `janus loss` reports it: comparable with the record's where every
    // code came out as the record's (a near tie may flip one).
    let got = losses(janus, &examples, &mut |_, _| true).unwrap();
    let key = format!("losses{}", codes_key.strip_prefix("codes").unwrap());
    let want = expected[&key].as_array().unwrap();
    for (i, ((g, w), example)) in got.losses.iter().zip(want).zip(&examples).enumerate() {
        if same_codes || !matches!(example, Example::Generate { .. }) {
            close(*g, w.as_f64().unwrap(), &format!("loss of sample {i}"));
        }
    }
    if same_codes {
        let mean = format!("mean{}", codes_key.strip_prefix("codes").unwrap());
        close(got.mean, expected[&mean].as_f64().unwrap(), "mean");
    }
}

fn expected(dir: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected/losses.json")).unwrap())
        .unwrap()
}

/// transformers' quantizer takes the nearest raw code, the official one (and janus-rs) the
/// nearest l2-normalised one: janus-rs's codes are the record's `codes_l2norm`, and the loss
/// of transformers' own codes is checked through `generation_loss`.
#[test]
fn hf_losses_match_transformers() {
    let janus = Janus::load_on(&fixture("hf-tiny"), &device(), ComputeDType::F32).unwrap();
    check_losses(&janus, &expected(&fixture("hf-tiny")), "codes_l2norm");
}

/// The official code on the original-layout checkpoint (384-pixel images: the 64-pixel samples
/// are resized, and a 24×24 grid of 16384 codes of width 8 has near ties, which the record lists).
#[test]
fn original_losses_match_the_official_code() {
    let janus = Janus::load_on(
        &original_checkpoint("safetensors"),
        &device(),
        ComputeDType::F32,
    )
    .unwrap();
    check_losses(&janus, &expected(&fixture("original-tiny")), "codes");
}

/// The multi-turn samples of `tests/fixtures/train/turns.jsonl` against the reference's record
/// (`losses_turns.json`, `make_fixtures.py loss-turns` / `loss-turns-original`): ids, the
/// positions the loss covers, each loss and the mean.
fn check_turns(janus: &Janus, dir: &std::path::Path) {
    use janus_core::train::loss::conversation_ids;
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected/losses_turns.json")).unwrap(),
    )
    .unwrap();
    let examples = read_jsonl(&fixture("train").join("turns.jsonl")).unwrap();
    let cases = expected["examples"].as_array().unwrap();
    assert_eq!(examples.len(), cases.len());
    for (i, (example, case)) in examples.iter().zip(cases).enumerate() {
        let Example::Conversation { turns } = example else {
            panic!("sample {i} is a conversation")
        };
        let (ids_built, positions) = conversation_ids(janus, turns).unwrap();
        assert_eq!(ids_built, ids(&case["input_ids"]), "sample {i}");
        let want_positions: Vec<usize> = ids(&case["target_positions"])
            .into_iter()
            .map(|p| p as usize)
            .collect();
        assert_eq!(positions, want_positions, "sample {i}");
    }
    let got = losses(janus, &examples, &mut |_, _| true).unwrap();
    for (i, (g, w)) in got
        .losses
        .iter()
        .zip(expected["losses"].as_array().unwrap())
        .enumerate()
    {
        close(*g, w.as_f64().unwrap(), &format!("loss of sample {i}"));
    }
    close(got.mean, expected["mean"].as_f64().unwrap(), "mean");
}

#[test]
fn hf_multi_turn_losses_match_transformers() {
    let janus = Janus::load_on(&fixture("hf-tiny"), &device(), ComputeDType::F32).unwrap();
    check_turns(&janus, &fixture("hf-tiny"));
}

#[test]
fn original_multi_turn_losses_match_the_official_code() {
    let janus = Janus::load_on(
        &original_checkpoint("safetensors"),
        &device(),
        ComputeDType::F32,
    )
    .unwrap();
    check_turns(&janus, &fixture("original-tiny"));
}

#[test]
fn bad_samples_are_errors_that_name_them() {
    let janus = Janus::load_on(&fixture("hf-tiny"), &device(), ComputeDType::F32).unwrap();
    let vq = &janus.config().vq;
    let short = vec![0; vq.num_tokens() - 1];
    let outside = vec![vq.codebook_size as u32; vq.num_tokens()];
    for codes in [short, outside] {
        let err = generation_loss(&janus, "a cat", &codes).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    }
    let missing = Example::Generate {
        prompt: "a cat".into(),
        image: fixture("train").join("no-such.png"),
    };
    let nothing = Example::Text {
        text: String::new(),
    };
    let fine = Example::Text {
        text: "a cat".into(),
    };
    assert!(losses(&janus, &[fine.clone(), missing], &mut |_, _| true).is_err());
    let err = losses(&janus, &[fine.clone(), nothing], &mut |_, _| true).unwrap_err();
    assert!(err.to_string().contains("sample 2"), "{err}");
    let stop = losses(&janus, &[fine.clone(), fine], &mut |done, _| done < 1);
    assert!(matches!(stop, Err(Error::Cancelled)));
}
