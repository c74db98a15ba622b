//! Hostile and careless input to the `janus` binary: each case fails with one typed error line
//! and exit status 1 before any work sized by it, loses no existing output, and never aborts —
//! also under a memory limit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;
use common::{assert_fails, fixture, janus, ok, ok_json, path_str, write_png};

/// A copy of the tiny checkpoint (files linked) whose `config.json` is changed by `edit`.
fn model_with_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(fixture("hf-tiny")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if name != "config.json" {
            std::os::unix::fs::symlink(path.canonicalize().unwrap(), model.join(name)).unwrap();
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("hf-tiny/config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

fn image(dir: &Path) -> PathBuf {
    let path = dir.join("image.png");
    write_png(&path, 8, 8, vec![128; 8 * 8 * 3]);
    path
}

/// Defect 1: `prompt + max_new_tokens` cannot wrap around the context check.
#[test]
fn an_overflowing_max_new_tokens_is_invalid_input() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("hf-tiny");
    let img = image(tmp.path());
    let out = janus(&[
        "understand",
        "--model",
        path_str(&m),
        "--image",
        path_str(&img),
        "--prompt",
        "what?",
        "--max-new-tokens",
        &u64::MAX.to_string(),
    ]);
    assert_fails(&out, "exceed the context");
}

/// Defect 2: `--count` is bounded (`--max-count`, 64 by default) before the model loads.
#[test]
fn count_past_the_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("hf-tiny");
    let out = tmp.path().join("cat.png");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            path_str(&m),
            "--prompt",
            "a cat",
            "--out",
            path_str(&out),
        ];
        args.extend_from_slice(extra);
        janus(&args)
    };
    assert_fails(&run(&["--count", "100000"]), "max_count");
    // prompts × count.
    assert_fails(
        &run(&["--prompt", "a dog", "--count", "3", "--max-count", "5"]),
        "max_count",
    );
    assert!(!out.exists());
    let dir_entries = std::fs::read_dir(tmp.path()).unwrap().count();
    assert_eq!(dir_entries, 0);
}

/// Defect 3: a guidance weight that overflows the guided logits stops at the first step.
#[test]
fn non_finite_logits_are_an_error_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("hf-tiny");
    let out = tmp.path().join("cat.png");
    let run = janus(&[
        "generate",
        "--model",
        path_str(&m),
        "--prompt",
        "a cat",
        "--cfg-weight",
        "3.4e38",
        "--out",
        path_str(&out),
    ]);
    assert_fails(&run, "non-finite logits at step 1");
    assert!(!out.exists());
}

/// Defect 4: declared layer counts are compared with the files before anything sized by them.
#[test]
fn a_config_declaring_a_million_layers_fails_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_config(tmp.path(), |c| {
        c["text_config"]["num_hidden_layers"] = 1_000_000.into();
    });
    let img = image(tmp.path());
    let started = std::time::Instant::now();
    let out = janus(&[
        "encode-image",
        "--model",
        path_str(&model),
        "--image",
        path_str(&img),
    ]);
    assert_fails(&out, "num_hidden_layers 1000000");
    // The old behaviour allocated for a million layers for a minute before failing.
    assert!(started.elapsed().as_secs() < 30);
}

/// Runs `janus` with the file-size limit `bytes` (a full disk, as a write sees it: EFBIG).
fn janus_with_file_limit(bytes: u64, args: &[&str]) -> Output {
    let mut script = String::from("trap '' XFSZ; exec prlimit --fsize=");
    script.push_str(&format!("{bytes} \"$0\" \"$@\""));
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_janus"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run janus under prlimit")
}

/// Defect 5: a failed write leaves the existing file as it was and no partial file behind.
#[test]
fn a_failed_write_keeps_the_existing_output() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("hf-tiny");
    let tokens = tmp.path().join("tokens.json");
    let img = image(tmp.path());
    let encoded = ok(&[
        "encode-image",
        "-q",
        "--model",
        path_str(&m),
        "--image",
        path_str(&img),
        "--json",
    ]);
    std::fs::write(&tokens, encoded).unwrap();
    let out = tmp.path().join("out.png");
    let old = b"\x89PNG an older valid image".to_vec();
    std::fs::write(&out, &old).unwrap();
    let before: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    let run = janus_with_file_limit(
        100,
        &[
            "decode-image",
            "--model",
            path_str(&m),
            "--tokens",
            path_str(&tokens),
            "--out",
            path_str(&out),
        ],
    );
    assert_fails(&run, "cannot write");
    assert_eq!(std::fs::read(&out).unwrap(), old);
    let after: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(after.len(), before.len(), "a partial file was left behind");
    // Without the limit the same command replaces the file.
    ok(&[
        "decode-image",
        "-q",
        "--model",
        path_str(&m),
        "--tokens",
        path_str(&tokens),
        "--out",
        path_str(&out),
    ]);
    assert!(image::open(&out).is_ok());
}

