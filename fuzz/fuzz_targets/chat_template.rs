//! `janus_core::fuzz::chat_template` under AFL++ (see FUZZING.md).

fn main() {
    afl::fuzz_nohook!(|data: &[u8]| janus_core::fuzz::chat_template(data));
}
