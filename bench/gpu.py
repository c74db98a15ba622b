#!/usr/bin/env python3
"""The GPU benchmark: the `janus` command on the wgpu backend, Janus-Pro-1B then -7B, in half precision.

    bench/gpu.sh [--janus BIN] [--budget-s 420] [--models pro-1b,pro-7b] [--dtypes f16,bf16]
                 [--records FILE.jsonl] [--cache DIR]
    bench/gpu.sh --tiny --strict   # the test checkpoint, f32 and f16: a smoke run (CI, lavapipe)

It runs a prebuilt `janus` binary (`cargo build --release -p janus-cli --features wgpu`; default
$JANUS_BIN, else .devbin/janus, else the release build), so that a machine with a GPU needs no Rust
toolchain. The random full-size checkpoints are written there by bench/make_checkpoints.py (numpy for
Pro-1B, numpy + torch for Pro-7B; the 7B only while the budget lasts). For each model and dtype it
records, one JSON line per measurement appended to --records as it goes (a run cut off by the budget
still reports what it finished):

  * a warm-up run first (kernels compile on a process's first use of them), then
  * generate, 1 image and 16 images (576 tokens each with classifier-free guidance, the VQ decode):
    seconds per image, the token loop and the decode apart, ms per token step; and 1 image with
    --top-k 4096 (the cost of the top-k cutoff search on the device);
  * understand (one image, 64 new tokens): time to first token, tokens/s after it;
  * kernels dispatched per decoding step and their GPU time (two answers profiled by cubecl,
    CUBECL_DEBUG_OPTION=profile), against the measured step time: the gap is launch overhead;
  * peak device memory during the run (nvidia-smi, polled every 50 ms; null without it);
  * the roofline ratio of a generation step: the bytes a step must read (the language model's and
    the generation head's weights in the dtype, plus the key/value cache at mid-image) over the
    device's bandwidth (a device-to-device copy timed with torch where CUDA is there), divided by
    the measured step time (1.0 = at the memory-bandwidth limit).

The PyTorch side (bench_torch.py --device cuda: transformers' Janus on the Pro-1B transformers layout,
the same tasks, after janus-rs' Pro-1B) runs when torch sees CUDA and transformers has Janus;
otherwise a line says why it was skipped. Every run stops at
--budget-s (default 420 s) in all: the remaining steps are recorded as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT = "A watercolor painting of a red fox sitting in a snowy forest at sunrise."
QUESTION = "What is shown in this image? Describe the colors, the shapes and the objects in detail."
IMAGE = REPO / "tests" / "fixtures" / "train" / "fox.png"
UNDERSTAND_TOKENS = 64
MANY = 16


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Records:
    def __init__(self, path: Path, common: dict):
        self.path = path
        self.common = common
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, **fields) -> None:
        line = json.dumps({**self.common, **fields}, sort_keys=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)


class MemoryPoller:
    """Peak device memory (MiB) from nvidia-smi while a command runs; None without nvidia-smi."""

    def __init__(self):
        self.tool = shutil.which("nvidia-smi")
        self.peak = None
        self._stop = threading.Event()
        self._thread = None

    def _read(self):
        try:
            out = subprocess.run([self.tool, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return max(float(v) for v in out.split())
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def __enter__(self):
        if self.tool:
            base = self._read()

            def loop():
                while not self._stop.wait(0.05):
                    v = self._read()
                    if v is not None:
                        self.peak = v if self.peak is None else max(self.peak, v)

            self.base = base
            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()
            if self.peak is not None and self.base is not None:
                self.peak = self.peak - self.base
        return False


def device_info() -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count()}
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        info["gpu"] = out.splitlines()[0] if out else None
    else:
        info["gpu"] = None
    return info


def measure_bandwidth(python: str) -> dict:
    """Device-to-device copy bandwidth (GB/s) with torch on CUDA, or why not."""
    code = r"""
import json, torch
if not torch.cuda.is_available():
    print(json.dumps({"bandwidth_gb_s": None, "why": "torch sees no CUDA device"})); raise SystemExit
n = 1 << 30
a = torch.empty(n, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize()
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): b.copy_(a)
e.record(); torch.cuda.synchronize()
t = s.elapsed_time(e) / 1000 / 10
print(json.dumps({"bandwidth_gb_s": round(2 * n / t / 1e9, 1), "device": torch.cuda.get_device_name(0),
                  "torch": torch.__version__}))
