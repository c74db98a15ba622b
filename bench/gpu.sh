#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py has the details): a prebuilt `janus --features wgpu` binary on the
# first GPU wgpu finds, Janus-Pro-1B then -7B with random full-size weights written here, JSON lines
# appended to bench/results-gpu.jsonl as it goes, stopping at --budget-s (default 420).
#
#   cargo build --release -p janus-cli --features wgpu      # on a machine with a toolchain
#   bash bench/gpu.sh [--janus BIN] [--budget-s S] [--models pro-1b] [--dtypes f16]
#   bash bench/gpu.sh --tiny --budget-s 300                  # smoke run on the test checkpoints
#
# For a machine without a toolchain, put the stripped binary at .devbin/janus (or .devbin/janus.xz),
# and, where the system has no Vulkan loader, Debian's libvulkan1 .deb in .gl/: both are used from
# there.
set -euo pipefail
cd "$(dirname "$0")/.."
# wgpu warns without a runtime dir on headless machines.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

if [[ -f .devbin/janus.xz && ! -f .devbin/janus ]]; then
  xz -dk .devbin/janus.xz
fi
if [[ -f .devbin/janus ]]; then
  chmod +x .devbin/janus
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
  shopt -s nullglob
  debs=(.gl/libvulkan1_*.deb)
  if (( ${#debs[@]} )); then
    root="$(mktemp -d)"
    for deb in "${debs[@]}"; do dpkg -x "$deb" "$root"; done
    export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" bench/gpu.py "$@"
