//! Entry points for fuzzing: each takes arbitrary bytes and runs one parser of untrusted input
//! the way loading or a request runs it. They return nothing; a panic, an abort or a hang is the
//! finding. Used by the `fuzz/` targets and the corpus replay test.
//!
//! Parsers that only read files (a checkpoint folder, the tokenizer and processor files) run on a
//! temporary folder holding the fuzzed bytes; the other files such a folder needs are copied from
//! the committed fixtures (`tests/fixtures/` of this repository), so that only the fuzzed file is
//! bad.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;

use crate::config::{JanusConfig, Layout};
use crate::limits::Limits;
use crate::load::{Checkpoint, ComputeDType};
use crate::nn::weight::WeightFormat;
use crate::pipeline::ImageTokens;
use crate::processor::chat_template::{ChatTemplate, Message, Part};
use crate::processor::image::{
    ImageProcessorConfig, decode_image_within, preprocess_for_understanding, preprocess_for_vq,
};
use crate::processor::prompt::{PromptFormat, Role, TurnText};
use crate::tokenizer::{JanusTokenizer, strings};

/// JSON as [`read_json`](crate::config::read_json) reads a file: UTF-8 text, then JSON.
fn json(data: &[u8]) -> Option<Value> {
    serde_json::from_str(std::str::from_utf8(data).ok()?).ok()
}

/// A fresh temporary folder (removed when dropped); `None` when the system has none to give.
fn temp_dir() -> Option<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("janus-fuzz-")
        .tempdir()
        .ok()
}

/// `tests/fixtures/` of this repository.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `config.json`, either layout (chosen by its content): [`JanusConfig::from_json`], then the
/// derived sizes model building reads from a parsed configuration.
pub fn config_json(data: &[u8]) {
    let Some(value) = json(data) else { return };
    let Ok(config) = JanusConfig::from_json(Path::new("config.json"), &value) else {
        return;
    };
    let _ = (config.vision.grid(), config.vision.num_patches());
    let _ = (
        config.vq.downsample(),
        config.vq.image_size(),
        config.vq.num_tokens(),
    );
}

/// What loading does with an opened checkpoint before it builds the model: the compute dtype
/// `auto` resolves to (from the stored dtypes and sizes), then every file's tensors read and
/// checked against their shapes.
fn read_checkpoint(dir: &Path) {
    let Ok(checkpoint) = Checkpoint::open(dir) else {
        return;
    };
    let _ = ComputeDType::Auto.resolve(&crate::default_device(), WeightFormat::Auto, &checkpoint);
    for name in checkpoint.tensor_names() {
        let _ = checkpoint.shape(name);
    }
    for file in 0..checkpoint.files().len() {
        let _ = checkpoint.file_tensors(file);
    }
}

/// One `model.safetensors`: its header and tensor list read from the bytes; when that succeeds,
/// the bytes as the `model.safetensors` of a folder opened and read as loading reads it.
pub fn safetensors(data: &[u8]) {
    let path = Path::new("model.safetensors");
    if crate::load::safetensors::tensors_in(path, data).is_err() {
        // `Checkpoint::open` runs the same function on the same bytes: it fails the same way.
        return;
    }
    let Some(dir) = temp_dir() else { return };
    if std::fs::write(dir.path().join(path), data).is_ok() {
        read_checkpoint(dir.path());
    }
}

/// A small safetensors file: `header` (the JSON) and `data_len` bytes of data.
fn safetensors_bytes(header: &str, data_len: usize) -> Vec<u8> {
    let mut header = header.as_bytes().to_vec();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend((0..data_len).map(|i| (i * 37 % 251) as u8));
    out
}

/// The shards next to a fuzzed `model.safetensors.index.json`: tensor `a` in the first, `b` and
/// `c` in the second (the names the seed indexes use).
const INDEX_SHARDS: [(&str, &str, usize); 2] = [
    (
        "model-00001-of-00002.safetensors",
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        8,
    ),
    (
        "model-00002-of-00002.safetensors",
        concat!(
            r#"{"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"#,
            r#""c":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}}"#
        ),
        10,
    ),
];

/// `model.safetensors.index.json`: its `weight_map` (shard names, path traversal refusal) read
/// from the bytes; when that succeeds, a folder with the index and two small shards
/// (`model-0000{1,2}-of-00002.safetensors`, holding `a` and `b`, `c`) opened and read as
/// loading reads it (missing shards, tensors the index misplaces).
pub fn safetensors_index(data: &[u8]) {
    let name = "model.safetensors.index.json";
    let Some(value) = json(data) else { return };
    if crate::load::index_entries(Path::new(name), &value).is_err() {
        return;
    }
    let Some(dir) = temp_dir() else { return };
    for (shard, header, len) in INDEX_SHARDS {
        if std::fs::write(dir.path().join(shard), safetensors_bytes(header, len)).is_err() {
            return;
        }
    }
    if std::fs::write(dir.path().join(name), data).is_ok() {
        read_checkpoint(dir.path());
    }
}