"""
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            return {"bandwidth_gb_s": None, "why": f"torch not usable: {out.stderr.strip()[-200:]}"}
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as e:
        return {"bandwidth_gb_s": None, "why": f"torch not usable: {e}"}


def run_janus(janus: str, argv: list[str], budget: Budget) -> tuple[dict | None, str | None, float | None]:
    """One `janus … --json --quiet` run: (its JSON, an error, peak device MiB)."""
    timeout = budget.left()
    if timeout <= 1:
        return None, "budget spent", None
    with MemoryPoller() as mem:
        try:
            p = subprocess.run([janus, *argv, "--json", "--quiet"], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, "stopped at the budget", mem.peak
    if p.returncode != 0:
        return None, f"exit {p.returncode}: {p.stderr.strip()[-400:]}", mem.peak
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]), None, mem.peak
    except (ValueError, IndexError):
        return None, f"no JSON on stdout: {p.stdout[-200:]!r}", mem.peak


def llm_step_bytes(folder: Path, dtype: str) -> int | None:
    """Bytes one generation step reads: language model + generation head weights in `dtype`, plus
    the key/value cache of a CFG pair at mid-image (None where the folder has no BENCH.json)."""
    bench = folder / "BENCH.json"
    if not bench.is_file():
        return None
    info = json.loads(bench.read_text())
    counts = info["parameters_by_component"]
    dims = info["dims"]
    size = 4 if dtype == "f32" else 2
    # Every decoder layer, the generation head and aligner; not the text embedding and LM head
    # (rows of the one, and the other unused while drawing).
    text_tables = 2 * dims["vocab_size"] * dims["hidden_size"]
    params = counts["language_model"] - text_tables + counts.get("gen_head", 0) + counts.get("gen_aligner", 0)
    kv = 2 * 2 * dims["num_hidden_layers"] * dims["hidden_size"] * (info["num_image_tokens"] // 2 + 40)
    return params * size + kv * size


KERNEL_LINE = re.compile(r"^\| ([0-9.]+)(ns|µs|us|ms|s) +\| (\S+)")
UNIT_S = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def profiled_kernels(janus: str, argv: list[str], budget: Budget) -> tuple[int, float] | None:
    """Kernels a `janus` run dispatches and their summed GPU time (s), from cubecl's profile log
    (CUBECL_DEBUG_OPTION=profile: every kernel timed, so the run itself is slower)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "cubecl.log"
        env = {**os.environ, "CUBECL_DEBUG_LOG": str(log), "CUBECL_DEBUG_OPTION": "profile"}
        try:
            p = subprocess.run([janus, *argv, "--json", "--quiet"], capture_output=True, text=True,
                               timeout=max(1.0, budget.left()), env=env)
        except subprocess.TimeoutExpired:
            return None
        if p.returncode != 0 or not log.is_file():
            return None
        count, total = 0, 0.0
        with log.open(errors="replace") as f:
            for line in f:
                m = KERNEL_LINE.match(line)
                if m:
                    count += 1
                    total += float(m.group(1)) * UNIT_S[m.group(2)]
        return count, total


def launches_per_step(args, records: Records, budget: Budget, name: str, dtype: str, common: list[str]) -> None:
    """Kernels per decoding step: two profiled answers of 2 and 18 new tokens, the difference over
    16 steps (the same layers as an image step, with the text head); their GPU time per step."""
    base = ["understand", *common, "--image", str(IMAGE), "--prompt", QUESTION]
    short = profiled_kernels(args.janus, [*base, "--max-new-tokens", "2"], budget)
    long = profiled_kernels(args.janus, [*base, "--max-new-tokens", "18"], budget)
    fields = {"model": name, "dtype": dtype, "task": "launches", "impl": "janus-rs"}
    if not short or not long:
        records.add(**fields, error="the profiled runs did not finish")
        return
    records.add(**fields, kernels_per_step=round((long[0] - short[0]) / 16, 1),
                kernel_ms_per_step=round(1000 * (long[1] - short[1]) / 16, 3))


