"""Frame sampling and exact frame decoding, run in a persistent child process that can be killed.

Exactness comes from the method: every video is decoded sequentially with PyAV from the first frame
(no seeking), frames are counted as they come out of the decoder, indices are sampled over the frames
that actually decoded, and the frames at those indices are returned. decord's seeking `get_batch` is
not used: it silently returns wrong frames on some MPEG-4 Part 2 AVIs with B-frames and can hang in
native code when the container's frame count is wrong.

decord is not offered even sequentially (`VideoReader.next()` from frame 0; `get_batch` over 0..k is the
same code path): it picks the right frames on the generated h264 mp4, VP9 webm and MPEG-4 AVI files, but
(1) its bundled FFmpeg 4.1 decodes MPEG-4 Part 2 with small pixel differences from PyAV's FFmpeg (a +-1
in the generated test AVI; the RGB conversion itself is identical: decord reading PyAV's decoded YUV
written losslessly gives PyAV's RGB bit for bit), (2) its `next()` is not seek-free by construction:
when the decoder drains before the container's packet count is reached, `NextFrameImpl` calls
`SeekAccurate` and returns frames from the seek, and (3) it is slower per core (`decode_fps`).
`tests/test_video.py` runs it in a subprocess to show (1).

Sampling (`sample_frame_indices`): View 0 takes the centre frame of each of T equal segments; views
1..V-1 take a random frame per segment as the released EMP-Net code does (T segments of `n // T`
frames from frame 0, the last `n % T` frames never used), seeded from a stable hash of `video_id` and
the view number. Videos shorter than `frames` repeat frames; a 1-frame video is therefore `ok` with
its single frame repeated T times.

Failure reasons (short strings stored in the manifest's `error`): `missing`, `empty`, `unreadable`,
`not a video`, `no video stream`, `truncated` (decodes to < 90% of the frames its container declares),
`timeout`, `decode error: ...`.

`DecoderProcess` runs decoding in a child Python process (it imports only PyAV and numpy, so it
starts in a fraction of a second), restarted after a timeout or crash. Only the sampled RGB frames
cross the pipe: for the usual 320x240 / 340x256 videos that is less than the preprocessed float
tensors would be, so preprocessing runs in the caller (`pipeline.preprocess`). Test hook: when the environment variable
`FSAR_TEST_HANG_DECODE` is a substring of a video's path, the child hangs on that video (and touches
the file `FSAR_TEST_HANG_MARKER` names, if set).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.hashing import stable_hash

DECODER_NAME = "pyav-seq"
TRUNCATED_FRACTION = 0.9
HANG_ENV = "FSAR_TEST_HANG_DECODE"
HANG_MARKER_ENV = "FSAR_TEST_HANG_MARKER"
# Decoded frames are kept (as compact YUV frames) up to this many bytes; longer videos are decoded a
# second time, sequentially again, keeping only the sampled frames.
KEEP_FRAMES_BYTES = 512 << 20
CHILD_START_TIMEOUT_S = 120.0


class VideoError(Exception):
    """A video that cannot be used; `reason` is the short text stored in the manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sample_frame_indices(n_frames: int, frames: int, views: int, video_id: str) -> list[list[int]]:
    """Frame indices: `views` lists of `frames` indices in `[0, n_frames)`, non-decreasing.

    View 0: centre of each of `frames` equal segments. Views 1..: one uniformly random frame per
    segment of `n_frames // frames` frames (EMP-Net's `_interval_based_sampling` with SAMPLING_RATE > 40:
    `randint(i * interval, i * interval + interval - 1)`), from a generator seeded by
    `stable_hash(video_id)` and the view number (same on every machine). Videos shorter than `frames`
    (where the released code fails) draw from equal fractional segments instead, repeating frames.
    """
    if n_frames < 1:
        raise ValueError("n_frames must be at least 1")
    if frames < 1 or views < 1:
        raise ValueError("frames and views must be at least 1")
    segment = n_frames / frames
    starts = [segment * i for i in range(frames)]
    result = [[min(n_frames - 1, int(start + segment / 2)) for start in starts]]
    seed = stable_hash(video_id)
    interval = n_frames // frames
    for view in range(1, views):
        rng = np.random.default_rng([seed, view])
        indices = []
        for i, start in enumerate(starts):
            if interval >= 1:
                low, high = i * interval, (i + 1) * interval
            else:
                low = int(start)
                high = max(low + 1, int(start + segment))
            indices.append(min(n_frames - 1, int(rng.integers(low, high))))
        result.append(indices)
    return result


