"""Janus on Ray Data: captions and images at dataset scale.

Two callable classes for ``Dataset.map_batches`` with an actor pool, each actor loading the model
once:

>>> import ray
>>> from janus_rs.ray import Captioner
>>> ds = ray.data.from_items([{"path": "photos/cat.jpg"}, {"path": "photos/dog.png"}])
>>> ds = ds.map_batches(
...     Captioner,
...     fn_constructor_kwargs={"model": "deepseek-community/Janus-Pro-1B"},
...     compute=ray.data.ActorPoolStrategy(size=2),
...     num_cpus=1,
...     batch_size=4,
...     batch_format="pyarrow",
... )
>>> ds.to_pandas()[["path", "answer", "error"]]

- ``Captioner``: rows with a ``path`` (an image file, read by the actor; relative to ``root``
  when given) and optionally a ``seed``; adds ``answer`` and ``error``. The batch is answered
  with ``Janus.understand_batch`` (decoded together).
- ``ImageGenerator``: rows with a ``prompt`` and a ``seed``; each row becomes ``count`` rows
  (``index``, ``png`` bytes, ``tokens``, ``error``), the images of
  ``Janus.generate(prompt, count=count, seed=seed)``.

A row's result depends on the row alone (its seed is its own), never on how rows fall into
batches or actors. A row that fails (an unreadable image, a prompt past the context) carries the
error's message in ``error`` and does not stop the job.

The command line, ``python -m janus_rs.ray caption|generate``, runs the common jobs with
resumable Parquet output (see ``python -m janus_rs.ray --help``).
"""

from __future__ import annotations

import io
import os
import zlib
from typing import Any, Optional, Sequence

import PIL.Image
import pyarrow as pa

import janus_rs

DEFAULT_QUESTION = "Describe this image."

CAPTION_SCHEMA = pa.schema([("path", pa.string()), ("answer", pa.string()), ("error", pa.string())])

GENERATE_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("index", pa.int32()),
        ("png", pa.binary()),
        ("tokens", pa.list_(pa.int32())),
        ("error", pa.string()),
    ]
)


def path_seed(path: str) -> int:
    """The seed of a caption row without its own: a checksum of its path (CRC-32), so that a
    sampled caption does not depend on the row's batch or actor."""
    return zlib.crc32(path.encode("utf-8"))


def _columns(batch: Any) -> dict[str, list]:
    """A batch (a pyarrow Table, a dict of numpy arrays or lists, or a pandas DataFrame) as
    lists of Python values by column."""
    if isinstance(batch, pa.Table):
        return batch.to_pydict()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):
        return {c: batch[c].tolist() for c in batch.columns}
    return {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}


