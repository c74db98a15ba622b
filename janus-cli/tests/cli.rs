//! The `janus` binary end to end on the committed tiny checkpoints, in both layouts, against the
//! reference outputs of the fixtures (token ids equal, pixels within 1), and its error paths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

mod common;
use common::{assert_fails, fixture, janus, janus_env, ok, ok_json, path_str, write_png};

// ---------------------------------------------------------------- fixtures and references

/// The original-layout checkpoint that `scripts/setup.sh` writes (too large to commit).
fn original_checkpoint() -> PathBuf {
    let cache = std::env::var_os("JANUS_FIXTURE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/janus-rs-fixtures")
        });
    let dir = cache.join("original-tiny/safetensors");
    assert!(
        dir.join("config.json").is_file(),
        "{} is missing: run `bash scripts/setup.sh` (it writes the original-layout test checkpoint)",
        dir.display()
    );
    dir
}

/// A reference tensor: shape and values.
struct Ref {
    shape: Vec<usize>,
    values: Vec<f64>,
}

impl Ref {
    fn u32s(&self) -> Vec<u32> {
        self.values.iter().map(|&v| v as u32).collect()
    }
    fn u8s(&self) -> Vec<u8> {
        self.values.iter().map(|&v| v as u8).collect()
    }
}

fn read_reference(path: &Path) -> HashMap<String, Ref> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                    .collect(),
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::U8 => data.iter().map(|&b| f64::from(b)).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            let shape = view.shape().to_vec();
            (name, Ref { shape, values })
        })
        .collect()
}

fn eos(model: &Path) -> u32 {
    janus_core::JanusTokenizer::from_dir(model)
        .expect("tokenizer")
        .special()
        .eos
}

/// The official understanding input: the 48×48 `image_small_u8` repeated to `size` (nearest).
fn upscaled(small: &Ref, size: usize) -> Vec<u8> {
    let (h, w) = (small.shape[0], small.shape[1]);
    let mut out = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let at = ((y * h / size) * w + x * w / size) * 3;
            out.extend(small.values[at..at + 3].iter().map(|&v| v as u8));
        }
    }
    out
}

/// Largest channel difference between a PNG and a reference HWC u8 image.
fn max_pixel_diff(png: &Path, want: &[u8]) -> u8 {
    let got = image::open(png)
        .unwrap_or_else(|e| panic!("{}: {e}", png.display()))
        .to_rgb8();
    assert_eq!(got.as_raw().len(), want.len(), "{}: size", png.display());
    got.as_raw()
        .iter()
        .zip(want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0)
}

