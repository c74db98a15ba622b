#!/usr/bin/env bash
# Installs what building and testing janus-rs needs on a fresh Debian machine with a Rust
# toolchain, and writes the original-layout test checkpoint (regenerated from the committed
# manifest and seed; ~0.8 GB) into the fixture cache. Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

# Rust components used by the checks.
if command -v rustup >/dev/null; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

# A CPU Vulkan driver (lavapipe) for the wgpu backend tests, and Python for the fixture writer.
need_apt=()
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || [ -n "$(ls /usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null)" ] || need_apt+=(mesa-vulkan-drivers libvulkan1)
command -v python3 >/dev/null || need_apt+=(python3 python3-venv)
# The C ABI tests: C and C++ compilers, make and pkg-config for the example, valgrind.
command -v cc >/dev/null || need_apt+=(gcc)
command -v c++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v valgrind >/dev/null || need_apt+=(valgrind)
# Headless Chromium and its driver for the server's web page test.
{ command -v chromium && command -v chromedriver; } >/dev/null || need_apt+=(chromium chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# numpy is all the checkpoint writer needs.
VENV="${JANUS_VENV:-$HOME/.cache/janus-rs-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -c "import numpy" 2>/dev/null || "$VENV/bin/pip" install -q "numpy>=1.26"
# maturin, pytest, Pillow and safetensors for the Python package's build and tests.
"$VENV/bin/pip" install -q --disable-pip-version-check -r janus-py/requirements-dev.txt
# The server's tests: the OpenAI client and Selenium.
"$VENV/bin/pip" install -q --disable-pip-version-check -r janus-serve/tests/requirements.txt

export JANUS_FIXTURE_CACHE="${JANUS_FIXTURE_CACHE:-$HOME/.cache/janus-rs-fixtures}"
"$VENV/bin/python" tests/reference/gen_original.py --cache "$JANUS_FIXTURE_CACHE"
