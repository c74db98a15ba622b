#!/usr/bin/env bash
# Installs libjanus under a prefix: lib/libjanus.so, lib/libjanus.a, include/janus.h and
# lib/pkgconfig/janus.pc.
#
#   cargo build --release -p janus-ffi
#   janus-ffi/install.sh [--no-static] PREFIX [LIBDIR]
#
# LIBDIR is the folder cargo wrote the library to (default: $CARGO_TARGET_DIR/release, or
# target/release in the workspace). --no-static leaves out libjanus.a.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

static=1
if [ "${1:-}" = "--no-static" ]; then
  static=0
  shift
fi
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 [--no-static] PREFIX [LIBDIR]" >&2
  exit 2
fi
src="${2:-${CARGO_TARGET_DIR:-$root/target}/release}"
[ -f "$src/libjanus.so" ] || { echo "$src/libjanus.so not found: build with cargo build --release -p janus-ffi" >&2; exit 1; }

mkdir -p "$1/lib/pkgconfig" "$1/include"
prefix="$(cd "$1" && pwd)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)"

install -m 0755 "$src/libjanus.so" "$prefix/lib/libjanus.so"
if [ "$static" = 1 ]; then
  install -m 0644 "$src/libjanus.a" "$prefix/lib/libjanus.a"
fi
install -m 0644 "$root/include/janus.h" "$prefix/include/janus.h"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@VERSION@|$version|g" "$here/janus.pc.in" \
  > "$prefix/lib/pkgconfig/janus.pc"
echo "installed libjanus $version under $prefix"
