"""Janus and Janus-Pro multimodal models in Rust: image understanding and text-to-image generation.

>>> import janus_rs
>>> m = janus_rs.Janus.load("path/to/Janus-Pro-1B")
>>> print(m.understand("cat.jpg", "What is shown in this image?"))
>>> m.generate("a photo of a cat", seed=1)[0].image.save("cat.png")

Fine-tuning: ``janus_rs.train(model, "data.jsonl", "out", lora=16, steps=100)``; the training
loss of samples: ``janus_rs.loss(model, "data.jsonl")``.

Every model call releases the GIL. Errors are ``JanusError`` subclasses.
"""

from __future__ import annotations

from ._errors import (
    Cancelled,
    CheckpointError,
    ConfigError,
    HubError,
    InvalidInputError,
    IoError,
    JanusError,
    MissingFileError,
    NumericError,
    OutOfMemoryError,
    TokenizerError,
    UnsupportedError,
)
from ._janus_rs import Answer, GeneratedImage, Janus, TextStream, __version__, loss, train

__all__ = [
    "Answer",
    "Cancelled",
    "CheckpointError",
    "ConfigError",
    "GeneratedImage",
    "HubError",
    "InvalidInputError",
    "IoError",
    "Janus",
    "JanusError",
    "MissingFileError",
    "NumericError",
    "OutOfMemoryError",
    "TextStream",
    "TokenizerError",
    "UnsupportedError",
    "__version__",
    "loss",
    "train",
]
