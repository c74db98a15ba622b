#!/usr/bin/env python3
"""Load benchmark of `janus serve`: throughput and latency of concurrent image and chat requests.

Starts `janus serve` on a loopback port with the given model and thread count, then, for each
concurrency level, sends that many requests at once and waits for all of them:

* images: `POST /v1/images/generations` (one 384² image each, seed = request index); reports the
  wall time of the round, each request's latency, images per minute, and the round's time against
  one image alone (the issue's target: 4 concurrent images in ≤ 1.6× the time of one);
* chat: `POST /v1/chat/completions` with a short text prompt (greedy), each level run twice, with
  `max_tokens` and with an eighth of it; reports the round's wall time and latencies, the
  aggregate tokens/s over the round, and the decode rate: the extra tokens of the longer round
  over its extra time (the prompts cancel out), against one request alone (target: 8 concurrent
  answers decode at ≥ 5× the tokens/s of one). Token counts come from `usage`, so a tokenizer
  that decodes the random model's ids to nothing does not matter.

Records go to a JSON-lines file; the Markdown table is printed (paste it into BENCHMARKS.md).
Only the standard library is used.

    RAYON_NUM_THREADS=2 python3 bench/serve_load.py --bin target/release/janus \\
        --model ~/.cache/janus-rs-bench/pro-1b-hf --images 1,4 --chats 1,8,32 --max-tokens 32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 7200) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run_round(n: int, work) -> tuple[float, list]:
    """Runs `work(i)` for i in 0..n on n threads at once; the round's wall time and results."""
    results: list = [None] * n
    errors: list = []

    def one(i: int) -> None:
        try:
            results[i] = work(i)
        except Exception as e:  # reported after the round
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    if errors:
        raise RuntimeError("; ".join(errors))
    return wall, results


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="the janus binary (a release build)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", default="1,4,16", help="concurrency levels for image requests")
    ap.add_argument("--chats", default="1,8,32", help="concurrency levels for chat requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--extra", default="", help="more server flags, e.g. '--weights q8_0'")
    ap.add_argument("--records", type=Path, default=HERE / "results-serve.jsonl")
    ap.add_argument("--section", default="serve")
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "RAYON_NUM_THREADS": str(args.threads)}
    cmd = [args.bin, "serve", "--model", args.model, "--port", str(port), "--quiet",
           "--max-batch", str(args.max_batch), "--max-queue", "1024", *args.extra.split()]
    server = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.2)
        # Warm-up: one short answer (first-touch of the weights and caches).
        post(base + "/v1/chat/completions",
             {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2})
        records = []
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        common = {"section": args.section, "time": stamp, "threads": args.threads,
                  "max_batch": args.max_batch, "model": os.path.basename(str(args.model).rstrip("/")),
                  "cpu": platform.processor() or platform.machine(), "extra": args.extra}

        one_image = None
        for n in [int(x) for x in args.images.split(",") if x]:
            def image(i: int) -> float:
                t = time.monotonic()
                r = post(base + "/v1/images/generations",
                         {"prompt": f"a picture of thing number {i}", "seed": i})
                assert len(r["data"]) == 1
                return time.monotonic() - t
            wall, lat = run_round(n, image)
            one_image = one_image or (wall if n == 1 else None)
            rec = {**common, "kind": "images", "concurrency": n, "wall_s": wall,
                   "latency_median_s": statistics.median(lat), "latency_max_s": max(lat),
                   "images_per_min": 60 * n / wall,
                   "vs_one": wall / one_image if one_image else None}
            records.append(rec)
            print(json.dumps(rec), flush=True)

        one_rate = None
        short = max(1, args.max_tokens // 8)
        for n in [int(x) for x in args.chats.split(",") if x]:
            rounds = {}
            for tokens in (short, args.max_tokens):
                def chat(i: int) -> dict:
                    t = time.monotonic()
                    r = post(base + "/v1/chat/completions", {
                        "messages": [{"role": "user", "content": f"Tell me a story about number {i}."}],
                        "max_tokens": tokens})
                    return {"latency": time.monotonic() - t, "tokens": r["usage"]["completion_tokens"]}
                rounds[tokens] = run_round(n, chat)
            wall, res = rounds[args.max_tokens]
            wall_short, res_short = rounds[short]
            total = sum(r["tokens"] for r in res)
            extra = total - sum(r["tokens"] for r in res_short)
            decode = extra / (wall - wall_short) if wall > wall_short else float("nan")
            one_rate = one_rate or (decode if n == 1 else None)
            rec = {**common, "kind": "chat", "concurrency": n, "max_tokens": args.max_tokens,
                   "wall_s": wall, "completion_tokens": total, "tokens_per_s": total / wall,
                   "decode_tokens_per_s": decode,
                   "latency_median_s": statistics.median(r["latency"] for r in res),
                   "latency_max_s": max(r["latency"] for r in res),
                   "decode_vs_one": decode / one_rate if one_rate else None}
            records.append(rec)
            print(json.dumps(rec), flush=True)
        rss = peak_rss_mib(server.pid)
        for r in records:
            r["server_peak_rss_mib"] = rss
        with open(args.records, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    finally:
        server.terminate()
        server.wait(timeout=60)

    print()
    print(f"| images at once | round wall (s) | latency median / max (s) | images/min | round ÷ one image |")
    print("|---:|---:|---:|---:|---:|")
    for r in records:
        if r["kind"] == "images":
            vs = f"{r['vs_one']:.2f}×" if r["vs_one"] else "—"
            print(f"| {r['concurrency']} | {r['wall_s']:.1f} | {r['latency_median_s']:.1f} / {r['latency_max_s']:.1f} | "
                  f"{r['images_per_min']:.2f} | {vs} |")
    print()
    print(f"| answers at once ({args.max_tokens} tokens) | round wall (s) | latency median / max (s) | tokens/s over the round | decode tokens/s | decode ÷ one |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in records:
        if r["kind"] == "chat":
            vs = f"{r['decode_vs_one']:.2f}×" if r["decode_vs_one"] else "—"
            print(f"| {r['concurrency']} | {r['wall_s']:.1f} | {r['latency_median_s']:.1f} / {r['latency_max_s']:.1f} | "
                  f"{r['tokens_per_s']:.2f} | {r['decode_tokens_per_s']:.2f} | {vs} |")
    print(f"\nserver peak RSS: {rss:.0f} MiB")


if __name__ == "__main__":
    main()
