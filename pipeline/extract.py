"""Stage 1 orchestration: dataset -> decode (killable child process) -> CLIP encode -> store, on Dask.

The driver lists the dataset, loads the model once to fix the spec (and fail fast on bad weights),
creates or reopens the store (refusing a different spec), writes the text embeddings, checks disk
space, then streams videos through a Dask cluster (a `LocalCluster` by default, or `--scheduler`):
a decode task per video (CPU, in a persistent child process with a per-video timeout) feeds an encode
task (Dask resource `encode`, one at a time per worker) that writes the row's chunks with
`ChunkWriter` and returns the manifest update. Only the driver commits the manifest. Rows already
`ok` are skipped, so an interrupted run resumes; `--retry-failed` retries failed rows.

Decoding (`pipeline.decoding`, in `pipeline.decode_child`) and encoding (`pipeline.encoder`) know nothing about Dask; everything
Dask-specific is in this module.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.datasets import (
    DatasetListing,
    list_dataset,
    parse_part,
    parse_splits,
    select_videos,
    video_path,
)
from pipeline.decode_child import DecodeOutcome, DecodeRequest, close_decoders, decode_in_child
from runtime.memory import MALLOC_ENVIRON

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
COMMIT_EVERY_S = 2.0
COMMIT_EVERY_ROWS = 256
DISK_MARGIN = 1.05  # chunks are compressed, so the uncompressed size plus 5% is an upper bound
TASK_RETRIES = 2  # a task whose worker died is retried this many times, then its rows fail


class ExtractError(Exception):
    """A problem the user can fix (options, disk space, store mismatch); the message is one line."""


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
    retry_failed: bool = False
    progress: bool = True
    allow_torchscript: bool = (
        False  # --allow-torchscript: a TorchScript --pretrained file runs code
    )


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


# ---------------------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class EncoderConfig:
    """How a worker builds its encoder (hashable: the key of the per-process model cache)."""

    model: str
    pretrained: str  # as given: tag, "none" or a weights file path
    weights_sha256: str
    recipe: str
    layers: tuple[int, ...]
    device: str  # "cpu" or "cuda"
    precision: str
    torch_threads: int
    batch_frames: int
    batch_across_videos: bool  # CUDA: one forward over several videos' frames; CPU: one per video
    allow_torchscript: bool = False


_encoders: dict[EncoderConfig, Any] = {}
_transforms: dict[str, Any] = {}
_writers: dict[str, Any] = {}
_worker_lock = threading.Lock()  # one model load and one forward at a time per worker process


def _worker_device(device: str) -> str:
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if isinstance(name, int) or str(name).isdigit() else 0
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % max(count, 1)}"


def _worker_encoder(config: EncoderConfig) -> Any:
    """This process's encoder for `config`, loaded on first use (once per worker)."""
    encoder = _encoders.get(config)
    if encoder is None:
        from pipeline.encoder import FrameEncoder, load_clip

        _set_torch_threads(config.torch_threads)
        clip = load_clip(
            config.model,
            config.pretrained,
            device=_worker_device(config.device),
            allow_torchscript=config.allow_torchscript,
        )
        if clip.weights_sha256 != config.weights_sha256:
            raise RuntimeError(
                f"weights on this worker (sha256 {clip.weights_sha256[:12]}) differ from the "
                f"store's ({config.weights_sha256[:12]})"
            )
        encoder = FrameEncoder(
            clip, recipe=config.recipe, layers=list(config.layers), precision=config.precision
        )
        _encoders[config] = encoder
    return encoder


def _chunk_writer(store_path: str) -> Any:
    writer = _writers.get(store_path)
    if writer is None:
        from store import ChunkWriter

        writer = _writers[store_path] = ChunkWriter(store_path)
    return writer


def _set_torch_threads(count: int) -> None:
    import torch

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def decode_task(
    request: DecodeRequest,
    preprocess: dict[str, Any],
    config: EncoderConfig,
    timeout: float,
    train: bool = False,
) -> DecodeOutcome:
    """Dask task: decode one video in this worker thread's decode child, then preprocess it.

    Returns the outcome with `pixels` replaced by the model input `(V, T, 3, S, S)` float32; views
    1.. of a `train` video get the preprocessing's training augmentation.
    """
    from pipeline.preprocess import build_transform, transform_video

    outcome = decode_in_child(request, timeout)
    if outcome.error is not None:
        return outcome
    _set_torch_threads(config.torch_threads)
    key = json.dumps(preprocess, sort_keys=True)
    transform = _transforms.get(key)
    if transform is None:
        transform = _transforms[key] = build_transform(preprocess)
    try:
        model_input = transform_video(
            preprocess, transform, outcome.pixels, request.video_id, train
        )
    except Exception as error:  # e.g. a frame too small for the crop
        outcome.error = f"preprocess error: {type(error).__name__}: {error}"[:240]
        outcome.pixels = None
        return outcome
    outcome.pixels = model_input
    return outcome


