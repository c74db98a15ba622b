#!/usr/bin/env bash
# The test suite: formatting, lints, the tests on the CPU backend, and the parity tests of every
# entry point again on the wgpu backend with a smoke run of the GPU benchmark (a CPU Vulkan driver is
# enough). Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export JANUS_FIXTURE_CACHE="${JANUS_FIXTURE_CACHE:-$HOME/.cache/janus-rs-fixtures}"
# wgpu warns without a runtime dir on headless machines.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# (janus-cli asks janus-core for its `train` feature, so the workspace's janus-core, its tests and
# the README's training example build with Burn's autodiff.)
cargo test --workspace
# The model through the portable kernels too (the widest path this CPU has ran above).
JANUS_KERNELS=portable cargo test -p janus-core --test llm_parity --test vq

# The Python package, built into the test virtual environment, and its tests. janus-core gets the
# test profile's optimisation so that maturin reuses what `cargo test` built.
VENV="${JANUS_VENV:-$HOME/.cache/janus-rs-venv}"
(cd janus-py && VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" maturin develop -q \
  --config 'profile.dev.package.janus-core.opt-level=3')
"$VENV/bin/python" -m pytest -q janus-py/tests --ignore=janus-py/tests/test_ray.py
# janus_rs.ray on a local Ray cluster of two CPUs, bounded in time.
timeout 300 "$VENV/bin/python" -m pytest -q janus-py/tests/test_ray.py

# `janus serve` through the official openai client and, in headless Chromium, its web page.
cargo build -q -p janus-cli
JANUS_BIN="${CARGO_TARGET_DIR:-target}/debug/janus" JANUS_REQUIRE_BROWSER="${CI:+1}" \
  "$VENV/bin/python" -m pytest -q janus-serve/tests

# Every entry point again on wgpu, on whatever Vulkan device there is (lavapipe on a machine
# without a GPU): the language model, SigLIP, the VQ codec, understanding, generation, the batching
# engine, and f16 compute where the adapter has it.
JANUS_TEST_DEVICE=wgpu cargo test -p janus-core --no-default-features --features wgpu \
  --test llm_parity --test siglip --test vq --test understanding --test generation --test batching
# The picks on the GPU against the host's draws (the default device of a build without the CPU
# backend is the GPU).
cargo test -p janus-core --no-default-features --features wgpu --lib generate::device
# The GPU benchmark end to end on the test checkpoint (a smoke run on lavapipe: no timing claims).
cargo build -q -p janus-cli --features wgpu
JANUS_BIN="${CARGO_TARGET_DIR:-target}/debug/janus" bash bench/gpu.sh --tiny --strict --budget-s 900 \
  --records "$(mktemp -d)/gpu.jsonl"
