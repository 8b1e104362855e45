"""TS-FSAR's cost from the store: FLOPs, bytes and seconds per training episode vs frozen CLIP online.

    python -m bench.tsfsar                            # ViT-B/16 shapes on CPU, taps 0,4,8,12 timed
    python -m bench.tsfsar --taps all --device cuda   # every tap timed (bash bench/gpu.sh)
    python -m bench.tsfsar --quick                    # the tiny ViT (figures meaningless)

Model: open_clip ViT-B-16, random init (cost does not depend on the weights); `--quick`: the tiny
ViT. Episode: the 5-way 1-shot 5-query training episode, 30 videos x T = 8 frames, as `fsar-train
--head tsfsar` steps it (forward, the released loss, backward, AdamW with its groups).
  bytes/episode  the head's arrays (`resid/layerKK` per tap + `cls/layer12`) of the 30 videos,
                 uncompressed float16: what the loader reads and decodes per episode, for every
                 tap choice `fsar-store info` lists (13, 7 and 4 taps for ViT-B/16);
  GFLOP          torch.utils.flop_counter.FlopCounterMode (matmuls and attention, forward +
                 backward) of the head step, and of the CLIP forward on the episode's frames that
                 the released code runs every episode; the FLOP ceiling of caching is
                 (CLIP + head) / head. Tap choices other than the timed one: the timed step's
                 per-episode part plus 30 x one video's per-video part (side network, TS-DCM,
                 Adapter) counted at those taps;
  s/episode      side by side at the timed taps, store and online episodes alternating: store =
                 the training loader's tensors for the episode (split in RAM) + the head step;
                 online = the same head fed by the frozen CLIP run on the episode's frames;
  loader         uncompressed MB/s of `SplitData.get` for one episode: the split in RAM (as
                 `fsar-train` holds a split that fits `--max-ram`), and streamed (a larger split)
                 with the store's files in the page cache (warm) and evicted from it (cold,
                 `bench.common.evict`); and the stall share of the training loop over the streamed
                 split (`SplitData.episodes` prefetching while the head steps, bench.store's method);
  break-even     bytes/episode / online s/episode: with the reads prefetched while the head steps
                 (as fsar-train runs), the read rate below which the store is slower than running
                 the backbone on this machine;
  overtake       CLIP FLOPs per episode / the seconds a path takes to read the episode: a backbone
                 running faster than this (a GPU) makes CLIP online faster than that read path, so
                 the cache does not pay there (derived from this machine's read rates; the GPU run,
                 bench/gpu.sh, measures it directly).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    Result,
    Scratch,
    evict,
    parser,
    resolve_device,
    timed,
    tiny_spec,
    vit_b16_spec,
)
from bench.training import count_flops, timed_cpu
from bench.workload import QUERY, SHOT, WAY, build_store, episode_rows, head_step

# `python -m bench.run_all --report` puts this above the figures in docs/performance.md
HOW_TO_READ = """
TS-FSAR reads the raw residual stream at every tap (2.4 MB per tap per ViT-B/16 video at T = 8), so a
training episode reads about a gigabyte at 13 taps, while its side network costs a fraction of the
CLIP forward it replaces: the FLOP ceiling of caching is about 3x with every tap. On a CPU the
backbone is slow and any read path beats the break-even rate. For a GPU read the "CLIP speed above
which online beats reading" rows: a GPU that runs the ViT-B/16 forward faster than that makes the
store slower than running CLIP online on that read path. Then cache fewer taps (`--taps`), keep the
split in RAM (`--max-ram`), or give the machine more page cache.
"""

N_VIDEOS = WAY * (SHOT + QUERY)


def tap_choices(depth: int) -> list[list[int]]:
    """The tap sets `fsar-store info` lists: every tap, then 6- and 3-block side networks."""
    from store.layout import default_taps, evenly_spaced_taps

    blocks = sorted({max(1, depth // 2), max(1, depth // 4)}, reverse=True)
    return [default_taps(depth)] + [evenly_spaced_taps(depth, b) for b in blocks]


def episode_bytes(spec: dict[str, Any], taps: list[int]) -> int:
    """Uncompressed bytes of the head's arrays for one episode's videos (one view)."""
    from store.layout import cls_name, resid_name, row_bytes

    names = [resid_name(t) for t in taps] + [cls_name(int(spec["depth"]))]
    return row_bytes(spec, names, views=1) * N_VIDEOS


def store_head(store: Any, device: str) -> tuple[Any, dict[str, str], Any]:
    """The tsfsar head as fsar-train builds it for the store (its init and texts), its inputs and
    its optimiser (the released AdamW groups)."""
    from heads.train import TrainConfig, build_head, make_optimizer

    torch.manual_seed(0)
    head = build_head("tsfsar", {}, store, torch.device(device))
    head.train()
    return head, head.inputs(store.spec), make_optimizer(head, TrainConfig(lr=1e-5))


def video_flops(head: Any, inputs: dict[str, torch.Tensor]) -> float:
    """Forward + backward FLOPs of one video's per-video part (side network, TS-DCM, Adapter)."""
    one = {k: v[:1] for k, v in inputs.items()}

    def run() -> None:
        feats = head.video_features(one)
        torch.stack([v.float().sum() for v in feats.values()]).sum().backward()

    flops = count_flops(run)
    head.zero_grad(set_to_none=True)
    return flops


