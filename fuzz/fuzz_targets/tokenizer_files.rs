//! `janus_core::fuzz::tokenizer_files` under AFL++ (see FUZZING.md).

fn main() {
    // Reads the fixture files once before the fork server starts, so that every run sees them
    // cached (a first-run-only path would lower AFL++'s stability figure).
    janus_core::fuzz::tokenizer_files(&[0]);
    afl::fuzz_nohook!(|data: &[u8]| janus_core::fuzz::tokenizer_files(data));
}
