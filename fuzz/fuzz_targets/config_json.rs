//! `janus_core::fuzz::config_json` under AFL++ (see FUZZING.md).

fn main() {
    afl::fuzz_nohook!(|data: &[u8]| janus_core::fuzz::config_json(data));
}
