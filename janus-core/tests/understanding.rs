//! Understanding against the reference: prompt ids with expanded image tokens, and greedy
//! answers, for both layouts; streaming and bad input.

mod common;

use common::*;
use janus_core::generate::text::TextGenOptions;
use janus_core::pipeline::Janus;
use janus_core::{ComputeDType, Error};

fn load(dir: &std::path::Path) -> Janus {
    Janus::load_on(dir, &device(), ComputeDType::F32).unwrap_or_else(|e| panic!("{e}"))
}

fn u32s(t: &RefTensor) -> Vec<u32> {
    t.values.iter().map(|&v| v as u32).collect()
}

fn rgb(t: &RefTensor) -> image::RgbImage {
    let (h, w) = (t.shape[0] as u32, t.shape[1] as u32);
    image::RgbImage::from_raw(w, h, t.values.iter().map(|&v| v as u8).collect()).unwrap()
}

fn greedy(n: usize) -> TextGenOptions {
    TextGenOptions {
        max_new_tokens: n,
        ..TextGenOptions::default()
    }
}

/// `got` is the reference's greedy continuation, cut after an EOS.
fn check_answer(got: &[u32], want: &[u32], eos: u32) {
    let n = want
        .iter()
        .position(|&t| t == eos)
        .map_or(want.len(), |i| i + 1);
    assert_eq!(got, &want[..n]);
}

#[test]
fn hf_understanding_matches_transformers() {
    for dir in ["hf-tiny", "hf-tiny-bf16-sharded"] {
        let janus = load(&fixture(dir));
        let r = read_reference(&fixture(dir).join("expected/multimodal.safetensors"));
        let ids = janus
            .understanding_ids("What is shown in this image?", 1)
            .unwrap();
        assert_eq!(ids, u32s(&r["mm_input_ids"]), "{dir}: prompt ids");
        let want = u32s(&r["mm_greedy_ids"]);
        let answer = janus
            .understand(
                &[rgb(&r["image_u8"])],
                "What is shown in this image?",
                &greedy(want.len()),
            )
            .unwrap();
        assert_eq!(answer.prompt_tokens, ids.len());
        check_answer(&answer.token_ids, &want, janus.tokenizer().special().eos);
    }
}

#[test]
fn original_understanding_matches_the_official_code() {
    let janus = load(&original_checkpoint("safetensors"));
    let r = read_reference(&fixture("original-tiny/expected/understand.safetensors"));
    let ids = janus
        .understanding_ids("What is shown in this image?", 1)
        .unwrap();
    assert_eq!(ids, u32s(&r["input_ids"]), "prompt ids");
    let chw = upscaled_pixels(&r["image_small_u8"], 384);
    // Back to an RGB8 image of 384 px (a square image at the model's size is not resized).
    let mut img = image::RgbImage::new(384, 384);
    for (i, px) in img.pixels_mut().enumerate() {
        for c in 0..3 {
            px.0[c] = ((chw[c * 384 * 384 + i] * 0.5 + 0.5) * 255.0).round() as u8;
        }
    }
    let want = u32s(&r["greedy_ids"]);
    let mut streamed = String::new();
    let answer = janus
        .understand_stream(
            &[img],
            "What is shown in this image?",
            &greedy(want.len()),
            &mut |s| {
                streamed.push_str(s);
                true
            },
        )
        .unwrap();
    check_answer(&answer.token_ids, &want, janus.tokenizer().special().eos);
    assert_eq!(streamed, answer.text);
    assert_eq!(answer.prompt_tokens, 676);
}

#[test]
fn bad_understanding_input_is_a_typed_error() {
    let janus = load(&fixture("hf-tiny"));
    let img = image::RgbImage::new(8, 8);
    fn invalid<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
        matches!(r, Err(Error::InvalidInput(_)))
    }
    // Placeholder count and image count disagree.
    assert!(invalid(janus.understand(
        std::slice::from_ref(&img),
        "<image_placeholder> and <image_placeholder>",
        &greedy(2)
    )));
    assert!(invalid(janus.understand(
        &[],
        "<image_placeholder> what?",
        &greedy(2)
    )));
    assert!(invalid(janus.understand(
        &[image::RgbImage::new(0, 0)],
        "what?",
        &greedy(2)
    )));
    // Past the context.
    let long = TextGenOptions {
        max_new_tokens: 5000,
        ..TextGenOptions::default()
    };
    assert!(invalid(janus.understand(
        std::slice::from_ref(&img),
        "what?",
        &long
    )));
    // Cancelled from the stream.
    let err = janus
        .understand_stream(&[img], "what?", &greedy(3), &mut |_| false)
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
}