@dataclass
class SampledVideo:
    """Frames of one video at the sampled indices."""

    frames: np.ndarray  # (V, T, H, W, 3) uint8 RGB
    indices: list[list[int]]
    n_frames: int  # frames that actually decoded
    declared_frames: int  # what the container says (0 if unknown)
    fps: float
    decoder: str = DECODER_NAME


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


def _decode_pass(
    path: Path, keep: set[int] | None, keep_bytes: int
) -> tuple[list[Any] | None, int]:
    """Decode `path` sequentially from the start. Returns (kept frames or None, frames decoded).

    `keep=None`: keep every frame while their total size stays under `keep_bytes` (else keep none and
    only count). Otherwise keep the frames whose index is in `keep` and stop after the last one.
    """
    import av

    container = _open_container(path)
    try:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
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


def _stream_info(path: Path) -> tuple[int, float]:
    container = _open_container(path)
    try:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return _declared_frames(container, stream), float(rate) if rate else 0.0
    finally:
        container.close()


def _to_rgb(frame: Any) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def decode_sampled(
    path: str | Path, frames: int, views: int, video_id: str, keep_bytes: int = KEEP_FRAMES_BYTES
) -> SampledVideo:
    """Decode `path` sequentially and return the frames at `sample_frame_indices` of its decoded count.

    Raises `VideoError` with a short reason for unusable files.
    """
    path = Path(path)
    check_file(path)
    hang = os.environ.get(HANG_ENV)
    if hang and hang in str(path):
        if os.environ.get(HANG_MARKER_ENV):  # lets a test see that the child is stuck
            Path(os.environ[HANG_MARKER_ENV]).touch()
        while True:  # test hook: behave like a decoder stuck in native code
            time.sleep(3600)
    declared, fps = _stream_info(path)
    all_frames, n_decoded = _decode_pass(path, None, keep_bytes)
    if n_decoded == 0:
        raise VideoError(
            "truncated" if container_is_cut_short(path) else "decode error: no frame decoded"
        )
    if declared > 0 and n_decoded < TRUNCATED_FRACTION * declared:
        raise VideoError("truncated")
    indices = sample_frame_indices(n_decoded, frames, views, video_id)
    needed = sorted({i for view in indices for i in view})
    if all_frames is not None:
        by_index = {i: _to_rgb(all_frames[i]) for i in needed}
    else:
        kept, _ = _decode_pass(path, set(needed), keep_bytes)
        if kept is None or len(kept) != len(needed):
            raise VideoError("decode error: second decoding pass returned fewer frames")
        by_index = {i: _to_rgb(frame) for i, frame in zip(needed, kept, strict=True)}
    stacked = np.stack([np.stack([by_index[i] for i in view]) for view in indices])
    return SampledVideo(stacked, indices, n_decoded, declared, fps)


# ------------------------------------------------------------------------------ decode child process


@dataclass
class DecodeRequest:
    """One video to decode: where, its id (seeds the random views), frames per view and views."""

    path: str
    video_id: str
    frames: int
    views: int


@dataclass
class DecodeOutcome:
    """Result of decoding one video: `pixels` is set when `error` is None."""

    error: str | None
    pixels: np.ndarray | None = (
        None  # (V, T, 3, S, S) float32, or (V, T, H, W, 3) uint8 without preprocess
    )
    indices: list[list[int]] = field(default_factory=list)
    n_frames: int = 0
    fps: float = 0.0
    decoder: str = DECODER_NAME
    seconds: float = 0.0


