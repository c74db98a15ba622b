//! The C ABI from C and C++: builds `tests/c/test_janus.c` and `tests/cpp/test_janus.cpp`
//! against `include/janus.h` and the library cargo built for this test (shared and static),
//! runs them on the tiny test checkpoints with the reference outputs extracted into plain files,
//! runs the C test under valgrind, and builds and runs `examples/cpp` against an installed copy
//! (`janus-ffi/install.sh`, `pkg-config`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

// ---- paths ----------------------------------------------------------------------------------

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// The original-layout checkpoint `scripts/setup.sh` writes into the fixture cache.
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

/// Where cargo put `libjanus.so` and `libjanus.a` for this test: next to the test executable
/// (`target/<profile>/deps`), where the library this test links was built with all its crate
/// types.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let deps = exe.parent().expect("deps folder").to_path_buf();
    for dir in [deps.clone(), deps.parent().unwrap_or(&deps).to_path_buf()] {
        if dir.join("libjanus.so").is_file() && dir.join("libjanus.a").is_file() {
            return dir;
        }
    }
    panic!(
        "libjanus.so / libjanus.a not found next to {}",
        exe.display()
    );
}

/// A scratch folder for this run (kept under the target folder for inspection).
fn work_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("janus-ffi-c-abi");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("work dir");
        dir
    })
}

// ---- reference outputs ----------------------------------------------------------------------

/// A tensor of a reference safetensors file: its shape and values (integers; u8 or i64).
struct RefTensor {
    shape: Vec<usize>,
    values: Vec<i64>,
}

fn read_reference(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("reference safetensors");
    st.tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let data = view.data();
            let values: Vec<i64> = match view.dtype() {
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::U8 => data.iter().map(|&b| i64::from(b)).collect(),
                safetensors::Dtype::F32 if name == "encode_gaps" => data
                    .chunks_exact(4)
                    // Near-ties (gap < 1e-3) become 1, the rest 0.
                    .map(|c| i64::from(f32::from_le_bytes(c.try_into().unwrap()) < 1e-3))
                    .collect(),
                _ => return None,
            };
            Some((
                name,
                RefTensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            ))
        })
        .collect()
}

/// The reference answer cut after its first EOS (the reference decoded a fixed number of
/// tokens).
fn cut_at_eos(ids: &[i64], eos: u32) -> Vec<i64> {
    let n = ids
        .iter()
        .position(|&t| t == i64::from(eos))
        .map_or(ids.len(), |i| i + 1);
    ids[..n].to_vec()
}

fn eos_of(dir: &Path) -> u32 {
    janus_core::JanusTokenizer::from_dir(dir)
        .expect("tokenizer")
        .special()
        .eos
}

/// `expected.txt` (lines `key n v1 … vn`) and `<key>.rgb` raw images.
struct Expected {
    dir: PathBuf,
    text: String,
}

impl Expected {
    fn ints(&mut self, key: &str, values: &[i64]) {
        write!(self.text, "{key} {}", values.len()).unwrap();
        for v in values {
            write!(self.text, " {v}").unwrap();
        }
        self.text.push('\n');
    }

    /// An image given as `[.., h, w, 3]` u8 values.
    fn image(&mut self, key: &str, t: &RefTensor) {
        let s = &t.shape[t.shape.len() - 3..];
        assert_eq!(s[2], 3, "{key}: not RGB");
        self.ints(&format!("{key}_shape"), &[s[0] as i64, s[1] as i64]);
        let bytes: Vec<u8> = t.values.iter().map(|&v| v as u8).collect();
        std::fs::write(self.dir.join(format!("{key}.rgb")), bytes).expect("write image");
    }
}

