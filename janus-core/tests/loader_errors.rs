//! Bad checkpoints give typed errors, never a panic: truncated files, lying headers, foreign
//! pickle globals, wrong dtypes and shapes, missing and unexpected tensors, missing shards.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use common::fixture;
use janus_core::{Checkpoint, ComputeDType, Error, JanusModel};
use safetensors::{Dtype, SafeTensors};

/// Copies a fixture folder (files only) into a fresh temporary folder.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
        }
    }
    tmp
}

fn load(dir: &Path) -> Result<JanusModel, Error> {
    JanusModel::load(dir, &common::device(), ComputeDType::F32)
}

/// Rewrites `model.safetensors` after `edit` has changed its tensors
/// (name → (dtype, shape, bytes)).
fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn mismatch(err: Error) -> janus_core::WeightMismatch {
    match err {
        Error::Weights(m) => *m,
        other => panic!("expected a weight mismatch, got {other}"),
    }
}

#[test]
fn the_unmodified_fixture_loads() {
    let dir = copy_fixture("hf-tiny");
    load(dir.path()).unwrap();
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("hf-tiny");
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    // A file cut inside its header, and an empty one.
    f.set_len(5).unwrap();
    assert!(matches!(
        load(dir.path()).unwrap_err(),
        Error::Checkpoint { .. }
    ));
    f.set_len(0).unwrap();
    assert!(matches!(
        load(dir.path()).unwrap_err(),
        Error::Checkpoint { .. }
    ));
}

#[test]
fn safetensors_header_that_lies_about_sizes() {
    let dir = copy_fixture("hf-tiny");
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // Claim a larger shape for the embedding table without adding bytes.
    let lying = header.replacen("[500,64]", "[900,64]", 1);
    assert_ne!(lying, header, "fixture header changed");
    bytes.splice(8..8 + n, lying.bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
}

#[test]
fn wrong_shape_missing_and_unexpected_tensors_are_listed_together() {
    let dir = copy_fixture("hf-tiny");
    rewrite(dir.path(), |t| {
        let (d, _, b) = t.remove("model.language_model.norm.weight").unwrap();
        // Same bytes, different shape.
        t.insert(
            "model.language_model.norm.weight".into(),
            (d, vec![8, 8], b),
        );
        t.remove("lm_head.weight").unwrap();
        t.insert(
            "model.extra.weight".into(),
            (Dtype::F32, vec![2], vec![0; 8]),
        );
    });
    let m = mismatch(load(dir.path()).unwrap_err());
    assert_eq!(m.missing, ["lm_head.weight"]);
    assert_eq!(m.unexpected, ["model.extra.weight"]);
    assert_eq!(
        m.wrong_shape,
        [(
            "model.language_model.norm.weight".to_string(),
            vec![64],
            vec![8, 8]
        )]
    );
    let msg = Error::Weights(Box::new(m)).to_string();
    assert!(
        msg.contains("lm_head.weight") && msg.contains("model.extra.weight"),
        "{msg}"
    );
}

#[test]
fn integer_weights_are_refused() {
    let dir = copy_fixture("hf-tiny");
    rewrite(dir.path(), |t| {
        let (_, s, b) = t.remove("model.language_model.norm.weight").unwrap();
        t.insert(
            "model.language_model.norm.weight".into(),
            (Dtype::I32, s, b),
        );
    });
    let m = mismatch(load(dir.path()).unwrap_err());
    assert_eq!(m.wrong_dtype.len(), 1, "{m:?}");
    assert_eq!(m.wrong_dtype[0].0, "model.language_model.norm.weight");
}

#[test]
fn missing_shard() {
    let dir = copy_fixture("hf-tiny-bf16-sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    assert!(
        err.to_string().contains("model-00002-of-00003.safetensors"),
        "{err}"
    );
}

#[test]
fn index_that_misplaces_a_tensor() {
    let dir = copy_fixture("hf-tiny-bf16-sharded");
    let path = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let (name, shard) = map
        .iter()
        .find(|(_, s)| s.as_str() != Some("model-00001-of-00003.safetensors"))
        .map(|(n, s)| (n.clone(), s.clone()))
        .unwrap();
    assert_ne!(shard, "model-00001-of-00003.safetensors");
    map.insert(name, "model-00001-of-00003.safetensors".into());
    std::fs::write(&path, index.to_string()).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
}

#[test]
fn no_weights_and_no_config() {
    let dir = copy_fixture("hf-tiny");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert!(matches!(
        load(dir.path()).unwrap_err(),
        Error::MissingFile { .. }
    ));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert!(matches!(
        load(dir.path()).unwrap_err(),
        Error::MissingFile { .. }
    ));
}

#[test]
fn malformed_config() {
    let dir = copy_fixture("hf-tiny");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"janus\", ",
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn truncated_pickle_checkpoint() {
    let dir = copy_fixture("hf-tiny-bin");
    let path = dir.path().join("pytorch_model.bin");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
}

/// Writes a zip like torch.save's whose pickle is `data`.
fn write_torch_zip(path: &Path, pickle: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

#[test]
fn pickle_with_a_foreign_global_is_refused() {
    let dir = copy_fixture("hf-tiny-bin");
    // `os.system("true")`: GLOBAL, then a call.
    let pickle = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.";
    write_torch_zip(&dir.path().join("pytorch_model.bin"), pickle);
    let err = load(dir.path()).unwrap_err();
    match &err {
        Error::UnsafePickle { global, .. } => assert_eq!(global, "os.system"),
        other => panic!("expected UnsafePickle, got {other}"),
    }
}

#[test]
fn pickle_with_no_tensors_is_an_error() {
    let dir = copy_fixture("hf-tiny-bin");
    // An empty OrderedDict.
    write_torch_zip(
        &dir.path().join("pytorch_model.bin"),
        b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01.",
    );
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
}

#[test]
fn not_a_zip() {
    let dir = copy_fixture("hf-tiny-bin");
    std::fs::write(
        dir.path().join("pytorch_model.bin"),
        b"definitely not a checkpoint",
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
}

/// A processor config whose image-token count is not the vision encoder's describes another
/// model: prompts would be expanded wrongly, so loading fails and names the key.
#[test]
fn processor_image_token_count_must_match_the_model() {
    let dir = copy_fixture("hf-tiny");
    let path = dir.path().join("processor_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["num_image_tokens"] = 576.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err =
        janus_core::pipeline::Janus::load_on(dir.path(), &common::device(), ComputeDType::F32)
            .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("num_image_tokens"), "{err}");
}