def _failed_update(row: int, outcome: DecodeOutcome | None, error: str) -> dict[str, Any]:
    update: dict[str, Any] = {"row": row, "status": "failed", "error": error}
    if outcome is not None and outcome.indices:
        update.update(n_frames=outcome.n_frames, fps=outcome.fps, decoder=outcome.decoder)
    return update


def encode_task(
    rows: Sequence[int],
    outcomes: Sequence[DecodeOutcome],
    config: EncoderConfig,
    store_path: str,
) -> list[dict[str, Any]]:
    """Dask task: encode decoded videos, write their chunks, return their manifest updates.

    On CPU every video is its own forward pass (results do not depend on the batch); on CUDA
    (`batch_across_videos`) the frames of all videos in the task go through forwards of up to
    `config.batch_frames` frames.
    """
    from store import done_update

    with _worker_lock:
        encoder = _worker_encoder(config)
        writer = _chunk_writer(store_path)
        updates: list[dict[str, Any]] = []
        good = [(r, o) for r, o in zip(rows, outcomes, strict=True) if o.error is None]
        updates += [
            _failed_update(r, o, str(o.error))
            for r, o in zip(rows, outcomes, strict=True)
            if o.error
        ]
        if not good:
            return updates
        per_video = [o.pixels.reshape(-1, *o.pixels.shape[2:]) for _, o in good]
        if not config.batch_across_videos:
            features = [encoder(frames) for frames in per_video]
        else:
            stacked = np.concatenate(per_video)
            parts = [
                encoder(stacked[i : i + config.batch_frames])
                for i in range(0, len(stacked), config.batch_frames)
            ]
            merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            sizes = np.cumsum([0] + [len(f) for f in per_video])
            features = [
                {k: v[sizes[i] : sizes[i + 1]] for k, v in merged.items()}
                for i in range(len(per_video))
            ]
        for (row, outcome), feats in zip(good, features, strict=True):
            views, frames = outcome.pixels.shape[:2]
            tensors = {k: v.reshape(views, frames, *v.shape[1:]) for k, v in feats.items()}
            try:
                sums = writer.write_row(row, tensors)
            except Exception as error:  # a write error fails this row, not the run
                updates.append(_failed_update(row, outcome, f"write error: {error}"[:240]))
                continue
            updates.append(
                done_update(
                    row,
                    sums,
                    n_frames=outcome.n_frames,
                    fps=outcome.fps,
                    frame_indices=outcome.indices,
                    decoder=outcome.decoder,
                )
            )
        return updates


