#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers of untrusted input (AFL++ through cargo-afl; see
# FUZZING.md): builds the fuzz crate (`fuzz/`), runs each target for FUZZ_SECONDS with one
# afl-fuzz process, one target after the other, and prints a Markdown table (executions, exec/s,
# crashes, hangs, corpus size per target), also written to bench/results-fuzz.md. Crashing and
# hanging inputs are copied to fuzz/artifacts/<target>/ (gitignored).
#
# Usage: bench/fuzz.sh [TARGET ...]          (default: every target)
#
# Environment:
#   FUZZ_SECONDS     seconds per target (default 600)
#   FUZZ_TIMEOUT_MS  afl-fuzz -t, the time after which a run counts as a hang (default 1000;
#                    5000 for `image`, whose inputs may be decoded up to 50 megapixels)
#   FUZZ_MEMORY_MB   afl-fuzz -m, the memory limit of a run (default 2048)
#   FUZZ_JOBS        cargo -j for the build (default 1)
#   FUZZ_OUT         afl-fuzz output folders (default fuzz/out/; each run starts afresh)
#   FUZZ_RESULTS     the Markdown file written (default bench/results-fuzz.md)
#   FUZZ_STRIP       when set, each target's binary is stripped of its debug info once built
#                    (about 200 MB a binary with it, under 1 MB without; backtraces of crashes
#                    then lose their line numbers: rebuild without it to reproduce one)
#   CARGO_TARGET_DIR default ~/.cache/janus-fuzz-target
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
all_targets=(config_json safetensors safetensors_index pickle tokenizer_files chat_template image
    tokens_json chat_request image_request)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi
seconds=${FUZZ_SECONDS:-600}
memory=${FUZZ_MEMORY_MB:-2048}
out=${FUZZ_OUT:-$root/fuzz/out}
results=${FUZZ_RESULTS:-$root/bench/results-fuzz.md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/janus-fuzz-target}

for t in "${targets[@]}"; do
    [ -d "$root/fuzz/corpus/$t" ] || { echo "unknown target $t (no fuzz/corpus/$t)" >&2; exit 2; }
done

# The fuzzer: cargo-afl, and AFL++ built by it for this toolchain (once; `config --build` refuses
# to rebuild, which is fine).
if ! cargo afl --version >/dev/null 2>&1; then
    cargo install --locked -j "${FUZZ_JOBS:-1}" cargo-afl
fi
cargo afl config --build >/dev/null 2>&1 || true

bin_dir=$CARGO_TARGET_DIR/release
# Builds one target (the dependencies once, instrumented; then a link of a second or two).
build() {
    (cd "$root/fuzz" && cargo afl build --release -j "${FUZZ_JOBS:-1}" --bin "$1") >&2
    if [ -n "${FUZZ_STRIP:-}" ]; then
        objcopy --strip-debug "$bin_dir/$1" "$bin_dir/$1.stripped"
        mv "$bin_dir/$1.stripped" "$bin_dir/$1"
        rm -f "$bin_dir/deps/$1"-*
    fi
}

# No UI; no CPU frequency or core-pattern checks (a shared machine); no binding to a core.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
# A seed that crashes (a finding kept in the corpus, not fixed yet) must not stop the campaign.
export AFL_IGNORE_SEED_PROBLEMS=1

dicts() {
    case $1 in
        safetensors) echo "-x $root/fuzz/dict/safetensors.dict" ;;
        pickle) echo "-x $root/fuzz/dict/pickle.dict" ;;
        chat_template) echo "-x $root/fuzz/dict/jinja.dict" ;;
        image) ;;
        *) echo "-x $root/fuzz/dict/json.dict" ;;
    esac
}

field() { awk -F: -v k="$1" '{gsub(/ /, "", $1)} $1 == k {gsub(/^ +| +$/, "", $2); print $2}' "$2"; }

rows=()
for t in "${targets[@]}"; do
    timeout_ms=${FUZZ_TIMEOUT_MS:-$([ "$t" = image ] && echo 5000 || echo 1000)}
    build "$t"
    rm -rf "${out:?}/$t"
    mkdir -p "$out/$t"
    echo "== $t: ${seconds}s, -t $timeout_ms, -m $memory" >&2
    # shellcheck disable=SC2046
    cargo afl fuzz -i "$root/fuzz/corpus/$t" -o "$out/$t" -V "$seconds" -t "$timeout_ms" \
        -m "$memory" $(dicts "$t") -- "$bin_dir/$t" >"$out/$t.log" 2>&1 || {
        echo "afl-fuzz failed for $t; the end of $out/$t.log:" >&2
        tail -20 "$out/$t.log" >&2
        rows+=("| $t | failed to run | | | | | | | |")
        continue
    }
    stats=$out/$t/default/fuzzer_stats
    run_time=$(field run_time "$stats")
    execs=$(field execs_done "$stats")
    crashes=$(field saved_crashes "$stats")
    hangs=$(field saved_hangs "$stats")
    corpus=$(field corpus_count "$stats")
    stability=$(field stability "$stats")
    coverage=$(field bitmap_cvg "$stats")
    rate=$(awk -v e="$execs" -v s="$run_time" 'BEGIN {printf "%.0f", (s > 0 ? e / s : 0)}')
    rows+=("| $t | $run_time | $execs | $rate | $crashes | $hangs | $corpus | $stability | $coverage |")
    for kind in crashes hangs; do
        found=("$out/$t/default/$kind"/id:*)
        if [ -e "${found[0]}" ]; then
            mkdir -p "$root/fuzz/artifacts/$t/$kind"
            cp "${found[@]}" "$root/fuzz/artifacts/$t/$kind/"
        fi
    done
done

{
    echo "# Fuzzing campaign"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)," \
        "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), AFL++ through" \
        "$(cargo afl --version 2>/dev/null | head -1), one afl-fuzz process per target," \
        "${seconds} s per target. Crashing and hanging inputs: fuzz/artifacts/<target>/."
    echo
    echo "| target | seconds | executions | exec/s | crashes | hangs | corpus | stability | edge coverage |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${rows[@]}"
} | tee "$results"