/// The folder of reference files the test programs read.
fn expected_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = work_dir().join("expected");
        std::fs::create_dir_all(&dir).expect("expected dir");
        let mut e = Expected {
            dir: dir.clone(),
            text: String::new(),
        };

        // Hugging Face layout: transformers' outputs.
        let hf = fixture("hf-tiny");
        let r = read_reference(&hf.join("expected/multimodal.safetensors"));
        e.image("hf_image", &r["image_u8"]);
        let greedy = &r["mm_greedy_ids"].values;
        e.ints("hf_max_new_tokens", &[greedy.len() as i64]);
        e.ints("hf_answer_ids", &cut_at_eos(greedy, eos_of(&hf)));
        e.ints("hf_prompt_tokens", &[r["mm_input_ids"].shape[1] as i64]);
        e.ints("hf_gen_tokens", &r["gen_tokens"].values);
        e.image("hf_gen_image", &r["gen_image_u8"]);

        // Original layout: the official code's outputs.
        let orig = fixture("original-tiny");
        let und = read_reference(&orig.join("expected/understand.safetensors"));
        let gen_ref = read_reference(&orig.join("expected/generate.safetensors"));
        let vq = read_reference(&orig.join("expected/vq_preprocess.safetensors"));
        // The understanding and encoder input: the small image upscaled (nearest) to the
        // models' image size, which the generated image has.
        let size = gen_ref["image_u8"].shape[1];
        let small = &und["image_small_u8"];
        let (h, w) = (small.shape[0], small.shape[1]);
        let mut big = Vec::with_capacity(size * size * 3);
        for y in 0..size {
            for x in 0..size {
                let at = ((y * h / size) * w + x * w / size) * 3;
                big.extend_from_slice(&small.values[at..at + 3]);
            }
        }
        e.image(
            "orig_image",
            &RefTensor {
                shape: vec![size, size, 3],
                values: big,
            },
        );
        let greedy = &und["greedy_ids"].values;
        e.ints("orig_max_new_tokens", &[greedy.len() as i64]);
        e.ints(
            "orig_answer_ids",
            &cut_at_eos(greedy, eos_of(&original_checkpoint())),
        );
        e.ints("orig_prompt_tokens", &[und["input_ids"].shape[1] as i64]);
        e.ints("orig_encode_tokens", &vq["encode_tokens"].values);
        let ties: Vec<i64> = (0..)
            .zip(&vq["encode_gaps"].values)
            .filter(|&(_, &tie)| tie == 1)
            .map(|(i, _)| i)
            .collect();
        e.ints("orig_encode_near_ties", &ties);
        e.ints("orig_gen_tokens", &gen_ref["tokens"].values);
        e.image("orig_gen_image", &gen_ref["image_u8"]);

        std::fs::write(dir.join("expected.txt"), &e.text).expect("write expected.txt");
        dir
    })
}

// ---- building and running -------------------------------------------------------------------

/// Runs a command and returns its output; panics with the output when it fails. The programs
/// find the library through their run path: cargo's `LD_LIBRARY_PATH` (which names other
/// builds' folders) is taken out.
fn run(cmd: &mut Command) -> String {
    let started = std::time::Instant::now();
    let out = cmd
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    println!(
        "{:?} took {:.1} s",
        cmd.get_program(),
        started.elapsed().as_secs_f64()
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// Compiles a test program against the header and the shared library (or the static one).
fn build(compiler: &str, source: &str, name: &str, extra: &[&str], static_lib: bool) -> PathBuf {
    let lib = lib_dir();
    let exe = work_dir().join(name);
    let mut cmd = Command::new(compiler);
    cmd.args(["-Wall", "-Wextra", "-Werror", "-g", "-I"])
        .arg(repo().join("include"))
        .args(extra)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join(source))
        .arg("-o")
        .arg(&exe);
    if static_lib {
        cmd.arg(lib.join("libjanus.a"))
            .args(["-Wl,--gc-sections", "-lpthread", "-ldl", "-lm"]);
    } else {
        cmd.arg("-L")
            .arg(&lib)
            .arg("-ljanus")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
    }
    run(&mut cmd);
    exe
}

fn build_c(name: &str, static_lib: bool) -> PathBuf {
    build(
        "cc",
        "tests/c/test_janus.c",
        name,
        &["-std=c11", "-pedantic"],
        static_lib,
    )
}

#[test]
fn c_test_with_the_shared_library() {
    let exe = build_c("test_janus_c", false);
    let out = run(Command::new(&exe)
        .arg(expected_dir())
        .arg(fixture("hf-tiny"))
        .arg(original_checkpoint()));
    println!("{out}");
    assert!(out.contains("all C checks passed"), "{out}");
}

#[test]
fn c_test_with_the_static_library() {
    let exe = build_c("test_janus_c_static", true);
    let out = run(Command::new(&exe)
        .arg(expected_dir())
        .arg(fixture("hf-tiny")));
    println!("{out}");
    assert!(out.contains("all C checks passed"), "{out}");
}

#[test]
fn cpp_test_with_the_shared_library() {
    let exe = build(
        "c++",
        "tests/cpp/test_janus.cpp",
        "test_janus_cpp",
        &["-std=c++17", "-pthread"],
        false,
    );
    let out = run(Command::new(&exe)
        .arg(expected_dir())
        .arg(fixture("hf-tiny")));
    println!("{out}");
    assert!(out.contains("all C++ checks passed"), "{out}");
}

/// valgrind's memcheck on the C test (Hugging Face checkpoint): no invalid reads or writes, no
/// bytes definitely lost. `JANUS_SKIP_VALGRIND=1` skips it where valgrind is not installed.
#[test]
fn c_test_under_valgrind() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("JANUS_SKIP_VALGRIND").is_some_and(|v| v == "1"),
            "valgrind is not installed: run `bash scripts/setup.sh` (or set JANUS_SKIP_VALGRIND=1)"
        );
        return;
    }
    let exe = build_c("test_janus_c_valgrind", false);
    let out = run(Command::new("valgrind")
        .args([
            "--tool=memcheck",
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
            "--show-leak-kinds=definite",
        ])
        .arg(&exe)
        .arg(expected_dir())
        .arg(fixture("hf-tiny")));
    println!("{out}");
    assert!(out.contains("all C checks passed"), "{out}");
    assert!(out.contains("ERROR SUMMARY: 0 errors"), "{out}");
}

