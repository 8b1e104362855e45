"""The decode child: a persistent Python process that decodes videos, killed and restarted on a hang.

One JSON request per line in, a JSON header line then raw frame bytes out; docs/extraction.md.
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
from typing import Any

import numpy as np

from pipeline.decoding import DECODER_NAME, VideoError, decode_sampled

CHILD_START_TIMEOUT_S = 120.0


@dataclass
class DecodeRequest:
    """One video to decode: where, its id (seeds the random views), frames per view, views, mode."""

    path: str
    video_id: str
    frames: int
    views: int
    decode: str = "seek"  # pipeline.decoding.DECODE_MODES


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
        sampled = decode_sampled(
            request.path, request.frames, request.views, request.video_id, mode=request.decode
        )
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
            [sys.executable, "-m", "pipeline.decode_child", "--serve", str(os.getpid())],
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve" and sys.argv[2].isdigit():
        _serve(int(sys.argv[2]))
    else:
        sys.exit(
            "usage: python -m pipeline.decode_child --serve PARENT_PID (fsar-extract's decode child)"
        )
