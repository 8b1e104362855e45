"""Exact frame decoding with PyAV: keyframe-aware seeking where provably exact, else sequential.

Why PyAV and not decord, the seek rule, and what each failure reason means: docs/extraction.md.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.sampling import sample_frame_indices
from pipeline.seeking import NotExact, decode_frames, index_packets

DECODER_NAME = "pyav-seq"  # sequential from frame 0: the reference and the fallback
SEEK_DECODER_NAME = "pyav-seek"  # pipeline/seeking.py, used only where it proves exactness
DECODE_MODES = ("seek", "sequential")
TRUNCATED_FRACTION = 0.9
# Test hook: a video whose path contains $FSAR_TEST_HANG_DECODE hangs the decoder (like native code
# stuck on a bad file); $FSAR_TEST_HANG_MARKER names a file touched when it does.
HANG_ENV = "FSAR_TEST_HANG_DECODE"
HANG_MARKER_ENV = "FSAR_TEST_HANG_MARKER"
# Decoded frames are kept (as compact YUV frames) up to this many bytes; longer videos are decoded a
# second time, sequentially again, keeping only the sampled frames.
KEEP_FRAMES_BYTES = 512 << 20


class VideoError(Exception):
    """A video that cannot be used; `reason` is the short text stored in the manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class SampledVideo:
    """Frames of one video at the sampled indices."""

    frames: np.ndarray  # (V, T, H, W, 3) uint8 RGB
    indices: list[list[int]]
    n_frames: int  # frames that actually decoded
    declared_frames: int  # what the container says (0 if unknown)
    fps: float
    decoder: str = DECODER_NAME
    frames_decoded: int = 0  # frames that came out of the decoder (all passes)


def check_file(path: Path) -> None:
    """Raise `VideoError` for a path that is missing, empty or unreadable."""
    if not path.exists():
        raise VideoError("missing")
    if path.is_dir():
        raise VideoError("unreadable")
    try:
        size = path.stat().st_size
    except OSError:
        raise VideoError("unreadable") from None
    if size == 0:
        raise VideoError("empty")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError:
        raise VideoError("unreadable") from None


def _ebml_vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int, bool]:
    """Read an EBML variable-length integer: (value, new position, all value bits set)."""
    first = data[pos]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    if length > 8 or pos + length > len(data):
        raise ValueError("bad EBML integer")
    value = first if keep_marker else first & (0xFF >> length)
    for byte in data[pos + 1 : pos + length]:
        value = (value << 8) | byte
    all_ones = value == (1 << (7 * length)) - 1
    return value, pos + length, all_ones


def container_is_cut_short(path: Path) -> bool:
    """Whether the container's own size fields promise more bytes than the file has.

    Understands RIFF (AVI), ISO BMFF (MP4/MOV) top-level boxes and the EBML Segment (WebM/MKV);
    False for anything else.
    """
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
        if head[:4] == b"RIFF" and len(head) >= 8:
            return file_size < int.from_bytes(head[4:8], "little") + 8
        if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
            offset = 0
            while offset + 8 <= file_size:
                handle.seek(offset)
                box = handle.read(16)
                size = int.from_bytes(box[:4], "big")
                if size == 1 and len(box) >= 16:
                    size = int.from_bytes(box[8:16], "big")
                elif size == 0:
                    return False
                if size < 8:
                    return False
                if offset + size > file_size:
                    return True
                offset += size
            return False
    if head[:4] == b"\x1a\x45\xdf\xa3":
        try:
            _, pos, _ = _ebml_vint(head, 0, keep_marker=True)
            header_size, pos, _ = _ebml_vint(head, pos, keep_marker=False)
            pos += header_size
            element_id, pos, _ = _ebml_vint(head, pos, keep_marker=True)
            if element_id != 0x18538067:
                return False
            segment_size, pos, unknown = _ebml_vint(head, pos, keep_marker=False)
        except (ValueError, IndexError):
            return False
        return not unknown and file_size < pos + segment_size
    return False


def _open_container(path: Path) -> Any:
    import av

    try:
        return av.open(str(path), mode="r")
    except PermissionError:
        raise VideoError("unreadable") from None
    except (av.error.InvalidDataError, av.error.EOFError):
        raise VideoError("truncated" if container_is_cut_short(path) else "not a video") from None
    except (av.error.FFmpegError, OSError) as error:
        if container_is_cut_short(path):
            raise VideoError("truncated") from None
        return _raise_decode_error(error)


def _raise_decode_error(error: Exception) -> Any:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise VideoError(f"decode error: {message[:200]}")


def _declared_frames(container: Any, stream: Any) -> int:
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        return 0
    if stream.duration is not None and stream.time_base is not None:
        return int(round(float(stream.duration * stream.time_base) * float(rate)))
    if container.duration:
        return int(round(container.duration / 1_000_000 * float(rate)))
    return 0


