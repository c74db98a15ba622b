"""The command line of ``janus_rs.ray``: captions of an image collection, images of a prompt list,
on a local Ray cluster or one at ``--address``, resumable.

    python -m janus_rs.ray caption --model M --input photos/ --output captions.parquet
    python -m janus_rs.ray generate --model M --prompts prompts.jsonl --output images/

Finished batches are saved as they arrive (in ``OUT.parts/``, or ``OUT/results.parquet.parts/``
for a folder); a run started again skips the rows already there, and the last step writes the
output whole and removes the parts. Exit 0 when the job finishes (error rows included), 1 when it
cannot start (model, input, Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import uuid
from typing import Any, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import CAPTION_SCHEMA, DEFAULT_QUESTION, GENERATE_SCHEMA, Captioner, ImageGenerator

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class StartError(Exception):
    """The job cannot start: a missing model or input, or no Ray."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m janus_rs.ray", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="job", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", required=True, help="a model folder or a Hugging Face id (on every node)")
        q.add_argument("--output", required=True, help="a .parquet file (or, for generate, a folder)")
        q.add_argument("--actors", type=int, default=1, help="model replicas (Ray actors), default 1")
        q.add_argument("--batch-size", type=int, default=4, help="rows per call of an actor, default 4")
        q.add_argument("--threads-per-actor", type=int, default=1, help="CPU threads of each actor, default 1")
        q.add_argument("--address", default=None, help="a Ray cluster to join (default: start a local one)")
        q.add_argument("--backend", default="cpu", help="cpu (default), wgpu or cuda")
        q.add_argument("--dtype", default="auto", help="compute dtype: auto, f32, f16, bf16")
        q.add_argument("--weights", default="auto", help="weights in memory: auto, f32, bf16, f16, q8_0, q4_0")
        q.add_argument("--temperature", type=float, help="0 takes the argmax")
        q.add_argument("--top-k", type=int, default=None)
        q.add_argument("--top-p", type=float, default=None)

    c = sub.add_parser("caption", help="answer a question about every image of a folder or Parquet file")
    common(c)
    c.add_argument("--input", required=True, help="a folder of images, or a Parquet file with a path column")
    c.add_argument("--question", default=DEFAULT_QUESTION, help=f"default {DEFAULT_QUESTION!r}")
    c.add_argument("--max-new-tokens", type=int, default=512)

    g = sub.add_parser("generate", help="generate images for the prompts of a JSON-lines file")
    common(g)
    g.add_argument("--prompts", required=True, help='JSON lines {"prompt": str, "seed": int?}')
    g.add_argument("--images-per-prompt", type=int, default=1)
    g.add_argument("--seed", type=int, default=0, help="line i without a seed uses SEED + i (default 0)")
    g.add_argument("--cfg-weight", type=float, default=5.0)
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("actors", "batch_size", "threads_per_actor"):
        if getattr(args, name) < 1:
            raise StartError(f"--{name.replace('_', '-')} must be at least 1")
    model = args.model
    looks_like_path = os.path.isabs(model) or model.startswith(".") or model.count("/") != 1
    if looks_like_path and not os.path.isdir(model):
        raise StartError(f"no model folder at {model}")


def _caption_rows(source: str) -> list[dict[str, str]]:
    """The rows to caption, sorted by path: a folder's image files, or a Parquet file's paths."""
    src = pathlib.Path(source)
    if src.is_dir():
        names = sorted(
            e.name for e in os.scandir(src) if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )
        return [{"path": n} for n in names]
    if src.is_file():
        try:
            table = pq.read_table(src, columns=["path"])
        except Exception as e:
            raise StartError(f"cannot read {source} as Parquet with a path column: {e}") from e
        return [{"path": str(p)} for p in sorted(table.column("path").to_pylist()) if p is not None]
    raise StartError(f"no input at {source}")


def _prompt_rows(source: str, base_seed: int) -> list[dict[str, Any]]:
    try:
        lines = pathlib.Path(source).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise StartError(f"cannot read {source}: {e}") from e
    rows = []
    for i, text in enumerate(lines):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
            prompt = item["prompt"]
            seed = item.get("seed")
            if not isinstance(prompt, str) or not (seed is None or isinstance(seed, int)):
                raise ValueError("prompt must be a string and seed an integer")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StartError(f"{source}, line {i + 1}: {e}") from e
        rows.append({"line": i, "prompt": prompt, "seed": base_seed + i if seed is None else seed})
    return rows


