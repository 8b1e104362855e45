"""Stable hashes of video ids (same value on every machine and Python run, unlike `hash()`)."""

from __future__ import annotations

import hashlib


def stable_hash(text: str) -> int:
    """A 64-bit unsigned integer derived from `text` with SHA-1."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def in_part(video_id: str, part: int, n_parts: int) -> bool:
    """Whether `video_id` belongs to part `part` (1-based) of `n_parts`."""
    return stable_hash(video_id) % n_parts == part - 1
