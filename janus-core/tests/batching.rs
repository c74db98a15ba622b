//! Batched decoding across requests (`janus_core::engine`): answers and images decoded together,
//! with sequences joining and leaving between steps, are bit-identical to what each gives alone,
//! for every weight storage (dense f32, bf16 kernels, q8_0 kernels).

mod common;

use common::*;
use janus_core::engine::{Finish, Sequence};
use janus_core::generate::image::ImageGenOptions;
use janus_core::generate::sampling::Sampling;
use janus_core::generate::text::TextGenOptions;
use janus_core::pipeline::{Janus, Turn};
use janus_core::{ComputeDType, Error, WeightFormat};

fn load(weights: WeightFormat) -> Janus {
    Janus::load_on_with(&fixture("hf-tiny"), &device(), ComputeDType::F32, weights)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A small picture whose pixels depend on `k`.
fn picture(k: u32) -> image::RgbImage {
    image::RgbImage::from_fn(40 + 7 * k, 33, |x, y| {
        image::Rgb([
            ((x * 5 + k * 40) % 256) as u8,
            ((y * 9 + x) % 256) as u8,
            ((k * 77 + y) % 256) as u8,
        ])
    })
}

fn sampled(seed: u64) -> TextGenOptions {
    TextGenOptions {
        max_new_tokens: 12,
        sampling: Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.95),
        },
        seed,
        ..TextGenOptions::default()
    }
}

fn conversations() -> Vec<Vec<Turn>> {
    vec![
        vec![Turn::user("What is shown in this image?", vec![picture(0)])],
        vec![Turn::user("Describe the scene in a few words.", vec![])],
        vec![
            Turn::user("Compare these two.", vec![picture(1), picture(2)]),
            Turn::assistant("They differ in colour."),
            Turn::user("Which one is brighter?", vec![]),
        ],
    ]
}

/// The weight storages to check: every kind on the CPU; on a GPU, which holds weights in the
/// compute dtype, that one.
fn storages() -> Vec<WeightFormat> {
    if on_gpu() {
        vec![WeightFormat::Auto]
    } else {
        vec![WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8_0]
    }
}

#[test]
fn answers_decoded_together_equal_answers_alone() {
    for weights in storages() {
        let janus = load(weights);
        let convs = conversations();
        let refs: Vec<&[Turn]> = convs.iter().map(Vec::as_slice).collect();
        for options in [
            TextGenOptions {
                max_new_tokens: 10,
                ..TextGenOptions::default()
            },
            sampled(5),
        ] {
            let together = janus.chat_batch(&refs, &options).unwrap();
            for (turns, got) in convs.iter().zip(&together) {
                let alone = janus.chat(turns, &options).unwrap();
                assert_eq!(got.token_ids, alone.token_ids, "{weights:?}");
                assert_eq!(got.text, alone.text);
                assert_eq!(got.prompt_tokens, alone.prompt_tokens);
            }
            let (images, question) = (vec![picture(3)], "What colour dominates?");
            let batch = janus
                .understand_batch(&[(&images, question), (&[], "Say hello.")], &options)
                .unwrap();
            let alone = janus.understand(&images, question, &options).unwrap();
            assert_eq!(batch[0].token_ids, alone.token_ids, "{weights:?}");
        }
    }
}

/// Requests with their own options (seeds, sampling rules) decoded together: each answer is its
/// request's alone; cancelling stops the batch.
#[test]
fn requests_with_their_own_options_equal_their_answers_alone() {
    let janus = load(WeightFormat::Auto);
    let (a, b) = (vec![picture(3)], vec![picture(7)]);
    let requests: Vec<(&[image::RgbImage], &str, TextGenOptions)> = vec![
        (&a, "What colour dominates?", sampled(1)),
        (&b, "Describe it.", sampled(2)),
        (&a, "What colour dominates?", sampled(2)),
        (
            &[],
            "Say hello.",
            TextGenOptions {
                max_new_tokens: 6,
                ..TextGenOptions::default()
            },
        ),
    ];
    let together = janus.understand_each(&requests, &mut || true).unwrap();
    for ((images, question, options), got) in requests.iter().zip(&together) {
        let alone = janus.understand(images, question, options).unwrap();
        assert_eq!(got.token_ids, alone.token_ids, "{question} {options:?}");
        assert_eq!(got.text, alone.text);
    }
    assert_ne!(together[0].token_ids, together[2].token_ids, "seeds apart");
    let mut steps = 0;
    let err = janus
        .understand_each(&requests, &mut || {
            steps += 1;
            steps < 6
        })
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
}

