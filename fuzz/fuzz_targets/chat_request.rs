//! `janus_serve::api::chat_request` (a chat completion request body, images decoded) under AFL++
//! (see FUZZING.md). Remote images stay refused: nothing is fetched.

fn main() {
    let defaults = janus_core::Limits::default();
    let limits = janus_serve::api::Limits {
        max_images: defaults.max_images,
        max_image_pixels: defaults.max_image_pixels,
        allow_remote_images: false,
        max_image_bytes: 1 << 20,
    };
    afl::fuzz_nohook!(|data: &[u8]| {
        let _ = janus_serve::api::chat_request(data, &limits);
    });
}
