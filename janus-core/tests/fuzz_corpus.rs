//! Replays the fuzzing corpus, `fuzz/corpus/<target>/` (the seeds, and every input a fuzzing
//! campaign found a crash or a hang with, minimised), through the matching
//! `janus_core::fuzz` entry point: a parser that panics on one of them fails here. See
//! `FUZZING.md`; the request targets are replayed by `janus-serve/tests/fuzz_corpus.rs`.

#[test]
fn config_json() {
    janus_core::fuzz::replay_corpus("config_json", &janus_core::fuzz::config_json);
}

#[test]
fn safetensors() {
    janus_core::fuzz::replay_corpus("safetensors", &janus_core::fuzz::safetensors);
}

#[test]
fn safetensors_index() {
    janus_core::fuzz::replay_corpus("safetensors_index", &janus_core::fuzz::safetensors_index);
}

#[test]
fn pickle() {
    janus_core::fuzz::replay_corpus("pickle", &janus_core::fuzz::pickle);
}

#[test]
fn tokenizer_files() {
    janus_core::fuzz::replay_corpus("tokenizer_files", &janus_core::fuzz::tokenizer_files);
}

#[test]
fn chat_template() {
    janus_core::fuzz::replay_corpus("chat_template", &janus_core::fuzz::chat_template);
}

#[test]
fn image() {
    janus_core::fuzz::replay_corpus("image", &janus_core::fuzz::image);
}

#[test]
fn tokens_json() {
    janus_core::fuzz::replay_corpus("tokens_json", &janus_core::fuzz::tokens_json);
}