def decode_request(request: DecodeRequest) -> DecodeOutcome:
    """Decode one video in this process. Unusable videos give an outcome with `error`."""
    started = time.perf_counter()
    try:
        sampled = decode_sampled(request.path, request.frames, request.views, request.video_id)
    except VideoError as error:
        return DecodeOutcome(error.reason, seconds=time.perf_counter() - started)
    except MemoryError:
        return DecodeOutcome("decode error: out of memory", seconds=time.perf_counter() - started)
    return DecodeOutcome(
        None,
        pixels=np.ascontiguousarray(sampled.frames),
        indices=sampled.indices,
        n_frames=sampled.n_frames,
        fps=sampled.fps,
        decoder=sampled.decoder,
        seconds=time.perf_counter() - started,
    )


def _die_with_parent(parent: int) -> None:
    """Exit when the process that started us is gone (even while stuck decoding a video)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:  # PR_SET_PDEATHSIG: the kernel sends SIGKILL when the parent dies
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


def _serve(parent: int) -> None:
    """Child loop: one JSON request per line on stdin; a JSON header line then raw bytes on stdout."""
    _die_with_parent(parent)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            request = DecodeRequest(**json.loads(line))
            outcome = decode_request(request)
        except Exception as error:  # report, never die on one video
            outcome = DecodeOutcome(f"decode error: {type(error).__name__}: {error}"[:240])
        header: dict[str, Any] = {
            "error": outcome.error,
            "indices": outcome.indices,
            "n_frames": outcome.n_frames,
            "fps": outcome.fps,
            "decoder": outcome.decoder,
            "seconds": outcome.seconds,
        }
        payload = b""
        if outcome.pixels is not None:
            header["dtype"] = outcome.pixels.dtype.str
            header["shape"] = list(outcome.pixels.shape)
            payload = outcome.pixels.tobytes()
        header["nbytes"] = len(payload)
        out.write(json.dumps(header).encode() + b"\n")
        out.write(payload)
        out.flush()


class DecoderProcess:
    """A persistent child process that decodes videos; killed and restarted when one times out."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.video", "--serve", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self._buffer = b""
        ready = self._read_line(time.monotonic() + CHILD_START_TIMEOUT_S)
        if ready is None or not json.loads(ready).get("ready"):
            self.close()
            raise RuntimeError("the decoder process did not start")

    def _read_more(self, deadline: float) -> bool:
        assert self._proc is not None and self._proc.stdout is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        fd = self._proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return False
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise EOFError
        self._buffer += chunk
        return True

    def _read_line(self, deadline: float) -> bytes | None:
        while b"\n" not in self._buffer:
            if not self._read_more(deadline):
                return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _read_exact(self, size: int, deadline: float) -> bytearray | None:
        """`size` bytes (a writable buffer, so numpy arrays over it are writable), or None at deadline."""
        assert self._proc is not None and self._proc.stdout is not None
        data = bytearray(size)
        view = memoryview(data)
        have = min(size, len(self._buffer))
        view[:have] = self._buffer[:have]
        self._buffer = self._buffer[have:]
        fd = self._proc.stdout.fileno()
        while have < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            got = os.readv(fd, [view[have:]])
            if not got:
                raise EOFError
            have += got
        return data

    def decode(self, request: DecodeRequest, timeout: float) -> DecodeOutcome:
        """Decode one video in the child; a video that takes longer than `timeout` s gives `timeout`."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        try:
            self._proc.stdin.write(json.dumps(request.__dict__).encode() + b"\n")
            self._proc.stdin.flush()
            line = self._read_line(deadline)
            if line is None:
                self.close()
                return DecodeOutcome("timeout", seconds=time.perf_counter() - started)
            header = json.loads(line)
            payload = self._read_exact(header["nbytes"], deadline)
            if payload is None:
                self.close()
                return DecodeOutcome("timeout", seconds=time.perf_counter() - started)
        except (EOFError, BrokenPipeError):
            code = self._proc.wait() if self._proc else None
            self.close()
            return DecodeOutcome(
                f"decode error: decoder process exited with code {code}",
                seconds=time.perf_counter() - started,
            )
        except (OSError, ValueError):  # pipes closed by `close()` from another thread (shutdown)
            self.close()
            return DecodeOutcome(
                "decode error: decoder process stopped", seconds=time.perf_counter() - started
            )
        pixels = None
        if header["error"] is None:
            pixels = np.frombuffer(payload, dtype=np.dtype(header["dtype"]))
            pixels = pixels.reshape(header["shape"])
        return DecodeOutcome(
            header["error"],
            pixels=pixels,
            indices=header["indices"],
            n_frames=header["n_frames"],
            fps=header["fps"],
            decoder=header["decoder"],
            seconds=time.perf_counter() - started,
        )

    def close(self) -> None:
        """Kill the child process (if any)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
        self._proc = None
        self._buffer = b""

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_local = threading.local()
_all_decoders: list[DecoderProcess] = []


