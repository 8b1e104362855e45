"""Decode-only throughput of one video, PyAV (what extraction does) or decord, in a fresh child.

decode_fps(path, "pyav"|"decord") -> {"frames", "fps_per_core", "fps_wall", "cpu_s", "wall_s"}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.decoding import decode_pass

FPS_DECODERS = ("pyav", "decord")


def _measure_fps(path: str, decoder: str, repeats: int) -> dict[str, float]:
    """Run in the child (`python -m bench.decode_fps`): decode `path` sequentially `repeats` times after one warm-up pass."""
    import resource

    if decoder == "pyav":

        def one_pass() -> int:
            # the extraction's own first pass: every frame decoded, none converted to RGB
            return decode_pass(Path(path), None, 0)[1]

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
        [sys.executable, "-m", "bench.decode_fps", str(path), decoder, str(int(repeats))],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=Path(__file__).resolve().parents[1],  # bench/ is importable from the repository root
    )
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"decode_fps({path}, {decoder}) failed: {message[:300]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[3].isdigit():
        print(json.dumps(_measure_fps(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
    else:
        sys.exit("usage: python -m bench.decode_fps PATH pyav|decord REPEATS (see decode_fps)")
