//! `janus_serve::api::image_request` (an image generation request body, for a 384-pixel model)
//! under AFL++ (see FUZZING.md).

fn main() {
    afl::fuzz_nohook!(|data: &[u8]| {
        let _ = janus_serve::api::image_request(data, 384);
    });
}
