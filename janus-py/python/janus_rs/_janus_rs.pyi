"""Type stubs of the native module ``janus_rs._janus_rs`` (re-exported by ``janus_rs``)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt
import PIL.Image

__version__: str

ImageLike = Union[PIL.Image.Image, str, os.PathLike[str], npt.NDArray[np.uint8]]
"""A PIL image, an image file's path, or a numpy uint8 array of shape (height, width, 3)."""

Images = Union[ImageLike, Sequence[ImageLike], None]
"""One image, a list or tuple of images, or None (no image)."""

Turn = Mapping[str, Any]
"""``{"role": "system" | "user" | "assistant", "content": str, "images": Images}`` (``images`` optional; system turns first, without images)."""

class Answer:
    """The answer to a question about images; ``str(answer)`` is the text."""

    @property
    def text(self) -> str:
        """The answer text (special tokens left out)."""
    @property
    def token_ids(self) -> list[int]:
        """The new token ids, with the end-of-sentence id last when generation stopped on it."""
    @property
    def prompt_tokens(self) -> int:
        """Length of the prompt in tokens, after image-token expansion."""
    @property
    def vision_seconds(self) -> float:
        """Seconds spent encoding the images."""
    @property
    def prefill_seconds(self) -> float:
        """Seconds to run the prompt and pick the first token."""
    @property
    def decode_seconds(self) -> float:
        """Seconds for the tokens after the first."""
    def __str__(self) -> str: ...
    def __repr__(self) -> str: ...

class GeneratedImage:
    """One generated image."""

    @property
    def image(self) -> PIL.Image.Image:
        """The picture, in mode RGB."""
    @property
    def tokens(self) -> npt.NDArray[np.int32]:
        """The image tokens it was decoded from, shape (rows, cols)."""
    @property
    def seed(self) -> int:
        """The seed of the call that made it."""
    def __repr__(self) -> str: ...

class TextStream(Iterator[str]):
    """The pieces of an answer's text as they are produced.

    The generation runs on a background thread; closing the stream (``close()``, leaving a
    ``with`` block, or dropping it) cancels it. After the last piece, ``answer`` holds the
    whole ``Answer``.
    """

    def __iter__(self) -> TextStream: ...
    def __next__(self) -> str: ...
    @property
    def answer(self) -> Optional[Answer]:
        """The whole answer once the stream is exhausted (None before, or when closed)."""
    def close(self) -> None:
        """Cancels the generation (if it still runs) and waits for its thread to stop."""
    def __enter__(self) -> TextStream: ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