# ---------------------------------------------------------------------------------------- driver side


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; `cuda:N` is not an option here."""
    from runtime.device import DeviceError, pick_device

    try:
        return pick_device(device, indexed=False).type
    except DeviceError as error:
        raise ExtractError(str(error)) from None


@dataclass(frozen=True)
class ClusterPlan:
    """Worker processes, threads per worker (decode concurrency) and torch threads per worker."""

    workers: int
    threads_per_worker: int
    torch_threads: int


def plan_cluster(device: str, workers: int | None, cores: int | None = None) -> ClusterPlan:
    """Size a LocalCluster so that torch threads x workers never exceeds the cores.

    CPU: encoding dominates; one worker per 4 cores, each with torch threads = its share of the cores
    and 2 Dask threads (one decodes the next video while the other encodes). CUDA: one worker per GPU
    and every core decoding (the GPU encodes far faster than one core decodes).
    """
    cores = cores or os.cpu_count() or 1
    if device == "cuda":
        import torch

        n = workers or max(1, torch.cuda.device_count())
        return ClusterPlan(n, max(2, cores // n), 1)
    n = workers or max(1, cores // 4)
    if n > cores:
        raise ExtractError(f"--workers {n}: this machine has {cores} cores; use at most {cores}")
    return ClusterPlan(n, 2, max(1, cores // n))


def check_disk_space(store_path: Path, n_rows: int, bytes_per_row: int) -> int:
    """Raise `ExtractError` when the disk holding the store lacks room for `n_rows`; return estimate."""
    needed = int(n_rows * bytes_per_row * DISK_MARGIN)
    probe = store_path if store_path.exists() else store_path.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise ExtractError(
            f"not enough disk space for {store_path}: about {needed / 1e9:.1f} GB needed for "
            f"{n_rows} videos, {free / 1e9:.1f} GB free; free space, choose another --store, or "
            "extract in pieces with --splits/--part"
        )
    return needed


def build_run_spec(clip: Any, options: ExtractOptions, device: str, precision: str) -> dict:
    """The store spec for this run (docs/design.md names)."""
    from pipeline.preprocess import PREPROCESS_NAMES, preprocess_spec
    from runtime.versions import versions
    from store.layout import build_spec

    if options.preprocess not in PREPROCESS_NAMES:
        raise ExtractError(f"--preprocess {options.preprocess!r}: use openclip or emp")
    if options.recipe not in ("emp", "emp+last"):
        raise ExtractError(f"--recipe {options.recipe!r}: use emp or emp+last")
    if options.frames < 1 or options.views < 1:
        raise ExtractError("--frames and --views must be at least 1")
    fields = clip.spec_fields()
    return build_spec(
        model=fields["model"],
        pretrained=fields["pretrained"],
        weights_sha256=fields["weights_sha256"],
        image_size=fields["image_size"],
        preprocess=preprocess_spec(options.preprocess, clip.preprocess.as_dict()),
        frames=options.frames,
        views=options.views,
        recipe=options.recipe,
        layers=fields["layers"],
        tokens=fields["tokens"],
        dim=fields["dim"],
        width=fields["width"],
        patch_grid=fields["patch_grid"],
        device=device,
        precision=precision,
        versions=versions("torch", "open_clip", "fsar"),
    )


def check_store_option(store: str) -> Path:
    """--store must name a local directory (new, empty, or a store to resume)."""
    from store.location import is_url

    if is_url(store) and not store.lower().startswith("file://"):
        raise ExtractError(
            f"--store {store}: fsar-extract writes a local directory; a URL opens read-only "
            "(copy it with fsar-store subset URL --out DIR, then extract into DIR)"
        )
    path = Path(store[len("file://") :] if store.lower().startswith("file://") else store)
    if path.exists() and not path.is_dir():
        raise ExtractError(f"--store {store} is a file, not a store directory")
    if path.is_dir() and any(path.iterdir()) and not _is_store(path):
        raise ExtractError(
            f"--store {store} exists, is not empty and holds no store: choose a new directory"
        )
    return path


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file() and (path / "manifest.parquet").is_file()


def _model_and_weights(options: ExtractOptions, existing_spec: dict | None) -> tuple[str, str]:
    """--model/--pretrained, falling back to the existing store's, then to ViT-B-16/openai.

    A store's `pretrained` is only ever an open_clip tag (or `none`): the store never names a file
    to load (a received store could ship weights that run code, or point at any file here).
    """
    model = options.model or (existing_spec or {}).get("model") or DEFAULT_MODEL
    pretrained = options.pretrained
    if pretrained is None:
        stored = (existing_spec or {}).get("pretrained")
        if stored and str(stored).startswith("file:"):
            raise ExtractError(
                f"{options.store} was extracted with weights file {stored[5:]}: pass it again "
                "with --pretrained PATH"
            )
        if stored and not _is_tag(str(model), str(stored)):
            raise ExtractError(
                f"{options.store}: the store's spec names pretrained {str(stored)[:80]!r}, which is "
                f"not an open_clip tag of {model}; pass --pretrained (a tag or your weights file)"
            )
        pretrained = stored or DEFAULT_PRETRAINED
    return model, pretrained


def _is_tag(model: str, pretrained: str) -> bool:
    import open_clip

    if pretrained.strip().lower() == "none":
        return True
    try:
        return bool(open_clip.get_pretrained_cfg(model, pretrained))
    except Exception:  # an unknown model: its tags cannot be checked
        return False


def _open_existing(path: Path, spec: dict, listing: DatasetListing) -> Any:
    from store import SpecMismatchError, open_store, spec_differences

    store = open_store(path, mode="a")
    try:
        differences = spec_differences(store.spec, spec)
        if differences:
            raise SpecMismatchError(
                f"{path} holds features with a different spec ({'; '.join(differences)}): "
                "use the same options or another --store"
            )
        if store.dataset != listing.dataset or store.classes != listing.classes:
            raise ExtractError(
                f"{path} was extracted from dataset {store.dataset!r} with other classes: "
                "use another --store"
            )
        stored_ids = store.manifest["video_id"].tolist()
        if stored_ids != listing.videos["video_id"].tolist():
            raise ExtractError(
                f"{path} lists {len(stored_ids)} videos but {listing.dataset} now lists "
                f"{len(listing.videos)} (different videos): use another --store"
            )
        # Videos are read from the listing of the user's data root, never from paths the store names.
        differs = store.manifest["relpath"].to_numpy() != listing.videos["relpath"].to_numpy()
        if differs.any():
            row = int(np.flatnonzero(differs)[0])
            raise ExtractError(
                f"{path}: row {row} names video file {str(store.manifest['relpath'].iat[row])[:80]!r}, "
                f"the dataset lists {listing.videos['relpath'].iat[row]!r}: use another --store"
            )
    except BaseException:
        store.close()
        raise
    return store


def _templates_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_")
    if not name:
        raise ExtractError(f"--templates {path}: cannot make an array name from the file name")
    return name


def add_text_embeddings(
    store_path: str,
    templates_file: str,
    model: str | None,
    pretrained: str | None,
    device: str,
    allow_torchscript: bool = False,
) -> tuple[str, tuple[int, ...]]:
    """`--text-only`: encode every class of an existing store under the templates in a file.

    Writes `text/<file stem>`; the model must be the store's (its weights' sha256 is checked).
    """
    from pipeline.encoder import load_clip
    from pipeline.text import encode_class_texts, load_templates
    from store import SpecMismatchError, open_store

    path = Path(store_path)
    templates = load_templates(templates_file)
    name = _templates_name(Path(templates_file))
    with open_store(path, mode="a") as store:
        options = ExtractOptions("", "", store_path, model=model, pretrained=pretrained)
        model_name, weights = _model_and_weights(options, store.spec)
        clip = load_clip(
            model_name, weights, device=resolve_device(device), allow_torchscript=allow_torchscript
        )
        if clip.model_name != store.spec["model"] or clip.weights_sha256 != store.spec.get(
            "weights_sha256"
        ):
            raise SpecMismatchError(
                f"{store_path} was extracted with {store.spec['model']} "
                f"({store.spec['pretrained']}); --model/--pretrained give {clip.model_name} "
                f"({clip.pretrained}): text features must come from the same model"
            )
        embeddings = encode_class_texts(clip.model, clip.tokenizer(), store.classes, templates)
        store.write_text(name, embeddings, templates)
    return name, tuple(embeddings.shape)


# Dask settings for the workers of our LocalCluster (`fsar-extract` without --scheduler; README,
# "Worker settings", says what to set on the workers of an existing cluster). Measured on 2 cores with
# ViT-B/16: the encoder's forward took 3.6 s per 8-frame video in a default Dask worker against
# 2.4 s in a plain loop. Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which pins glibc's
# mmap threshold at 128 KiB, so every activation is a fresh mmap (millions of page faults); keeping
# freed memory brought it to 2.9 s. Dask's statistical profiler (a thread that takes the GIL every
# 10 ms to walk the stacks) cost another 10%: 2.6 s.
WORKER_ENVIRON = {
    **MALLOC_ENVIRON,  # runtime.memory's policy: keep freed heap for the next forward
    "OMP_NUM_THREADS": "1",  # Dask's defaults, kept: tasks set torch threads themselves
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
LOCAL_WORKER_CONFIG = {
    "distributed.nanny.pre-spawn-environ": WORKER_ENVIRON,
    "distributed.worker.profile.enabled": False,
}


def _start_client(options: ExtractOptions, plan: ClusterPlan) -> tuple[Any, Any]:
    import dask
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout="20s")
        except OSError as error:
            raise ExtractError(
                f"--scheduler {options.scheduler}: cannot connect ({error}); start one with "
                "`dask scheduler` and `dask worker ADDRESS --resources encode=1`"
            ) from None
        return client, None
    with dask.config.set(LOCAL_WORKER_CONFIG):
        cluster = LocalCluster(
            n_workers=plan.workers,
            threads_per_worker=plan.threads_per_worker,
            processes=True,
            resources={"encode": 1},
            scheduler_kwargs={"dashboard": False},
            silence_logs=logging.ERROR,
        )
    return Client(cluster), cluster


def _torch_threads_for(client: Any, plan: ClusterPlan, scheduler: str | None) -> int:
    """Torch threads per worker: the plan's, or on an external cluster host cores / workers there."""
    if not scheduler:
        return plan.torch_threads
    cores = client.run(os.cpu_count)  # worker address -> cores of its host
    workers = client.scheduler_info().get("workers", {})
    per_host = Counter(w.get("host") for w in workers.values())
    shares = [
        max(1, (cores.get(address) or 1) // per_host[info.get("host")])
        for address, info in workers.items()
    ]
    return min(shares, default=1)


def _has_encode_resource(client: Any) -> bool:
    workers = client.scheduler_info().get("workers", {})
    return any("encode" in (w.get("resources") or {}) for w in workers.values())


def run_extraction(options: ExtractOptions) -> ExtractSummary:
    """Extract every selected, not-yet-ok video of the dataset into the store; return a summary."""
    from tqdm import tqdm

    from pipeline.encoder import FrameEncoder, export_last_block, load_clip
    from pipeline.text import EMP16_TEMPLATES, encode_class_texts
    from store import create_store
    from store.layout import LASTBLOCK_NAME, TEXT_DEFAULT, row_bytes

    started = time.perf_counter()
    store_path = check_store_option(options.store)
    splits = parse_splits(options.splits)
    part = parse_part(options.part)
    if options.timeout <= 0:
        raise ExtractError(f"--timeout {options.timeout}: use a positive number of seconds")
    listing = list_dataset(options.dataset, options.data_root)
    for note in listing.notes:
        print(f"note: {note}", flush=True)
    device = resolve_device(options.device)

    existing = None
    if _is_store(store_path):
        from store import open_store

        with open_store(store_path) as reader:
            existing = dict(reader.spec)
    model_name, weights = _model_and_weights(options, existing)
    if options.pretrained is not None and Path(weights).is_file():  # workers run elsewhere
        weights = str(Path(weights).resolve())
    clip = load_clip(model_name, weights, device="cpu", allow_torchscript=options.allow_torchscript)
    precision = FrameEncoder(clip, recipe=options.recipe, device=device).precision
    spec = build_run_spec(clip, options, device, precision)

    store = _open_existing(store_path, spec, listing) if existing is not None else None
    try:
        table = store.manifest if store is not None else listing.videos
        selected, todo = rows_to_extract(table, splits, part, options.retry_failed)
        summary = ExtractSummary(
            str(store_path),
            selected=int(selected.sum()),
            already_ok=int((selected & (table["status"] == "ok").to_numpy()).sum()),
            attempted=len(todo),
            ok=0,
        )
        estimate = check_disk_space(store_path, len(todo), row_bytes(spec))
        if store is None:
            store = create_store(
                store_path,
                spec,
                listing.classes,
                listing.videos,
                dataset=listing.dataset,
                split_source=listing.split_source,
            )
        spec = store.spec
        if TEXT_DEFAULT not in store.text_names:
            embeddings = encode_class_texts(clip.model, clip.tokenizer(), store.classes)
            store.write_text(TEXT_DEFAULT, embeddings, EMP16_TEMPLATES)
        if spec["recipe"] == "emp+last" and LASTBLOCK_NAME not in store.attrs.get("weights", {}):
            store.write_lastblock(*export_last_block(clip.model))
        del clip
        print(
            f"{store_path}: {len(todo)} videos to extract ({summary.already_ok} already ok), "
            f"about {estimate / 1e9:.2f} GB; model {spec['model']} ({spec['pretrained']}), "
            f"T={spec['frames']} V={spec['views']} recipe {spec['recipe']} on {device}",
            flush=True,
        )
        if todo:
            _run_tasks(store, options, device, precision, weights, todo, summary, tqdm)
        summary.seconds = time.perf_counter() - started
        return summary
    finally:
        if store is not None:
            store.close()


def rows_to_extract(
    table: pd.DataFrame,
    splits: list[str] | None,
    part: tuple[int, int] | None,
    retry_failed: bool,
) -> tuple[np.ndarray, list[int]]:
    """(mask of rows in --splits/--part, rows to run: selected and pending, or failed if retrying)."""
    selected = select_videos(table, splits, part).to_numpy()
    status = table["status"].to_numpy()
    todo = selected & ((status == "pending") | ((status == "failed") & retry_failed))
    return selected, np.flatnonzero(todo).tolist()


def _run_tasks(
    store: Any,
    options: ExtractOptions,
    device: str,
    precision: str,
    weights: str,
    todo: list[int],
    summary: ExtractSummary,
    tqdm: Any,
) -> None:
    """Submit decode -> encode tasks with a bounded window, commit updates, show progress."""
    from distributed import as_completed

    spec = store.spec
    manifest = store.manifest
    data_root = Path(options.data_root)
    per_video_frames = spec["frames"] * spec["views"]
    if options.batch_size is not None and options.batch_size < 1:
        raise ExtractError(f"--batch-size {options.batch_size}: use at least 1")
    batch_frames = options.batch_size or (256 if device == "cuda" else per_video_frames)
    videos_per_task = 1 if device == "cpu" else max(1, batch_frames // per_video_frames)
    plan = plan_cluster(device, options.workers)
    client, cluster = _start_client(options, plan)
    try:
        config = EncoderConfig(
            model=spec["model"],
            pretrained=weights,
            weights_sha256=spec["weights_sha256"],
            recipe=spec["recipe"],
            layers=tuple(spec["layers"]),
            device=device,
            precision=precision,
            torch_threads=_torch_threads_for(client, plan, options.scheduler),
            batch_frames=batch_frames,
            batch_across_videos=device != "cpu",
            allow_torchscript=options.allow_torchscript,
        )
        resources = {"encode": 1} if _has_encode_resource(client) else None
        n_workers = max(1, len(client.scheduler_info().get("workers", {})))
        window = max(4, n_workers * (plan.threads_per_worker + 2)) * videos_per_task
        queue = deque(todo)
        running = as_completed()
        rows_of: dict[Any, list[int]] = {}

        def submit_next() -> None:
            rows = [queue.popleft() for _ in range(min(videos_per_task, len(queue)))]
            decoded = [
                client.submit(
                    decode_task,
                    DecodeRequest(
                        path=str(video_path(data_root, manifest.at[row, "relpath"])),
                        video_id=str(manifest.at[row, "video_id"]),
                        frames=spec["frames"],
                        views=spec["views"],
                    ),
                    spec["preprocess"],
                    config,
                    options.timeout,
                    bool(manifest.at[row, "split"] == "train"),
                    pure=False,
                    retries=TASK_RETRIES,
                )
                for row in rows
            ]
            encoded = client.submit(
                encode_task,
                rows,
                decoded,
                config,
                str(store.location.local),
                pure=False,
                retries=TASK_RETRIES,
                resources=resources,
                priority=10,
            )
            rows_of[encoded] = rows
            running.add(encoded)

        in_flight = lambda: sum(len(r) for r in rows_of.values())  # noqa: E731
        while queue and in_flight() < window:
            submit_next()
        pending_updates: list[dict[str, Any]] = []
        last_commit = time.monotonic()
        bar = tqdm(total=len(todo), unit="video", disable=not options.progress, smoothing=0.1)
        loop_started = time.monotonic()
        try:
            for future in running:
                rows = rows_of.pop(future)
                try:
                    updates = future.result()
                except Exception as error:  # the task failed even after retries
                    reason = f"worker error: {type(error).__name__}: {error}".splitlines()[0]
                    updates = [_failed_update(row, None, reason[:240]) for row in rows]
                for update in updates:
                    if update["status"] == "ok":
                        summary.ok += 1
                        summary.frames += per_video_frames
                    else:
                        summary.failed[update["error"]] += 1
                pending_updates += updates
                bar.update(len(updates))
                elapsed = max(time.monotonic() - loop_started, 1e-9)
                done = summary.ok + sum(summary.failed.values())
                bar.set_postfix(
                    {
                        "videos/s": f"{done / elapsed:.2f}",
                        "frames/s": f"{summary.frames / elapsed:.1f}",
                        "failed": sum(summary.failed.values()),
                    },
                    refresh=False,
                )
                now = time.monotonic()
                if len(pending_updates) >= COMMIT_EVERY_ROWS or now - last_commit > COMMIT_EVERY_S:
                    store.commit(pending_updates)
                    pending_updates, last_commit = [], now
                while queue and in_flight() < window:
                    submit_next()
        finally:
            if pending_updates:
                store.commit(pending_updates)
            bar.close()
    finally:
        try:
            client.run(close_decoders)
        except Exception:  # workers already gone: their children die with their pipes
            pass
        client.close()
        if cluster is not None:
            cluster.close()
