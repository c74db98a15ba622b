//! Understanding against the reference: prompt ids with expanded image tokens, and greedy
//! answers, for both layouts; streaming and bad input.

mod common;

use common::*;
use janus_core::device::HostReads;
use janus_core::generate::text::TextGenOptions;
use janus_core::pipeline::{Janus, Turn};
use janus_core::processor::image::{ImageProcessorConfig, preprocess_for_understanding};
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
    // hf-tiny-v4 holds hf-tiny-bf16-sharded's tensors in the files transformers 4.x writes.
    for (dir, expected) in [
        ("hf-tiny", "hf-tiny"),
        ("hf-tiny-bf16-sharded", "hf-tiny-bf16-sharded"),
        ("hf-tiny-v4", "hf-tiny-bf16-sharded"),
    ] {
        let janus = load(&fixture(dir));
        let r = read_reference(&fixture(expected).join("expected/multimodal.safetensors"));
        let ids = janus
            .understanding_ids("What is shown in this image?", 1)
            .unwrap();
        assert_eq!(ids, u32s(&r["mm_input_ids"]), "{dir}: prompt ids");
        let want = u32s(&r["mm_greedy_ids"]);
        let mut streamed = String::new();
        let answer = janus
            .understand_stream(
                &[rgb(&r["image_u8"])],
                "What is shown in this image?",
                &greedy(want.len()),
                &mut |s| {
                    streamed.push_str(s);
                    true
                },
            )
            .unwrap();
        assert_eq!(
            streamed, answer.text,
            "{dir}: the pieces add up to the answer"
        );
        assert_eq!(answer.prompt_tokens, ids.len());
        check_answer(&answer.token_ids, &want, janus.tokenizer().special().eos);
    }
}

/// `expected/prompts.json`: understanding, conversation and generation prompt ids through
/// transformers' processor and the checkpoint's own chat template, in both file forms
/// (`chat_template.jinja` from transformers 5, `chat_template.json` from transformers 4).
#[test]
fn hf_prompt_ids_equal_the_processors() {
    for dir in ["hf-tiny", "hf-tiny-v4"] {
        let janus = load(&fixture(dir));
        let path = fixture(dir).join("expected/prompts.json");
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let cases = record["cases"].as_array().unwrap();
        assert!(cases.len() >= 8, "{dir}: {} cases", cases.len());
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let want: Vec<u32> = case["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let turns: Vec<Turn> = case["turns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    let text = t["text"].as_str().unwrap();
                    let images =
                        vec![image::RgbImage::new(2, 2); t["images"].as_u64().unwrap() as usize];
                    match t["role"].as_str().unwrap() {
                        "user" => Turn::user(text, images),
                        "assistant" => Turn::assistant(text),
                        other => panic!("{other}"),
                    }
                })
                .collect();
            let got = match case["mode"].as_str().unwrap() {
                "generate" => janus.generation_ids(&turns[0].content).unwrap(),
                _ if turns.len() == 1 => janus
                    .understanding_ids(&turns[0].content, turns[0].images.len())
                    .unwrap(),
                _ => janus.conversation_ids(&turns).unwrap(),
            };
            assert_eq!(got, want, "{dir}: {name}");
        }
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

