"""Broken and unusual video files for tests, written next to good synthetic videos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.synth import write_video

# file name stem -> expected manifest error (None: the video is `ok`)
EXPECTED_ERRORS: dict[str, str | None] = {
    "zero_bytes": "empty",
    "truncated": "truncated",
    "random_bytes": "not a video",
    "text_file": "not a video",
    "one_frame": None,
    "audio_only": "no video stream",
    "a_directory": "unreadable",
}


def moving_square_frames(n_frames: int, width: int = 96, height: int = 72) -> np.ndarray:
    """Frames of a square moving right over a gradient, each frame different."""
    frames = np.zeros((n_frames, height, width, 3), dtype=np.uint8)
    frames[..., 0] = np.linspace(0, 200, width, dtype=np.uint8)[None, None, :]
    frames[..., 2] = np.linspace(200, 0, height, dtype=np.uint8)[None, :, None]
    for i in range(n_frames):
        x = 4 + (i * 3) % (width - 20)
        frames[i, 20:36, x : x + 16] = (255, 255, 0)
        frames[i, 2:6, 2 : 2 + i % (width - 4)] = 255
    return frames


def write_audio_only(path: Path) -> None:
    """A one-second AAC-in-MP4 file without a video stream."""
    import av

    with av.open(str(path), mode="w") as output:
        stream = output.add_stream("aac", rate=16000)
        samples = (np.sin(np.arange(16000) / 10.0) * 8000).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)


def write_bad_videos(folder: Path) -> dict[str, Path]:
    """Write one file per `EXPECTED_ERRORS` entry into `folder`; returns stem -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "zero_bytes": folder / "zero_bytes.mp4",
        "truncated": folder / "truncated.avi",
        "random_bytes": folder / "random_bytes.avi",
        "text_file": folder / "text_file.mp4",
        "one_frame": folder / "one_frame.mp4",
        "audio_only": folder / "audio_only.mp4",
        "a_directory": folder / "a_directory.avi",
    }
    paths["zero_bytes"].write_bytes(b"")
    full = folder / "full_for_truncation.tmp"
    write_video(full, moving_square_frames(60), fps=25, container="avi")
    data = full.read_bytes()
    full.unlink()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["random_bytes"].write_bytes(np.random.default_rng(1).bytes(50_000))
    paths["text_file"].write_text("this is not a video, just text in a file named .mp4\n" * 20)
    write_video(paths["one_frame"], moving_square_frames(1), fps=25)
    write_audio_only(paths["audio_only"])
    paths["a_directory"].mkdir(exist_ok=True)
    return paths


def root_can_read_anything() -> bool:
    """True when permission bits do not stop this process (running as root)."""
    return os.geteuid() == 0