def _load(model: str, backend: str, dtype: str, weights: str, threads: Optional[int]) -> janus_rs.Janus:
    # The CPU backend's thread pool starts with the first model call: the actor's own count.
    if threads:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    return janus_rs.Janus.load(model, backend=backend, dtype=dtype, weights=weights)


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class Captioner:
    """Answers ``question`` about each row's image: a callable class for ``map_batches``.

    ``model``, ``backend``, ``dtype`` and ``weights`` are ``Janus.load``'s; ``threads`` the CPU
    threads of this actor (give Ray the same ``num_cpus``); the rest ``understand``'s (greedy by
    default). Rows: ``path`` (str; the file ``root/path`` when ``root`` is given) and optionally
    ``seed`` (else ``path_seed(path)``). Returns ``path``, ``answer`` and ``error`` (one null).
    """

    def __init__(
        self,
        model: str,
        question: str = DEFAULT_QUESTION,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        backend: str = "cpu",
        dtype: str = "auto",
        weights: str = "auto",
        threads: Optional[int] = None,
        root: Optional[str] = None,
    ) -> None:
        self.model = _load(model, backend, dtype, weights, threads)
        self.question = question
        self.options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.root = root

    def _image(self, path: str) -> PIL.Image.Image:
        file = os.path.join(self.root, path) if self.root is not None else path
        with open(file, "rb") as f:
            data = f.read()
        with PIL.Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")

    def __call__(self, batch: Any) -> pa.Table:
        cols = _columns(batch)
        paths = [str(p) for p in cols["path"]]
        seeds = cols.get("seed") or [None] * len(paths)
        seeds = [path_seed(p) if s is None else int(s) for p, s in zip(paths, seeds)]
        answers: list[Optional[str]] = [None] * len(paths)
        errors: list[Optional[str]] = [None] * len(paths)
        ready = []
        for i, path in enumerate(paths):
            try:
                ready.append((i, self._image(path)))
            except Exception as e:  # an unreadable file is this row's error
                errors[i] = f"cannot read the image: {_message(e)}"
        if ready:
            requests = [(img, self.question) for _, img in ready]
            try:
                got = self.model.understand_batch(
                    requests, seed=[seeds[i] for i, _ in ready], **self.options
                )
                for (i, _), answer in zip(ready, got):
                    answers[i] = answer.text
            except janus_rs.JanusError:
                # One request spoiled the batch: each alone, so that only it fails.
                for i, img in ready:
                    try:
                        answers[i] = self.model.understand(img, self.question, seed=seeds[i], **self.options).text
                    except janus_rs.JanusError as e:
                        errors[i] = _message(e)
        return pa.table({"path": paths, "answer": answers, "error": errors}, schema=CAPTION_SCHEMA)


class ImageGenerator:
    """Generates ``count`` images per row's prompt: a callable class for ``map_batches``.

    ``model``, ``backend``, ``dtype``, ``weights`` and ``threads`` as in ``Captioner``; the rest
    ``generate``'s. Rows: ``prompt`` (str), ``seed`` (int) and optionally ``line`` (passed
    through). Each row gives ``count`` rows: ``line``, ``prompt``, ``seed``, ``index`` (0 ..
    count-1), ``png`` (PNG bytes), ``tokens`` (the token grid, row-major int32) and ``error``
    (on error every ``index`` row carries it, ``png`` and ``tokens`` null).
    """

    def __init__(
        self,
        model: str,
        count: int = 1,
        cfg_weight: float = 5.0,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        backend: str = "cpu",
        dtype: str = "auto",
        weights: str = "auto",
        threads: Optional[int] = None,
    ) -> None:
        self.model = _load(model, backend, dtype, weights, threads)
        self.count = count
        self.options = dict(cfg_weight=cfg_weight, temperature=temperature, top_k=top_k, top_p=top_p)

    def __call__(self, batch: Any) -> pa.Table:
        cols = _columns(batch)
        prompts = [str(p) for p in cols["prompt"]]
        seeds = cols["seed"]
        lines = cols.get("line") or list(range(len(prompts)))
        out: dict[str, list] = {name: [] for name in GENERATE_SCHEMA.names}
        for line, prompt, seed in zip(lines, prompts, seeds):
            try:
                images = self.model.generate(prompt, count=self.count, seed=int(seed), **self.options)
                rows = [(_png(g), g.tokens.reshape(-1).tolist(), None) for g in images]
            except janus_rs.JanusError as e:
                rows = [(None, None, _message(e))] * self.count
            for index, (png, tokens, error) in enumerate(rows):
                out["line"].append(line)
                out["prompt"].append(prompt)
                out["seed"].append(int(seed))
                out["index"].append(index)
                out["png"].append(png)
                out["tokens"].append(tokens)
                out["error"].append(error)
        return pa.table(out, schema=GENERATE_SCHEMA)


def _png(image: Any) -> bytes:
    """A generated image's PNG bytes."""
    buf = io.BytesIO()
    image.image.save(buf, format="PNG")
    return buf.getvalue()


__all__: Sequence[str] = ["CAPTION_SCHEMA", "Captioner", "DEFAULT_QUESTION", "GENERATE_SCHEMA", "ImageGenerator", "path_seed"]
