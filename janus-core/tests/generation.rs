//! Text-to-image generation against the reference: prompt ids, the CFG logits of the first
//! steps, greedy image tokens (one and two images per call) and decoded pixels, in both layouts;
//! seeds, cancellation and bad input.

mod common;

use burn::tensor::module::embedding;
use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use janus_core::device::HostReads;
use janus_core::generate::image::{ImageGenOptions, unconditional_ids};
use janus_core::generate::sampling::Sampling;
use janus_core::pipeline::{ImageTokens, Janus};
use janus_core::{ComputeDType, Error};

fn load(dir: &std::path::Path) -> Janus {
    Janus::load_on(dir, &device(), ComputeDType::F32).unwrap_or_else(|e| panic!("{e}"))
}

fn greedy(count: usize) -> ImageGenOptions {
    ImageGenOptions {
        count,
        cfg_weight: 5.0,
        sampling: Sampling::GREEDY,
        seed: 0,
    }
}

fn as_u32(t: &RefTensor) -> Vec<u32> {
    t.values.iter().map(|&v| v as u32).collect()
}

/// Largest per-channel difference between an image and a reference `[1, h, w, 3]` u8 array.
fn max_pixel_diff(img: &image::RgbImage, want: &RefTensor) -> f64 {
    assert_eq!(
        [img.height() as usize, img.width() as usize, 3],
        want.shape[1..],
        "image size"
    );
    img.as_raw()
        .iter()
        .zip(&want.values)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max)
}

/// The first two CFG steps, teacher-forced, against the reference's gen-head logits.
fn check_first_steps(
    janus: &Janus,
    ids: &[u32],
    r_tokens: &[u32],
    cond: &RefTensor,
    uncond: &RefTensor,
) -> f64 {
    let model = janus.model();
    let llm = &model.llm;
    let pad = janus.tokenizer().special().pad;
    let rows = [ids.to_vec(), unconditional_ids(ids, pad)];
    let mut cache = llm.new_cache(ids.len() + 2);
    let h = llm.forward(llm.embed(&rows).unwrap(), &mut cache).unwrap();
    let mut last = h.narrow(1, ids.len() - 1, 1);
    let steps = cond.shape[1];
    let v = cond.shape[2];
    let mut worst: f64 = 0.0;
    for (s, &token) in r_tokens.iter().enumerate().take(steps) {
        let (_, logits) = values(model.heads.gen_head.forward(last.clone()));
        for (row, want) in [(0, cond), (1, uncond)] {
            let got = &logits[row * v..(row + 1) * v];
            let exp = &want.values[s * v..(s + 1) * v];
            let d = got
                .iter()
                .zip(exp)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            worst = worst.max(d);
        }
        let tok = i64::from(token);
        let idx =
            Tensor::<2, Int>::from_data(TensorData::new(vec![tok, tok], [2, 1]), janus.device());
        let emb = model
            .heads
            .gen_aligner
            .forward(embedding(model.heads.gen_embed.val(), idx));
        last = llm.forward(emb, &mut cache).unwrap();
    }
    worst
}

#[test]
fn hf_greedy_generation_matches_transformers() {
    // hf-tiny-v4 holds hf-tiny-bf16-sharded's tensors in the files transformers 4.x writes.
    for (dir, expected) in [
        ("hf-tiny", "hf-tiny"),
        ("hf-tiny-bf16-sharded", "hf-tiny-bf16-sharded"),
        ("hf-tiny-v4", "hf-tiny-bf16-sharded"),
    ] {
        let janus = load(&fixture(dir));
        let r = read_reference(&fixture(expected).join("expected/multimodal.safetensors"));
        let ids = janus.generation_ids("a photo of a cat").unwrap();
        assert_eq!(ids, as_u32(&r["gen_input_ids"]), "{dir}: prompt ids");
        let pad = janus.tokenizer().special().pad;
        assert_eq!(
            unconditional_ids(&ids, pad),
            as_u32(&r["gen_uncond_input_ids"])
        );

        let want = as_u32(&r["gen_tokens"]);
        let d_logits = check_first_steps(
            &janus,
            &ids,
            &want,
            &r["gen_cond_logits"],
            &r["gen_uncond_logits"],
        );
        assert!(
            d_logits < 1e-4,
            "{dir}: gen-head logits differ by {d_logits}"
        );

        for count in [1, 2] {
            let images = janus.generate("a photo of a cat", &greedy(count)).unwrap();
            assert_eq!(images.len(), count);
            for img in &images {
                assert_eq!(img.tokens.ids, want, "{dir}: tokens (count {count})");
                let d = max_pixel_diff(&img.image, &r["gen_image_u8"]);
                assert!(d <= 1.0, "{dir}: pixels differ by {d}");
            }
        }
        println!("{dir}: gen-head logits max |Δ| {d_logits:.2e}; tokens equal; pixels within 1");
    }
}