def untimed_head_video_flops(spec: dict[str, Any], taps: list[int], device: str) -> float:
    """`video_flops` of a head reading `taps`, on random inputs of the store's shapes."""
    import heads
    from heads.train import head_options

    head = heads.create("tsfsar", **head_options("tsfsar", {"taps": taps}, spec)).to(device)
    v, t, w, d = 1, spec["frames"], spec["width"], spec["dim"]
    roles = head.inputs({**spec, "taps": taps})
    shapes = {r: (v, t, d) if r == "clip" else (v, t, spec["tokens"], w) for r in roles}
    return video_flops(head, {r: torch.randn(s, device=device) for r, s in shapes.items()})


def online_inputs(encoder: Any, roles: dict[str, str], pixels: torch.Tensor) -> dict:
    """The head's inputs computed by the frozen tower from the frames (one forward), (B, T, ...)."""
    frames = pixels.shape[0] // N_VIDEOS
    out = encoder.encode_torch(pixels)
    # clone: tensors made under inference mode cannot enter the head's autograd graph
    return {
        r: out[n].clone().reshape(N_VIDEOS, frames, *out[n].shape[1:]) for r, n in roles.items()
    }


def loader_rates(store: Any, roles: dict[str, str], path: Path) -> dict[str, float]:
    """Uncompressed MB/s of one episode's inputs: split in RAM, streamed warm, streamed cold."""
    from heads.data import SplitData

    rows = store.select(split="train")
    episode = episode_rows(store, "train", seed=5)
    in_ram = SplitData(store, rows, roles, max_ram_gb=64.0)
    streamed = SplitData(store, rows, roles, max_ram_gb=0.0, views=None)
    nbytes = sum(v.nbytes for v in streamed.get(episode, 0).values())  # also warms the page cache
    seconds = {
        "ram": timed(lambda: in_ram.get(episode, 0))[0],
        "warm": timed(lambda: streamed.get(episode, 0))[0],
    }
    evict(path)
    seconds["cold"] = timed(lambda: streamed.get(episode, 0))[0]
    return {k: nbytes / 1e6 / v for k, v in seconds.items()}


class Run:
    """One benchmark run: the store at the timed taps, its head, the CLIP tower, the frames."""

    def __init__(self, spec: dict[str, Any], work: Path, device: str, model: str) -> None:
        from heads.data import SplitData
        from pipeline.encoder import FrameEncoder, load_clip

        self.spec, self.work, self.device = spec, work, device
        _, self.store = build_store(work / "store", spec, {"train": (6, 6)})
        self.head, self.roles, self.opt = store_head(self.store, device)
        self.data = SplitData(self.store, self.store.select(split="train"), self.roles, 64.0)
        self.clip = load_clip(model, "none", device=device)
        self.encoder = FrameEncoder(self.clip, recipe="ts", taps=spec["taps"])
        g = torch.Generator().manual_seed(0)
        size = self.encoder.image_size
        self.pixels = torch.randn(N_VIDEOS * spec["frames"], 3, *size, generator=g).to(device)

    def store_inputs(self, seed: int) -> dict[str, torch.Tensor]:
        rows = episode_rows(self.store, "train", seed=seed)
        return {k: v.to(self.device) for k, v in self.data.get(rows, 0).items()}

    def store_episode(self, seed: int) -> None:
        head_step(self.head, self.store_inputs(seed), self.opt)

    def online_episode(self) -> None:
        head_step(self.head, online_inputs(self.encoder, self.roles, self.pixels), self.opt)


def flop_figures(res: Result, run: Run, chosen: list[list[int]], full: dict[str, Any]) -> float:
    """GFLOP of the CLIP forward and of the head step per tap choice; returns the CLIP's."""
    sample = run.store_inputs(0)
    step = count_flops(lambda: head_step(run.head, sample, run.opt))
    with torch.inference_mode():
        per_frame = count_flops(lambda: run.encoder.encode_torch(run.pixels[:1]), run.clip.visual)
    clip = per_frame * len(run.pixels)
    per_episode = step - N_VIDEOS * video_flops(run.head, sample)
    res.add(
        "clip_gflop", f"CLIP forward per episode ({len(run.pixels)} frames)", clip / 1e9, "GFLOP"
    )
    for taps in chosen:
        n = len(taps)
        if taps == run.spec["taps"]:
            head = step
        else:
            head = per_episode + N_VIDEOS * untimed_head_video_flops(full, taps, run.device)
        res.add(f"head_gflop.taps{n}", f"tsfsar step per episode, {n} taps", head / 1e9, "GFLOP")
        res.add(f"ceiling.taps{n}", f"FLOP ceiling of caching, {n} taps", (clip + head) / head, "x")
    return clip


