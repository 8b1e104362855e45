"""Cost of the views of the reproduction recipe: extraction time per video and store bytes per video.

    python -m bench.views                       # tiny ViT on CPU, V = 1 and 4, 6 videos
    python -m bench.views --model ViT-B-16      # the same with ViT-B/16 (random init), slower

Time: CPU seconds of this process (`time.process_time`, one torch thread, so that other load on the
machine changes it little), per video of 320x240 pixels and
100 frames (about an HMDB51 clip), T = 8, `--preprocess emp`, as a train-split video (views 1..V-1
augmented): exact sequential decoding (`pipeline.decode_child.decode_request`), preprocessing
(`pipeline.preprocess.transform_video`) and the frozen encoder (`pipeline.encoder.FrameEncoder`, one
forward of the video's V x T frames). Medians over the videos after one warm-up video, the V values
interleaved video by video (a busy machine slows both alike). This is not
`fsar-extract` (no Dask, no store writes): it isolates what a view adds.
Bytes: the uncompressed size of one row of a ViT-B/16 store (T 8, layers 4/8/12, 197 tokens of 512,
float16) from the store layout, and the total per benchmark from the split files' video counts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.datasets import LISTED_DATASETS as BENCHMARKS


def seconds_per_video(
    model: str, views: list[int], videos: list[Path]
) -> dict[int, dict[str, float]]:
    """Median seconds per video for each V, the V values interleaved video by video."""
    from pipeline.decode_child import DecodeRequest, decode_request
    from pipeline.encoder import FrameEncoder
    from pipeline.model import load_clip
    from pipeline.preprocess import build_transform, preprocess_spec, transform_video

    clip = load_clip(model, "none")
    encoder = FrameEncoder(clip)
    spec = preprocess_spec("emp", clip.preprocess.as_dict())
    transform = build_transform(spec)
    times = {v: {"decode": [], "preprocess": [], "encode": []} for v in views}
    for i, path in enumerate(videos):
        for v in views:
            start = time.process_time()
            outcome = decode_request(DecodeRequest(str(path), path.stem, 8, v))
            decoded = time.process_time()
            pixels = transform_video(spec, transform, outcome.pixels, path.stem, train=True)
            preprocessed = time.process_time()
            encoder(pixels.reshape(-1, *pixels.shape[2:]))
            encoded = time.process_time()
            if i:  # the first video warms up
                times[v]["decode"].append(decoded - start)
                times[v]["preprocess"].append(preprocessed - decoded)
                times[v]["encode"].append(encoded - preprocessed)
    out = {}
    for v, parts in times.items():
        out[v] = {k: statistics.median(x) for k, x in parts.items()}
        out[v]["total"] = sum(out[v].values())
    return out


def store_bytes(views: int) -> int:
    from bench.common import VIT_B16
    from store.layout import row_bytes
    from store.random_store import random_spec

    spec = random_spec(
        frames=8, views=views, dim=VIT_B16["dim"], width=VIT_B16["width"],
        patches=VIT_B16["patches"], recipe="emp",
    )  # fmt: skip
    return row_bytes(spec)


def split_videos(benchmark: str) -> int:
    from pipeline.datasets import SPLITS_DIR

    folder = SPLITS_DIR / benchmark
    return sum(
        sum(1 for line in (folder / f"{s}_few_shot.txt").read_text().splitlines() if line.strip())
        for s in ("train", "val", "test")
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.views", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fsar-tiny-vit")
    p.add_argument("--views", default="1,4", help="comma-separated V values")
    p.add_argument("--videos", type=int, default=10)
    args = p.parse_args(argv)
    import torch

    from bench.extraction import textured_video
    from runtime.memory import keep_freed_memory

    keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    views = [int(v) for v in args.views.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        videos = [Path(tmp) / f"video{i}.mp4" for i in range(args.videos + 1)]
        for i, path in enumerate(videos):
            textured_video(path, 100, seed=i)
        print(
            f"{args.model}, CPU seconds per video (1 torch thread, median of {args.videos}), "
            "320x240 x 100 frames, T=8, --preprocess emp, train video:"
        )
        measured = seconds_per_video(args.model, views, videos)
        first = measured[views[0]]["total"]
        for v, t in measured.items():
            print(
                f"  V={v}: decode {t['decode']:.3f}  preprocess {t['preprocess']:.3f}  "
                f"encode {t['encode']:.3f}  total {t['total']:.3f} s ({t['total'] / first:.2f}x V={views[0]})"
            )
    torch.set_num_threads(threads)
    print("ViT-B/16 store, uncompressed bytes per video and per benchmark (train+val+test videos):")
    for v in views:
        per_video = store_bytes(v)
        totals = ", ".join(f"{b} {split_videos(b) * per_video / 1e9:.0f} GB" for b in BENCHMARKS)
        print(f"  V={v}: {per_video / 1e6:.2f} MB per video; {totals}")


if __name__ == "__main__":
    main()
