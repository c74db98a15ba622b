//! The tokenizer against transformers' `AutoTokenizer` on the fixture tokenizer (ids with and
//! without BOS, decoding with and without special tokens), and special ids from the files.

mod common;

use common::{fixture, ids};
use janus_core::JanusTokenizer;
use serde_json::Value;

fn cases() -> (Value, JanusTokenizer) {
    let dir = fixture("tokenizer");
    let text = std::fs::read_to_string(dir.join("tokenize.json")).unwrap();
    (
        serde_json::from_str(&text).unwrap(),
        JanusTokenizer::from_dir(&dir).unwrap(),
    )
}

#[test]
fn encodes_and_decodes_like_transformers() {
    let (reference, tok) = cases();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let kind = case["kind"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "{kind}");
        let plain = ids(&case["ids_no_special"]);
        assert_eq!(tok.encode(text, false).unwrap(), plain, "{kind}");
        assert_eq!(
            tok.decode(&ids(&case["ids"]), false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{kind}"
        );
        assert_eq!(
            tok.decode(&ids(&case["ids"]), true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "{kind}"
        );
    }
}

#[test]
fn special_ids_come_from_the_files() {
    let (reference, tok) = cases();
    let want = &reference["special_token_ids"];
    let id = |s: &str| want[s].as_u64().unwrap() as u32;
    let sp = tok.special();
    assert_eq!(sp.bos, id("<｜begin▁of▁sentence｜>"));
    assert_eq!(sp.eos, id("<｜end▁of▁sentence｜>"));
    assert_eq!(sp.pad, id("<｜▁pad▁｜>"));
    assert_eq!(sp.image_placeholder, id("<image_placeholder>"));
    assert_eq!(sp.begin_of_image, id("<begin_of_image>"));
    assert_eq!(sp.end_of_image, id("<end_of_image>"));
    assert_eq!(sp.user, Some(id("<|User|>")));
    assert_eq!(sp.assistant, Some(id("<|Assistant|>")));
    assert_eq!(
        tok.vocab_size(),
        reference["vocab_size"].as_u64().unwrap() as usize
    );
}

/// The tokenizer files transformers 5 writes (no `add_bos_token`: BOS comes from the
/// post-processor of `tokenizer.json`) and those transformers 4 writes (`add_bos_token`, the image
/// tokens in an `extra_special_tokens` map) encode like the fixture tokenizer.
#[test]
fn model_folders_agree_with_the_tokenizer_fixture() {
    let (cases, reference) = cases();
    for dir in ["hf-tiny", "hf-tiny-bin-sharded-bf16", "hf-tiny-v4"] {
        let tok = JanusTokenizer::from_dir(&fixture(dir)).unwrap();
        assert_eq!(tok.special(), reference.special(), "{dir}");
        assert_eq!(tok.image_token(), "<image_placeholder>", "{dir}");
        for case in cases["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, true).unwrap(),
                ids(&case["ids"]),
                "{dir}: {text:?}"
            );
            let plain = ids(&case["ids_no_special"]);
            assert_eq!(tok.encode(text, false).unwrap(), plain, "{dir}: {text:?}");
        }
    }
}

#[test]
fn missing_special_token_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tokenizer");
    let mut json: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap())
            .unwrap();
    // Drop <begin_of_image> from the added tokens and the vocabulary.
    json["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["content"] != "<begin_of_image>");
    json["model"]["vocab"]
        .as_object_mut()
        .unwrap()
        .remove("<begin_of_image>");
    std::fs::write(tmp.path().join("tokenizer.json"), json.to_string()).unwrap();
    let err = JanusTokenizer::from_dir(tmp.path()).unwrap_err();
    assert!(matches!(err, janus_core::Error::Tokenizer(_)), "{err}");
    assert!(err.to_string().contains("<begin_of_image>"), "{err}");

    let err = JanusTokenizer::from_dir(&tmp.path().join("nowhere")).unwrap_err();
    assert!(
        matches!(err, janus_core::Error::MissingFile { .. }),
        "{err}"
    );
}
