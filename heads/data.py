"""Serving store tensors to heads: only the tensors a head reads, in RAM when the split fits.

`SplitData(store, rows, names, max_ram_gb)` loads the split's rows of those tensors once when they
fit in `max_ram_gb`; otherwise every request reads just its rows' chunks from the store. Both
`batches` (a pass over the split) and `episodes` (training episodes) prefetch the next item in a
background thread with a queue of bounded size, so memory stays bounded when streaming.
Training draws a random view per video per episode (seeded by the episode); evaluation uses view 0
(or, with `fsar-eval --view random`, one of views 1..V-1 per video per episode).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from store.layout import TEXT_DEFAULT, row_bytes, text_name

from .episodes import Episode, EpisodeSampler
from .registry import HeadError

Inputs = dict[str, torch.Tensor]


class MissingInputsError(HeadError):
    """The store lacks arrays a head reads (one line naming them)."""


def missing_inputs(head: Any, store: Any) -> list[str]:
    """The arrays `head` reads (its `inputs(spec)`, and class texts if it uses them) that `store` lacks."""
    missing = sorted(set(head.inputs(store.spec).values()) - set(store.tensors))
    if head.uses_text and TEXT_DEFAULT not in store.text_names:
        missing.append(text_name(TEXT_DEFAULT))
    return missing


def require_inputs(head: Any, store: Any) -> None:
    """Refuse a store that lacks what `head` reads, before anything is trained or written."""
    missing = missing_inputs(head, store)
    if missing:
        recipe = (
            " (extract with --recipe emp+last: it writes them and weights/lastblock.safetensors)"
        )
        hint = recipe if any(m.endswith("_in") for m in missing) else ""
        raise MissingInputsError(
            f"head {head.name!r} reads {', '.join(missing)}, which the store lacks{hint}; "
            f"it has {', '.join(store.tensors)}"
        )


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run `items` in a background thread, at most `depth` produced items ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(done)
        except BaseException as error:  # re-raised in the consumer
            buffer.put(error)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class SplitData:
    """The rows of one split for one head: `roles` maps head roles to store tensor names."""

    def __init__(
        self,
        store: Any,
        rows: np.ndarray,
        roles: dict[str, str],
        max_ram_gb: float = 8.0,
        views: int | None = None,
    ) -> None:
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.roles = roles
        self.n_views = int(store.spec["views"])
        self.views = views  # None: all views (training); 1: view 0 only (evaluation)
        need = row_bytes(store.spec, list(roles.values()), views) * len(self.rows)
        self.in_memory = need <= max_ram_gb * 1e9
        self.bytes_needed = need
        self._position = {int(r): i for i, r in enumerate(self.rows)}
        self._arrays: dict[str, np.ndarray] = {}
        if self.in_memory and len(self.rows):
            view = 0 if views == 1 else None
            data = store.read(self.rows, list(roles.values()), view=view)
            for role, name in roles.items():
                array = data[name]
                self._arrays[role] = array[:, None] if view is not None else array

    def get(self, rows: np.ndarray, view: np.ndarray | int = 0) -> Inputs:
        """Tensors (len(rows), T, ...) for `rows`, `view[i]` of row i (float16, as stored)."""
        rows = np.asarray(rows, dtype=np.int64)
        views = np.broadcast_to(np.asarray(view, dtype=np.int64), rows.shape)
        out: Inputs = {}
        if self.in_memory:
            positions = np.array([self._position[int(r)] for r in rows], dtype=np.int64)
            for role, array in self._arrays.items():
                out[role] = torch.from_numpy(np.ascontiguousarray(array[positions, views]))
            return out
        if self.views == 1 or not views.any():
            data = self.store.read(rows, list(self.roles.values()), view=0)
            return {
                role: torch.from_numpy(np.ascontiguousarray(data[n]))
                for role, n in self.roles.items()
            }
        data = self.store.read(rows, list(self.roles.values()))
        index = np.arange(len(rows))
        return {
            role: torch.from_numpy(np.ascontiguousarray(data[n][index, views]))
            for role, n in self.roles.items()
        }

    def batches(self, batch_size: int, view: int = 0) -> Iterator[tuple[np.ndarray, Inputs]]:
        """(rows, tensors of `view`) over the whole split, prefetched."""
        chunks = [self.rows[i : i + batch_size] for i in range(0, len(self.rows), batch_size)]
        return prefetch(((rows, self.get(rows, view)) for rows in chunks), depth=2)

    def episodes(
        self, sampler: EpisodeSampler, indices: range, seed: int, random_view: bool
    ) -> Iterator[tuple[Episode, Inputs]]:
        """(episode, tensors of support rows then query rows), prefetched."""

        def load(index: int) -> tuple[Episode, Inputs]:
            ep = sampler.episode(index)
            rows = np.concatenate([ep.support_rows, ep.query_rows])
            view: np.ndarray | int = 0
            if random_view and self.n_views > 1:
                view = np.random.default_rng([seed, index, 1]).integers(
                    self.n_views, size=len(rows)
                )
            return ep, self.get(rows, view)

        return prefetch((load(i) for i in indices), depth=2)
