"""What a worker does for one video: decode and preprocess it, then encode it and write its row.

Plain functions with a per-process model cache; they know nothing about Dask (pipeline/cluster.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.decode_child import DecodeOutcome, DecodeRequest, decode_in_child

if TYPE_CHECKING:  # imported where used: workers load them once, on first use
    from pipeline.encoder import FrameEncoder
    from store import ChunkWriter


@dataclass(frozen=True)
class EncoderConfig:
    """How a worker builds its encoder (hashable: the key of the per-process model cache)."""

    model: str
    pretrained: str  # as given: tag, "none" or a weights file path
    weights_sha256: str
    recipe: str
    layers: tuple[int, ...]
    device: str  # "cpu", "cuda" or "cuda:N" (pipeline.cluster gives each worker its GPU)
    precision: str
    torch_threads: int
    batch_frames: int
    batch_across_videos: bool  # CUDA: one forward over several videos' frames; CPU: one per video
    allow_torchscript: bool = False
    taps: tuple[int, ...] = ()  # recipes with ts


_encoders: dict[EncoderConfig, Any] = {}
_transforms: dict[str, Any] = {}
_writers: dict[str, Any] = {}
_worker_lock = threading.Lock()  # one model load and one forward at a time per worker process


def _worker_encoder(config: EncoderConfig) -> FrameEncoder:
    """This process's encoder for `config`, loaded on first use (once per worker)."""
    encoder = _encoders.get(config)
    if encoder is None:
        from pipeline.encoder import FrameEncoder
        from pipeline.model import load_clip

        _set_torch_threads(config.torch_threads)
        clip = load_clip(
            config.model,
            config.pretrained,
            device=config.device,
            allow_torchscript=config.allow_torchscript,
        )
        if clip.weights_sha256 != config.weights_sha256:
            raise RuntimeError(
                f"weights on this worker (sha256 {clip.weights_sha256[:12]}) differ from the "
                f"store's ({config.weights_sha256[:12]})"
            )
        encoder = FrameEncoder(
            clip,
            recipe=config.recipe,
            layers=list(config.layers),
            precision=config.precision,
            taps=list(config.taps) or None,
        )
        _encoders[config] = encoder
    return encoder


def _chunk_writer(store_path: str) -> ChunkWriter:
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
    # One thread (torch's count is per calling thread): on CPU the other task thread's forward
    # holds every core, and a second team of threads would stall its barriers.
    _set_torch_threads(1 if config.device == "cpu" else config.torch_threads)
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


def failed_update(row: int, outcome: DecodeOutcome | None, error: str) -> dict[str, Any]:
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
        _set_torch_threads(config.torch_threads)  # this thread may have preprocessed on one
        writer = _chunk_writer(store_path)
        updates: list[dict[str, Any]] = []
        good = [(r, o) for r, o in zip(rows, outcomes, strict=True) if o.error is None]
        updates += [
            failed_update(r, o, str(o.error))
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
                updates.append(failed_update(row, outcome, f"write error: {error}"[:240]))
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