/// A multi-turn conversation with two non-square images (one placed before the text, one by a
/// tag), against `expected/chat.safetensors`: the prompt ids, the processor's `pixel_values`, the
/// logits of all eight greedy steps (teacher-forced) and the greedy tokens themselves.
fn check_chat(dir: &std::path::Path, expected: &std::path::Path) {
    let janus = load(dir);
    let r = read_reference(expected);
    let turns = [
        Turn::user("Describe the first image.", vec![rgb(&r["image_a_u8"])]),
        Turn::assistant("A red disc on a gradient."),
        Turn::user(
            "Here is another one: <image_placeholder>\nWhat changed?",
            vec![rgb(&r["image_b_u8"])],
        ),
    ];
    let ids = janus.conversation_ids(&turns).unwrap();
    assert_eq!(ids, u32s(&r["input_ids"]), "prompt ids");

    // Preprocessing: max |Δ| ≤ 1e-6 (both processors are matched bit for bit here).
    let cfg = ImageProcessorConfig::from_dir(dir, janus.config().layout).unwrap();
    let pixels: Vec<f64> = turns
        .iter()
        .flat_map(|t| &t.images)
        .flat_map(|img| preprocess_for_understanding(img, &cfg))
        .map(f64::from)
        .collect();
    let pv = &r["pixel_values"];
    let d = max_abs_diff(&pv.shape, &pixels, pv);
    eprintln!("{}: pixel_values max |Δ| {d:.2e}", dir.display());
    assert!(d <= 1e-6, "pixel_values differ by {d}");

    // Teacher-forced logits of the greedy steps: max |Δ| ≤ 1e-4.
    let model = janus.model();
    let want = u32s(&r["greedy_ids"]);
    let size = cfg.image_size;
    let pixels = burn::tensor::Tensor::<4>::from_data(
        burn::tensor::TensorData::new(
            pixels.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            [2, 3, size, size],
        ),
        (&device(), model.llm.dtype()),
    );
    let features = model.heads.aligner.forward(model.vision.forward(pixels));
    let mut full = ids.clone();
    full.extend(&want[..want.len() - 1]);
    let sp = *janus.tokenizer().special();
    let embeds = janus_core::generate::text::embed_with_images(
        model,
        &full,
        sp.image_placeholder,
        Some(features),
    )
    .unwrap();
    let mut cache = model.llm.new_cache(full.len());
    let hidden = model.llm.forward(embeds, &mut cache).unwrap();
    let logits = model
        .llm
        .logits(hidden.narrow(1, ids.len() - 1, want.len()));
    let (shape, got) = values(logits);
    let d = max_abs_diff(&shape, &got, &r["greedy_logits"]);
    eprintln!("{}: greedy-step logits max |Δ| {d:.2e}", dir.display());
    assert!(d <= 1e-4, "greedy-step logits differ by {d}");

    let mut streamed = String::new();
    let answer = janus
        .chat_stream(&turns, &greedy(want.len()), &mut |s| {
            streamed.push_str(s);
            true
        })
        .unwrap();
    assert_eq!(answer.prompt_tokens, ids.len());
    check_answer(&answer.token_ids, &want, sp.eos);
    assert_eq!(streamed, answer.text);
}

#[test]
fn hf_multi_turn_two_image_chat_matches_transformers() {
    check_chat(
        &fixture("hf-tiny"),
        &fixture("hf-tiny/expected/chat.safetensors"),
    );
}

#[test]
fn original_multi_turn_two_image_chat_matches_the_official_code() {
    check_chat(
        &original_checkpoint("safetensors"),
        &fixture("original-tiny/expected/chat.safetensors"),
    );
}

#[test]
fn malformed_conversations_are_typed_errors() {
    let janus = load(&fixture("hf-tiny"));
    let img = image::RgbImage::new(8, 8);
    let q = Turn::user("what?", vec![]);
    let a = Turn::assistant("that.");
    for turns in [
        vec![],
        vec![a.clone()],
        vec![q.clone(), a.clone()],
        vec![q.clone(), q.clone()],
        vec![Turn::user(
            "<image_placeholder>",
            vec![img.clone(), img.clone()],
        )],
        vec![Turn::user("", vec![])],
    ] {
        let err = janus.chat(&turns, &greedy(2)).unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{turns:?}: {err}");
    }
    let err = janus
        .chat(&[q, a, Turn::user("and?", vec![img])], &greedy(3))
        .map(|_| ())
        .and_then(|_| janus.chat_stream(&[Turn::user("x", vec![])], &greedy(3), &mut |_| false))
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
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

#[test]
fn an_answer_step_reads_the_device_once() {
    // On a GPU each token reads back its pick and nothing else, with top-k, top-p and a
    // repetition penalty too; the CPU backend's tensors are host memory.
    let janus = load(&fixture("hf-tiny"));
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 6, y as u8 * 8, 90]));
    for options in [
        greedy(6),
        TextGenOptions {
            sampling: janus_core::generate::sampling::Sampling {
                temperature: 0.8,
                top_k: Some(20),
                top_p: Some(0.9),
            },
            repetition_penalty: 1.3,
            seed: 4,
            ..greedy(6)
        },
    ] {
        let before = janus_core::device::host_reads();
        let answer = janus
            .understand(std::slice::from_ref(&img), "what is this?", &options)
            .unwrap();
        let reads = janus_core::device::host_reads() - before;
        let steps = answer.token_ids.len();
        // Per token three f32.
        let want = if on_gpu() {
            HostReads {
                count: steps as u64,
                bytes: (steps * 3 * 4) as u64,
            }
        } else {
            HostReads::default()
        };
        assert_eq!(reads, want, "{options:?}: {steps} tokens");
    }
}
