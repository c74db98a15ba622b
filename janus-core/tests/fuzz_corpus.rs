//! Replays the fuzzing corpus, `fuzz/corpus/<target>/` (the seeds, and every input a fuzzing
//! campaign found a crash or a hang with, minimised), through the matching
//! `janus_core::fuzz` entry point: a parser that panics on one of them fails here. See
//! `FUZZING.md`; the request targets are replayed by `janus-serve/tests/fuzz_corpus.rs`.

use std::path::{Path, PathBuf};

/// Runs every file of `fuzz/corpus/<target>/` through `run`, reporting all that panic.
fn replay(target: &str, run: fn(&[u8])) {
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
fn config_json() {
    replay("config_json", janus_core::fuzz::config_json);
}

#[test]
fn safetensors() {
    replay("safetensors", janus_core::fuzz::safetensors);
}

#[test]
fn safetensors_index() {
    replay("safetensors_index", janus_core::fuzz::safetensors_index);
}

#[test]
fn pickle() {
    replay("pickle", janus_core::fuzz::pickle);
}

#[test]
fn tokenizer_files() {
    replay("tokenizer_files", janus_core::fuzz::tokenizer_files);
}

#[test]
fn chat_template() {
    replay("chat_template", janus_core::fuzz::chat_template);
}

#[test]
fn image() {
    replay("image", janus_core::fuzz::image);
}

#[test]
fn tokens_json() {
    replay("tokens_json", janus_core::fuzz::tokens_json);
}
