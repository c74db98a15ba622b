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

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 1e-4 * want.abs(),
        "{what}: {got} against {want}"
    );
}

#[test]
fn hf_losses_match_transformers() {
    let janus = Janus::load_on(&fixture("hf-tiny"), &device(), ComputeDType::F32).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("hf-tiny").join("expected/losses.json")).unwrap(),
    )
    .unwrap();
    let examples = read_jsonl(&fixture("train").join("data.jsonl")).unwrap();
    let cases = expected["examples"].as_array().unwrap();
    assert_eq!(examples.len(), cases.len());
    let tokenizer = janus.tokenizer();
    let eos = tokenizer.special().eos;
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
                // janus-rs quantises as the official code does (nearest l2-normalised code);
                // transformers' quantizer takes the nearest raw code, so both losses are checked.
                let codes = janus.encode_image(&open_image(image).unwrap()).unwrap().ids;
                assert_eq!(codes, ids(&case["codes_l2norm"]), "sample {i}");
                let theirs = ids(&case["codes"]);
                assert_eq!(want_targets, theirs, "sample {i}");
                let loss = generation_loss(&janus, prompt, &theirs).unwrap();
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
        }
    }
    let got = losses(&janus, &examples, &mut |_, _| true).unwrap();
    let want = expected["losses_l2norm"].as_array().unwrap();
    for (i, (g, w)) in got.losses.iter().zip(want).enumerate() {
        close(*g, w.as_f64().unwrap(), &format!("loss of sample {i}"));
    }
    close(got.mean, expected["mean_l2norm"].as_f64().unwrap(), "mean");
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
