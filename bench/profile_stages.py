#!/usr/bin/env python3
"""Where the compute-bound stages spend their time: a `perf` profile of each, grouped by kind of work.

Runs the `pipeline` bench under `perf record` for each stage, sampling only its timed repetitions
(the bench opens and closes the window through perf's control FIFOs, `JANUS_PERF_CTL`), and
groups the samples by the symbol they fell in:

- `prefill`: the language model over the 617-position understanding prompt (image features
  computed before the window);
- `siglip`: SigLIP-L/16 and the aligner on one 384×384 image;
- `vq_decode`: the VQ decoder on one 24×24 grid.

    /opt/refenv/bin/python bench/profile_stages.py --rust-bin PIPELINE [--stages prefill,siglip,vq_decode]
        [--weights auto] [--dtype f32] [--threads 2] [--repeat 2] [--show-symbols 12]

Prints a Markdown table per stage (share of samples per kind, and the stage's median time), and
with `--show-symbols N` the N hottest symbols of each. Needs Linux `perf` (`perf record` with
`--control`, perf 5.9 or later).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (kind, regular expression over the symbol name), first match wins.
KINDS = [
    ("GEMM (`gemm` crate microkernels and packing)", r"gemm_common|gemm_f32|gemm_f16|gemm_f64|\bgemm::"),
    ("bf16 products and convolutions (janus-rs, AMX or AVX512-BF16)", r"janus_core::nn::kernels::(bf16_gemm|conv)"),
    ("Winograd transforms and GroupNorm (janus-rs, f32 VQ)", r"janus_core::nn::kernels::(winograd|group_norm)"),
    ("decode kernels (janus-rs)", r"janus_core::nn::kernels"),
    ("widening compact weights to f32", r"widen_rows|HalfMatrix|dequantize"),
    ("attention (backend's fused kernel)", r"burn_flex::ops::attention"),
    ("convolution (im2col, col2im, layout)", r"conv|im2col|col2im|unfold"),
    ("exp, erf, tanh (libm)", r"expf|erff|erfc|libm::|tanhf|__exp|__log"),
    ("element-wise ops (backend)", r"burn_flex::ops::(unary|binary|float|activation|scalar|clamp|cmp|bool)|macerator"),
    ("closures run on the thread pool (loop bodies inlined into the pool's calls, not resolved further)",
     r"core::ops::function::impls|ForEachConsumer<.*consume|Producer::fold_with|bridge_producer_consumer::helper"
     r"|StackJob<.*>::run_inline|join_context::\{\{closure\}\}"),
    ("reductions, norms, softmax (backend)", r"burn_flex::ops::(reduce|softmax|norm|mean|sum|max)|reduce"),
    ("copies and layout changes", r"memmove|memcpy|copy_|permute|transpose|burn_flex::ops::(cat|slice|gather|select|expand|reshape|repeat)|into_contiguous|strided"),
    ("fresh memory: page faults, zeroing, unmapping (kernel, allocator)", r"clear_page|page_fault|folio|alloc_pages|get_page|do_anonymous|memset|zero_user|__alloc|_int_malloc|_int_free|malloc|free\b|munmap|mmap|memcg|smp_call_function|native_write_msr|flush_tlb|tlb|lru|rmqueue|unmap"),
    ("thread wake-ups and scheduling", r"schedule|futex|spin_unlock|spin_lock|sched_yield|rayon|crossbeam|task_switch|wake|syscall|irq|softirq"),
]


def classify(symbol: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, symbol):
            return kind
    return "other"


def profile(stage: str, args, image: Path) -> tuple[dict, list[tuple[float, str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ctl, ack, data = tmp / "ctl", tmp / "ack", tmp / "perf.data"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), JANUS_PERF_CTL=f"{ctl},{ack}")
        cmd = ["perf", "record", "-q", "-F", str(args.frequency), "-D", "-1",
               "--control", f"fifo:{ctl},{ack}", "-o", str(data), "--",
               str(args.rust_bin), "--model", str(args.model), "--task", stage,
               "--weights", args.weights, "--dtype", args.dtype, "--repeat", str(args.repeat), "--image", str(image)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{stage}: {' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                                 "--sort", "symbol", "--percent-limit", "0"],
                                capture_output=True, text=True, check=True).stdout
    rows = []
    for line in report.splitlines():
        # `perf report` pads the symbol and may append IPC columns ("-  -"): drop both.
        m = re.match(r"\s*([0-9.]+)%\s+\[[.k]\]\s+(.*?)(\s+-\s+-)?\s*$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2)))
    return result, rows


def table(stage: str, result: dict, rows: list[tuple[float, str]], show: int) -> str:
    shares: dict[str, float] = {}
    for pct, sym in rows:
        kind = classify(sym)
        shares[kind] = shares.get(kind, 0.0) + pct
    total = sum(shares.values()) or 1.0
    ms = result.get("ms")
    extra = f", {result['prompt_tokens']} positions" if "prompt_tokens" in result else ""
    out = [f"**{stage}**: median {ms:.0f} ms ({result.get('weights', '?')} weights, "
           f"{result.get('dtype', '?')} compute{extra})", "",
           "| Kind of work | Share | ms |", "|---|---:|---:|"]
    for kind, pct in sorted(shares.items(), key=lambda kv: -kv[1]):
        share = pct / total
        out.append(f"| {kind} | {100 * share:.1f} % | {share * ms:.0f} |")
    if show:
        out += ["", "| Hottest symbols | Share |", "|---|---:|"]
        for pct, sym in rows[:show]:
            out.append(f"| `{sym[:90]}` | {100 * pct / total:.1f} % |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rust-bin", required=True, help="the pipeline bench executable (release)")
    ap.add_argument("--cache", default=None, help="checkpoint cache (default $JANUS_BENCH_CACHE or ~/.cache/janus-rs-bench)")
    ap.add_argument("--model-dir", default="pro-1b-hf", help="folder in the cache (default %(default)s)")
    ap.add_argument("--stages", default="prefill,siglip,vq_decode")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--dtype", default="f32", help="compute dtype (f32 or bf16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--frequency", type=int, default=999, help="samples a second per thread")
    ap.add_argument("--show-symbols", type=int, default=0)
    args = ap.parse_args()
    cache = Path(args.cache or os.environ.get("JANUS_BENCH_CACHE", Path.home() / ".cache/janus-rs-bench"))
    args.model = cache / args.model_dir
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is missing: run bench/make_checkpoints.py first")
    image = cache / "input-384.png"
    sys.path.insert(0, str(HERE))
    from run import write_image  # the same input image as the benchmarks
    write_image(image)
    for stage in args.stages.split(","):
        result, rows = profile(stage, args, image)
        print(table(stage, result, rows, args.show_symbols) + "\n", flush=True)


if __name__ == "__main__":
    main()
