#!/usr/bin/env python3
"""Run the janus-rs benchmarks side by side with PyTorch and write BENCHMARKS.md.

Each task runs as its own process, alternately on the Rust side (the `pipeline` bench of
janus-core, built with `cargo bench --no-run`) and the PyTorch side (`bench_torch.py`, transformers'
Janus) in each of its dtypes (`--torch-dtypes`, default f32 and bf16: bf16 is the reference
precision and PyTorch's fastest CPU path), `--runs` times each, on the same checkpoint folder, input
files and thread count. janus-rs computes in `--dtype` with weights stored as `--weights`. Every
record is appended to a JSON-lines file; the Markdown report gives medians, min-max and the ratio to
each PyTorch dtype.

    /opt/refenv/bin/python bench/run.py                      # everything, 5 runs, all cores, f32
    /opt/refenv/bin/python bench/run.py --tasks understand,generate1 --runs 3
    /opt/refenv/bin/python bench/run.py --model pro-7b-original --torch-dtypes "" --weights q8_0 \
        --tasks load,understand,generate1 --runs 3 --section pro-7b-q8_0    # janus-rs only, a section

Checkpoints come from bench/make_checkpoints.py (run it first).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name -> (bench task, extra flags, the metrics reported for it: (key, label, unit, lower_is_better))
TASKS = {
    "load": ("load", [], [("load_s", "load", "s", True),
                          ("files_read_s", "reading the weight files once (janus-rs, after its load)", "s", True)]),
    "understand": ("understand", ["--image", "{image}"], [
        ("vision_ms", "SigLIP + aligner inside the prefill", "ms", True),
        ("prefill_ms", "prefill (time to first token)", "ms", True),
        ("decode_tokens_per_s", "decode (tokens 2..32)", "tokens/s", False),
    ]),
    "generate1": ("generate", ["--parallel", "1", "--steps", "32"], [
        ("prefill_ms", "generate, CFG pair: prefill + first token", "ms", True),
        ("ms_per_step", "generate, CFG pair (2 rows): per image-token step", "ms", True),
        ("load_s", "model load, in the same runs", "s", True),
    ]),
    "generate4": ("generate", ["--parallel", "4", "--steps", "32"], [
        ("prefill_ms", "generate, 4 images: prefill + first tokens", "ms", True),
        ("ms_per_step", "generate, 4 images (8 rows): per image-token step", "ms", True),
    ]),
    "vq_decode": ("vq_decode", ["--repeat", "3"], [("ms", "VQ decode of one 24×24 grid", "ms", True)]),
    "siglip": ("siglip", ["--image", "{image}", "--repeat", "3"], [("ms", "SigLIP + aligner, one image", "ms", True)]),
    "full_image": ("generate", ["--parallel", "1", "--steps", "576"], [
        ("total_ms", "one whole image: 576 steps + VQ decode", "ms", True),
        ("vq_decode_ms", "VQ decode inside it", "ms", True),
    ]),
}
DEFAULT_TASKS = "understand,generate1,generate4,vq_decode,siglip,load"
BANDWIDTH: dict = {}
NOTES_MARKER = "<!-- notes: kept by bench/run.py -->"


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- section {name}: written by bench/run.py -->", f"<!-- /section {name} -->"


def cache_dir(args) -> Path:
    if args.cache:
        return Path(args.cache).expanduser()
    env = os.environ.get("JANUS_BENCH_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/janus-rs-bench").expanduser()


def write_image(path: Path) -> None:
    """The shared 384×384 input: smooth gradients, a disc and a bar (deterministic)."""
    import numpy as np
    from PIL import Image

    if path.exists():
        return
    y, x = np.mgrid[0:384, 0:384].astype(np.float64)
    img = np.stack([255 * x / 383, 255 * y / 383, 127.5 + 127.5 * np.sin(2 * np.pi * (x + y) / 288)], -1)
    img[(x - 238) ** 2 + (y - 154) ** 2 < 84 ** 2] = [230, 40, 60]
    img[288:326, 38:192] = [20, 200, 90]
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(path)


def rust_binary(args) -> Path:
    """Builds the `pipeline` bench (release profile) and returns its executable."""
    if args.rust_bin:
        return Path(args.rust_bin)
    cmd = ["cargo", "bench", "-p", "janus-core", "--bench", "pipeline", "--no-run", "--message-format=json"]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and \
                msg["target"]["name"] == "pipeline":
            return Path(msg["executable"])
    raise SystemExit("cargo did not report the pipeline bench executable")


def run_one(cmd: list[str], env: dict) -> dict:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    rec["process_s"] = time.perf_counter() - t
    return rec


def memory_bandwidth_gbs() -> float:
    """Copy bandwidth (read + write bytes per second) of a 1 GiB float32 buffer, best of 5."""
    import numpy as np

    a = np.ones(1 << 28, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def machine() -> dict:
    info = {"python": platform.python_version(), "kernel": platform.release(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def shown_args(argv: list[str]) -> list[str]:
    """The command line that measured, without machine-specific paths (`--rust-bin X`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--rust-bin":
            skip = True
        elif not a.startswith("--rust-bin=") and a != "--report-only":
            out.append(a if a else '""')
    return out


def fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def summarize(values: list[float]) -> str:
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def report(records: list[dict], args, meta: dict) -> str:
    title = f"## {meta['model']}, weights {meta.get('rust_weights', '?')}" if args.section else "# Benchmarks"
    tds = torch_dtypes(args)
    if tds:
        sides = (f"Threads: {args.threads} on both sides; janus-rs computes in {args.dtype} with weights "
                 f"`--weights {args.weights}` (resolved: {meta.get('rust_weights', '?')}), PyTorch computes in "
                 f"{' and '.join(tds)} (its bf16 weights upcast at load for f32)")
        builds = ("janus-rs: burn CPU backend (flex, rayon, SIMD), release build; PyTorch: "
                  + ("DeepSeek's official Janus code, " if args.torch_impl == "official" else "transformers' Janus, ")
                  + f"{meta.get('torch_versions', '?')}, eager, sdpa attention")
        legend = "Median (min–max). Ratio: how many times faster janus-rs is than PyTorch in that dtype (>1 = faster)."
    else:
        sides = (f"Threads: {args.threads}; janus-rs alone, computing in {args.dtype} with weights "
                 f"`--weights {args.weights}` (resolved: {meta.get('rust_weights', '?')})")
        builds = "janus-rs: burn CPU backend (flex, rayon, SIMD), release build"
        legend = "Median (min–max)."
    lines = [
        title,
        "",
        "Written by `bench/run.py` (see `bench/README.md` for what each figure times); rerun with",
        f"`{meta['command']}`.",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine'].get('cpu', '?')}, {meta['machine']['cores']} cores, "
        f"{meta['machine'].get('memory_gib', '?')} GiB RAM; memory read bandwidth "
        f"{meta['read_range']} GB/s ({meta['read_threads']} threads summing a filled 1 GiB buffer, "
        f"the `bandwidth` task, sampled before each task), copy bandwidth {meta['bandwidth_gbs']:.1f} GB/s "
        "(numpy, read + write)",
        f"- Checkpoint: `{meta['model']}` (random weights, {meta['params'] / 1e9:.2f} B parameters, "
        f"bf16 on disk: {meta['files']})",
        f"- {sides}; {args.runs} runs per task ({args.full_image_runs} of `full_image`), each its own "
        "process" + (", the sides alternating" if tds else ""),
        f"- {builds}",
        "",
        legend,
        "",
        row(["Figure", "janus-rs"] + [f"PyTorch {d}" for d in tds] + [f"Ratio vs {d}" for d in tds]),
        "|---|---:|" + "---:|" * (2 * len(tds)),
    ]
    by = {}
    for r in records:
        by.setdefault((r["bench"], r["impl"]), []).append(r)
    mem_rows = []
    for name in args.tasks.split(","):
        _, _, metrics = TASKS[name]
        rust = by.get((name, "janus-rs"), [])
        torches = [by.get((name, f"torch-{d}"), []) for d in torch_dtypes(args)]
        for key, label, unit, lower in metrics:
            a = [r[key] for r in rust if r.get(key) is not None]
            bs = [[r[key] for r in t if r.get(key) is not None] for t in torches]
            if not a or (bs and not any(bs)):
                continue
            ma = statistics.median(a)
            cells, ratios = [], []
            for b in bs:
                if not b:
                    cells.append("–")
                    ratios.append("–")
                    continue
                mb = statistics.median(b)
                cells.append(summarize(b))
                ratios.append(f"{(mb / ma) if lower else (ma / mb):.2f}×")
            lines.append(row([f"{label} ({unit})", summarize(a)] + cells + ratios))
        if rust:
            mem_rows.append((name, [r["peak_rss_mb"] for r in rust], [[r["peak_rss_mb"] for r in t] for t in torches]))
    lines += ["", "Peak RSS of the process (MiB, `VmHWM`), by task:", "",
              row(["Task", "janus-rs"] + [f"PyTorch {d}" for d in tds]),
              "|---|---:|" + "---:|" * len(tds)]
    for name, a, bs in mem_rows:
        lines.append(row([name, summarize(a)] + [summarize(b) if b else "–" for b in bs]))
    lines += ["", f"Weights: {meta['params']:,} parameters; janus-rs holds {meta.get('rust_weight_mib', '?')} MiB "
                  f"({meta.get('rust_weights', '?')}); in f32 they are {meta['params'] * 4 / 2**20:.0f} MiB, "
                  f"in bf16 {meta['params'] * 2 / 2**20:.0f} MiB.", ""]
    floors = meta.get("floors") or []
    if floors:
        lines += ["Memory floor of a decoding step: the weights it reads once, at the median read bandwidth "
                  "above.", "",
                  row(["Step", "janus-rs reads (GB)", "floor (ms)", "janus-rs median (ms)"]
                      + [f"PyTorch {d} median (ms)" for d in tds]),
                  "|---|---:|---:|---:|" + "---:|" * len(tds)]
        for label, gb, rust_ms, torch_ms in floors:
            floor = gb / meta["read_gbs"] * 1e3
            cell = lambda v: fmt(v) if v is not None else "–"
            lines.append(row([label, f"{gb:.2f}", fmt(floor), cell(rust_ms)] + [cell(t) for t in torch_ms]))
        lines.append("")
    und = [r for r in records if r["bench"] == "understand"]
    ids = {r["impl"]: r.get("token_ids") for r in und}
    for d in tds:
        if ids.get("janus-rs") and ids.get(f"torch-{d}"):
            same = ids["janus-rs"] == ids[f"torch-{d}"]
            lines.append(f"Greedy understanding tokens of janus-rs and PyTorch {d} {'agree' if same else 'DIFFER'} "
                         f"({len(ids[f'torch-{d}'])} tokens).")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="checkpoint cache (default $JANUS_BENCH_CACHE or ~/.cache/janus-rs-bench)")
    ap.add_argument("--model", default="pro-1b-hf", help="folder in the cache (default %(default)s)")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated, of {','.join(TASKS)} (default %(default)s)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--full-image-runs", type=int, default=1,
                    help="runs of the full_image task, which takes minutes per run (default %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="janus-rs compute dtype (default %(default)s)")
    ap.add_argument("--weights", default="auto", choices=["auto", "f32", "bf16", "f16", "q8_0", "q4_0"],
                    help="janus-rs weight storage (default %(default)s)")
    ap.add_argument("--torch-dtypes", default="f32,bf16",
                    help="PyTorch compute dtypes, each run as its own side (default %(default)s)")
    ap.add_argument("--torch-impl", default="hf", choices=["hf", "official"],
                    help="PyTorch side: transformers' Janus (hf) or DeepSeek's code (official; use an "
                         "original-layout --model and put the code on PYTHONPATH)")
    ap.add_argument("--rust-bin", default=None, help="prebuilt pipeline bench executable")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--records", default=str(HERE / "results.jsonl"), help="raw records (JSON lines)")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rewrite the report from the records of an earlier run (--records)")
    ap.add_argument("--section", default=None,
                    help="write the report as a section of --out, between markers named after it, and "
                         "leave the rest of the file as it is (default: the report is the top of --out)")
    args = ap.parse_args(argv)
    for t in args.tasks.split(","):
        if t not in TASKS:
            raise SystemExit(f"unknown task {t}")

    cache = cache_dir(args)
    model = cache / args.model
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model} is missing: run bench/make_checkpoints.py first")
    if args.report_only:
        records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
        BANDWIDTH["reads"] = [r for r in records if r["bench"] == "bandwidth"]
        if not BANDWIDTH["reads"]:
            raise SystemExit(f"{args.records} holds no bandwidth samples (written before they were recorded)")
        write_outputs(records, args, argv, model)
        return
    image = cache / "input-384.png"
    write_image(image)
    rust = rust_binary(args)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    py = sys.executable

    records = []
    for name in args.tasks.split(","):
        # The read bandwidth of a shared machine drifts: sample it with every task.
        sample = run_one([str(rust), "--task", "bandwidth"], env)
        sample.update(bench="bandwidth", impl="bandwidth", run=len(BANDWIDTH.setdefault("reads", [])))
        BANDWIDTH["reads"].append(sample)
        records.append(sample)
        task, extra, _ = TASKS[name]
        extra = [e.format(image=image) for e in extra]
        runs = args.full_image_runs if name == "full_image" else args.runs
        for i in range(runs):
            sides = [("janus-rs", [str(rust), "--model", str(model), "--task", task, "--dtype", args.dtype,
                                   "--weights", args.weights, *extra])]
            for td in torch_dtypes(args):
                sides.append((f"torch-{td}", [py, str(HERE / "bench_torch.py"), "--model", str(model), "--task", task,
                                              "--impl", args.torch_impl, "--dtype", td, "--threads", str(args.threads),
                                              *extra]))
            if i % 2 == 1:
                sides.reverse()
            for impl, cmd in sides:
                rec = run_one(cmd, env)
                rec["impl"] = impl
                rec["bench"] = name
                rec["run"] = i
                records.append(rec)
                print(f"{name} run {i} {impl}: " + json.dumps({k: v for k, v in rec.items()
                                                              if k not in ("token_ids", "versions", "runs_ms")}),
                      flush=True)
        write_outputs(records, args, argv, model)


