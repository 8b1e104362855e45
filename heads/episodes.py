"""N-way K-shot episodes over a store split, reproducible on any machine and any store order.

Episode i of seed s depends only on (s, i) and on the split's ok videos sorted by `video_id`:
classes are drawn from the eligible class names (sorted), videos from each class's sorted ids.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd


class EpisodeError(ValueError):
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


class EpisodeSampler:
    """`sampler.episode(i)` for any i; iterate for episodes 0..n_episodes-1."""

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

    @property
    def rows(self) -> np.ndarray:
        """Every row any episode can use, ascending."""
        return np.sort(np.concatenate(list(self.class_rows.values())))

    def episode(self, index: int) -> Episode:
        rng = np.random.default_rng([self.seed, index])
        chosen = rng.choice(len(self.class_names), size=self.way, replace=False)
        support, query = [], []
        for name_index in chosen:
            rows = self.class_rows[self.class_names[name_index]]
            picked = rows[rng.choice(len(rows), size=self.shot + self.query, replace=False)]
            support.append(picked[: self.shot])
            query.append(picked[self.shot :])
        labels = np.arange(self.way)
        return Episode(
            index=index,
            support_rows=np.concatenate(support),
            support_labels=np.repeat(labels, self.shot),
            query_rows=np.concatenate(query),
            query_labels=np.repeat(labels, self.query),
            class_ids=np.array([self.class_labels[self.class_names[i]] for i in chosen]),
        )

    def __len__(self) -> int:
        return self.n_episodes

    def __iter__(self):
        return (self.episode(i) for i in range(self.n_episodes))
