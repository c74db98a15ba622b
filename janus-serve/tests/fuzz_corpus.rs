//! Replays the fuzzing corpus of the request targets, `fuzz/corpus/{chat_request,image_request}/`
//! (the seeds, and every input a fuzzing campaign found a crash or a hang with, minimised),
//! through the request parsers with the settings of `fuzz/fuzz_targets/`: a body that panics
//! fails here. See `FUZZING.md`.

use janus_serve::api::{Limits, chat_request, image_request};

#[test]
fn chat_request_corpus() {
    let defaults = janus_core::Limits::default();
    let limits = Limits {
        max_images: defaults.max_images,
        max_image_pixels: defaults.max_image_pixels,
        allow_remote_images: false,
        max_image_bytes: 1 << 20,
    };
    janus_core::fuzz::replay_corpus("chat_request", &|data| {
        let _ = chat_request(data, &limits);
    });
}

#[test]
fn image_request_corpus() {
    janus_core::fuzz::replay_corpus("image_request", &|data| {
        let _ = image_request(data, 384);
    });
}
