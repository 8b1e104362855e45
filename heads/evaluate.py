"""Few-shot evaluation: one per-video pass over the split, then thousands of cheap episodes.

    result = evaluate(head, store, split="test", way=5, shot=1, query=1, episodes=10_000)
    print(result.summary())   # accuracy 76.81 ± 0.35 (95% CI, 10000 episodes, 5-way 1-shot, test)

Per-video work (`video_features`, then `cache_features`) runs once per video on view 0; episodes
are then scored in batches from those cached features. `view="random"` runs it once per video on
each of views 1..V-1 and gives every video of every episode one of them, drawn from (seed, episode,
slot): the released test draws a random frame per segment for every episode, which these cached
random views approximate.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.progress import progress_bar

from .base import FewShotHead, table_class_means
from .data import SplitData
from .episodes import EpisodeBatch, EpisodeSampler, draw_keys
from .stats import ci95_half_width


def confidence_interval(correct_fraction: np.ndarray) -> float:
    """95% half-width (percent) of the mean episode accuracy: fsar's one rule (heads.stats)."""
    return ci95_half_width(np.asarray(correct_fraction, dtype=np.float64) * 100.0)


@dataclass
class EvalResult:
    accuracy: float  # percent
    ci95: float  # percent, half-width
    episodes: int
    way: int
    shot: int
    query: int
    split: str
    head: str
    store_fingerprint: str
    seconds: float  # all of evaluate(): load, pass over the split, episodes
    pass_seconds: float  # load and one pass of the head over the split (the rest is episodes)
    per_episode: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    view: str = (
        "centre"  # centre (view 0), random (one of views 1..V-1 per episode) or a view number
    )

    def summary(self) -> str:
        views = "" if self.view == "centre" else f", view {self.view}"
        return (
            f"accuracy {self.accuracy:.2f} ± {self.ci95:.2f} (95% CI, {self.episodes} episodes, "
            f"{self.way}-way {self.shot}-shot, {self.split}{views})"
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("per_episode")
        return out


def video_pass(
    head: FewShotHead,
    data: SplitData,
    shot: int,
    device: torch.device,
    batch_size: int = 16,
    view: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-video features of every row in `data` (order of data.rows), cached for episodes."""
    labels = data.store.manifest["label"].to_numpy()
    parts: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for rows, inputs in data.batches(batch_size, view):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            feats = head.video_features(inputs)
            own = torch.as_tensor(labels[rows], device=device)
            parts.append(head.cache_features(feats, own, shot))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


EPISODE_BATCH_BYTES = 256e6  # gathered support + query features of one batch of episodes
MAX_EPISODES_PER_BATCH = 1000  # per call a few ms of fixed cost: 10 calls for 10,000 episodes


def auto_episodes_per_batch(features: dict[str, torch.Tensor], videos_per_episode: int) -> int:
    """Episodes scored per call: as many as keep the gathered features under EPISODE_BATCH_BYTES.

    1-shot heads cache small per-video features and score up to 1,000 episodes at once; K-shot
    `emp` keeps every support's patch tokens (T x P x D) to fuse prototypes per episode, which at
    ViT-B/16 shapes is megabytes per video, so its batches shrink instead of exhausting memory.
    """
    per_video = sum(v[0].numel() * v.element_size() for v in features.values() if v.dim() > 0)
    per_episode = max(1, per_video * videos_per_episode)
    return int(max(1, min(MAX_EPISODES_PER_BATCH, EPISODE_BATCH_BYTES // per_episode)))


def row_positions(rows: np.ndarray) -> np.ndarray:
    """Lookup table store row -> index into `rows` (-1 where absent), for gathering features."""
    table = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, dtype=np.int64)
    table[rows] = np.arange(len(rows))
    return table


VIEW_STREAM = 1 << 62  # draw_keys counter of the view draws, apart from the sampler's streams


def parse_view(view: str | int, n_views: int) -> int | None:
    """`centre` -> 0, `random` -> None, a view number -> itself (checked against the store's V)."""
    if view in ("centre", "center"):
        return 0
    if view == "random":
        if n_views < 2:
            raise ValueError(
                "--view random draws among views 1..V-1: extract the store with --views 2 or more"
            )
        return None
    try:
        number = int(view)
    except ValueError:
        raise ValueError(f"--view {view!r}: use centre, random or a view number") from None
    if not 0 <= number < n_views:
        raise ValueError(f"--view {number}: the store has views 0..{n_views - 1}")
    return number


def with_random_views(episodes: EpisodeBatch, seed: int, n_random: int) -> EpisodeBatch:
    """`episodes` with every row r replaced by r * n_random + w, w its drawn view among 1..V-1 (minus 1)."""
    n_support = episodes.support_rows.shape[1]
    n_query = episodes.query_rows.shape[1]
    slots = np.arange(n_support + n_query)
    keys = draw_keys(seed, episodes.indices[:, None].astype(np.uint64), VIEW_STREAM, slots)
    drawn = (keys % np.uint64(n_random)).astype(np.int64)
    return replace(
        episodes,
        support_rows=episodes.support_rows * n_random + drawn[:, :n_support],
        query_rows=episodes.query_rows * n_random + drawn[:, n_support:],
    )


def score_episodes(
    head: FewShotHead,
    features: dict[str, torch.Tensor],
    position: np.ndarray,
    episodes: EpisodeBatch,
    device: torch.device,
    buffers: dict[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """Fraction of correct queries per episode, scoring all `episodes` in one batched call.

    `features` are per-video features in the order of some rows; `position` (row_positions of
    those rows) maps a store row to its index there. `buffers`, kept by the caller between
    calls, receive the gathered features: allocating megabytes afresh per batch costs page
    faults on CPU under glibc's default settings (library callers; fsar-eval also keeps freed
    memory, see runtime.memory)."""

    def gather(rows: np.ndarray, role: str) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(position[rows].reshape(-1), device=device)
        out = {}
        for k, v in features.items():
            shape = (len(index), *v.shape[1:])
            if buffers is None:  # index_select: about twice as fast as v[index] on CPU
                gathered = v.index_select(0, index)
            else:
                buffer = buffers.get(f"{role}/{k}")
                if buffer is None or buffer.shape[0] < shape[0] or buffer.dtype != v.dtype:
                    buffer = buffers[f"{role}/{k}"] = v.new_empty(shape)
                gathered = torch.index_select(v, 0, index, out=buffer[: shape[0]])
            out[k] = gathered.reshape(*rows.shape, *v.shape[1:])
        return out

    class_ids = torch.as_tensor(episodes.class_ids, device=device)
    n_episodes, n_way = episodes.class_ids.shape
    shot = episodes.support_rows.shape[1] // n_way
    means = head.support_means(shot) if shot > 1 else None
    if means is not None and class_major(episodes.support_labels, n_way, shot):
        # K-shot prototypes straight from the feature table: one video per class, labels 0..N-1
        index = torch.as_tensor(position[episodes.support_rows], device=device)
        index = index.view(n_episodes, n_way, shot)
        support = {k: table_class_means(features[k], index) for k in means}
        support_labels = torch.arange(n_way, device=device).expand(n_episodes, n_way)
    else:
        support = gather(episodes.support_rows, "support")
        support_labels = torch.as_tensor(episodes.support_labels, device=device)
    query = gather(episodes.query_rows, "query")
    query_labels = torch.as_tensor(episodes.query_labels, device=device)
    head.process_support_set(support, support_labels, class_ids)
    with torch.no_grad():
        prediction = head(query).argmax(-1)
    return (prediction == query_labels).float().mean(-1).cpu().numpy()


def class_major(labels: np.ndarray, n_way: int, shot: int) -> bool:
    """Whether support labels (E, N*K) are the sampler's class-major 0,..,0,1,..,1,... order."""
    return bool((labels == np.repeat(np.arange(n_way), shot)).all())


def evaluate(
    head: FewShotHead,
    store: Any,
    split: str = "test",
    way: int = 5,
    shot: int = 1,
    query: int = 1,
    episodes: int = 10_000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_ram_gb: float = 8.0,
    episodes_per_batch: int | None = None,
    data: SplitData | None = None,
    progress: bool = False,
    view: str | int = "centre",
) -> EvalResult:
    """Accuracy ± 95% CI of `head` on `episodes` episodes of `split` (deterministic).

    `view`: `centre` (view 0), `random` (one of views 1..V-1 per video and episode) or a view number."""
    start = time.perf_counter()
    device = torch.device(device)
    fixed = parse_view(view, int(store.spec["views"]))
    sampler = EpisodeSampler(
        store.manifest[store.manifest["split"] == split], way, shot, query, seed, episodes, split
    )
    if data is None:
        views = 1 if fixed == 0 else None
        data = SplitData(store, sampler.rows, head.inputs(store.spec), max_ram_gb, views=views)
    was_training = head.training
    head.eval()
    n_random = int(store.spec["views"]) - 1
    if (
        fixed is None
    ):  # features of views 1..V-1, video-major: row position p, view w -> p * n + w - 1
        parts = [video_pass(head, data, shot, device, view=w) for w in range(1, n_random + 1)]
        features = {k: torch.stack([p[k] for p in parts], 1).flatten(0, 1) for k in parts[0]}
        position = row_positions((data.rows[:, None] * n_random + np.arange(n_random)).reshape(-1))
    else:
        features = video_pass(head, data, shot, device, view=fixed)
        position = row_positions(data.rows)
    pass_seconds = time.perf_counter() - start
    if episodes_per_batch is None:
        episodes_per_batch = auto_episodes_per_batch(features, way * (shot + query))
    correct = np.zeros(episodes)
    buffers: dict[str, torch.Tensor] = {}
    bar = progress_bar(episodes, progress, unit="episode", desc="eval", leave=False)
    with (
        torch.no_grad()
    ):  # (lastlayer --strategy novel enables grad for its own support fine-tuning)
        for first in range(0, episodes, episodes_per_batch):
            batch = sampler.batch(range(first, min(first + episodes_per_batch, episodes)))
            if fixed is None:
                batch = with_random_views(batch, seed, n_random)
            correct[first : first + len(batch)] = score_episodes(
                head, features, position, batch, device, buffers
            )
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    head.train(was_training)
    return EvalResult(
        accuracy=float(correct.mean() * 100.0) if episodes else float("nan"),
        ci95=confidence_interval(correct),
        episodes=episodes,
        way=way,
        shot=shot,
        query=query,
        split=split,
        head=head.name,
        store_fingerprint=store.fingerprint(),
        seconds=time.perf_counter() - start,
        pass_seconds=pass_seconds,
        per_episode=correct,
        view=str(view if fixed != 0 else "centre"),
    )


def load_run(
    run_dir: str | Path,
    store: Any,
    device: str | torch.device = "cpu",
    options: dict[str, Any] | None = None,
) -> FewShotHead:
    """The head of a training run (best.safetensors, else last), refusing a store with another spec.

    The run's files are checked before a model is built: the head config, updated by `options`
    (test-time options such as tsfsar's fusion exponents), must build (on the meta device,
    allocating nothing) a head whose weight names and shapes are the checkpoint's.
    """
    from store import SpecMismatchError, spec_differences

    from . import registry
    from .checkpoint import CheckpointError, check_fits, load_model, read_metadata
    from .data import require_inputs

    run_dir = Path(run_dir)
    checkpoint = run_dir / "best.safetensors"
    if not checkpoint.exists():
        checkpoint = run_dir / "last.safetensors"
    if not checkpoint.exists():
        raise CheckpointError(
            f"no checkpoint in {run_dir} (expected best.safetensors or last.safetensors)"
        )
    saved = read_metadata(checkpoint)
    spec = saved["meta"].get("store_spec")
    if not isinstance(spec, dict):
        raise CheckpointError(f"checkpoint {checkpoint} does not name the store spec it needs")
    differences = spec_differences(spec, store.spec)
    if differences:
        raise SpecMismatchError(
            f"checkpoint {checkpoint} was trained on a store with another spec: "
            + "; ".join(differences)
        )
    config = {**saved["head_config"], **(options or {})}
    _check_head_installed(checkpoint, saved["head"], saved["meta"].get("head_source"))
    try:
        registry.factory(saved["head"])  # a plugin's module is imported outside the meta device
        with torch.device("meta"):
            probe = registry.create(saved["head"], **config)
    except Exception as exc:  # unknown head, bad option values
        text = " ".join(str(exc).split())[:160]
        raise CheckpointError(
            f"checkpoint {checkpoint}: head {saved['head']!r} with its saved config does not build "
            f"({type(exc).__name__}: {text})"
        ) from None
    check_fits(checkpoint, probe)
    head = registry.create(saved["head"], **config)
    require_inputs(head, store)
    head.prepare(store)
    load_model(checkpoint, head)
    return head.to(device)


_PACKAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _check_head_installed(checkpoint: Path, name: str, recorded: Any) -> None:
    """Refuse, naming the package to install, a checkpoint whose plugin head is not installed;
    warn when the installed version differs from the one it was trained with."""
    from . import registry
    from .checkpoint import CheckpointError

    recorded = recorded if isinstance(recorded, dict) else {}
    package = str(recorded.get("distribution", ""))
    version = str(recorded.get("version", ""))
    plugin = bool(_PACKAGE_NAME.match(package)) and package != "fsar"
    try:
        here = registry.source(name)
    except registry.HeadError as error:
        if not plugin:
            raise CheckpointError(f"checkpoint {checkpoint}: {error}") from None
        pin = f"=={version}" if _PACKAGE_NAME.match(version) else ""
        raise CheckpointError(
            f"checkpoint {checkpoint}: head {name!r} comes from package {package}, which is not "
            f"installed here: install it (pip install '{package}{pin}') and evaluate again"
        ) from None
    if plugin and (here.distribution, here.version) != (package, version):
        warnings.warn(
            f"checkpoint {checkpoint} was trained with head {name!r} of {package} {version[:40]}; "
            f"here it comes from {here.distribution} {here.version}",
            stacklevel=3,
        )


def store_of_run(run_dir: str | Path) -> str:
    """The store path a run's config.json names."""
    from runtime import files

    from .checkpoint import CheckpointError

    path = Path(run_dir) / "config.json"
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"no run at {run_dir}: {path} does not exist")
    try:
        path_in_config = files.read_json(path, "run config")["store"]["path"]
    except files.FileRefused as error:
        raise CheckpointError(str(error)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{path} is not a run's config ({type(exc).__name__}): pass --store"
        ) from None
    if not isinstance(path_in_config, str) or not path_in_config:
        raise CheckpointError(f"{path} names no store: pass --store")
    return path_in_config