/// The C test built with AddressSanitizer (gcc's `-fsanitize=address`, against the shared
/// library): every call and error path of the header, no invalid access on the C side.
#[test]
fn c_test_under_address_sanitizer() {
    let exe = build(
        "cc",
        "tests/c/test_janus.c",
        "test_janus_c_asan",
        &[
            "-std=c11",
            "-pedantic",
            "-fsanitize=address",
            "-fno-omit-frame-pointer",
        ],
        false,
    );
    let out = run(Command::new(&exe)
        .env("ASAN_OPTIONS", "halt_on_error=1:detect_leaks=1")
        .arg(expected_dir())
        .arg(fixture("hf-tiny")));
    println!("{out}");
    assert!(out.contains("all C checks passed"), "{out}");
    assert!(!out.contains("AddressSanitizer"), "{out}");
}

/// `examples/cpp` built with its Makefile against a copy installed by `janus-ffi/install.sh`
/// and found through `pkg-config`, then run on the tiny checkpoint: it answers and writes a PNG
/// of the model's image size.
#[test]
fn cpp_example_against_an_installed_copy() {
    let prefix = work_dir().join("prefix");
    run(Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("install.sh"))
        .arg("--no-static")
        .arg(&prefix)
        .arg(lib_dir()));
    let pc_path = prefix.join("lib/pkgconfig");
    let libs = run(Command::new("pkg-config")
        .args(["--libs", "janus"])
        .env("PKG_CONFIG_PATH", &pc_path));
    assert!(
        libs.contains("-ljanus") && libs.contains(&prefix.join("lib").display().to_string()),
        "{libs}"
    );

    let build = work_dir().join("example");
    run(Command::new("make")
        .arg("-C")
        .arg(repo().join("examples/cpp"))
        .arg(format!("BUILD={}", build.display()))
        .env("PKG_CONFIG_PATH", &pc_path));
    let png = work_dir().join("example.png");
    let out = run(Command::new(build.join("janus_example"))
        .arg(fixture("hf-tiny"))
        .arg(fixture("preprocess/decode/rgb.png"))
        .arg(&png)
        .arg("What is shown in this image?")
        .arg("a photo of a cat"));
    println!("{out}");
    let written = image::open(&png).expect("the example's PNG").to_rgb8();
    let r = read_reference(&fixture("hf-tiny/expected/multimodal.safetensors"));
    let shape = &r["gen_image_u8"].shape;
    assert_eq!(
        (written.height() as usize, written.width() as usize),
        (shape[1], shape[2])
    );
}