def bench_model(args, records: Records, budget: Budget, name: str, folder: Path, bandwidth) -> bool:
    """Every task of one model; False once the budget is spent."""
    for dtype in args.dtypes:
        common = ["--model", str(folder), "--backend", args.backend, "--dtype", dtype]
        # generate-top-k: the top-k cutoff searched on the device each step (no sort).
        # warm-up: the first run of a process tree compiles every kernel (and fills the driver's
        # and cubecl's caches); recorded, not counted as a measurement.
        tasks = [("warm-up", 1), ("generate", 1), ("generate", args.many), ("generate-top-k", 1),
                 ("understand", 1)]
        for task, count in tasks:
            if budget.left() < 5:
                records.add(model=name, dtype=dtype, task=task, images=count, skipped="budget spent")
                args.failures += 1
                return False
            out_png = Path(args.scratch) / f"{name}-{dtype}-{count}.png"
            if task.startswith("generate") or task == "warm-up":
                argv = ["generate", *common, "--prompt", PROMPT, "--count", str(count), "--seed", "0",
                        "--out", str(out_png)]
                if task == "generate-top-k":
                    argv += ["--top-k", "4096"]
            else:
                argv = ["understand", *common, "--image", str(IMAGE), "--prompt", QUESTION,
                        "--max-new-tokens", str(UNDERSTAND_TOKENS)]
            t0 = time.monotonic()
            got, err, peak = run_janus(args.janus, argv, budget)
            fields = {"model": name, "dtype": dtype, "task": task, "images": count, "impl": "janus-rs",
                      "wall_s": round(time.monotonic() - t0, 3), "peak_device_mib": peak}
            if err and "does not offer it" in err:
                records.add(**fields, skipped=err)
                break  # the adapter lacks this dtype: the next one
            if err:
                records.add(**fields, error=err)
                args.failures += 1
                if "budget" in err:
                    return False
                continue
            t = got["timings"]
            fields["load_s"] = round(t["load_s"], 3)
            if task.startswith("generate") or task == "warm-up":
                steps = got["grid"][0] * got["grid"][1]
                ms_step = 1000 * t["tokens_s"] / steps
                fields.update(s_per_image=round(t["total_s"] / count, 4), total_s=round(t["total_s"], 3),
                              tokens_s=round(t["tokens_s"], 3), vq_decode_s=round(t["vq_decode_s"], 3),
                              ms_per_step=round(ms_step, 3), steps=steps)
                step_bytes = llm_step_bytes(folder, dtype)
                if step_bytes and bandwidth:
                    limit_ms = 1000 * step_bytes / (bandwidth * 1e9)
                    fields.update(step_bytes=step_bytes, bandwidth_limit_ms=round(limit_ms, 3),
                                  roofline_ratio=round(limit_ms / ms_step, 3))
            else:
                fields.update(ttft_s=round(t["vision_s"] + t["prefill_s"], 4), vision_s=round(t["vision_s"], 4),
                              tokens_per_s=t["decode_tokens_per_s"], new_tokens=len(got["token_ids"]))
            records.add(**fields)
        if budget.left() > 5:
            launches_per_step(args, records, budget, name, dtype, common)
    return True


def torch_side(args, records: Records, budget: Budget) -> None:
    """transformers' Janus on CUDA (bench_torch.py --device cuda) on the Pro-1B transformers layout,
    the same tasks; a line saying why where it cannot run."""
    probe = ("import torch, transformers\n"
             "from transformers import JanusForConditionalGeneration\n"
             "print(torch.cuda.is_available())")
    try:
        p = subprocess.run([args.python, "-c", probe], capture_output=True, text=True, timeout=120)
        why = None if p.stdout.strip().endswith("True") else (
            "torch sees no CUDA device" if p.returncode == 0 else f"no transformers with Janus: {p.stderr.strip()[-200:]}")
    except (OSError, subprocess.SubprocessError) as e:
        why = str(e)
    if why:
        records.add(impl="pytorch", task="all", skipped=why)
        return
    t0 = time.monotonic()
    try:
        p = subprocess.run([args.python, str(HERE / "make_checkpoints.py"), "--only", "hf", "--cache", args.cache],
                           capture_output=True, text=True, timeout=max(1.0, budget.left()))
        err = None if p.returncode == 0 else f"exit {p.returncode}: {p.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        err = "stopped at the budget while writing the checkpoint"
    records.add(impl="pytorch", model="pro-1b", task="checkpoint", seconds=round(time.monotonic() - t0, 1),
                **({"error": err} if err else {}))
    if err:
        return
    folder = Path(args.cache) / "pro-1b-hf"
    torch_dtypes = [d for d in args.dtypes if d in ("f32", "bf16", "f16")]
    for dtype in torch_dtypes:
        for task, extra, count in [("generate", ["--parallel", "1", "--steps", "576"], 1),
                                   ("generate", ["--parallel", str(args.many), "--steps", "576"], args.many),
                                   ("understand", ["--image", str(IMAGE)], 1)]:
            if budget.left() < 5:
                records.add(impl="pytorch", model="pro-1b", dtype=dtype, task=task, images=count, skipped="budget spent")
                return
            cmd = [args.python, str(HERE / "bench_torch.py"), "--model", str(folder), "--task", task,
                   "--dtype", dtype, "--device", "cuda", *extra]
            fields = {"impl": "pytorch", "model": "pro-1b", "dtype": dtype, "task": task, "images": count}
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=budget.left())
            except subprocess.TimeoutExpired:
                records.add(**fields, error="stopped at the budget")
                return
            if p.returncode != 0:
                records.add(**fields, error=f"exit {p.returncode}: {p.stderr.strip()[-300:]}")
                continue
            r = json.loads(p.stdout.strip().splitlines()[-1])
            fields.update(load_s=r.get("load_s"), peak_device_mib=r.get("peak_device_mib"))
            if task == "generate":
                fields.update(s_per_image=round(r["total_ms"] / 1000 / count, 4), total_s=round(r["total_ms"] / 1000, 3),
                              vq_decode_s=round(r.get("vq_decode_ms", 0) / 1000, 3), ms_per_step=r.get("ms_per_step"))
            else:
                fields.update(ttft_s=round(r["prefill_ms"] / 1000, 4), vision_s=round(r["vision_ms"] / 1000, 4),
                              tokens_per_s=r["decode_tokens_per_s"])
            records.add(**fields)


