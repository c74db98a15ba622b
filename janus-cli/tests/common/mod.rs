//! What the `janus` end-to-end tests share: the committed fixtures and running the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Writes an HWC u8 image as PNG.
pub fn write_png(path: &Path, width: usize, height: usize, rgb: Vec<u8>) {
    image::RgbImage::from_raw(width as u32, height as u32, rgb)
        .expect("image size")
        .save(path)
        .expect("write png");
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Runs `janus` with `args` (offline, quiet unless `-q` is left out by the caller's args).
pub fn janus_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_janus"));
    cmd.args(args).env("HF_HUB_OFFLINE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run janus")
}

pub fn janus(args: &[&str]) -> Output {
    janus_env(args, &[])
}

/// Runs a command that must succeed and returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = janus(args);
    assert!(
        out.status.success(),
        "janus {args:?} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs a command that must succeed and parses its stdout as one JSON object.
pub fn ok_json(args: &[&str]) -> Value {
    let stdout = ok(args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: not one JSON value: {e}"))
}

/// A failed run: exit 1, nothing on stdout, one `error:` line closing stderr, no panic.
pub fn assert_fails(out: &Output, mentions: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    // Progress lines may come first; the error is one line, the last.
    let errors = stderr.lines().filter(|l| l.starts_with("error")).count();
    assert_eq!(errors, 1, "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert!(
        stderr.contains(mentions),
        "stderr lacks {mentions:?}: {stderr}"
    );
}
