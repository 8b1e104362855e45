"""What `fsar-extract` takes (`ExtractOptions`) and what a run reports (`ExtractSummary`).

Shared by the driver (pipeline/extract.py) and the Dask runner (pipeline/cluster.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from runtime.values import OptionError, real_number, whole_number

# Bounds of the numbers fsar-extract takes: far beyond any clip sampling of the field, and they keep a
# row (V x T frames of every cached layer) within what one chunk may hold.
MAX_FRAMES = 1024
MAX_VIEWS = 256
MAX_WORKERS = 1024
MAX_BATCH_FRAMES = 1 << 16
MAX_TIMEOUT_S = 86_400.0


@dataclass
class ExtractOptions:
    """Everything `fsar-extract` takes; `None` model/pretrained mean the store's, else the defaults."""

    dataset: str
    data_root: str
    store: str
    model: str | None = None
    pretrained: str | None = None
    frames: int = 8
    views: int = 1
    recipe: str = "emp"
    preprocess: str = "openclip"
    splits: str | None = None
    part: str | None = None
    workers: int | None = None
    scheduler: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    timeout: float = 120.0
    decode: str = "seek"  # pipeline.decoding.DECODE_MODES
    retry_failed: bool = False
    progress: bool = True
    taps: str | None = None  # --taps 0,4,8,12: recipes with ts (default: every tap)
    class_descriptions: tuple[str, ...] = ()  # --class-descriptions FILE (repeatable)
    side_pca: str | None = None  # --side-pca released|exact (default: the store's, else released)
    allow_torchscript: bool = False  # a TorchScript --pretrained file runs code when loaded

    def validate(self, preprocessing: tuple[str, ...], decoders: tuple[str, ...]) -> None:
        """Refuse values no extraction can use, naming the option, before anything is read or
        written (OptionError; the names allowed come from their owners; the recipe and its
        --taps/--side-pca: pipeline.extract.recipe_of)."""
        whole_number("--frames", self.frames, 1, MAX_FRAMES)
        whole_number("--views", self.views, 1, MAX_VIEWS)
        if self.workers is not None:
            whole_number("--workers", self.workers, 1, MAX_WORKERS)
        if self.batch_size is not None:
            whole_number("--batch-size", self.batch_size, 1, MAX_BATCH_FRAMES)
        real_number("--timeout", self.timeout, 0.0, MAX_TIMEOUT_S, above_low=True)
        if self.preprocess not in preprocessing:
            raise OptionError(f"--preprocess {self.preprocess!r}: use {' or '.join(preprocessing)}")
        if self.decode not in decoders:
            raise OptionError(f"--decode {self.decode}: use one of {', '.join(decoders)}")


@dataclass
class ExtractSummary:
    """What a run did."""

    store: str
    selected: int  # rows in --splits/--part
    already_ok: int  # skipped because they were ok before this run
    attempted: int
    ok: int
    failed: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    frames: int = 0

    def count(self, updates: list[dict[str, Any]], frames_per_video: int) -> None:
        """Add finished rows (their manifest updates) to the counts."""
        for update in updates:
            if update["status"] == "ok":
                self.ok += 1
                self.frames += frames_per_video
            else:
                self.failed[update["error"]] += 1

    def rates(self, elapsed: float) -> dict[str, Any]:
        """Progress-bar figures after `elapsed` seconds of the run."""
        elapsed = max(elapsed, 1e-9)
        failed = sum(self.failed.values())
        return {
            "videos/s": f"{(self.ok + failed) / elapsed:.2f}",
            "frames/s": f"{self.frames / elapsed:.1f}",
            "failed": failed,
        }

    def lines(self) -> list[str]:
        if self.attempted == 0:
            return [
                f"{self.store}: nothing to extract ({self.already_ok} of {self.selected} selected "
                "videos already ok; --retry-failed retries failed ones)"
            ]
        rate = self.attempted / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"{self.store}: {self.ok} ok, {sum(self.failed.values())} failed of {self.attempted} "
            f"attempted ({self.already_ok} already ok, {self.selected} selected) in "
            f"{self.seconds:.1f} s ({rate:.2f} videos/s, {self.frames / max(self.seconds, 1e-9):.1f} "
            "frames/s)"
        ]
        for reason, count in self.failed.most_common():
            out.append(f"  failed: {count} x {reason}")
        return out
