#!/usr/bin/env python3
"""How much each weight storage changes the model's choices, against the same weights in f32.

For every storage (`--formats`) and checkpoint (`--models`), the `quality` task of the `pipeline`
bench runs the f32 model greedily and feeds its tokens to the model loaded with that storage
(teacher forcing), then reports:

- the cosine between the two models' logits at every step (CFG-guided image-token logits over a
  generation, text logits over an answer), mean and minimum;
- top-1 agreement, counted over the steps whose f32 top-2 margin exceeds 1e-2 (random weights
  make near-ties, where any storage may flip the order);
- the first step whose top-1 differs: where greedy decoding with the storage parts from f32.

    /opt/refenv/bin/python bench/quality.py                        # fixtures + Pro-1B, all formats
    /opt/refenv/bin/python bench/quality.py --models fixture --formats q8_0
    /opt/refenv/bin/python bench/quality.py --models pro-1b --formats bf16:bf16   # weights:compute dtype

Prints a Markdown table; `--write` puts it into BENCHMARKS.md between its quality markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BEGIN = "<!-- quality: written by bench/quality.py -->"
END = "<!-- /quality -->"


def models(args) -> list[tuple[str, Path]]:
    cache = Path(args.cache or os.environ.get("JANUS_BENCH_CACHE", Path.home() / ".cache/janus-rs-bench"))
    known = {
        "fixture": ("fixture hf-tiny-bf16-sharded", REPO / "tests/fixtures/hf-tiny-bf16-sharded"),
        "pro-1b": ("Janus-Pro-1B size (random, bf16)", cache / "pro-1b-hf"),
    }
    out = []
    for name in args.models.split(","):
        if name not in known:
            raise SystemExit(f"unknown model {name} (expected {', '.join(known)})")
        label, path = known[name]
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path} is missing (bench/make_checkpoints.py writes the Pro-1B one)")
        out.append((label, path))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="fixture,pro-1b")
    ap.add_argument("--formats", default="bf16,f16,q8_0,q4_0",
                    help="weight storages, each optionally `:DTYPE` for the compute dtype (f32 unless given)")
    ap.add_argument("--steps", type=int, default=576, help="image-token steps (default %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=64, help="answer tokens (default %(default)s)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--rust-bin", default=None, help="prebuilt pipeline bench executable")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = ap.parse_args()

    import run  # the harness next to this file: builds the bench, writes the input image

    rust = run.rust_binary(args)
    cache = run.cache_dir(args)
    image = cache / "input-384.png"
    run.write_image(image)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    rows = []
    for label, path in models(args):
        for fmt in args.formats.split(","):
            weights, _, dtype = fmt.partition(":")
            cmd = [str(rust), "--model", str(path), "--task", "quality", "--weights", weights,
                   "--dtype", dtype or "f32",
                   "--steps", str(args.steps), "--new-tokens", str(args.new_tokens), "--image", str(image)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({"model": label, "format": fmt, **{k: rec[k] for k in ("image", "text")}}), flush=True)
            rows.append((label, fmt, rec))

    def part(p: dict) -> list[str]:
        first = p["first_divergence"]
        return [f"{p['mean_cosine']:.6f}", f"{p['min_cosine']:.6f}",
                f"{p['top1_agree']}/{p['top1_counted']} ({100 * p['top1_agreement']:.1f} %)",
                "none" if first is None else str(first)]

    lines = [
        BEGIN,
        "",
        f"Against the same checkpoint in f32 (greedy in f32, teacher-forced in the storage; "
        f"{args.steps} guided image-token steps, {args.new_tokens} answer tokens; top-1 counted where "
        "the f32 top-2 margin exceeds 1e-2). `bench/quality.py` writes this table.",
        "",
        "| Checkpoint | Weights | image: mean cos | image: min cos | image: top-1 | image: first divergence "
        "| answer: mean cos | answer: min cos | answer: top-1 | answer: first divergence |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, fmt, rec in rows:
        text = part(rec["text"]) if rec.get("text") else ["–"] * 4
        weights, _, dtype = fmt.partition(":")
        name = f"{weights}, {dtype} compute" if dtype else weights
        lines.append(f"| {label} | {name} | " + " | ".join(part(rec["image"]) + text) + " |")
    lines += ["", END]
    table = "\n".join(lines)
    print(table)
    if args.write:
        path = REPO / "BENCHMARKS.md"
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            text = head + table + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n## Quality of the weight storages\n\n" + table + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