/// Defect 6: inputs are regular files within `--max-input-mb`, checked before they are read.
#[test]
fn devices_and_oversized_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("hf-tiny");
    let out = tmp.path().join("out.png");
    assert_fails(
        &janus(&[
            "understand",
            "--model",
            path_str(&m),
            "--image",
            "/dev/zero",
            "--prompt",
            "what?",
        ]),
        "regular file",
    );
    assert_fails(
        &janus(&[
            "decode-image",
            "--model",
            path_str(&m),
            "--tokens",
            "/dev/zero",
            "--out",
            path_str(&out),
        ]),
        "regular file",
    );
    let big = tmp.path().join("big.png");
    std::fs::write(&big, vec![0u8; (1 << 20) + 1]).unwrap();
    assert_fails(
        &janus(&[
            "encode-image",
            "--model",
            path_str(&m),
            "--image",
            path_str(&big),
            "--max-input-mb",
            "1",
        ]),
        "max_input_mb",
    );
    // Pixels past --max-image-pixels: refused from the header.
    let img = image(tmp.path());
    assert_fails(
        &janus(&[
            "encode-image",
            "--model",
            path_str(&m),
            "--image",
            path_str(&img),
            "--max-image-pixels",
            "63",
        ]),
        "max_image_pixels",
    );
    // More images than --max-images.
    let mut args = vec!["understand", "--model", path_str(&m), "--prompt", "what?"];
    for _ in 0..3 {
        args.extend(["--image", path_str(&img)]);
    }
    args.extend(["--max-images", "2"]);
    assert_fails(&janus(&args), "max_images");
    assert!(!out.exists());
    // A file of the model folder that is a device is an error, never skipped or read forever.
    for name in [
        "chat_template.jinja",
        "tokenizer_config.json",
        "tokenizer.json",
        "processor_config.json",
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let model = model_with_config(&dir, |_| {});
        std::fs::remove_file(model.join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", model.join(name)).unwrap();
        assert_fails(
            &janus(&[
                "encode-image",
                "--model",
                path_str(&model),
                "--image",
                path_str(&img),
            ]),
            "regular file",
        );
    }
}

