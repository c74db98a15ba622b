//! Replays the fuzzing corpus of the request targets, `fuzz/corpus/{chat_request,image_request}/`
//! (the seeds, and every input a fuzzing campaign found a crash or a hang with, minimised),
//! through the request parsers with the settings of `fuzz/fuzz_targets/`: a body that panics
//! fails here. See `FUZZING.md`.

use std::path::{Path, PathBuf};

use janus_serve::api::{Limits, chat_request, image_request};

/// Runs every file of `fuzz/corpus/<target>/` through `run`, reporting all that panic.
fn replay(target: &str, run: &(dyn Fn(&[u8]) + std::panic::RefUnwindSafe)) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    let panicked: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap();
            std::panic::catch_unwind(|| run(&data)).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        panicked.is_empty(),
        "{target}: {} of {} inputs panic: {panicked:#?}",
        panicked.len(),
        files.len()
    );
}

#[test]
fn chat_request_corpus() {
    let defaults = janus_core::Limits::default();
    let limits = Limits {
        max_images: defaults.max_images,
        max_image_pixels: defaults.max_image_pixels,
        allow_remote_images: false,
        max_image_bytes: 1 << 20,
    };
    replay("chat_request", &|data| {
        let _ = chat_request(data, &limits);
    });
}

#[test]
fn image_request_corpus() {
    replay("image_request", &|data| {
        let _ = image_request(data, 384);
    });
}