def decode_in_child(request: DecodeRequest, timeout: float) -> DecodeOutcome:
    """Decode with this thread's persistent `DecoderProcess` (started on first use)."""
    decoder = getattr(_local, "decoder", None)
    if decoder is None:
        decoder = DecoderProcess()
        _local.decoder = decoder
        _all_decoders.append(decoder)
    return decoder.decode(request, timeout)


def close_decoders() -> int:
    """Stop every decode child this process started through `decode_in_child`; returns how many."""
    for decoder in _all_decoders:
        decoder.close()
    return len(_all_decoders)


# ------------------------------------------------------------------------------ decode throughput

FPS_DECODERS = ("pyav", "decord")


def _measure_fps(path: str, decoder: str, repeats: int) -> dict[str, float]:
    """Run in the `--fps` child: decode `path` sequentially `repeats` times after one warm-up pass."""
    import resource

    if decoder == "pyav":

        def one_pass() -> int:
            # the extraction's own first pass: every frame decoded, none converted to RGB
            return _decode_pass(Path(path), None, 0)[1]

    else:
        import decord  # only ever in this child: its FFmpeg libraries can break PyAV's encoders

        def one_pass() -> int:
            reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            count = 0
            while True:
                try:
                    reader.next()  # sequential from frame 0; decord converts every frame to RGB
                except StopIteration:
                    return count
                count += 1

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    frames = one_pass()
    cpu_start, wall_start = cpu(), time.perf_counter()
    total = sum(one_pass() for _ in range(repeats))
    cpu_s, wall_s = cpu() - cpu_start, time.perf_counter() - wall_start
    return {
        "frames": float(frames),
        "fps_per_core": total / max(cpu_s, 1e-9),
        "fps_wall": total / max(wall_s, 1e-9),
        "cpu_s": cpu_s,
        "wall_s": wall_s,
    }


def decode_fps(
    path: str | Path, decoder: str = "pyav", repeats: int = 3, timeout: float = 600.0
) -> dict[str, float]:
    """Decode-only throughput of one video: sequential decoding from frame 0, no seeking.

    Runs in a fresh child process (decord is never imported in the caller) with `OMP_NUM_THREADS=1`.
    Returns `frames` (per pass), `fps_per_core` (frames per CPU second of the child: user + system
    time of all its threads, so it does not depend on other load on the machine), `fps_wall`, `cpu_s`
    and `wall_s` over `repeats` passes after a warm-up pass. `decoder`: `pyav` (what extraction does:
    every frame decoded, only sampled ones converted to RGB) or `decord` (`VideoReader.next()` with one
    thread; decord converts every frame to RGB, it cannot skip that without seeking).
    """
    if decoder not in FPS_DECODERS:
        raise ValueError(f"decoder {decoder!r}: use one of {', '.join(FPS_DECODERS)}")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.video", "--fps", str(path), decoder, str(int(repeats))],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"decode_fps({path}, {decoder}) failed: {message[:300]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve" and sys.argv[2].isdigit():
        _serve(int(sys.argv[2]))
    elif len(sys.argv) == 5 and sys.argv[1] == "--fps" and sys.argv[4].isdigit():
        print(json.dumps(_measure_fps(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        sys.exit(
            "usage: python -m pipeline.video --serve PARENT_PID (fsar-extract's decode child)\n"
            "       python -m pipeline.video --fps PATH pyav|decord REPEATS (see decode_fps)"
        )