/// The storages a fuzzed `data.pkl` is packed with: `archive/data/0` … `archive/data/3`, 256
/// bytes each (enough for the seed pickles' tensors).
const PICKLE_STORAGES: usize = 4;

/// A `torch.save` zip holding `pickle` as `archive/data.pkl`, with [`PICKLE_STORAGES`] storages.
fn torch_zip(pickle: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("archive/data.pkl", options).ok()?;
    zip.write_all(pickle).ok()?;
    for (name, body) in [
        ("archive/byteorder", &b"little"[..]),
        ("archive/version", b"3\n"),
    ] {
        zip.start_file(name, options).ok()?;
        zip.write_all(body).ok()?;
    }
    for key in 0..PICKLE_STORAGES {
        zip.start_file(format!("archive/data/{key}"), options)
            .ok()?;
        let bytes: Vec<u8> = (0..256).map(|i| ((i * 7 + key) % 256) as u8).collect();
        zip.write_all(&bytes).ok()?;
    }
    Some(zip.finish().ok()?.into_inner())
}

/// A pickled checkpoint. Bytes that start with `PK` are a whole `pytorch_model.bin` (the zip
/// `torch.save` writes); anything else is its `data.pkl`: the global-import scan runs on it, and
/// when it passes, it is packed into a zip with a few storages. Either file is then opened as the
/// `pytorch_model.bin` of a folder (the scan again, then `pytorch-reader`) and read as loading
/// reads it.
pub fn pickle(data: &[u8]) {
    let file = if data.starts_with(b"PK") {
        data.to_vec()
    } else {
        if crate::load::pickle::scan_pickle(data).is_err() {
            return;
        }
        match torch_zip(data) {
            Some(file) => file,
            None => return,
        }
    };
    let Some(dir) = temp_dir() else { return };
    if std::fs::write(dir.path().join("pytorch_model.bin"), file).is_ok() {
        read_checkpoint(dir.path());
    }
}

/// The files [`tokenizer_files`] can put fuzzed bytes in, by the first byte of the input.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.json",
];

/// The fixture folders [`tokenizer_files`] puts the fuzzed file in (every other file copied), and
/// their layouts: the transformers 5 files (`chat_template.jinja`, nested image processor), the
/// transformers 4 files (`chat_template.json`, `preprocessor_config.json`,
/// `special_tokens_map.json`), and the original layout's.
const TOKENIZER_BASES: [(&str, Layout); 3] = [
    ("hf-tiny", Layout::HuggingFace),
    ("hf-tiny-v4", Layout::HuggingFace),
    ("original-tiny", Layout::Original),
];

/// Files by name, with their bytes.
type Files = Vec<(String, Vec<u8>)>;

/// The small files of each [`TOKENIZER_BASES`] folder (everything but weights), read once.
fn tokenizer_bases() -> &'static HashMap<&'static str, Files> {
    static BASES: OnceLock<HashMap<&'static str, Files>> = OnceLock::new();
    BASES.get_or_init(|| {
        let root = fixtures();
        TOKENIZER_BASES
            .iter()
            .map(|&(base, _)| {
                let dir = root.join(base);
                let mut files = Vec::new();
                let entries = std::fs::read_dir(&dir)
                    .unwrap_or_else(|e| panic!("fuzz fixtures: {}: {e}", dir.display()));
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".json") || name.ends_with(".jinja") {
                        let bytes = std::fs::read(entry.path()).unwrap_or_else(|e| {
                            panic!("fuzz fixtures: {}: {e}", entry.path().display())
                        });
                        files.push((name, bytes));
                    }
                }
                (base, files)
            })
            .collect()
    })
}