/// `got` is the reference's greedy continuation, cut after an EOS.
fn check_answer(got: &[u32], want: &[u32], eos: u32) {
    let n = want
        .iter()
        .position(|&t| t == eos)
        .map_or(want.len(), |i| i + 1);
    assert_eq!(got, &want[..n], "answer tokens");
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

// ---------------------------------------------------------------- understand

const QUESTION: &str = "What is shown in this image?";

#[test]
fn understand_hf_matches_the_reference() {
    for dir in ["hf-tiny", "hf-tiny-bin-sharded-bf16"] {
        let model = fixture(dir);
        // The bin fixture shares its weights' reference with the bf16 safetensors one.
        let reference = if dir == "hf-tiny" {
            "hf-tiny"
        } else {
            "hf-tiny-bf16-sharded"
        };
        let r = read_reference(&fixture(reference).join("expected/multimodal.safetensors"));
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("image.png");
        let shape = &r["image_u8"].shape;
        write_png(&img, shape[1], shape[0], r["image_u8"].u8s());
        let want = r["mm_greedy_ids"].u32s();
        let n = want.len().to_string();
        let args = [
            "understand",
            "--model",
            path_str(&model),
            "--dtype",
            "f32",
            "--image",
            path_str(&img),
            "--prompt",
            QUESTION,
            "--max-new-tokens",
            &n,
        ];
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let v = ok_json(&with_json);
        let got = ids(&v["token_ids"]);
        check_answer(&got, &want, eos(&model));
        assert_eq!(
            v["prompt_tokens"].as_u64(),
            Some(r["mm_input_ids"].shape[1] as u64),
            "{dir}: prompt tokens"
        );
        let text = v["text"].as_str().expect("text").to_string();
        assert_eq!(v.as_object().unwrap().len(), 6, "{v}");
        let t = &v["timings"];
        for key in ["load_s", "vision_s", "prefill_s", "decode_s"] {
            assert!(t[key].as_f64().is_some_and(|s| s >= 0.0), "{key}: {v}");
        }
        // A rate where the answer has tokens after the first.
        assert_eq!(t["decode_tokens_per_s"].is_f64(), got.len() > 1, "{v}");
        assert_eq!(v["dtype"], "f32", "{dir}");
        // `auto` keeps a checkpoint's half precision on the CPU; f32 files stay f32.
        let stored = if dir.contains("bf16") || dir.contains("v4") {
            "bf16"
        } else {
            "f32"
        };
        assert_eq!(v["weights"], stored, "{dir}");

        // Streamed: the same answer (text held back inside a character aside), then a newline.
        let streamed = ok(&args);
        assert!(streamed.ends_with('\n'), "{streamed:?}");
        assert!(
            text.starts_with(streamed.trim_end_matches('\n')),
            "{streamed:?} vs {text:?}"
        );
        // The explicit placeholder form is the same prompt.
        let tagged = format!("<image_placeholder>\n{QUESTION}");
        let mut tagged_args = with_json.clone();
        let at = tagged_args.iter().position(|a| *a == "--prompt").unwrap() + 1;
        tagged_args[at] = &tagged;
        let untimed = |mut v: Value| {
            v.as_object_mut().unwrap().remove("timings");
            v
        };
        assert_eq!(
            untimed(ok_json(&tagged_args)),
            untimed(v.clone()),
            "{dir}: tagged prompt"
        );
    }
}

#[test]
fn understand_original_matches_the_official_code() {
    let model = original_checkpoint();
    let r = read_reference(&fixture("original-tiny/expected/understand.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("image.png");
    write_png(&img, 384, 384, upscaled(&r["image_small_u8"], 384));
    let want = r["greedy_ids"].u32s();
    let n = want.len().to_string();
    let v = ok_json(&[
        "understand",
        "-q",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--image",
        path_str(&img),
        "--prompt",
        QUESTION,
        "--max-new-tokens",
        &n,
        "--temperature",
        "0",
        "--json",
    ]);
    check_answer(&ids(&v["token_ids"]), &want, eos(&model));
    assert_eq!(
        v["prompt_tokens"].as_u64(),
        Some(r["input_ids"].shape[1] as u64)
    );
}

// ---------------------------------------------------------------- generate

#[test]
fn generate_hf_matches_the_reference_with_one_and_several_images() {
    let model = fixture("hf-tiny");
    let r = read_reference(&fixture("hf-tiny/expected/multimodal.safetensors"));
    let want = r["gen_tokens"].u32s();
    let pixels = r["gen_image_u8"].u8s();
    let tmp = tempfile::tempdir().unwrap();

    let out = tmp.path().join("cat.png");
    let v = ok_json(&[
        "generate",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--prompt",
        "a photo of a cat",
        "--temperature",
        "0",
        "--out",
        path_str(&out),
        "--json",
    ]);
    assert_eq!(v["images"], json!([path_str(&out)]));
    assert_eq!(v["tokens"].as_array().unwrap().len(), 1);
    assert_eq!(ids(&v["tokens"][0]), want);
    let grid = ids(&v["grid"]);
    assert_eq!(grid.len(), 2);
    assert_eq!((grid[0] * grid[1]) as usize, want.len());
    assert!(v["seed"].is_u64(), "{v}");
    let t = &v["timings"];
    let secs = |key: &str| t[key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"));
    assert!(secs("load_s") > 0.0 && secs("tokens_s") > 0.0 && secs("vq_decode_s") > 0.0);
    assert!((secs("tokens_s") + secs("vq_decode_s") - secs("total_s")).abs() < 1e-6);
    let d = max_pixel_diff(&out, &pixels);
    assert!(d <= 1, "pixels differ by {d}");
    let files: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "exactly --out is written");

    // Two prompts × two images, in one batch: cat_0 … cat_3, each the reference (greedy).
    let v = ok_json(&[
        "generate",
        "-q",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--prompt",
        "a photo of a cat",
        "--prompt",
        "a photo of a cat",
        "--count",
        "2",
        "--cfg-weight",
        "5",
        "--temperature",
        "0",
        "--seed",
        "3",
        "--out",
        path_str(&out),
        "--json",
    ]);
    let names: Vec<PathBuf> = (0..4)
        .map(|i| tmp.path().join(format!("cat_{i}.png")))
        .collect();
    assert_eq!(
        v["images"],
        json!(names.iter().map(|p| path_str(p)).collect::<Vec<_>>())
    );
    assert_eq!(v["seed"], json!(3));
    for (i, name) in names.iter().enumerate() {
        assert_eq!(ids(&v["tokens"][i]), want, "image {i}");
        let d = max_pixel_diff(name, &pixels);
        assert!(d <= 1, "image {i}: pixels differ by {d}");
    }

    // Without --json: the paths written, one a line.
    let listed = ok(&[
        "generate",
        "-q",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--prompt",
        "a photo of a cat",
        "--count",
        "2",
        "--temperature",
        "0",
        "--out",
        path_str(&tmp.path().join("dog.png")),
    ]);
    let expected: Vec<String> = (0..2)
        .map(|i| path_str(&tmp.path().join(format!("dog_{i}.png"))).to_string())
        .collect();
    assert_eq!(listed.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn generate_with_sampling_reproduces_its_seed() {
    let model = fixture("hf-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.png");
    let run = |seed: Option<&str>| {
        let mut args = vec![
            "generate",
            "-q",
            "--model",
            path_str(&model),
            "--prompt",
            "a portrait",
            "--top-k",
            "50",
            "--out",
            path_str(&out),
            "--json",
        ];
        if let Some(s) = seed {
            args.extend(["--seed", s]);
        }
        ok_json(&args)
    };
    let first = run(None);
    let seed = first["seed"].as_u64().expect("the seed used").to_string();
    let again = run(Some(&seed));
    assert_eq!(
        again["tokens"], first["tokens"],
        "the reported seed reproduces"
    );
}

#[test]
fn generate_original_matches_the_official_code() {
    let model = original_checkpoint();
    let r = read_reference(&fixture("original-tiny/expected/generate.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cat.png");
    let v = ok_json(&[
        "generate",
        "-q",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--prompt",
        "a photo of a cat",
        "--temperature",
        "0",
        "--out",
        path_str(&out),
        "--json",
    ]);
    let want = r["tokens"].u32s();
    assert_eq!(ids(&v["tokens"][0]), want);
    let grid = ids(&v["grid"]);
    assert_eq!((grid[0] * grid[1]) as usize, want.len());
    let d = max_pixel_diff(&out, &r["image_u8"].u8s());
    assert!(d <= 1, "pixels differ by {d}");

    // decode-image on the generate JSON decodes its first image: the reference pixels.
    let json_path = tmp.path().join("gen.json");
    std::fs::write(&json_path, v.to_string()).unwrap();
    let decoded = tmp.path().join("decoded.png");
    ok(&[
        "decode-image",
        "-q",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--tokens",
        path_str(&json_path),
        "--out",
        path_str(&decoded),
    ]);
    let d = max_pixel_diff(&decoded, &r["image_u8"].u8s());
    assert!(d <= 1, "decoded pixels differ by {d}");
}

// ---------------------------------------------------------------- encode-image / decode-image

/// `clip((x + 1) / 2 · 255, 0, 255)` truncated, NCHW floats to HWC u8 (the reference's formula).
fn to_u8_hwc(t: &Ref) -> Vec<u8> {
    let (c, h, w) = (t.shape[1], t.shape[2], t.shape[3]);
    let mut out = Vec::with_capacity(h * w * c);
    for y in 0..h {
        for x in 0..w {
            for ch in 0..c {
                let v = t.values[ch * h * w + y * w + x];
                out.push(((v + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

fn grid_of(n: usize) -> usize {
    let g = (n as f64).sqrt().round() as usize;
    assert_eq!(g * g, n, "a square grid");
    g
}

#[test]
fn decode_image_hf_matches_the_reference() {
    let model = fixture("hf-tiny");
    let r = read_reference(&fixture("hf-tiny/expected/multimodal.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    for (tokens, pixels) in [
        (r["vq_tokens"].u32s(), to_u8_hwc(&r["vq_decoded"])),
        (r["gen_tokens"].u32s(), r["gen_image_u8"].u8s()),
    ] {
        let g = grid_of(tokens.len());
        let file = tmp.path().join("tokens.json");
        std::fs::write(&file, json!({"tokens": tokens, "grid": [g, g]}).to_string()).unwrap();
        let out = tmp.path().join("decoded.png");
        let stdout = ok(&[
            "decode-image",
            "--model",
            path_str(&model),
            "--tokens",
            path_str(&file),
            "--out",
            path_str(&out),
        ]);
        assert_eq!(stdout.trim_end(), path_str(&out));
        let d = max_pixel_diff(&out, &pixels);
        assert!(d <= 1, "pixels differ by {d}");
    }
}

#[test]
fn encode_image_original_matches_the_official_quantizer() {
    let model = original_checkpoint();
    let und = read_reference(&fixture("original-tiny/expected/understand.safetensors"));
    let r = read_reference(&fixture("original-tiny/expected/vq_preprocess.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("image.png");
    write_png(&img, 384, 384, upscaled(&und["image_small_u8"], 384));
    let v = ok_json(&[
        "encode-image",
        "-q",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--image",
        path_str(&img),
        "--json",
    ]);
    assert_eq!(v.as_object().unwrap().len(), 4, "{v}");
    assert_eq!(v["weights"], "bf16", "the original test checkpoint is bf16");
    assert_eq!(v["dtype"], "f32");
    let got = ids(&v["tokens"]);
    let want = r["encode_tokens"].u32s();
    assert_eq!(got.len(), want.len());
    let g = grid_of(want.len()) as u64;
    assert_eq!(v["grid"], json!([g, g]));
    let gaps = &r["encode_gaps"].values;
    for i in 0..want.len() {
        // Only a recorded near-tie may pick the other code.
        assert!(
            got[i] == want[i] || gaps[i] < 1e-3,
            "position {i}: {} vs {} (gap {:e})",
            got[i],
            want[i],
            gaps[i]
        );
    }

    // Its JSON feeds decode-image; the text form lists the same grid row by row.
    let file = tmp.path().join("tokens.json");
    std::fs::write(&file, v.to_string()).unwrap();
    let out = tmp.path().join("decoded.png");
    ok(&[
        "decode-image",
        "-q",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--tokens",
        path_str(&file),
        "--out",
        path_str(&out),
    ]);
    assert!(image::open(&out).is_ok());
    let text = ok(&[
        "encode-image",
        "-q",
        "--model",
        path_str(&model),
        "--dtype",
        "f32",
        "--image",
        path_str(&img),
    ]);
    let rows: Vec<Vec<u32>> = text
        .lines()
        .map(|l| l.split(' ').map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len() as u64, g);
    assert_eq!(rows.concat(), got);
}

#[test]
fn encode_image_hf_gives_a_grid_that_decodes() {
    let model = fixture("hf-tiny");
    let r = read_reference(&fixture("hf-tiny/expected/multimodal.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("image.png");
    let shape = &r["image_u8"].shape;
    write_png(&img, shape[1], shape[0], r["image_u8"].u8s());
    let v = ok_json(&[
        "encode-image",
        "-q",
        "--model",
        path_str(&model),
        "--image",
        path_str(&img),
        "--json",
    ]);
    let tokens = ids(&v["tokens"]);
    // The grid is the one the decoder reads (the reference's token grids have its size).
    assert_eq!(tokens.len(), r["vq_tokens"].values.len());
    let g = grid_of(tokens.len()) as u64;
    assert_eq!(v["grid"], json!([g, g]));
    let file = tmp.path().join("tokens.json");
    std::fs::write(&file, v.to_string()).unwrap();
    ok(&[
        "decode-image",
        "-q",
        "--model",
        path_str(&model),
        "--tokens",
        path_str(&file),
        "--out",
        path_str(&tmp.path().join("out.png")),
    ]);
}

// ---------------------------------------------------------------- the hub cache

/// A Hugging Face cache under `home/hub` holding `repo` with the files of a fixture folder.
fn fake_hub_cache(home: &Path, repo: &str, fixture_dir: &str) {
    let folder = home
        .join("hub")
        .join(format!("models--{}", repo.replace('/', "--")));
    let rev = "4f1c0e0d6a8b9c7d5e3f2a1b0c9d8e7f6a5b4c3d";
    let snap = folder.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), rev).unwrap();
    for entry in std::fs::read_dir(fixture(fixture_dir)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, snap.join(path.file_name().unwrap())).unwrap();
        }
    }
}

#[test]
fn a_hub_id_is_found_in_the_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    fake_hub_cache(home.path(), "tiny-org/janus-tiny", "hf-tiny");
    let hf_home = path_str(home.path());
    let r = read_reference(&fixture("hf-tiny/expected/multimodal.safetensors"));
    let tokens = r["gen_tokens"].u32s();
    let g = grid_of(tokens.len());
    let file = home.path().join("tokens.json");
    std::fs::write(&file, json!({"tokens": tokens, "grid": [g, g]}).to_string()).unwrap();
    let out = home.path().join("out.png");
    let run = |model: &str| {
        janus_env(
            &[
                "decode-image",
                "-q",
                "--model",
                model,
                "--tokens",
                path_str(&file),
                "--out",
                path_str(&out),
            ],
            &[("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")],
        )
    };
    let found = run("tiny-org/janus-tiny");
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let d = max_pixel_diff(&out, &r["gen_image_u8"].u8s());
    assert!(d <= 1, "pixels differ by {d}");

    assert_fails(&run("tiny-org/not-there"), "tiny-org/not-there");
}

// ---------------------------------------------------------------- errors

#[test]
fn bad_input_fails_with_one_line() {
    let model = fixture("hf-tiny");
    let m = path_str(&model);
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("image.png");
    write_png(&img, 8, 8, vec![128; 8 * 8 * 3]);
    let im = path_str(&img);

    // A model folder that is not there.
    let missing = tmp.path().join("no-model");
    assert_fails(
        &janus(&[
            "understand",
            "--model",
            path_str(&missing),
            "--image",
            im,
            "--prompt",
            "what?",
        ]),
        "no-model",
    );
    // A folder that is not a model.
    assert_fails(
        &janus(&[
            "encode-image",
            "--model",
            path_str(tmp.path()),
            "--image",
            im,
        ]),
        path_str(tmp.path()),
    );
    // An image that is not there, and one that is not an image.
    let garbage = tmp.path().join("garbage.png");
    std::fs::write(&garbage, b"not an image at all").unwrap();
    for bad in [tmp.path().join("none.png"), garbage] {
        assert_fails(
            &janus(&[
                "understand",
                "--model",
                m,
                "--image",
                path_str(&bad),
                "--prompt",
                "what?",
            ]),
            path_str(&bad),
        );
        assert_fails(
            &janus(&["encode-image", "--model", m, "--image", path_str(&bad)]),
            path_str(&bad),
        );
    }
    // Placeholders and images that do not match.
    assert_fails(
        &janus(&[
            "understand",
            "--model",
            m,
            "--image",
            im,
            "--prompt",
            "<image_placeholder> and <image_placeholder>?",
        ]),
        "placeholder",
    );
    // Malformed token files.
    let out = tmp.path().join("out.png");
    for (name, content) in [
        ("broken.json", "{\"tokens\": [1, 2,"),
        ("shape.json", "{\"tokens\": [1, 2, 3], \"grid\": [2, 2]}"),
        ("kind.json", "{\"tokens\": \"abc\", \"grid\": [1, 1]}"),
        ("empty.json", "{\"tokens\": [], \"grid\": [0, 0]}"),
        ("binary.json", "\u{1}\u{2}\u{3}"),
    ] {
        let file = tmp.path().join(name);
        std::fs::write(&file, content).unwrap();
        assert_fails(
            &janus(&[
                "decode-image",
                "--model",
                m,
                "--tokens",
                path_str(&file),
                "--out",
                path_str(&out),
            ]),
            name,
        );
    }
    assert!(!out.exists());
    // Output into a folder that does not exist.
    assert_fails(
        &janus(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "a cat",
            "--out",
            path_str(&tmp.path().join("nope/cat.png")),
        ]),
        "nope",
    );
    // Bad option values.
    assert_fails(
        &janus(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "a cat",
            "--temperature=-1",
            "--out",
            path_str(&out),
        ]),
        "temperature",
    );
}

/// Quantized weights compute in f32: any other compute dtype is an error (exit 1) before the
/// model loads; an unknown storage is a usage error.
/// Without `--dtype`, a bf16 checkpoint computes in bf16 where this CPU has AMX (the load line
/// and the JSON say so) and an f32 one in f32; quantized weights compute in f32.
#[test]
fn the_default_dtype_follows_the_weights_and_the_cpu() {
    use janus_core::nn::kernels::Bf16Gemm;
    let bf16_cpu = matches!(Bf16Gemm::selected(), Ok(Some(Bf16Gemm::Amx)));
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("image.png");
    write_png(&img, 64, 64, vec![128; 64 * 64 * 3]);
    for (dir, weights, want) in [
        (
            "hf-tiny-bf16-sharded",
            "auto",
            if bf16_cpu { "bf16" } else { "f32" },
        ),
        ("hf-tiny-bf16-sharded", "q8_0", "f32"),
        ("hf-tiny", "auto", "f32"),
    ] {
        let model = fixture(dir);
        let args = [
            "encode-image",
            "--model",
            path_str(&model),
            "--image",
            path_str(&img),
            "--weights",
            weights,
            "--json",
        ];
        let out = janus(&args);
        assert!(out.status.success(), "{dir} {weights}: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["dtype"], want, "{dir} {weights}");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            log.contains(&format!("(dtype {want}, ")),
            "{dir} {weights}: {log}"
        );
    }
}

#[test]
fn weights_the_compute_dtype_cannot_use_are_errors() {
    let model = fixture("hf-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("image.png");
    write_png(&img, 8, 8, vec![128; 3 * 8 * 8]);
    for weights in ["q8_0", "q4_0"] {
        let out = janus(&[
            "encode-image",
            "--model",
            path_str(&model),
            "--image",
            path_str(&img),
            "--dtype",
            "bf16",
            "--weights",
            weights,
        ]);
        assert_fails(&out, "--dtype f32");
    }
    let out = janus(&[
        "encode-image",
        "--model",
        path_str(&model),
        "--image",
        path_str(&img),
        "--weights",
        "int3",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn usage_errors_exit_with_2() {
    for args in [
        &["generate", "--model", "x"][..],
        &[
            "understand",
            "--model",
            "x",
            "--prompt",
            "p",
            "--dtype",
            "f64",
        ],
        &[
            "understand",
            "--model",
            "x",
            "--prompt",
            "p",
            "--backend",
            "tpu",
        ],
        &["frobnicate"],
    ] {
        let out = janus(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
    }
}

// ---------------------------------------------------------------- loss

#[test]
fn loss_matches_transformers_and_names_bad_lines() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("hf-tiny/expected/losses.json")).unwrap(),
    )
    .unwrap();
    let data = fixture("train/data.jsonl");
    let model = fixture("hf-tiny");
    let args = ["loss", "-q", "--model", path_str(&model)];
    let v = ok_json(&[&args[..], &["--data", path_str(&data), "--json"]].concat());
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    // Images quantised as the official code does: the fixture's `losses_l2norm`.
    let want = expected["losses_l2norm"].as_array().unwrap();
    let got = v["losses"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    let close = |g: &Value, w: &Value| {
        let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
        assert!((g - w).abs() <= 1e-4 * w.abs(), "{g} vs {w}");
    };
    for (g, w) in got.iter().zip(want) {
        close(g, w);
    }
    close(&v["mean"], &expected["mean_l2norm"]);
    // Plain output: a line per sample, then the mean.
    let text = ok(&[&args[..], &["--data", path_str(&data)]].concat());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), want.len() + 1, "{text}");
    assert!(lines[0].starts_with("1\tgenerate\t"), "{text}");
    assert!(lines[want.len()].starts_with("mean\t"), "{text}");
    // A malformed line is named before the model loads.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"task\": \"text\", \"text\": \"a\"}\n{\"task\": \"draw\"}\n",
    )
    .unwrap();
    let out = janus(&[&args[..], &["--data", path_str(&bad), "--json"]].concat());
    assert_fails(&out, "line 2");
    let missing = tmp.path().join("missing.jsonl");
    let out = janus(&[&args[..], &["--data", path_str(&missing)]].concat());
    assert_fails(&out, "missing.jsonl");
}

// ---------------------------------------------------------------- train

#[test]
fn train_writes_a_model_that_loads_with_a_lower_loss() {
    let model = fixture("hf-tiny");
    let data = fixture("train/data.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tuned");
    let train = |extra: &[&str]| {
        let base = [
            "train",
            "-q",
            "--model",
            path_str(&model),
            "--data",
            path_str(&data),
        ];
        janus(&[&base[..], extra].concat())
    };
    let run = train(&[
        "--out",
        path_str(&out),
        "--stage",
        "2",
        "--lr",
        "1e-2",
        "--steps",
        "10",
        "--batch-size",
        "2",
        "--cfg-drop",
        "0",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let steps: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 10);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], json!(i + 1));
        assert_eq!(s["samples"], json!(2 * (i + 1)));
        assert!(s["loss"].as_f64().unwrap().is_finite() && s["lr"].as_f64().unwrap() > 0.0);
    }
    let mean = |dir: &Path| {
        ok_json(&[
            "loss",
            "-q",
            "--model",
            path_str(dir),
            "--data",
            path_str(&data),
            "--json",
        ])["mean"]
            .as_f64()
            .unwrap()
    };
    let (before, after) = (mean(&model), mean(&out));
    assert!(after < before / 2.0, "mean loss {before} -> {after}");
    // Usage errors exit 2; saving over the input is refused before training.
    let both = train(&["--out", path_str(&out), "--steps", "1", "--epochs", "1"]);
    assert_eq!(both.status.code(), Some(2));
    let over = train(&["--out", path_str(&model), "--steps", "1"]);
    assert_fails(&over, "loaded from");
}

/// Ctrl-C during `janus train` saves a checkpoint and exits 130; `--resume` finishes the run
/// with the log an uninterrupted run writes; a LoRA run writes an adapter `--lora` applies.
#[cfg(unix)]
#[test]
fn train_stops_on_ctrl_c_and_resumes() {
    let model = fixture("hf-tiny");
    let data = fixture("train/data.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "-q",
            "--model",
            path_str(&model),
            "--data",
            path_str(&data),
            "--out",
            path_str(out),
            "--lora",
            "2",
            "--lr",
            "1e-2",
            "--steps",
            "300",
            "--seed",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let whole = tmp.path().join("whole");
    let run = Command::new(env!("CARGO_BIN_EXE_janus"))
        .args(args(&whole, &[]))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let cut = tmp.path().join("cut");
    let child = Command::new(env!("CARGO_BIN_EXE_janus"))
        .args(args(&cut, &[]))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = cut.join("train_log.jsonl");
    let lines = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|s| s.lines().map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let started = std::time::Instant::now();
    while lines(&log).len() < 2 {
        assert!(started.elapsed().as_secs() < 300, "no training step logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let done = lines(&log).len();
    assert!(done < 300, "stopped early ({done} updates)");
    let checkpoint = cut.join("checkpoint");
    assert!(checkpoint.join("state.json").is_file());
    let resumed = Command::new(env!("CARGO_BIN_EXE_janus"))
        .args(args(&cut, &["--resume", path_str(&checkpoint)]))
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(lines(&log), lines(&whole.join("train_log.jsonl")));
    // The adapter each run wrote gives the same losses through --lora.
    let loss = |adapter: &Path| {
        ok_json(&[
            "loss",
            "-q",
            "--model",
            path_str(&model),
            "--lora",
            path_str(adapter),
            "--data",
            path_str(&data),
            "--json",
        ])
    };
    assert_eq!(loss(&cut), loss(&whole));
}