def decode_pass(path: Path, keep: set[int] | None, keep_bytes: int) -> tuple[list[Any] | None, int]:
    """Decode `path` sequentially from the start. Returns (kept frames or None, frames decoded).

    `keep=None`: keep every frame while their total size stays under `keep_bytes` (else keep none and
    only count). Otherwise keep the frames whose index is in `keep` and stop after the last one.
    """
    import av

    container = _open_container(path)
    try:
        stream, _ = _video_stream(container)
        kept: list[Any] | None = []
        kept_size = 0
        count = 0
        last_needed = max(keep) if keep else -1
        try:
            for frame in container.decode(stream):
                if keep is None:
                    if kept is not None:
                        kept_size += frame.width * frame.height * 3 // 2
                        if kept_size > keep_bytes:
                            kept = None
                        else:
                            kept.append(frame)
                elif count in keep:
                    kept.append(frame)
                count += 1
                if keep is not None and count > last_needed:
                    break
        except av.error.FFmpegError as error:
            # A damaged packet ends the stream; what decoded so far is judged by the caller.
            if count == 0:
                _raise_decode_error(error)
        return kept, count
    finally:
        container.close()


def _video_stream(container: Any) -> tuple[Any, float]:
    """The first video stream and its frame rate (0.0 when the container gives none)."""
    if not container.streams.video:
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    return stream, float(rate) if rate else 0.0


def _stream_info(path: Path) -> tuple[int, float]:
    container = _open_container(path)
    try:
        stream, fps = _video_stream(container)
        return _declared_frames(container, stream), fps
    finally:
        container.close()


def _decode_seek(path: Path, frames: int, views: int, video_id: str) -> SampledVideo:
    """The seek path (pipeline/seeking.py); raises `NotExact` where only sequential is exact."""
    if container_is_cut_short(path):
        raise NotExact("container cut short")
    container = _open_container(path)
    try:
        stream, fps = _video_stream(container)
        declared = _declared_frames(container, stream)
        index = index_packets(container, stream, int(stream.frames or 0))
        n_frames = index.n_frames
        if declared > 0 and n_frames < TRUNCATED_FRACTION * declared:
            raise NotExact("fewer packets than declared frames")
        indices = sample_frame_indices(n_frames, frames, views, video_id)
        kept, decoded = decode_frames(stream.codec_context, index, [i for v in indices for i in v])
        by_index = {i: _to_rgb(frame) for i, frame in kept.items()}
    finally:
        container.close()
    stacked = np.stack([np.stack([by_index[i] for i in view]) for view in indices])
    return SampledVideo(stacked, indices, n_frames, declared, fps, SEEK_DECODER_NAME, decoded)


def _to_rgb(frame: Any) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def decode_sampled(
    path: str | Path,
    frames: int,
    views: int,
    video_id: str,
    keep_bytes: int = KEEP_FRAMES_BYTES,
    mode: str = "seek",
) -> SampledVideo:
    """Decode `path` and return the frames at `sample_frame_indices` of its decoded count.

    `mode="seek"` tries the seek path and decodes sequentially where it cannot prove exactness
    (`decoder` says which ran); `"sequential"` always decodes from frame 0. Raises `VideoError`
    with a short reason for unusable files.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}: use one of {', '.join(DECODE_MODES)}")
    path = Path(path)
    check_file(path)
    hang = os.environ.get(HANG_ENV)
    if hang and hang in str(path):
        if os.environ.get(HANG_MARKER_ENV):  # lets a test see that the child is stuck
            Path(os.environ[HANG_MARKER_ENV]).touch()
        while True:  # test hook: behave like a decoder stuck in native code
            time.sleep(3600)
    if mode == "seek":
        try:
            return _decode_seek(path, frames, views, video_id)
        except NotExact:
            pass
    declared, fps = _stream_info(path)
    all_frames, n_decoded = decode_pass(path, None, keep_bytes)
    if n_decoded == 0:
        raise VideoError(
            "truncated" if container_is_cut_short(path) else "decode error: no frame decoded"
        )
    if declared > 0 and n_decoded < TRUNCATED_FRACTION * declared:
        raise VideoError("truncated")
    indices = sample_frame_indices(n_decoded, frames, views, video_id)
    needed = sorted({i for view in indices for i in view})
    decoded = n_decoded
    if all_frames is not None:
        by_index = {i: _to_rgb(all_frames[i]) for i in needed}
    else:
        kept, second = decode_pass(path, set(needed), keep_bytes)
        decoded += second
        if kept is None or len(kept) != len(needed):
            raise VideoError("decode error: second decoding pass returned fewer frames")
        by_index = {i: _to_rgb(frame) for i, frame in zip(needed, kept, strict=True)}
    stacked = np.stack([np.stack([by_index[i] for i in view]) for view in indices])
    return SampledVideo(stacked, indices, n_decoded, declared, fps, DECODER_NAME, decoded)