class Parts:
    """The rows finished so far: an earlier run's output, and the batches of runs since, one
    Parquet file each in `output`'s `.parts` folder (written atomically)."""

    def __init__(self, output: pathlib.Path, schema: pa.Schema) -> None:
        self.output = output
        self.folder = output.with_name(output.name + ".parts")
        self.schema = schema

    def read(self) -> pa.Table:
        files = sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []
        if self.output.is_file():
            files.insert(0, self.output)
        tables = [pq.read_table(f, schema=self.schema) for f in files]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def finish(self, table: pa.Table) -> None:
        """Writes the whole output atomically, then removes the parts."""
        tmp = self.output.with_name(f".{self.output.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.output)
        if self.folder.is_dir():
            for f in self.folder.iterdir():
                f.unlink()
            self.folder.rmdir()

    def add(self, table: pa.Table) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.folder / name)


def _run(rows: list[dict[str, Any]], udf: type, kwargs: dict, args: argparse.Namespace, on_batch) -> None:
    """Maps `rows` through `udf` on Ray, handing each finished batch to `on_batch`."""
    if not rows:
        return
    try:
        import ray
    except ImportError as e:
        raise StartError("Ray is not installed: pip install 'janus-rs[ray]'") from e
    if not ray.is_initialized():
        try:
            ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        except Exception as e:
            raise StartError(f"cannot start or join Ray: {e}") from e
    # Blocks of about a batch, and at least one per actor.
    blocks = min(len(rows), max(args.actors, -(-len(rows) // args.batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        udf,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=args.actors),
        num_cpus=args.threads_per_actor,
        batch_size=args.batch_size,
        batch_format="pyarrow",
    )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            on_batch(batch)
    except Exception as e:
        # An actor that cannot load the model fails here, as does a lost cluster: the rows
        # finished so far stay for the next run.
        raise StartError(f"the job stopped: {e}") from e


def _model_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        backend=args.backend,
        dtype=args.dtype,
        weights=args.weights,
        threads=args.threads_per_actor,
        top_k=args.top_k,
        top_p=args.top_p,
    )


def caption(args: argparse.Namespace) -> str:
    rows = _caption_rows(args.input)
    parts = Parts(pathlib.Path(args.output), CAPTION_SCHEMA)
    done = set(parts.read().column("path").to_pylist())
    todo = [r for r in rows if r["path"] not in done]
    # Paths of a folder are relative to it; a Parquet file's, as given (from here).
    root = args.input if os.path.isdir(args.input) else os.curdir
    kwargs = _model_kwargs(args) | dict(
        question=args.question,
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.temperature is None else args.temperature,
        root=os.path.abspath(root),
    )
    _run(todo, Captioner, kwargs, args, parts.add)
    table = parts.read()
    wanted = pa.array(sorted({r["path"] for r in rows}), pa.string())
    table = table.filter(pc.is_in(table.column("path"), wanted)).sort_by("path")
    parts.finish(table)
    errors = table.column("error").drop_null()
    return f"{table.num_rows} images captioned ({len(errors)} with errors) in {args.output}"


FOLDER_SCHEMA = pa.schema([f for f in GENERATE_SCHEMA if f.name != "png"] + [pa.field("file", pa.string())])


def generate(args: argparse.Namespace) -> str:
    rows = _prompt_rows(args.prompts, args.seed)
    output = pathlib.Path(args.output)
    folder = output.suffix.lower() != ".parquet"
    if folder:
        output.mkdir(parents=True, exist_ok=True)
    parts = Parts(output / "results.parquet" if folder else output, FOLDER_SCHEMA if folder else GENERATE_SCHEMA)
    done = set(parts.read().column("line").to_pylist())
    todo = [r for r in rows if r["line"] not in done]
    kwargs = _model_kwargs(args) | dict(
        count=args.images_per_prompt,
        cfg_weight=args.cfg_weight,
        temperature=1.0 if args.temperature is None else args.temperature,
    )

    def save(batch: pa.Table) -> None:
        if folder:
            # The images as files first: a saved part means its files are there.
            files = []
            for line, index, png in zip(*(batch.column(c).to_pylist() for c in ("line", "index", "png"))):
                if png is None:
                    files.append(None)
                    continue
                name = f"{line:06d}_{index}.png"
                tmp = output / f".{name}.tmp"
                tmp.write_bytes(png)
                os.replace(tmp, output / name)
                files.append(name)
            batch = batch.drop_columns(["png"]).append_column("file", pa.array(files, pa.string()))
        parts.add(batch)

    _run(todo, ImageGenerator, kwargs, args, save)
    table = parts.read()
    lines = pa.array(sorted({r["line"] for r in rows}), pa.int64())
    table = table.filter(pc.is_in(table.column("line"), lines))
    table = table.sort_by([("line", "ascending"), ("index", "ascending")])
    parts.finish(table)
    errors = table.column("error").drop_null()
    return f"{table.num_rows} images for {len(rows)} prompts ({len(errors)} with errors) in {output}"


def main(argv: Optional[Iterable[str]] = None) -> int:
    """Runs a job; returns the exit status."""
    args = _parser().parse_args(None if argv is None else list(argv))
    try:
        _check_args(args)
        summary = caption(args) if args.job == "caption" else generate(args)
    except StartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0