/// The prompt reaches the model: two prompts give different prompt ids and different images
/// (greedy, so only the prompt differs).
#[test]
fn different_prompts_give_different_images() {
    for dir in ["hf-tiny", "hf-tiny-v4"] {
        let janus = load(&fixture(dir));
        let a = janus.generation_ids("a photo of a cat").unwrap();
        let b = janus.generation_ids("a red fox in the snow").unwrap();
        assert_ne!(a, b, "{dir}: prompt ids");
        let ia = janus.generate("a photo of a cat", &greedy(1)).unwrap();
        let ib = janus.generate("a red fox in the snow", &greedy(1)).unwrap();
        assert_ne!(ia[0].tokens.ids, ib[0].tokens.ids, "{dir}: image tokens");
        assert_ne!(ia[0].image, ib[0].image, "{dir}: pixels");
    }
}

#[test]
fn original_greedy_generation_matches_the_official_code() {
    let janus = load(&original_checkpoint("safetensors"));
    let r = read_reference(&fixture("original-tiny/expected/generate.safetensors"));
    let ids = janus.generation_ids("a photo of a cat").unwrap();
    let input = id_rows(&r["input_ids"]);
    assert_eq!(ids, input[0], "prompt ids");
    let pad = janus.tokenizer().special().pad;
    assert_eq!(unconditional_ids(&ids, pad), input[1]);

    let want = as_u32(&r["tokens"]);
    assert_eq!(want.len(), 576);
    let d_logits = check_first_steps(&janus, &ids, &want, &r["cond_logits"], &r["uncond_logits"]);
    assert!(d_logits < 1e-4, "gen-head logits differ by {d_logits}");

    let margins = &r["margins"].values;
    for count in [1, 2] {
        let images = janus.generate("a photo of a cat", &greedy(count)).unwrap();
        assert_eq!(images.len(), count);
        for img in &images {
            let got = &img.tokens.ids;
            let differ: Vec<usize> = (0..576).filter(|&i| got[i] != want[i]).collect();
            if let Some(&first) = differ.first() {
                panic!(
                    "count {count}: {} of 576 tokens differ, the first at step {first} (reference top-2 margin there {:.2e})",
                    differ.len(),
                    margins[first]
                );
            }
            assert_eq!((img.tokens.rows, img.tokens.cols), (24, 24));
            let d = max_pixel_diff(&img.image, &r["image_u8"]);
            assert!(d <= 1.0, "count {count}: pixels differ by {d}");
        }
    }
    println!(
        "original: gen-head logits max |Δ| {d_logits:.2e}; 576 tokens equal and pixels within 1 (count 1 and 2)"
    );
}

