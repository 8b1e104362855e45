"""What one video costs in each recipe, for choosing recipe and taps before extracting.

`fsar-store info` prints `size_lines(spec)`; docs/extraction.md holds `python -m store.sizes` (ViT-B/16).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from .layout import recipe_sizes

# ViT-B/16 at 224 px: what the published methods cache (bench/ uses the same shapes).
VIT_B16: dict[str, Any] = {
    "model": "ViT-B-16",
    "frames": 8,
    "tokens": 197,
    "dim": 512,
    "width": 768,
    "patches": 196,
    "depth": 12,
}


def taps_text(taps: Sequence[int] | None) -> str:
    """`0..12 (13)` for a run of taps, `0,4,8,12 (4)` otherwise, `-` for none."""
    if not taps:
        return "-"
    run = list(taps) == list(range(taps[0], taps[-1] + 1))
    listed = f"{taps[0]}..{taps[-1]}" if run and len(taps) > 2 else ",".join(map(str, taps))
    return f"{listed} ({len(taps)})"


def size_rows(spec: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """(recipe, taps, MB per video uncompressed) for every recipe at the spec's shapes."""
    return [(r["recipe"], taps_text(r["taps"]), r["bytes"] / 1e6) for r in recipe_sizes(spec)]


def _amount(mb: float) -> str:
    return f"{mb:8.2f} MB" if mb >= 1 else f"{mb * 1000:8.2f} KB"


def size_lines(spec: Mapping[str, Any]) -> list[str]:
    """Plain-text table: one line per recipe and tap choice."""
    dtype = spec.get("dtype", "float16")
    head = f"{'recipe':<13}{'taps':<22}per video ({dtype}, uncompressed)"
    return [head] + [f"{r:<13}{t:<22}{_amount(mb)}" for r, t, mb in size_rows(spec)]


def markdown_table(spec: Mapping[str, Any]) -> str:
    """The same rows as a markdown table."""
    lines = ["| recipe | taps (count) | MB per video |", "|---|---|---:|"]
    lines += [f"| `{r}` | {t} | {mb:.2f} |" for r, t, mb in size_rows(spec)]
    return "\n".join(lines)


def reference_spec(frames: int = VIT_B16["frames"], views: int = 1) -> dict[str, Any]:
    """An `emp` spec with ViT-B/16 shapes (sizes do not depend on the weights)."""
    from .random_store import random_spec

    return random_spec(
        frames=frames,
        views=views,
        dim=VIT_B16["dim"],
        width=VIT_B16["width"],
        patches=VIT_B16["patches"],
        depth=VIT_B16["depth"],
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m store.sizes", description="MB per video per recipe for ViT-B/16."
    )
    p.add_argument("--frames", type=int, default=VIT_B16["frames"])
    p.add_argument("--views", type=int, default=1)
    args = p.parse_args(argv)
    print(markdown_table(reference_spec(args.frames, args.views)))


if __name__ == "__main__":
    main()