/// The smaller defects: a model path that is a file, an empty question, `--top-k 0`, the
/// output's extension, and prompts from a file or standard input.
#[test]
fn the_smaller_contracts_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("hf-tiny");
    let img = image(tmp.path());
    let config = m.join("config.json");
    let out = janus(&[
        "understand",
        "--model",
        path_str(&config),
        "--image",
        path_str(&img),
        "--prompt",
        "what?",
    ]);
    assert_fails(&out, "is a file");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("HF_HUB_OFFLINE"));
    for empty in ["", "  \n"] {
        let out = janus(&[
            "understand",
            "--model",
            path_str(&m),
            "--image",
            path_str(&img),
            "--prompt",
            empty,
        ]);
        assert_fails(&out, "the question is empty");
    }
    // --top-k 0 is "off": the same image as no --top-k.
    let gen_args = |out: &Path, extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "generate",
            "-q",
            "--model",
            path_str(&m),
            "--prompt",
            "a cat",
            "--seed",
            "3",
            "--json",
            "--out",
            path_str(out),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let json = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok_json(&refs)
    };
    let plain = json(gen_args(&tmp.path().join("a.png"), &[]));
    let off = json(gen_args(&tmp.path().join("b.png"), &["--top-k", "0"]));
    assert_eq!(plain["tokens"], off["tokens"]);
    // The extension picks the format; an unknown one is refused before generating.
    for (name, format) in [
        ("c.jpg", image::ImageFormat::Jpeg),
        ("c.webp", image::ImageFormat::WebP),
        ("c.png", image::ImageFormat::Png),
    ] {
        let path = tmp.path().join(name);
        json(gen_args(&path, &[]));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(image::guess_format(&bytes).unwrap(), format, "{name}");
    }
    let gif = tmp.path().join("c.gif");
    let refs: Vec<String> = gen_args(&gif, &[]);
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    assert_fails(&janus(&refs), ".png, .jpg");
    assert!(!gif.exists());
    // --prompt-file (one trailing newline trimmed) and `-` give what --prompt gives.
    let file = tmp.path().join("prompt.txt");
    std::fs::write(&file, "a cat\n").unwrap();
    let mut from_file = gen_args(&tmp.path().join("d.png"), &[]);
    let at = from_file.iter().position(|a| a == "--prompt").unwrap();
    from_file[at] = "--prompt-file".into();
    from_file[at + 1] = path_str(&file).into();
    assert_eq!(json(from_file.clone())["tokens"], plain["tokens"]);
    from_file[at + 1] = "-".into();
    let mut child = Command::new(env!("CARGO_BIN_EXE_janus"))
        .args(&from_file)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"a cat\r\n").unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success());
    let piped: serde_json::Value = serde_json::from_slice(&piped.stdout).unwrap();
    assert_eq!(piped["tokens"], plain["tokens"]);
    // A prompt far longer than a command line allows reaches the model (and its context check).
    std::fs::write(&file, "a cat ".repeat(40_000)).unwrap();
    let out = janus(&[
        "understand",
        "--model",
        path_str(&m),
        "--image",
        path_str(&img),
        "--prompt-file",
        path_str(&file),
    ]);
    assert_fails(&out, "exceed the context");
    // --prompt and --prompt-file together: a usage error.
    let out = janus(&[
        "understand",
        "--model",
        path_str(&m),
        "--prompt",
        "x",
        "--prompt-file",
        path_str(&file),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// The peak virtual memory of a run (kB), sampled from /proc while it runs.
fn vm_peak_kb(args: &[&str]) -> u64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_janus"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status)
            && let Some(kb) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmPeak:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak = peak.max(kb);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    peak
}

/// Nothing on the request path aborts: the worst inputs above, under an address-space limit of
/// a normal run's peak + 2 GB, each end with a typed error and exit status 1.
#[test]
fn the_worst_inputs_fail_cleanly_under_a_memory_limit() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        panic!("prlimit (util-linux) is not installed: run `bash scripts/setup.sh`");
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = fixture("hf-tiny");
    let ms = path_str(&m);
    let img = image(tmp.path());
    let out = tmp.path().join("out.png");
    let baseline = vm_peak_kb(&[
        "generate",
        "-q",
        "--model",
        ms,
        "--prompt",
        "a cat",
        "--out",
        path_str(&out),
    ]);
    assert!(baseline > 0);
    let cap = (baseline + (2 << 20)) * 1024;
    let layers = model_with_config(tmp.path(), |c| {
        c["text_config"]["num_hidden_layers"] = 1_000_000.into();
    });
    let max = u64::MAX.to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "generate",
                "--model",
                ms,
                "--prompt",
                "a cat",
                "--count",
                "1000000",
                "--max-count",
                "1000000",
                "--out",
                path_str(&out),
            ],
            "out of memory",
        ),
        (
            vec![
                "understand",
                "--model",
                ms,
                "--image",
                "/dev/zero",
                "--prompt",
                "what?",
            ],
            "regular file",
        ),
        (
            vec![
                "decode-image",
                "--model",
                ms,
                "--tokens",
                "/dev/zero",
                "--out",
                path_str(&out),
            ],
            "regular file",
        ),
        (
            vec![
                "encode-image",
                "--model",
                path_str(&layers),
                "--image",
                path_str(&img),
            ],
            "num_hidden_layers",
        ),
        (
            vec![
                "understand",
                "--model",
                ms,
                "--image",
                path_str(&img),
                "--prompt",
                "what?",
                "--max-new-tokens",
                &max,
            ],
            "exceed the context",
        ),
    ];
    for (args, mentions) in cases {
        let run = Command::new("prlimit")
            .arg(format!("--as={cap}"))
            .arg(env!("CARGO_BIN_EXE_janus"))
            .args(&args)
            .env("HF_HUB_OFFLINE", "1")
            .env("MALLOC_ARENA_MAX", "2")
            .output()
            .unwrap();
        assert_fails(&run, mentions);
    }
}
