"""Synthetic `folder` dataset: moving shapes whose classes come in time-reversal pairs.

Each motion family (sliding, growing, rotating, orbiting, ...) gives two classes: the motion and the
same motion played backwards ("sliding left to right" / "sliding right to left"). A single frame, or
the average of all frames, cannot tell the two apart; only the order of the frames can. Pairs are
never split across train/val/test, so every split has reversal pairs and the splits are class-disjoint.

Both classes of a pair share an appearance (a shape and a palette, jittered per video), as real
classes share scenes and objects: a single frame, or the average of all frames, tells which pair a
video belongs to, and only the order of the frames tells which of the two classes. Videos also vary in
size, start/end jitter, length, frame rate, frame size and container: H.264 in .mp4, MPEG-4 Part 2
with B-frames in .avi (like HMDB51/UCF101) and VP9 in .webm, written with PyAV. `write_video` is also
used by tests to make files with known frames.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.datasets import DatasetError
from runtime.values import seed as values_seed
from runtime.values import whole_number

CONTAINERS = ("mp4", "avi", "webm")
FRAME_SIZES = ((96, 72), (112, 84), (80, 64), (64, 64))
FRAME_RATES = (12, 15, 24, 25, 30)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int,
    container: str | None = None,
    gop: int | None = None,
) -> None:
    """Write RGB frames `(N, H, W, 3)` uint8 to `path`; the container (mp4/avi/webm) follows the suffix.

    mp4: H.264 (libx264, B-frames allowed); avi: MPEG-4 Part 2 with 2 B-frames; webm: VP9.
    x264 and VP9 on one thread: the same frames give the same pixels however busy the machine is.
    `gop`: the longest keyframe interval (default: the encoder's, 250 for x264, 12 for MPEG-4).
    """
    import av

    path = Path(path)
    kind = container or path.suffix.lstrip(".")
    codec, options = {
        "mp4": ("libx264", {"preset": "veryfast", "bf": "2", "threads": "1"}),
        "avi": ("mpeg4", {"bf": "2", "qscale": "3"}),
        "webm": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "threads": "1"}),
    }[kind]
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w", format=kind) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        if gop is not None:
            stream.codec_context.gop_size = gop
        if kind == "avi":
            stream.codec_context.max_b_frames = 2
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)


@dataclass
class State:
    """What one frame shows: shape centre (fractions of the frame), scale, angle, brightness, ..."""

    x: float = 0.5
    y: float = 0.5
    scale: float = 1.0
    angle: float = 0.0
    brightness: float = 1.0
    stretch: float = 1.0
    separation: float = 0.0  # > 0: two copies of the shape, this far left and right of the centre


MotionFn = Callable[[float, np.ndarray], State]


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


# Each family maps progress t in [0, 1] and per-video jitter (4 numbers in [-1, 1]) to a frame state.
# The reversed class uses t -> 1 - t.
FAMILIES: list[tuple[str, str, MotionFn]] = [
    (
        "sliding left to right",
        "sliding right to left",
        lambda t, j: State(x=_lerp(0.2 + 0.05 * j[0], 0.8 + 0.05 * j[1], t), y=0.5 + 0.15 * j[2]),
    ),
    (
        "falling from top to bottom",
        "rising from bottom to top",
        lambda t, j: State(x=0.5 + 0.15 * j[0], y=_lerp(0.2 + 0.05 * j[1], 0.8 + 0.05 * j[2], t)),
    ),
    (
        "growing",
        "shrinking",
        lambda t, j: State(x=0.5 + 0.1 * j[0], y=0.5 + 0.1 * j[1], scale=_lerp(0.35, 1.6, t)),
    ),
    (
        "rotating clockwise",
        "rotating counterclockwise",
        lambda t, j: State(
            x=0.5 + 0.1 * j[0], y=0.5 + 0.1 * j[1], angle=(1.5 + 0.3 * j[2]) * math.pi * t
        ),
    ),
    (
        "moving from top left to bottom right",
        "moving from bottom right to top left",
        lambda t, j: State(x=_lerp(0.2, 0.8, t) + 0.04 * j[0], y=_lerp(0.2, 0.8, t) + 0.04 * j[1]),
    ),
    (
        "moving from bottom left to top right",
        "moving from top right to bottom left",
        lambda t, j: State(x=_lerp(0.2, 0.8, t) + 0.04 * j[0], y=_lerp(0.8, 0.2, t) + 0.04 * j[1]),
    ),
    (
        "orbiting clockwise",
        "orbiting counterclockwise",
        lambda t, j: State(
            x=0.5 + 0.25 * math.cos(2 * math.pi * (0.8 * t + 0.1 * j[0])),
            y=0.5 + 0.25 * math.sin(2 * math.pi * (0.8 * t + 0.1 * j[0])),
        ),
    ),
    (
        "fading in",
        "fading out",
        lambda t, j: State(
            x=0.5 + 0.15 * j[0], y=0.5 + 0.15 * j[1], brightness=_lerp(0.05, 1.0, t)
        ),
    ),
    (
        "stretching wider",
        "squeezing narrower",
        lambda t, j: State(x=0.5 + 0.1 * j[0], y=0.5 + 0.1 * j[1], stretch=_lerp(0.5, 2.0, t)),
    ),
    (
        "coming together",
        "moving apart",
        lambda t, j: State(
            x=0.5 + 0.05 * j[0], y=0.5 + 0.15 * j[1], separation=_lerp(0.32, 0.0, t)
        ),
    ),
    (
        "spinning clockwise faster and faster",
        "spinning counterclockwise slower and slower",
        lambda t, j: State(
            x=0.5 + 0.1 * j[0], y=0.5 + 0.1 * j[1], angle=(3 + 0.5 * j[2]) * math.pi * t * t
        ),
    ),
    (
        "dropping with acceleration",
        "rising and slowing down",
        lambda t, j: State(x=0.5 + 0.2 * j[0], y=_lerp(0.15, 0.85, t * t)),
    ),
]
MAX_CLASSES = 2 * len(FAMILIES)
MAX_VIDEOS_PER_CLASS = 10_000
SHAPES = ("circle", "square", "triangle", "diamond")


def _polygon(shape: str) -> np.ndarray:
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.8
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
    elif shape == "diamond":
        angles = np.deg2rad([-90, 0, 90, 180])
    else:
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _inside_convex(points: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    inside = np.ones(px.shape, dtype=bool)
    for k in range(len(points)):
        (x0, y0), (x1, y1) = points[k], points[(k + 1) % len(points)]
        inside &= (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0) >= 0
    return inside


def render_frame(
    state: State,
    shape: str,
    size: float,
    colour: np.ndarray,
    background: np.ndarray,
    width: int,
    height: int,
) -> np.ndarray:
    """One RGB frame `(height, width, 3)` uint8 showing the shape (with an off-centre marker) in `state`."""
    frame = np.empty((height, width, 3), dtype=np.float64)
    frame[:] = background
    py, px = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    radius = size * min(width, height) * state.scale
    colour = background + (colour - background) * state.brightness
    marker_colour = background + (255 - colour - background) * state.brightness
    cos, sin = math.cos(state.angle), math.sin(state.angle)
    outline = _polygon(shape) * [state.stretch, 1.0]
    rotated = outline @ np.array([[cos, sin], [-sin, cos]])
    offsets = [0.0] if state.separation <= 0 else [-state.separation, state.separation]
    for offset in offsets:
        cx, cy = (state.x + offset) * width, state.y * height
        points = rotated * radius + [cx, cy]
        frame[_inside_convex(points, px, py)] = colour
        mx = cx + 0.55 * radius * state.stretch * cos
        my = cy + 0.55 * radius * state.stretch * sin
        marker = (px - mx) ** 2 + (py - my) ** 2 <= (0.22 * radius) ** 2
        frame[marker] = marker_colour
    return np.clip(frame, 0, 255).astype(np.uint8)


def _distinct_colours(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    colours: list[np.ndarray] = []
    while len(colours) < count:
        candidate = rng.integers(0, 256, 3).astype(np.float64)
        if all(np.abs(candidate - c).sum() > 180 for c in colours):
            colours.append(candidate)
    return colours


@dataclass(frozen=True)
class PairStyle:
    """The appearance both classes of a reversal pair share."""

    shape: str
    colour: np.ndarray
    background: np.ndarray


def random_style(rng: np.random.Generator) -> PairStyle:
    background, colour = _distinct_colours(rng, 2)
    return PairStyle(SHAPES[rng.integers(len(SHAPES))], colour, background)


def render_video(
    motion: MotionFn, reverse: bool, rng: np.random.Generator, style: PairStyle | None = None
) -> tuple[np.ndarray, int, str]:
    """Frames `(N, H, W, 3)`, fps and container for one random video of a motion (or its reversal).

    `style` fixes the shape and palette (each colour jittered by up to 20 per channel); without it
    both are drawn at random.
    """
    width, height = FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
    n_frames = int(rng.integers(16, 41))
    fps = int(FRAME_RATES[rng.integers(len(FRAME_RATES))])
    container = CONTAINERS[rng.integers(len(CONTAINERS))]
    style = style or random_style(rng)
    shape = style.shape
    size = float(rng.uniform(0.12, 0.2))
    colour = np.clip(style.colour + rng.uniform(-20, 20, 3), 0, 255)
    background = np.clip(style.background + rng.uniform(-20, 20, 3), 0, 255)
    jitter = rng.uniform(-1, 1, 4)
    frames = []
    for i in range(n_frames):
        progress = i / (n_frames - 1)
        state = motion(1 - progress if reverse else progress, jitter)
        frames.append(render_frame(state, shape, size, colour, background, width, height))
    return np.stack(frames), fps, container


def split_pairs(n_pairs: int) -> dict[str, list[int]]:
    """Pair indices per split: about 20% of pairs for val and 30% for test (at least 1 each), rest train."""
    if n_pairs < 3:
        raise ValueError(
            "need at least 6 classes (3 reversal pairs) for class-disjoint train/val/test"
        )
    n_test = max(1, round(0.3 * n_pairs))
    n_val = max(1, round(0.2 * n_pairs))
    n_train = n_pairs - n_test - n_val
    return {
        "train": list(range(n_train)),
        "val": list(range(n_train, n_train + n_val)),
        "test": list(range(n_train + n_val, n_pairs)),
    }


def make_synthetic_dataset(
    out: str | Path, classes: int = 20, videos_per_class: int = 6, seed: int = 0
) -> dict[str, object]:
    """Write `out/{train,val,test}/<class_name_with_underscores>/<video>` and `out/synth.json`.

    Returns the description saved in `synth.json` (classes per split, reversal pairs, counts).
    """
    if classes % 2 or not 6 <= classes <= MAX_CLASSES:
        raise DatasetError(
            f"--classes {classes}: use an even number from 6 to {MAX_CLASSES} (reversal pairs)"
        )
    whole_number("--videos-per-class", videos_per_class, 1, MAX_VIDEOS_PER_CLASS)
    seed = values_seed("--seed", seed)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file; give a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise DatasetError(
            f"--out {out} exists and is not empty; give a new directory (datasets are not mixed)"
        )
    rng = np.random.default_rng(seed)
    family_order = rng.permutation(len(FAMILIES))[: classes // 2]
    splits = split_pairs(classes // 2)
    description: dict[str, object] = {
        "seed": seed,
        "videos_per_class": videos_per_class,
        "pairs": [],
    }
    split_classes: dict[str, list[str]] = {}
    for split, pair_ids in splits.items():
        split_classes[split] = []
        for pair_id in pair_ids:
            forward_name, backward_name, motion = FAMILIES[family_order[pair_id]]
            description["pairs"].append([forward_name, backward_name])  # type: ignore[union-attr]
            style = random_style(rng)
            for name, reverse in ((forward_name, False), (backward_name, True)):
                split_classes[split].append(name)
                folder = out / split / name.replace(" ", "_")
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(videos_per_class):
                    frames, fps, container = render_video(motion, reverse, rng, style)
                    write_video(
                        folder / f"{name.replace(' ', '_')}_{k:03d}.{container}", frames, fps
                    )
    description["classes"] = split_classes
    description["videos"] = classes * videos_per_class
    (out / "synth.json").write_text(json.dumps(description, indent=2) + "\n")
    return description