#[test]
fn seeds_reproduce_and_images_have_their_own_streams() {
    let janus = load(&fixture("hf-tiny"));
    let opts = |count, seed| ImageGenOptions {
        count,
        seed,
        ..ImageGenOptions::default()
    };
    let tokens = |o: ImageGenOptions| {
        janus
            .generate("a portrait", &o)
            .unwrap()
            .into_iter()
            .map(|g| g.tokens.ids)
            .collect::<Vec<_>>()
    };
    let one = tokens(opts(1, 11));
    let two = tokens(opts(2, 11));
    assert_eq!(one, tokens(opts(1, 11)), "same seed, same image");
    assert_eq!(two[0], one[0], "count 2 starts with the count-1 image");
    assert_ne!(two[0], two[1], "each image has its own stream");
    assert_ne!(one, tokens(opts(1, 12)), "another seed, another image");

    // Saved as PNG, the pixels come back unchanged.
    let img = janus
        .generate("a portrait", &opts(1, 11))
        .unwrap()
        .remove(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.png");
    img.save_png(&path).unwrap();
    let back = image::open(&path).unwrap().to_rgb8();
    assert_eq!(back, img.image);
    let err = img
        .save_png(&dir.path().join("missing/out.png"))
        .unwrap_err();
    assert!(matches!(err, Error::Write { .. }), "{err}");
}

#[test]
fn generation_can_be_cancelled() {
    let janus = load(&fixture("hf-tiny"));
    let mut seen = 0;
    let err = janus
        .generate_with_progress("a cat", &greedy(1), &mut |step, total| {
            assert_eq!(total, 16);
            seen = step;
            step < 3
        })
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(seen, 3);
}

#[test]
fn bad_generation_input_is_a_typed_error() {
    let janus = load(&fixture("hf-tiny"));
    fn invalid<T>(r: Result<T, Error>) -> bool {
        matches!(r, Err(Error::InvalidInput(_)))
    }
    assert!(invalid(janus.generate("   ", &greedy(1))));
    assert!(invalid(janus.generate("a cat", &greedy(0))));
    let mut nan = greedy(1);
    nan.cfg_weight = f32::NAN;
    assert!(invalid(janus.generate("a cat", &nan)));
    let mut hot = greedy(1);
    hot.sampling.temperature = -1.0;
    assert!(invalid(janus.generate("a cat", &hot)));

    let codes = janus.config().vq.codebook_size as u32;
    let g = janus.config().vq.grid;
    let grid = |ids: Vec<u32>, rows, cols| ImageTokens { ids, rows, cols };
    assert!(invalid(janus.decode_image(&grid(vec![codes; g * g], g, g))));
    assert!(invalid(janus.decode_image(&grid(vec![0; g * g - 1], g, g))));
    assert!(invalid(janus.decode_image(&grid(
        vec![0; 2 * g * g],
        2 * g,
        g
    ))));
    let img = janus.decode_image(&grid(vec![1; g * g], g, g)).unwrap();
    assert_eq!(img.width() as usize, janus.config().vq.image_size());
    assert!(invalid(janus.encode_image(&image::RgbImage::new(0, 0))));
}

#[test]
fn encode_decode_round_trip_on_the_token_grid() {
    // Decoding a grid and encoding the pixels again gives a grid of the same shape; a
    // non-square image of another size is resized and cropped first.
    let janus = load(&fixture("hf-tiny"));
    let g = janus.config().vq.grid;
    let grid = ImageTokens {
        ids: (0..(g * g) as u32).collect(),
        rows: g,
        cols: g,
    };
    let img = janus.decode_image(&grid).unwrap();
    let tokens = janus.encode_image(&img).unwrap();
    assert_eq!((tokens.rows, tokens.cols, tokens.ids.len()), (g, g, g * g));
    let codes = janus.config().vq.codebook_size as u32;
    assert!(tokens.ids.iter().all(|&t| t < codes));
    let wide = image::RgbImage::from_fn(97, 41, |x, y| image::Rgb([x as u8, y as u8, 7]));
    assert_eq!(janus.encode_image(&wide).unwrap().ids.len(), g * g);
    assert_eq!(janus.encode_image(&img).unwrap(), tokens, "deterministic");
}

#[test]
fn a_batch_of_prompts_gives_what_each_prompt_gives_alone() {
    let janus = load(&fixture("hf-tiny"));
    // A long prompt makes the batched prefill long; short ones alone keep it to a few positions,
    // where the padding rows' first queries see no key at all.
    let long = [
        "a photo of a cat",
        "a portrait of a young girl, film grained",
        "sky",
    ];
    let short = ["a photo of a cat", "sky"];
    for prompts in [&long[..], &short[..]] {
        for opts in [
            greedy(2),
            ImageGenOptions {
                count: 2,
                seed: 5,
                ..ImageGenOptions::default()
            },
        ] {
            let batch = janus.generate_batch(prompts, &opts).unwrap();
            assert_eq!(batch.len(), prompts.len());
            for (prompt, images) in prompts.iter().zip(&batch) {
                let alone = janus.generate(prompt, &opts).unwrap();
                assert_eq!(images.len(), 2);
                for (a, b) in images.iter().zip(&alone) {
                    assert_eq!(a.tokens.ids, b.tokens.ids, "{prompt:?}");
                    let d = a
                        .image
                        .as_raw()
                        .iter()
                        .zip(b.image.as_raw())
                        .map(|(&x, &y)| x.abs_diff(y))
                        .max()
                        .unwrap();
                    assert!(d <= 1, "{prompt:?}: pixels differ by {d}");
                }
            }
        }
    }
}

#[test]
fn a_generation_step_reads_the_device_once() {
    // On a GPU each token step reads back its picks and nothing else (top-k and top-p
    // included), and each decoded image its pixels; the CPU backend's tensors are host memory.
    let janus = load(&fixture("hf-tiny"));
    for sampling in [
        Sampling::GREEDY,
        Sampling {
            temperature: 1.0,
            top_k: Some(50),
            top_p: Some(0.9),
        },
    ] {
        let opts = ImageGenOptions {
            count: 2,
            sampling,
            ..greedy(2)
        };
        let before = janus_core::device::host_reads();
        let images = janus.generate("a portrait", &opts).unwrap();
        let reads = janus_core::device::host_reads() - before;
        let steps = images[0].tokens.ids.len();
        let (w, h) = images[0].image.dimensions();
        // Per step three f32 a row; per image its f32 channels.
        let step_bytes = steps * images.len() * 3 * 4;
        let pixel_bytes = images.len() * 3 * (w * h) as usize * 4;
        let want = if on_gpu() {
            HostReads {
                count: (steps + images.len()) as u64,
                bytes: (step_bytes + pixel_bytes) as u64,
            }
        } else {
            HostReads::default()
        };
        assert_eq!(reads, want, "{sampling:?}: {steps} steps");
    }
}
