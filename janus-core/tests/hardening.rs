//! Bad numbers and many threads: NaN weights and overflowing guidance are typed errors naming
//! the step (in a batched step only the affected sequence fails), and eight threads sharing one
//! handle each get what a serial run gives, with a cancelled call among them.

mod common;

use common::*;
use janus_core::engine::Finish;
use janus_core::generate::image::ImageGenOptions;
use janus_core::generate::sampling::Sampling;
use janus_core::generate::text::TextGenOptions;
use janus_core::pipeline::Janus;
use janus_core::{ComputeDType, Error};

fn load(dir: &std::path::Path) -> Janus {
    Janus::load_on(dir, &device(), ComputeDType::F32).unwrap_or_else(|e| panic!("{e}"))
}

fn picture() -> image::RgbImage {
    image::RgbImage::from_fn(37, 29, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 11 % 256) as u8,
            ((x + y) % 256) as u8,
        ])
    })
}

/// A copy of the tiny checkpoint whose tensors named in `poisoned` hold NaN.
fn with_nan_weights(dir: &std::path::Path, poisoned: &[&str]) -> std::path::PathBuf {
    let src = fixture("hf-tiny");
    let out = dir.join("nan-model");
    std::fs::create_dir(&out).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&path, out.join(path.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if poisoned.contains(&name.as_str()) {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            for v in data.chunks_exact_mut(4) {
                v.copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
        tensors.push((name, view.dtype(), view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out
}

#[test]
fn nan_weights_are_an_error_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let janus = load(&with_nan_weights(
        tmp.path(),
        &["lm_head.weight", "model.generation_head.vision_head.weight"],
    ));
    let short = TextGenOptions {
        max_new_tokens: 3,
        ..TextGenOptions::default()
    };
    let e = janus
        .understand(&[picture()], "What is this?", &short)
        .unwrap_err();
    assert!(matches!(e, Error::NonFiniteLogits { step: 1 }), "{e}");
    assert_eq!(e.to_string(), "non-finite logits at step 1");
    for options in [
        ImageGenOptions::default(),
        ImageGenOptions {
            sampling: Sampling::GREEDY,
            ..ImageGenOptions::default()
        },
    ] {
        let e = janus.generate("a cat", &options).unwrap_err();
        assert!(matches!(e, Error::NonFiniteLogits { step: 1 }), "{e}");
    }
}

#[test]
fn in_a_batched_step_only_the_overflowing_sequence_fails() {
    let janus = load(&fixture("hf-tiny"));
    let overflowing = ImageGenOptions {
        cfg_weight: 3.4e38,
        ..ImageGenOptions::default()
    };
    let e = janus.generate("a cat", &overflowing).unwrap_err();
    assert!(matches!(e, Error::NonFiniteLogits { step: 1 }), "{e}");
    let short = TextGenOptions {
        max_new_tokens: 5,
        ..TextGenOptions::default()
    };
    let mut bad = janus.begin_generate("a cat", &overflowing).unwrap();
    let mut good = janus
        .begin_understand(&[picture()], "What is this?", &short, &[])
        .unwrap();
    while !good.is_finished() {
        janus.step(&mut [&mut bad, &mut good]).unwrap();
    }
    assert_eq!(bad.finish(), Some(Finish::NonFiniteLogits { step: 1 }));
    let e = janus.finish_images(bad).unwrap_err();
    assert!(matches!(e, Error::NonFiniteLogits { step: 1 }), "{e}");
    let alone = janus
        .understand(&[picture()], "What is this?", &short)
        .unwrap();
    assert_eq!(
        janus.finish_answer(good).unwrap().token_ids,
        alone.token_ids
    );
}

#[test]
fn eight_threads_on_one_handle_get_their_serial_results() {
    let janus = load(&fixture("hf-tiny"));
    let img = picture();
    let greedy = TextGenOptions {
        max_new_tokens: 6,
        ..TextGenOptions::default()
    };
    let sampled = TextGenOptions {
        sampling: Sampling {
            temperature: 1.0,
            top_k: Some(20),
            top_p: None,
        },
        seed: 4,
        ..greedy.clone()
    };
    let images = ImageGenOptions {
        count: 2,
        seed: 7,
        ..ImageGenOptions::default()
    };
    #[derive(Debug, PartialEq)]
    enum Out {
        Ids(Vec<u32>),
        Grids(Vec<Vec<u32>>),
    }
    let call = |i: usize| -> Out {
        match i % 4 {
            0 => Out::Ids(
                janus
                    .understand(std::slice::from_ref(&img), "What is this?", &greedy)
                    .unwrap()
                    .token_ids,
            ),
            1 => Out::Ids(
                janus
                    .understand(std::slice::from_ref(&img), "Describe it.", &sampled)
                    .unwrap()
                    .token_ids,
            ),
            2 => Out::Grids(
                janus
                    .generate("a red fox", &images)
                    .unwrap()
                    .into_iter()
                    .map(|g| g.tokens.ids)
                    .collect(),
            ),
            _ => Out::Grids(vec![janus.encode_image(&img).unwrap().ids]),
        }
    };
    let serial: Vec<Out> = (0..8).map(call).collect();
    let (parallel, cancelled) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8).map(|i| s.spawn(move || call(i))).collect();
        let cancel = s.spawn(|| {
            janus.generate_with_progress("a cat", &ImageGenOptions::default(), &mut |step, _| {
                step < 3
            })
        });
        let outs: Vec<Out> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (outs, cancel.join().unwrap())
    });
    assert!(matches!(cancelled, Err(Error::Cancelled)));
    assert_eq!(parallel, serial);
    // The handle is still usable after the cancelled call.
    assert_eq!(call(0), serial[0]);
}

/// Many images are decoded a few at a time (bounded memory); each equals its grid decoded alone.
#[test]
fn images_decoded_in_chunks_equal_images_decoded_alone() {
    let janus = load(&fixture("hf-tiny"));
    let options = ImageGenOptions {
        count: 6,
        seed: 2,
        ..ImageGenOptions::default()
    };
    let images = janus.generate("a lighthouse", &options).unwrap();
    assert_eq!(images.len(), 6);
    for g in &images {
        assert_eq!(janus.decode_image(&g.tokens).unwrap(), g.image);
    }
}
