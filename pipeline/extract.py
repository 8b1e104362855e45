"""fsar-extract's driver: list the dataset, fix the spec, create or resume the store, run, summarise.

The Dask runner is pipeline/cluster.py and the tasks pipeline/tasks.py; details: docs/extraction.md.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.datasets import (
    DatasetListing,
    list_dataset,
    parse_part,
    parse_splits,
    select_videos,
)
from pipeline.decoding import DECODE_MODES
from pipeline.errors import ExtractError

if TYPE_CHECKING:  # imported where used: `fsar-extract --help` stays fast
    from pipeline.model import LoadedClip
    from store import FeatureStore

DISK_MARGIN = 1.05  # chunks are compressed, so the uncompressed size plus 5% is an upper bound


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


def build_run_spec(clip: LoadedClip, options: ExtractOptions, device: str, precision: str) -> dict:
    """The store spec for this run (docs/design.md names)."""
    from pipeline.preprocess import PREPROCESS_NAMES, preprocess_spec
    from runtime.versions import versions
    from store.layout import build_spec

    if options.preprocess not in PREPROCESS_NAMES:
        raise ExtractError(
            f"--preprocess {options.preprocess!r}: use {', '.join(PREPROCESS_NAMES)}"
        )
    parts = recipe_of(options)
    if options.frames < 1 or options.views < 1:
        raise ExtractError("--frames and --views must be at least 1")
    fields = clip.spec_fields()
    taps = parse_taps(options.taps, clip.depth) if "ts" in parts else None
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
        taps=taps,
        depth=clip.depth if "ts" in parts else None,
        device=device,
        precision=precision,
        versions=versions("torch", "open_clip", "fsar"),
    )


def recipe_of(options: ExtractOptions) -> frozenset[str]:
    """The recipe's components; --taps and --side-pca only with ts (one-line errors)."""
    from pipeline.side_init import PCA_METHODS
    from store.layout import RECIPES, recipe_parts

    try:
        parts = recipe_parts(options.recipe)
    except ValueError:
        raise ExtractError(
            f"--recipe {options.recipe!r}: use one of {', '.join(RECIPES)}"
        ) from None
    for flag, value in (("--taps", options.taps), ("--side-pca", options.side_pca)):
        if value is not None and "ts" not in parts:
            raise ExtractError(f"{flag} is for recipes with ts (e.g. --recipe emp+ts)")
    if options.side_pca is not None and options.side_pca not in PCA_METHODS:
        raise ExtractError(f"--side-pca {options.side_pca!r}: use {' or '.join(PCA_METHODS)}")
    return parts


def parse_taps(text: str | None, depth: int) -> list[int]:
    """--taps `0,4,8,12` (default: every tap 0..depth), checked against the model's depth."""
    from store.layout import check_taps, default_taps

    if text is None:
        return default_taps(depth)
    try:
        return check_taps([int(t) for t in text.split(",")], depth)
    except ValueError:
        raise ExtractError(
            f"--taps {text}: give at least two increasing ints within 0..{depth} (0 = the ln_pre "
            f"output, k = block k's output), e.g. --taps 0,{depth // 3},{2 * depth // 3},{depth}"
        ) from None


def write_side_init(store: FeatureStore, clip: LoadedClip, method: str | None) -> None:
    """TS-FSAR's side-network init into the store, once (a different --side-pca is refused)."""
    from pipeline.side_init import export_side_init
    from store.layout import TSFSAR_INIT_NAME

    if TSFSAR_INIT_NAME in store.attrs.get("weights", {}):
        stored = store.read_tsfsar_init()[1]["pca"]["method"]
        if method is not None and stored != method:
            raise ExtractError(
                f"{store.location.describe()} holds a side-network init made with --side-pca "
                f"{stored}: leave --side-pca out, or extract into another --store"
            )
        return
    print(f"{store.location.describe()}: computing the side-network init (PCA)", flush=True)
    store.write_tsfsar_init(
        *export_side_init(clip.model, clip.model_name, clip.pretrained, method or "released")
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


def _open_existing(path: Path, spec: dict, listing: DatasetListing) -> FeatureStore:
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


def run_extraction(options: ExtractOptions) -> ExtractSummary:
    """Extract every selected, not-yet-ok video of the dataset into the store; return a summary."""
    from pipeline.cluster import run_tasks
    from pipeline.descriptions import check_coverage, load_descriptions, write_descriptions
    from pipeline.encoder import FrameEncoder, export_last_block
    from pipeline.model import load_clip, resolve_device
    from pipeline.text import EMP16_TEMPLATES, encode_class_texts
    from pipeline.weights import choose_weights
    from store import create_store
    from store.layout import LASTBLOCK_NAME, TEXT_DEFAULT, row_bytes

    started = time.perf_counter()
    store_path = check_store_option(options.store)
    splits = parse_splits(options.splits)
    part = parse_part(options.part)
    if options.timeout <= 0:
        raise ExtractError(f"--timeout {options.timeout}: use a positive number of seconds")
    if options.decode not in DECODE_MODES:
        raise ExtractError(f"--decode {options.decode}: use one of {', '.join(DECODE_MODES)}")
    parts = recipe_of(options)
    listing = list_dataset(options.dataset, options.data_root)
    for note in listing.notes:
        print(f"note: {note}", flush=True)
    descriptions = None
    if options.class_descriptions:
        descriptions = load_descriptions(options.class_descriptions)
        check_coverage(descriptions, listing.classes)
    device = resolve_device(options.device)

    existing = None
    if _is_store(store_path):
        from store import open_store

        with open_store(store_path) as reader:
            existing = dict(reader.spec)
    model_name, weights = choose_weights(options.model, options.pretrained, existing, options.store)
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
        if descriptions is not None:
            for line in write_descriptions(store, clip, descriptions):
                print(line, flush=True)
        if "last" in parts and LASTBLOCK_NAME not in store.attrs.get("weights", {}):
            store.write_lastblock(*export_last_block(clip.model))
        if "ts" in parts:
            write_side_init(store, clip, options.side_pca)
        del clip
        print(
            f"{store_path}: {len(todo)} videos to extract ({summary.already_ok} already ok), "
            f"about {estimate / 1e9:.2f} GB; model {spec['model']} ({spec['pretrained']}), "
            f"T={spec['frames']} V={spec['views']} recipe {spec['recipe']} on {device}",
            flush=True,
        )
        if todo:
            run_tasks(store, options, device, precision, weights, todo, summary)
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
