"""Why extraction decodes with PyAV, not decord: prints what decord returns on fsar's test clips.

    python -m bench.decord_evidence [--work DIR]

The clips are the decoding tests' (tests/bad_videos.moving_square_frames, 57 frames, written by
`pipeline.synth.write_video` as h264 mp4, VP9 webm and MPEG-4 Part 2 AVI with B-frames); the
reference is every frame decoded sequentially with PyAV. Two questions, each answered by decord in a
child process (its bundled FFmpeg libraries can break PyAV's encoders in the same process):
  seeking     does `VideoReader.get_batch(indices)` return the frames at fsar's sampled indices?
  sequential  does `VideoReader.next()` from frame 0 return the reference frames, bit for bit?
fsar's own decoding (`pipeline.decoding.decode_sampled`) is checked against the same reference by
tests/test_video.py; this script only documents the third-party behaviour, run by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

KINDS = (("avi", 25), ("mp4", 30), ("webm", 24))
FRAMES = 57

SEEKING_PROBE = """
import json, sys
import decord
reader = decord.VideoReader(sys.argv[1])
print(json.dumps(reader.get_batch(json.loads(sys.argv[2])).asnumpy().tolist()))
"""

SEQUENTIAL_PROBE = """
import sys
import numpy as np
import decord
reader = decord.VideoReader(sys.argv[1], ctx=decord.cpu(0), num_threads=1)
frames = []
while True:
    try:
        frames.append(reader.next().asnumpy())  # sequential from frame 0, no seek requested
    except StopIteration:
        break
np.save(sys.argv[2], np.stack(frames))
"""


def write_clips(folder: Path) -> dict[str, Path]:
    from pipeline.synth import write_video
    from tests.bad_videos import moving_square_frames

    frames = moving_square_frames(FRAMES)
    paths = {}
    for kind, fps in KINDS:
        paths[kind] = folder / f"clip.{kind}"
        write_video(paths[kind], frames, fps)
    return paths


def reference_frames(path: Path) -> np.ndarray:
    """Every frame, decoded sequentially with PyAV."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def in_child(probe: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", probe, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def seeking(avi: Path, reference: np.ndarray) -> str:
    """decord's seeking `get_batch` at the indices fsar samples for view 0 of the AVI."""
    from pipeline.video import sample_frame_indices

    indices = sample_frame_indices(len(reference), 8, 1, "clip-avi")[0]
    probe = in_child(SEEKING_PROBE, str(avi), json.dumps(indices))
    if probe.returncode != 0:
        return f"decord could not read {avi.name}: {probe.stderr.strip()[-200:]}"
    batch = np.array(json.loads(probe.stdout), dtype=np.uint8)
    wrong = [i for i, f in zip(indices, batch, strict=True) if not np.array_equal(f, reference[i])]
    if not wrong:
        return f"get_batch({indices}) returned the right frames with this decord build"
    return f"get_batch({indices}) returned other frames than asked at indices {wrong}"


def sequential(path: Path, reference: np.ndarray, work: Path) -> str:
    """decord's `next()` from frame 0 against the reference: shifted frames, pixel differences."""
    out = work / f"{path.suffix[1:]}.npy"
    probe = in_child(SEQUENTIAL_PROBE, str(path), str(out))
    if probe.returncode != 0:
        return f"decord could not read {path.name}: {probe.stderr.strip()[-200:]}"
    decoded = np.load(out).astype(np.int16)
    if decoded.shape != reference.shape:
        return f"{len(decoded)} frames of shape {decoded.shape[1:]}, PyAV {reference.shape}"
    ref = reference.astype(np.int16)
    nearest = [int(np.argmin([np.abs(f - r).sum() for r in ref])) for f in decoded]
    shifted = [i for i, n in enumerate(nearest) if n != i]
    difference = np.abs(decoded - ref)
    exact = "bit-identical" if not difference.any() else "NOT bit-identical"
    return (
        f"{exact} to PyAV (max |difference| {int(difference.max())}, "
        f"{np.count_nonzero(difference.any(axis=(1, 2, 3)))} of {len(ref)} frames differ); "
        f"frames nearest another index: {shifted or 'none'}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.decord_evidence", description=__doc__)
    p.add_argument("--work", default=None, help="folder for the clips (default: a temp dir)")
    args = p.parse_args(argv)
    if importlib.util.find_spec("decord") is None:  # (never imported here: see above)
        raise SystemExit("decord is not installed: nothing to show")
    from bench.common import Scratch

    with Scratch(args.work, "decord") as work:
        clips = write_clips(work)
        references = {kind: reference_frames(path) for kind, path in clips.items()}
        print(f"seeking, MPEG-4 AVI with B-frames: {seeking(clips['avi'], references['avi'])}")
        for kind, path in clips.items():
            print(f"sequential next(), {kind}: {sequential(path, references[kind], work)}")


if __name__ == "__main__":
    main()