def torch_dtypes(args) -> list[str]:
    return [d.strip() for d in args.torch_dtypes.split(",") if d.strip()]


def write_outputs(records: list[dict], args, argv, model: Path) -> None:
    """Writes the raw records and the report (after every task, so a cut-short run still leaves
    what it measured)."""
    with open(args.records, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")

    bench_json = json.loads((model / "BENCH.json").read_text()) if (model / "BENCH.json").exists() else {}
    params = int(bench_json.get("parameters", bench_json.get("params", 0)) or 0)
    dtype_bytes = 4 if args.dtype == "f32" else 2
    torch_rec = next((r for r in records if r["impl"].startswith("torch")), {})
    meta = {
        "command": "python bench/run.py " + " ".join(shown_args(argv if argv is not None else sys.argv[1:])),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "bandwidth_gbs": BANDWIDTH.setdefault("gbs", memory_bandwidth_gbs()),
        "read_gbs": statistics.median(r["read_gbs"] for r in BANDWIDTH["reads"]),
        "read_range": summarize([r["read_gbs"] for r in BANDWIDTH["reads"]]),
        "read_threads": BANDWIDTH["reads"][0]["threads"],
        "model": args.model,
        "params": params,
        "dtype_bytes": dtype_bytes,
        "weight_bytes_compute": params * dtype_bytes,
        "torch_versions": ", ".join(f"{k} {v}" for k, v in (torch_rec.get("versions") or {}).items()),
        "files": ", ".join(bench_json.get("weight_files") or []) or "?",
    }
    rust_rec = next((r for r in records if r["impl"] == "janus-rs" and r.get("weights")), {})
    meta["rust_weights"] = rust_rec.get("weights", "?")
    meta["rust_weight_mib"] = f"{rust_rec['weight_bytes'] / 2**20:.0f}" if rust_rec.get("weight_bytes") else "?"
    # The bytes a decoding step reads on the Rust side: its weights' storage.
    read_bytes = {"f32": 4, "bf16": 2, "f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}.get(meta["rust_weights"], dtype_bytes)
    # Under q8_0/q4_0 the generation head keeps the file's 16-bit storage.
    head_bytes = 2 if meta["rust_weights"] in ("q8_0", "q4_0") else read_bytes
    meta["floors"] = decode_floors(records, bench_json, read_bytes, head_bytes, torch_dtypes(args))
    text = report(records, args, meta)
    out = Path(args.out)
    old = out.read_text() if out.exists() else ""
    if args.section:
        begin, end = section_markers(args.section)
        block = f"{begin}\n{text}\n{end}"
        if begin in old and end in old:
            head, rest = old.split(begin, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block + "\n"
    elif NOTES_MARKER in old:
        # Hand-written analysis below the marker survives a rerun.
        text += "\n" + NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]
    out.write_text(text)
    print(text, flush=True)


def decode_floors(records: list[dict], bench_json: dict, dtype_bytes: float, head_bytes: float,
                  tds: list[str]) -> list:
    """(label, GB janus-rs reads per step, janus-rs median ms, PyTorch median ms per dtype) for the
    decoding steps measured (`head_bytes`: bytes per weight of the generation head and aligner)."""
    parts = bench_json.get("parameters_by_component") or {}
    dims = bench_json.get("dims") or {}
    if not parts or not dims:
        return []
    # One embedding row is read per token, not the table. The original layout counts `lm_head`
    # (untied, vocab × hidden) inside `language_model`; the transformers layout lists it apart.
    table = dims["vocab_size"] * dims["hidden_size"]
    lm_head = parts.get("lm_head")
    if lm_head is None:
        lm_head = table
        stack = parts["language_model"] - table - lm_head
    else:
        stack = parts["language_model"] - table
    gen = parts.get("generation_head", parts.get("gen_head", 0)) + \
        parts.get("generation_aligner", parts.get("gen_aligner", 0))
    text_gb = (stack + lm_head) * dtype_bytes / 1e9
    image_gb = (stack * dtype_bytes + gen * head_bytes) / 1e9

    def med(bench, key, impl, invert=False):
        v = [r[key] for r in records if r["bench"] == bench and r["impl"] == impl and r.get(key)]
        if not v:
            return None
        m = statistics.median(v)
        return 1e3 / m if invert else m

    rows = []
    if any(r["bench"] == "understand" for r in records):
        rows.append(("understanding, one token (1 row)", text_gb,
                     med("understand", "decode_tokens_per_s", "janus-rs", True),
                     [med("understand", "decode_tokens_per_s", f"torch-{d}", True) for d in tds]))
    for bench, label in (("generate1", "generation, CFG pair (2 rows)"), ("generate4", "generation, 4 images (8 rows)")):
        if any(r["bench"] == bench for r in records):
            rows.append((label, image_gb, med(bench, "ms_per_step", "janus-rs"),
                         [med(bench, "ms_per_step", f"torch-{d}") for d in tds]))
    return rows


if __name__ == "__main__":
    main()
