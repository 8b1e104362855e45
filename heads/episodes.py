"""N-way K-shot episodes over a store split, reproducible on any machine and any store order.

Episode i of seed s depends only on (s, i) and on the split's ok videos sorted by `video_id`:
classes are drawn from the eligible class names (sorted), videos from each class's sorted ids.
The draws use a counter-based hash (splitmix64 of seed, episode, class and slot) rather than a
random stream, so that (a) any episode is computed without the ones before it, (b) a batch of
episodes is drawn with a few array operations (10,000 evaluation episodes cost milliseconds, not
seconds), and (c) the episodes do not change with the numpy version, whose `Generator` methods
do not promise the same streams across releases.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from runtime.errors import FsarError


class EpisodeError(FsarError, ValueError):
    """A split cannot provide the requested episodes (one-line message for the user)."""


@dataclass(frozen=True)
class Episode:
    """Store rows and episode labels of one task; `class_ids` are store labels (index into classes)."""

    index: int
    support_rows: np.ndarray  # (N*K,) class-major
    support_labels: np.ndarray  # (N*K,) in [0, N)
    query_rows: np.ndarray  # (N*Q,)
    query_labels: np.ndarray  # (N*Q,)
    class_ids: np.ndarray  # (N,)


@dataclass(frozen=True)
class EpisodeBatch:
    """E episodes stacked: the arrays of `Episode` with a leading episode axis."""

    indices: np.ndarray  # (E,)
    support_rows: np.ndarray  # (E, N*K)
    support_labels: np.ndarray  # (E, N*K)
    query_rows: np.ndarray  # (E, N*Q)
    query_labels: np.ndarray  # (E, N*Q)
    class_ids: np.ndarray  # (E, N)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Episode:
        return Episode(
            index=int(self.indices[i]),
            support_rows=self.support_rows[i],
            support_labels=self.support_labels[i],
            query_rows=self.query_rows[i],
            query_labels=self.query_labels[i],
            class_ids=self.class_ids[i],
        )


_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic): a well-mixed hash."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _MASK


def draw_keys(*counters: np.ndarray | int) -> np.ndarray:
    """Random uint64 keys, one per element of the broadcast `counters` (nested splitmix64)."""
    key = np.uint64(0)
    for counter in counters:
        key = splitmix64(key ^ np.asarray(counter, dtype=np.uint64))
    return np.asarray(key)


class EpisodeSampler:
    """`sampler.episode(i)` or `sampler.batch(range(a, b))` for any i; iterate for 0..n_episodes-1."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        way: int,
        shot: int,
        query: int,
        seed: int = 0,
        n_episodes: int = 0,
        split: str = "",
    ) -> None:
        if min(way, shot) < 1 or query < 0:
            raise EpisodeError(
                f"way and shot must be >= 1 and query >= 0 (got {way}-way {shot}-shot {query}-query)"
            )
        ok = manifest[manifest["status"] == "ok"].sort_values("video_id", kind="stable")
        need = shot + query
        self.class_rows: dict[str, np.ndarray] = {}
        self.class_labels: dict[str, int] = {}
        skipped = []
        for name, group in ok.groupby("class_name", sort=True):
            if len(group) < need:
                skipped.append(f"{name} ({len(group)})")
                continue
            self.class_rows[str(name)] = group["row"].to_numpy(dtype=np.int64)
            self.class_labels[str(name)] = int(group["label"].iat[0])
        where = f"split {split!r}" if split else "the split"
        if skipped:
            warnings.warn(
                f"{where}: skipping {len(skipped)} classes with fewer than {need} ok videos: "
                + ", ".join(skipped[:5])
                + (" ..." if len(skipped) > 5 else ""),
                stacklevel=2,
            )
        if way > len(self.class_rows):
            raise EpisodeError(
                f"{way}-way episodes need {way} classes with >= {need} ok videos; "
                f"{where} has {len(self.class_rows)}"
            )
        self.class_names = sorted(self.class_rows)
        self.way, self.shot, self.query = way, shot, query
        self.seed, self.n_episodes = seed, n_episodes
        # class_names order, padded with -1: videos of class c are _padded[c, :_lengths[c]]
        self._lengths = np.array([len(self.class_rows[n]) for n in self.class_names])
        self._padded = np.full((len(self.class_names), self._lengths.max()), -1, dtype=np.int64)
        for c, name in enumerate(self.class_names):
            self._padded[c, : self._lengths[c]] = self.class_rows[name]
        self._label_of = np.array([self.class_labels[n] for n in self.class_names])

    @property
    def rows(self) -> np.ndarray:
        """Every row any episode can use, ascending."""
        return np.sort(np.concatenate(list(self.class_rows.values())))

    def batch(self, indices: range | np.ndarray) -> EpisodeBatch:
        """Episodes `indices`, drawn together: E x classes keys pick the classes (the N smallest
        keys, in key order), E x N x videos keys pick each class's K + Q videos."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        n_classes, longest = self._padded.shape
        episode = index[:, None].astype(np.uint64)
        class_keys = draw_keys(self.seed, episode, 0, np.arange(n_classes))  # (E, C)
        chosen = np.argsort(class_keys, axis=1, kind="stable")[:, : self.way]  # (E, N)
        slots = np.arange(longest)
        video_keys = draw_keys(self.seed, episode[..., None], 1 + chosen[..., None], slots)
        video_keys[slots >= self._lengths[chosen][..., None]] = _MASK  # padding sorts last
        need = self.shot + self.query
        picked = np.argsort(video_keys, axis=2, kind="stable")[..., :need]  # (E, N, K+Q)
        rows = np.take_along_axis(self._padded[chosen], picked, axis=2)
        e = len(index)
        labels = np.arange(self.way)
        return EpisodeBatch(
            indices=index,
            support_rows=rows[..., : self.shot].reshape(e, -1),
            support_labels=np.tile(np.repeat(labels, self.shot), (e, 1)),
            query_rows=rows[..., self.shot :].reshape(e, -1),
            query_labels=np.tile(np.repeat(labels, self.query), (e, 1)),
            class_ids=self._label_of[chosen],
        )

    def episode(self, index: int) -> Episode:
        return self.batch([index])[0]

    def __len__(self) -> int:
        return self.n_episodes

    def __iter__(self):
        return (self.episode(i) for i in range(self.n_episodes))