def make_checkpoint(args, name: str, budget: Budget) -> tuple[Path | None, str | None]:
    cache = Path(args.cache)
    folder = cache / f"{name}-original"
    cmd = [args.python, str(HERE / "make_checkpoints.py"), "--only", "original", "--cache", str(cache),
           "--accept-other-draws"]
    if name == "pro-7b":
        cmd.append("--pro-7b")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, budget.left()))
    except subprocess.TimeoutExpired:
        return None, "stopped at the budget while writing the checkpoint"
    if p.returncode != 0:
        return None, f"make_checkpoints.py: exit {p.returncode}: {p.stderr.strip()[-400:]}"
    return folder, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--janus", default=None, help="the janus binary (built with --features wgpu)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop after this many seconds (default %(default)s)")
    ap.add_argument("--models", default="pro-1b,pro-7b", help="of pro-1b, pro-7b (default %(default)s)")
    ap.add_argument("--dtypes", default=None, help="compute dtypes (default f16,bf16; with --tiny f32,f16)")
    ap.add_argument("--backend", default="wgpu")
    ap.add_argument("--tiny", action="store_true",
                    help="the transformers-layout test checkpoint instead, 2 images at once (a smoke run)")
    ap.add_argument("--many", type=int, default=None, help="images of the parallel run (default 16; --tiny 2)")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a measurement failed or the budget cut the run short")
    ap.add_argument("--records", default=str(HERE / "results-gpu.jsonl"))
    ap.add_argument("--cache", default=os.environ.get("JANUS_BENCH_CACHE", str(Path.home() / ".cache/janus-rs-bench")))
    ap.add_argument("--python", default=sys.executable, help="python for make_checkpoints.py and torch")
    ap.add_argument("--scratch", default=None, help="folder for the images written (default: a temporary one)")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)

    if args.janus is None:
        for candidate in (os.environ.get("JANUS_BIN"), REPO / ".devbin" / "janus",
                          Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "release" / "janus"):
            if candidate and Path(candidate).is_file():
                args.janus = str(candidate)
                break
        else:
            print("error: no janus binary: build one with `cargo build --release -p janus-cli --features wgpu` "
                  "or pass --janus", file=sys.stderr)
            return 1
    args.dtypes = (args.dtypes or ("f32,f16" if args.tiny else "f16,bf16")).split(",")
    args.many = args.many or (2 if args.tiny else MANY)
    args.failures = 0
    if args.scratch is None:
        import tempfile
        args.scratch = tempfile.mkdtemp(prefix="janus-gpu-bench-")
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    records = Records(Path(args.records), {"run": run_id, "backend": args.backend})
    bandwidth = measure_bandwidth(args.python)
    version = subprocess.run([args.janus, "--version"], capture_output=True, text=True).stdout.strip()
    records.add(task="device", janus=version, budget_s=args.budget_s, **device_info(), **bandwidth)
    bw = bandwidth.get("bandwidth_gb_s")

    if args.tiny:
        bench_model(args, records, budget, "hf-tiny", REPO / "tests" / "fixtures" / "hf-tiny", bw)
    else:
        for name in args.models.split(","):
            if budget.left() < 30:
                records.add(model=name, task="checkpoint", skipped="budget spent")
                break
            t0 = time.monotonic()
            folder, err = make_checkpoint(args, name, budget)
            records.add(model=name, task="checkpoint", seconds=round(time.monotonic() - t0, 1),
                        **({"error": err} if err else {"folder": str(folder)}))
            if err or not bench_model(args, records, budget, name, folder, bw):
                break
            if name == "pro-1b":
                torch_side(args, records, budget)
    records.add(task="end", seconds_left=round(budget.left(), 1), failures=args.failures)
    return 1 if args.strict and (args.failures or budget.left() <= 0) else 0


if __name__ == "__main__":
    sys.exit(main())