class Janus:
    """A loaded Janus or Janus-Pro model: answers questions about images, generates images.

    Every call releases the GIL while the model runs; one model can serve several threads.
    """

    @staticmethod
    def load(
        model: Union[str, os.PathLike[str]],
        backend: str = "cpu",
        dtype: str = "auto",
        weights: str = "auto",
        lora: Optional[Union[str, os.PathLike[str]]] = None,
        max_images: int = 8,
        max_image_pixels: int = 50_000_000,
        max_count: int = 64,
        max_input_mb: int = 64,
    ) -> Janus:
        """Loads a model: a folder (Hugging Face or original DeepSeek layout), or a Hugging Face
        id (``"org/name"``) found in the Hugging Face cache or downloaded into it
        (``HF_HUB_OFFLINE=1`` forbids downloading).

        ``backend`` is ``"cpu"``, ``"wgpu"`` or ``"cuda"`` (those compiled in); ``dtype``, the
        compute dtype, is ``"auto"`` (bf16 on a CPU with AMX when the weights are held in bf16;
        else f32), ``"f32"``, ``"f16"`` or ``"bf16"`` (on the
        CPU: bf16 operands and f32 sums for the large products, f32 elsewhere); ``weights``, how
        weights are held in
        memory, is ``"auto"`` (on the CPU the half precision the files store, else f32; on a GPU
        the compute dtype), ``"f32"``, ``"bf16"``, ``"f16"``, ``"q8_0"`` or ``"q4_0"``.
        ``lora``, a LoRA adapter folder in PEFT's format (``adapter_config.json`` +
        ``adapter_model.safetensors``), is merged into the weights it adapts as they load.
        ``max_images``, ``max_image_pixels``, ``max_count`` and ``max_input_mb`` limit every
        request on the model (as ``janus --max-images`` ...): most images per request, most
        pixels of one input image, most images one ``generate`` makes (prompts × count), the
        largest image file read, in MiB. Past one, ``InvalidInputError`` before the work starts.
        """
    @property
    def dir(self) -> pathlib.Path:
        """The folder the model was loaded from."""
    @property
    def backend(self) -> str:
        """The backend it runs on."""
    @property
    def dtype(self) -> str:
        """The dtype it computes in (what ``"auto"`` resolved to)."""
    @property
    def weights(self) -> str:
        """How the weights are held in memory (what ``"auto"`` resolved to)."""
    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take in memory."""
    def understand(
        self,
        images: Images,
        question: str,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
    ) -> Answer:
        """Answers a question about images.

        ``<image_placeholder>`` tags in the question mark the images' places (one per image, in
        order); without tags each image comes before the question. Greedy by default;
        ``temperature > 0`` samples (``seed`` None picks a random seed).
        """
    def understand_batch(
        self,
        requests: Sequence[tuple[Images, str]],
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[Union[int, Sequence[int]]] = None,
    ) -> list[Answer]:
        """Answers several ``(images, question)`` requests at once (decoded together).

        Each answer equals ``understand(images, question, ..., seed=...)`` of its request alone;
        ``seed`` is one seed for all, a list with one per request, or None (random each).
        """
    def understand_stream(
        self,
        images: Images,
        question: str,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
    ) -> TextStream:
        """``understand`` as an iterator of text pieces, produced while the model runs."""
    def chat(
        self,
        conversation: Sequence[Turn],
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
    ) -> Answer:
        """The assistant's next turn in a conversation.

        Turns alternate user and assistant, starting and ending with a user turn.
        """
    def chat_stream(
        self,
        conversation: Sequence[Turn],
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
    ) -> TextStream:
        """``chat`` as an iterator of text pieces (see ``understand_stream``)."""
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        count: int = 1,
        cfg_weight: float = 5.0,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        progress: Optional[Callable[[int, int], Optional[bool]]] = None,
    ) -> list[GeneratedImage]:
        """Generates ``count`` images per prompt (a list of prompts runs as one batch).

        ``progress(step, total)`` is called after every image-token step; returning False
        cancels with ``Cancelled``. Ctrl-C cancels too.
        """
    def encode_image(self, image: ImageLike) -> npt.NDArray[np.int32]:
        """The VQ token grid of an image, shape (rows, cols)."""
    def loss(
        self,
        data: str | os.PathLike[str],
        progress: Callable[[int, int], bool | None] | None = None,
    ) -> dict[str, Any]:
        """The training loss of each sample of a JSONL file and their mean (no update):
        ``{"losses": [float, ...], "mean": float}``."""
    def decode_image(self, tokens: npt.ArrayLike) -> PIL.Image.Image:
        """Decodes a token grid of shape (rows, cols) to an RGB image."""
    def __repr__(self) -> str: ...


def train(
    model: Union[str, os.PathLike[str]],
    data: Union[str, os.PathLike[str]],
    out: Union[str, os.PathLike[str]],
    *,
    backend: str = "cpu",
    stage: int = 1,
    lora: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    merge: bool = False,
    lr: float = 1e-4,
    epochs: Optional[int] = None,
    steps: Optional[int] = None,
    batch_size: int = 1,
    grad_accum: int = 1,
    warmup: int = 0,
    weight_decay: float = 0.1,
    clip: float = 1.0,
    cfg_drop: float = 0.1,
    seed: int = 0,
    mix: Optional[tuple[float, float, float]] = None,
    save_every: Optional[int] = None,
    resume: Optional[Union[str, os.PathLike[str]]] = None,
    progress: Optional[Callable[[dict[str, Any]], Any]] = None,
) -> dict[str, Any]:
    """Fine-tunes a model on the samples of a JSONL file (as ``janus train`` does) and writes the
    result into ``out``: the model folder in its input's layout, or with ``lora`` the adapter in
    PEFT's format (``merge=True``: the model with the adapter merged). Returns
    ``{"steps", "total_steps", "stopped", "loss", "checkpoint"}``.

    ``stage`` 1 trains the aligners, the generation embedding and the image head; 2 and 3 the
    language model too. ``lora`` (a rank) trains adapters on the language model's projections
    instead, every weight frozen. ``steps`` counts optimizer updates (each ``batch_size`` x
    ``grad_accum`` samples); without it, ``epochs`` passes (default 1). ``progress(report)`` is
    called after each update with ``{"step", "loss", "lr", "samples", "steps", "rate"}``; returning
    ``False`` (or Ctrl-C) stops the run after that update with a checkpoint in
    ``out/checkpoint``, which ``resume`` continues bit for bit. ``mix=(g, u, t)`` gives sampling
    weights of generation, understanding and text samples (default: each sample once an epoch).
    The GIL is released while it runs.
    """

def loss(
    model: Union[str, os.PathLike[str]],
    data: Union[str, os.PathLike[str]],
    *,
    backend: str = "cpu",
    dtype: str = "auto",
    weights: str = "auto",
    lora: Optional[Union[str, os.PathLike[str]]] = None,
    progress: Optional[Callable[[int, int], Any]] = None,
) -> dict[str, Any]:
    """The training loss of each sample of a JSONL file and their mean, without an update (as
    ``janus loss`` computes them): ``{"losses": [float, ...], "mean": float}``. ``lora``: an
    adapter folder applied at load. ``progress(done, total)`` is called after each sample;
    returning ``False`` cancels. The GIL is released while it runs.
    """