def time_figures(res: Result, run: Run, repeat: int) -> float:
    """Seconds per episode from the store and online, alternating; returns online s/episode."""
    run.store_episode(0)  # warm-up: allocations, kernel choice
    store_t, online_t = [], []
    for i in range(repeat):
        store_t.append(timed_cpu(lambda i=i: run.store_episode(i + 1), run.device))
        online_t.append(timed_cpu(run.online_episode, run.device))
    store_s, store_cpu = (statistics.median(x) for x in zip(*store_t, strict=True))
    online_s, online_cpu = (statistics.median(x) for x in zip(*online_t, strict=True))
    n = len(run.spec["taps"])
    res.add(
        f"episode_s.store.taps{n}", f"{n} taps from the store (in RAM): s/episode", store_s, "s"
    )
    res.add(f"episode_s.online.taps{n}", f"{n} taps, frozen CLIP online: s/episode", online_s, "s")
    res.add(f"speedup.taps{n}", f"{n} taps: speedup vs frozen CLIP online", online_s / store_s, "x")
    res.add(
        f"speedup_cpu.taps{n}",
        f"{n} taps: speedup vs frozen CLIP online, CPU seconds",
        online_cpu / store_cpu,
        "x",
        note="all threads' CPU time, robust to machine load",
    )
    return online_s


PATHS = {"ram": "split in RAM", "warm": "streamed, page cache", "cold": "streamed, from disk"}


def loader_figures(
    res: Result, run: Run, online_s: float, clip_flops: float, stall_episodes: int
) -> None:
    """Read rates per access path against the break-even rate, the backbone speed at which CLIP
    online overtakes each path, and the stall share of the streamed training loop."""
    from bench.store import loader_stall

    n = len(run.spec["taps"])
    rates = loader_rates(run.store, run.roles, run.work / "store")
    nbytes = episode_bytes(run.spec, run.spec["taps"])
    break_even = nbytes / 1e6 / online_s
    res.add(
        f"break_even_mbps.taps{n}",
        f"{n} taps: read rate below which the store is slower than CLIP online here",
        break_even,
        "MB/s",
    )
    for path, what in PATHS.items():
        rate = rates[path]
        res.add(
            f"loader_mbps.{path}.taps{n}",
            f"loader, {what}: MB/s",
            rate,
            "MB/s",
            note=f"{'pays' if rate > break_even else 'does NOT pay'} against CLIP online here",
        )
        tflops = clip_flops / (nbytes / 1e6 / rate) / 1e12
        res.add(
            f"overtake_tflops.{path}.taps{n}",
            f"{n} taps: CLIP speed above which online beats reading ({what})",
            tflops,
            "TFLOP/s",
            note="the backbone's episode FLOPs over this path's read time for the episode",
        )
    stall, per_step, episodes = loader_stall(
        run.store, run.head, run.roles, run.opt, run.device, stall_episodes
    )
    res.add(
        f"loader_stall_pct.taps{n}",
        f"{n} taps: loader stall share (streamed, prefetched as fsar-train)",
        stall,
        "%",
        note=f"{episodes} episodes after the first, {per_step:.2f} s each",
    )


def main(argv: list[str] | None = None) -> Path:
    p = parser("tsfsar", __doc__.splitlines()[0])
    p.add_argument("--taps", default=None, help="taps timed: all, or e.g. 0,4,8,12 [0,4,8,12]")
    p.add_argument("--repeat", type=int, default=None, help="episodes timed per side [2]")
    p.add_argument("--stall-episodes", type=int, default=None, help="stall loop episodes [3]")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    quick = args.quick
    model, frames = ("fsar-tiny-vit", 4) if quick else ("ViT-B-16", 8)
    make_spec = tiny_spec if quick else vit_b16_spec
    full = make_spec("ts", frames=frames)
    chosen = tap_choices(int(full["depth"]))
    taps = (
        chosen[0] if args.taps == "all" else [int(t) for t in (args.taps or "0,4,8,12").split(",")]
    )
    repeat = args.repeat or (1 if quick else 2)
    res = Result("tsfsar", quick, device)
    res.config = {
        "model": f"{model} (random init)",
        "episode": f"{WAY}-way {SHOT}-shot {QUERY}-query: {N_VIDEOS} videos, "
        f"{N_VIDEOS * frames} frames",
        "timed_taps": taps,
        "episodes_timed": repeat,
        "store": "train split of 6 classes x 6 videos, zstd, written here (reads not verified)",
    }
    for choice in chosen:
        gb = episode_bytes(full, choice) / 1e9
        res.add(f"bytes.taps{len(choice)}", f"bytes per episode, {len(choice)} taps", gb, "GB")
    with Scratch(args.work, "tsfsar") as work:
        run = Run(make_spec("ts", frames=frames, taps=taps), work, device, model)
        clip_flops = flop_figures(res, run, chosen, full)
        online_s = time_figures(res, run, repeat)
        loader_figures(res, run, online_s, clip_flops, args.stall_episodes or (1 if quick else 3))
        run.store.close()
    res.notes.append(
        "online: the CLIP tower runs on frames already decoded and preprocessed in memory; the "
        "released code also decodes and augments every episode, so its real cost is higher"
    )
    return res.write(args.out)


if __name__ == "__main__":
    main()
