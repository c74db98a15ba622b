"""The exceptions janus_rs raises: one class per kind of janus-core error, all under JanusError."""

from __future__ import annotations

__all__ = [
    "JanusError",
    "IoError",
    "MissingFileError",
    "ConfigError",
    "CheckpointError",
    "TokenizerError",
    "HubError",
    "InvalidInputError",
    "NumericError",
    "OutOfMemoryError",
    "Cancelled",
    "UnsupportedError",
]


class JanusError(Exception):
    """Base class of every error janus_rs raises; ``str(e)`` is janus-core's message."""


class IoError(JanusError, OSError):
    """A file or folder could not be read.

    Also an ``OSError``: ``filename`` names the path and ``errno`` is the system's error number
    when there is one; ``str(e)`` is janus-core's message.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingFileError(IoError, FileNotFoundError):
    """The model folder (or a file the model needs in it) does not exist."""


class ConfigError(JanusError):
    """A configuration file is malformed or lacks a key it must have."""


class CheckpointError(JanusError):
    """A checkpoint is malformed, refused (unsafe pickle) or does not match the model."""


class TokenizerError(JanusError):
    """The tokenizer files are malformed or lack a token the model needs."""


class HubError(JanusError):
    """A model id could not be found in the Hugging Face cache or downloaded from the hub."""


class InvalidInputError(JanusError, ValueError):
    """An argument is invalid: wrong image shape, placeholder count, option out of range, ..."""


class NumericError(JanusError, ArithmeticError):
    """The model produced NaN or infinite logits (NaN weights, or a guidance weight so large that
    the guided logits overflow); the message names the step. Nothing was sampled."""


class OutOfMemoryError(JanusError, MemoryError):
    """The memory a request needs could not be allocated (tried before the work began; the model
    stays usable)."""


class Cancelled(JanusError):
    """The call was cancelled: a ``progress`` callback returned False, or Ctrl-C was pressed."""


class UnsupportedError(JanusError):
    """The model, backend or feature is not supported by this build."""
