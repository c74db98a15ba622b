#!/usr/bin/env python3
"""Throughput of the janus_rs.ray jobs per actor: captions/hour and images/hour on this machine.

Runs `python -m janus_rs.ray caption` and `... generate` (in process, on one local Ray cluster)
over a random full-size checkpoint (default: Janus-Pro-1B, original layout, from
`bench/make_checkpoints.py --only original`) with each actor layout of --layouts (ACTORSxTHREADS:
1x1 = one actor with one thread, 2x1 = two actors with one thread each, 1x2 = one actor with two
threads), and appends one JSON line per job to --out (bench/results-ray.jsonl):

    {"job": "caption"|"generate", "actors": A, "threads_per_actor": T, "rows": N, "seconds": S,
     "per_hour": N / S * 3600, "model": ..., "weights": ..., "max_new_tokens": ...}

The seconds are the whole job's wall time as a user sees it: Ray starting the actors, each actor
loading the model, the rows, writing the output. The captioned images are 384×384 noise pictures;
the prompts a fixed list. Needs `pip install "./janus-py[ray]"` in the Python that runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import PIL.Image

HERE = pathlib.Path(__file__).resolve().parent
PROMPTS = [
    "a red fox in the snow",
    "a lighthouse at dusk",
    "a bowl of ramen, studio light",
    "an old map of an island",
    "a cat on a windowsill",
    "a mountain lake at dawn",
    "a steam locomotive",
    "a bouquet of tulips",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = os.environ.get("JANUS_BENCH_CACHE", str(pathlib.Path.home() / ".cache/janus-rs-bench"))
    ap.add_argument("--model", default=str(pathlib.Path(cache) / "pro-1b-original"))
    ap.add_argument("--layouts", default="1x1,2x1,1x2", help="ACTORSxTHREADS, comma-separated")
    ap.add_argument("--jobs", default="caption,generate")
    ap.add_argument("--captions", type=int, default=16, help="images to caption per job")
    ap.add_argument("--images", type=int, default=4, help="images to generate per job")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--out", default=str(HERE / "results-ray.jsonl"))
    args = ap.parse_args()

    import ray

    from janus_rs.ray.cli import main as job

    layouts = [tuple(int(x) for x in item.split("x")) for item in args.layouts.split(",")]
    cpus = max(a * t for a, t in layouts)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        photos = tmp / "photos"
        photos.mkdir()
        for i in range(args.captions):
            pixels = rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(photos / f"{i:04d}.png")
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)]}) + "\n" for i in range(args.images)))
        for name in args.jobs.split(","):
            for actors, threads in layouts:
                out = tmp / f"{name}-{actors}x{threads}.parquet"
                common = ["--model", args.model, "--output", str(out), "--weights", args.weights,
                          "--actors", str(actors), "--threads-per-actor", str(threads), "--batch-size", "1"]
                if name == "caption":
                    argv = ["caption", *common, "--input", str(photos), "--max-new-tokens", str(args.max_new_tokens)]
                    rows = args.captions
                else:
                    argv = ["generate", *common, "--prompts", str(prompts)]
                    rows = args.images
                started = time.perf_counter()
                status = job(argv)
                seconds = time.perf_counter() - started
                if status != 0:
                    print(f"{name} {actors}x{threads}: exit {status}", file=sys.stderr)
                    return 1
                record = {
                    "job": name, "actors": actors, "threads_per_actor": threads, "rows": rows,
                    "seconds": round(seconds, 2), "per_hour": round(rows / seconds * 3600, 1),
                    "model": pathlib.Path(args.model).name, "weights": args.weights,
                    "max_new_tokens": args.max_new_tokens if name == "caption" else None,
                }
                print(json.dumps(record), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
