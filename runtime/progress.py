"""Progress bars of long commands (tqdm), or none when the user turned them off.

`bar = progress_bar(total, enabled, unit="episode")`; callers check `bar is not None`.
"""

from __future__ import annotations

from typing import Any


def progress_bar(total: int, enabled: bool, **options: Any) -> Any | None:
    """A tqdm bar over `total` items with tqdm's `options`, or None when not `enabled`."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, **options)
