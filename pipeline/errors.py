"""Stage 1 errors a user can fix: each message is one line; the CLI prints it and exits 2.

Encoder errors (model name, weights, templates) and extraction errors (options, disk, stores).
"""

from __future__ import annotations

from runtime.errors import FsarError


class EncoderError(FsarError):
    """A problem the user can fix (model name, weights, templates); the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class PretrainedUnavailable(EncoderError):
    """A pretrained tag is unknown or its weights are not available here (offline, not cached)."""


class WeightsFileError(EncoderError):
    """A local weights file is missing, unreadable, not a state dict, or for another architecture."""


class UnsupportedModel(EncoderError):
    """The architecture cannot be cached by the recipe (e.g. timm towers, attentional pooling)."""


class ExtractError(FsarError):
    """A problem the user can fix (options, disk space, store mismatch); the message is one line."""