/// Images and answers in one batch, an answer joining after the images started and leaving
/// before they end: each equals its own call alone.
#[test]
fn images_and_answers_mixed_with_joins_and_leaves() {
    for weights in storages() {
        let janus = load(weights);
        // 4 images (8 rows), 1 more (2 rows) and an answer: more rows than one kernel call serves.
        let image_opts = ImageGenOptions {
            count: 4,
            seed: 11,
            ..ImageGenOptions::default()
        };
        let mut images = janus.begin_generate("a red fox", &image_opts).unwrap();
        let mut greedy_images = janus
            .begin_generate(
                "a blue lake",
                &ImageGenOptions {
                    sampling: Sampling::GREEDY,
                    ..ImageGenOptions::default()
                },
            )
            .unwrap();
        for _ in 0..3 {
            janus.step(&mut [&mut images, &mut greedy_images]).unwrap();
        }
        let convs = conversations();
        let short = TextGenOptions {
            max_new_tokens: 4,
            ..sampled(9)
        };
        let mut answer = janus.begin_chat(&convs[2], &short, &[]).unwrap();
        let mut streamed = String::new();
        let mut seqs: Vec<&mut Sequence> = vec![&mut images, &mut answer, &mut greedy_images];
        while seqs.iter().any(|s| !s.is_finished()) {
            janus.step(&mut seqs).unwrap();
            streamed.push_str(&seqs[1].take_text());
        }
        assert_eq!(answer.finish(), Some(Finish::Length));
        let got = janus.finish_answer(answer).unwrap();
        assert_eq!(streamed, got.text, "the pieces add up to the answer");
        let alone = janus.chat(&convs[2], &short).unwrap();
        assert_eq!(got.token_ids, alone.token_ids, "{weights:?}: answer");
        for (seq, prompt, opts) in [
            (images, "a red fox", image_opts.clone()),
            (
                greedy_images,
                "a blue lake",
                ImageGenOptions {
                    sampling: Sampling::GREEDY,
                    ..ImageGenOptions::default()
                },
            ),
        ] {
            let got = janus.finish_images(seq).unwrap();
            let alone = janus.generate(prompt, &opts).unwrap();
            assert_eq!(got.len(), alone.len());
            for (g, a) in got.iter().zip(&alone) {
                assert_eq!(g.tokens, a.tokens, "{weights:?}: {prompt}");
                assert_eq!(g.image, a.image);
            }
        }
    }
}

#[test]
fn a_stop_string_cuts_the_answer() {
    let janus = load(if on_gpu() {
        WeightFormat::Auto
    } else {
        WeightFormat::Bf16
    });
    let turns = vec![Turn::user("Describe the scene.", vec![picture(4)])];
    let options = TextGenOptions {
        max_new_tokens: 16,
        ..sampled(3)
    };
    let full = janus.chat(&turns, &options).unwrap();
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    assert!(
        chars.len() > 6,
        "the answer is long enough: {:?}",
        full.text
    );
    // A stop string starting in the middle of the answer.
    let (at, _) = chars[chars.len() / 2];
    let end = chars
        .get(chars.len() / 2 + 2)
        .map_or(full.text.len(), |c| c.0);
    let stop = full.text[at..end].to_string();
    let cut = full.text.find(&stop).unwrap();
    let mut seq = janus
        .begin_chat(&turns, &options, std::slice::from_ref(&stop))
        .unwrap();
    let mut streamed = String::new();
    while !seq.is_finished() {
        janus.step(&mut [&mut seq]).unwrap();
        streamed.push_str(&seq.take_text());
    }
    assert_eq!(seq.finish(), Some(Finish::StopString));
    let got = janus.finish_answer(seq).unwrap();
    assert_eq!(got.text, full.text[..cut], "cut before {stop:?}");
    assert_eq!(
        streamed, got.text,
        "nothing of the stop string was streamed"
    );
    assert_eq!(got.token_ids[..], full.token_ids[..got.token_ids.len()]);
}
