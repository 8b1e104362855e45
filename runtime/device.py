"""Which torch device a `--device` option names, refused in one line when this machine lacks it.

`auto` is CUDA when torch sees a GPU, else the CPU.
"""

from __future__ import annotations

import torch

from runtime.errors import FsarError


class DeviceError(FsarError, ValueError):
    """A `--device` value that is malformed or names hardware this machine lacks (one line)."""


def pick_device(name: str, *, indexed: bool = True) -> torch.device:
    """auto, cpu, cuda or (when `indexed`) cuda:N, checked against the GPUs torch sees here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = str(name).partition(":")
    if kind not in ("cpu", "cuda") or (
        index and (kind == "cpu" or not index.isdigit() or not indexed)
    ):
        choices = "auto, cpu, cuda or cuda:N" if indexed else "auto, cpu or cuda"
        raise DeviceError(f"--device {name!r}: use {choices}")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {name}: no CUDA GPU is visible to torch; use --device cpu")
        if index and int(index) >= count:
            raise DeviceError(f"--device {name}: this machine has {count} CUDA GPU(s)")
    return torch.device(name)