/// The tokenizer and processor files of a model folder. The first byte picks which file the
/// rest is (by the byte modulo 5: `tokenizer_config.json`, `special_tokens_map.json`,
/// `processor_config.json`, `preprocessor_config.json`, `chat_template.json`) and which fixture
/// folder holds it (by the byte / 5 modulo 3: `hf-tiny`, `hf-tiny-v4`, `original-tiny`). The
/// bytes go through [`ImageProcessorConfig::from_json`] for both layouts (and on an
/// `image_processor` block); then, in a copy of the folder with the file replaced,
/// [`ImageProcessorConfig::from_dir`], [`JanusTokenizer::from_dir`] and
/// [`PromptFormat::from_dir`], and the prompts the pipeline builds with them (which render a
/// chat template the file may carry) are encoded.
pub fn tokenizer_files(data: &[u8]) {
    let Some((&selector, content)) = data.split_first() else {
        return;
    };
    let file = TOKENIZER_FILES[usize::from(selector) % TOKENIZER_FILES.len()];
    let (base, layout) =
        TOKENIZER_BASES[usize::from(selector) / TOKENIZER_FILES.len() % TOKENIZER_BASES.len()];

    if let Some(value) = json(content) {
        let path = Path::new(file);
        for layout in [Layout::Original, Layout::HuggingFace] {
            let _ = ImageProcessorConfig::from_json(path, &value, layout);
            if let Some(nested) = value.get("image_processor") {
                let _ = ImageProcessorConfig::from_json(path, nested, layout);
            }
        }
    }

    let Some(dir) = temp_dir() else { return };
    let dir = dir.path();
    for (name, bytes) in &tokenizer_bases()[base] {
        if name != file && std::fs::write(dir.join(name), bytes).is_err() {
            return;
        }
    }
    if std::fs::write(dir.join(file), content).is_err() {
        return;
    }
    let _ = ImageProcessorConfig::from_dir(dir, layout);
    let Ok(tokenizer) = JanusTokenizer::from_dir(dir) else {
        return;
    };
    let _ = tokenizer.template_tokens();
    let Ok(format) = PromptFormat::from_dir(dir, layout, &tokenizer) else {
        return;
    };
    let turns = [
        TurnText {
            role: Role::System,
            content: "Answer briefly.",
            images: 0,
        },
        TurnText {
            role: Role::User,
            content: "What is in <image_placeholder> this picture?",
            images: 1,
        },
        TurnText {
            role: Role::Assistant,
            content: "A red cube.",
            images: 0,
        },
        TurnText {
            role: Role::User,
            content: "And its colour?",
            images: 0,
        },
    ];
    let prompts = [
        format.generation_prompt("a red cube on a table"),
        format.understanding_prompt("Describe the image.", 1),
        format.conversation_prompt(&turns),
    ];
    for prompt in prompts.into_iter().flatten() {
        let _ = tokenizer.encode(&prompt, true);
    }
}

/// A chat template (the bytes as UTF-8, lossily): compiled with the tokenizer's special tokens
/// as variables, then rendered on a short conversation (system, user with an image, assistant,
/// user), with and without the assistant's cue, and on a single user message.
pub fn chat_template(data: &[u8]) {
    let source = String::from_utf8_lossy(data);
    let tokens = [
        ("bos_token", strings::BOS),
        ("eos_token", strings::EOS),
        ("pad_token", strings::PAD),
        ("boi_token", strings::BEGIN_OF_IMAGE),
        ("eoi_token", strings::END_OF_IMAGE),
        ("image_token", strings::IMAGE_PLACEHOLDER),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    let Ok(template) = ChatTemplate::new(Path::new("chat_template.jinja"), &source, tokens) else {
        return;
    };
    let conversation = [
        Message {
            role: "system",
            content: vec![Part::Text {
                text: "Answer briefly.",
            }],
        },
        Message {
            role: "user",
            content: vec![
                Part::Image,
                Part::Text {
                    text: "What is in this picture?",
                },
            ],
        },
        Message {
            role: "assistant",
            content: vec![Part::Text {
                text: "A red cube.",
            }],
        },
        Message {
            role: "user",
            content: vec![Part::Text {
                text: "And its colour?",
            }],
        },
    ];
    let _ = template.render(&conversation, true);
    let _ = template.render(&conversation, false);
    let _ = template.render(&conversation[3..], true);
}

/// An input image: decoded within the default [`Limits`] (as a request's image is), then
/// preprocessed for understanding (both layouts' default processors, 384 pixels) and for the VQ
/// encoder (32 pixels, to stay fast).
pub fn image(data: &[u8]) {
    let Ok(img) = decode_image_within(data, &Limits::default()) else {
        return;
    };
    for layout in [Layout::Original, Layout::HuggingFace] {
        let _ = preprocess_for_understanding(&img, &ImageProcessorConfig::defaults(layout, 384));
    }
    let _ = preprocess_for_vq(&img, 32);
}

/// The token file of `decode-image`: [`ImageTokens::from_json`].
pub fn tokens_json(data: &[u8]) {
    let _ = ImageTokens::from_json(data);
}

/// Runs every file of `fuzz/corpus/<target>/` (the repository's seed corpus and the inputs
/// campaigns found, minimised) through `run`, and panics naming every input that panicked: the
/// replay test of each target (`janus-core/tests/fuzz_corpus.rs`,
/// `janus-serve/tests/fuzz_corpus.rs`).
pub fn replay_corpus(target: &str, run: &(dyn Fn(&[u8]) + std::panic::RefUnwindSafe)) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no inputs", dir.display());
    let panicked: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("a readable corpus file");
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
