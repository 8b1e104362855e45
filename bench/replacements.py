"""Replacements benchmark: does each hand-written replacement of a torch op pay on a whole step?

A replacement stays in heads/ only where a whole training or evaluation step at ViT-B/16 shapes is
at least 10% faster with it than with plain torch in its place. Each step runs in this process, on
the same inputs, in rounds: as shipped, then with each replacement's plain torch in its place, so
all see the same machine load; a row's gain is the median over rounds of plain / shipped - 1, in wall
and in CPU seconds (all threads: what a busy machine distorts least, but blind to work spread over
idle cores).
Steps (`--quick`: tiny shapes, figures meaningless):
  train   one emp training episode at ViT-B/16 shapes (5-way 1-shot 5-query, 30 videos of
          8 x 197 x 512 tokens per layer): video features, support set, queries, loss, backward,
          Adam step; inputs already in memory (the loader costs the same both ways);
  small   the same episode at store dim 64 (8 x 17 tokens), the small-head figure of bench.training,
          on the thread count `fsar-train` picks;
  eval    `heads.evaluate.evaluate` of the `otam` head over 10,000 5-way 1-shot episodes of a
          ViT-B/16-shaped test split (5 classes x 8 videos): the pass over the split and the episodes.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import Result, Scratch, parser, resolve_device, tiny_spec, vit_b16_spec
from bench.workload import QUERY, SHOT, WAY, build_store, head_step, make_head, optimizer_for
from runtime.memory import keep_freed_memory

# `python -m bench.run_all --report` puts this above the figures in docs/performance.md
HOW_TO_READ = """
Each hand-written replacement of a torch operation that heads/ keeps, timed on a whole step with
it and with plain torch in its place, side by side in one run. It stays only where the whole
step at ViT-B/16 shapes gains at least 10%. Wall time counts work spread over idle cores; CPU
seconds (all threads) are what a busy machine distorts least.
"""

Step = Callable[[], Any]
SHAPES = {"train": (512, 197, 8), "small": (64, 17, 8), "tiny": (32, 17, 4)}  # D, tokens, frames


@dataclass(frozen=True)
class Replacement:
    """A replacement and how to put plain torch in its place for one step."""

    key: str
    what: str
    step: str  # train | small | eval
    plain: Callable[[Any], contextlib.AbstractContextManager]  # head -> context


@contextlib.contextmanager
def patched(module: Any, **values: Any) -> Iterator[None]:
    """Module attributes set to `values` inside the block."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


@contextlib.contextmanager
def torch_dropout(head: torch.nn.Module) -> Iterator[None]:
    """Every ParallelDropout of `head` replaced by nn.Dropout of the same rate."""
    from heads.dropout import ParallelDropout

    swapped = []
    for module in head.modules():
        for name, child in module.named_children():
            if isinstance(child, ParallelDropout):
                setattr(module, name, torch.nn.Dropout(child.p))
                swapped.append((module, name, child))
    try:
        yield
    finally:
        for module, name, child in swapped:
            setattr(module, name, child)


def one_generator_dropout(_head: Any) -> contextlib.AbstractContextManager:
    """ParallelDropout without its numpy SFC64 path: tensors under a million elements use F.dropout."""
    import heads.dropout as dropout

    return patched(dropout, MIN_ELEMENTS=dropout.PARALLEL_MIN_ELEMENTS)


def sdpa_attention(_head: Any) -> contextlib.AbstractContextManager:
    import heads.emp as emp

    return patched(emp, attention=F.scaled_dot_product_attention)


def otam_torch_autograd(_head: Any) -> contextlib.AbstractContextManager:
    """The linear-space recursion on torch tensors with torch autograd (no numpy, no own backward)."""
    import heads.otam as otam

    def recursion(scaled: torch.Tensor) -> torch.Tensor:
        cells = scaled.reshape(*scaled.shape[:2], -1)
        return otam._cells_linear(cells.exp())[-1][-1].log().reshape(scaled.shape[2:])

    return patched(otam, _recursion_linear=recursion)


@contextlib.contextmanager
def otam_log_space(_head: Any) -> Iterator[None]:
    """The released log-space recursion (logaddexp) with torch autograd, for every head."""
    import heads.baselines as baselines
    import heads.emp as emp
    import heads.otam as otam

    def log_space(dists: torch.Tensor, lbda: float = otam.DEFAULT_LAMBDA) -> torch.Tensor:
        return otam.otam_bidirectional(dists, lbda, space="log")

    with (
        patched(emp, otam_bidirectional=log_space),
        patched(baselines, otam_bidirectional=log_space),
    ):
        yield


def all_threads(_head: Any) -> contextlib.AbstractContextManager:
    import heads.threads as threads

    return patched(threads, step_threads=lambda *_: torch.get_num_threads())


REPLACEMENTS = (
    Replacement("dropout", "heads.dropout (parallel + SFC64 masks) vs nn.Dropout", "train", torch_dropout),
    Replacement("dropout_sfc64", "heads.dropout's SFC64 path vs F.dropout under 1M elements", "train", one_generator_dropout),
    Replacement("attention", "heads.emp attention/softmax vs F.scaled_dot_product_attention", "train", sdpa_attention),
    Replacement("otam_numpy", "OTAM numpy views + own backward vs torch autograd", "train", otam_torch_autograd),
    Replacement("otam_linear", "OTAM linear-space recursion vs the released log space", "train", otam_log_space),
    Replacement("otam_linear_eval", "OTAM linear-space recursion vs the released log space", "eval", otam_log_space),
    Replacement("dropout_small", "heads.dropout (parallel + SFC64 masks) vs nn.Dropout", "small", torch_dropout),
    Replacement("attention_small", "heads.emp attention/softmax vs F.scaled_dot_product_attention", "small", sdpa_attention),
    Replacement("otam_numpy_small", "OTAM numpy views + own backward vs torch autograd", "small", otam_torch_autograd),
    Replacement("threads_small", "heads.threads (one thread) vs all threads", "small", all_threads),
)  # fmt: skip


def training_step(dim: int, tokens: int, frames: int, device: str) -> tuple[Any, Step]:
    """(head, one emp training episode on fixed random inputs) at the given token shapes."""
    from heads.threads import step_threads
    from store.random_store import random_spec

    spec = random_spec(frames=frames, views=1, dim=dim, width=dim, patches=tokens - 1, recipe="emp")
    torch.manual_seed(0)
    head = make_head("emp", spec).to(device)
    head.train()
    opt = optimizer_for(head)
    videos = WAY * (SHOT + QUERY)
    g = torch.Generator().manual_seed(0)
    roles = head.inputs(spec)
    inputs = {r: torch.randn(videos, frames, tokens, dim, generator=g).to(device) for r in roles}

    def step() -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(step_threads(spec, list(roles.values()), videos))
        try:
            head_step(head, inputs, opt)
        finally:
            torch.set_num_threads(threads)

    return head, step


def evaluation_step(
    work: Path, spec: dict[str, Any], episodes: int, device: str
) -> tuple[Any, Step]:
    """(head, `evaluate` of the otam head over `episodes` episodes of a random test split)."""
    from heads.evaluate import evaluate
    from heads.train import build_head

    _, store = build_store(work / "eval-store", spec, {"test": (5, 8)})
    head = build_head("otam", {}, store, torch.device(device))
    return head, lambda: evaluate(head, store, episodes=episodes, device=device)


def side_by_side(step: Step, head: Any, chosen: list[Replacement], rounds: int) -> dict:
    """Wall and CPU seconds of `step` as shipped ("with") and with each replacement's plain torch
    in its place, in rounds (with, plain 1, plain 2, ...): each gain is paired with its round."""
    sides: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "with": contextlib.nullcontext
    }
    sides |= {rep.key: lambda rep=rep: rep.plain(head) for rep in chosen}
    for enter in sides.values():  # warm-up, every way
        with enter():
            step()
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in sides}
    for _ in range(rounds):
        for key, enter in sides.items():
            with enter():
                wall, cpu = time.perf_counter(), time.process_time()
                step()
                times[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def add_rows(res: Result, rep: Replacement, times: dict, shape: str) -> None:
    (with_wall, with_cpu), (plain_wall, plain_cpu) = (
        zip(*times[side], strict=True) for side in ("with", rep.key)
    )
    gain = statistics.median(p / w - 1 for p, w in zip(plain_wall, with_wall, strict=True))
    gain_cpu = statistics.median(p / w - 1 for p, w in zip(plain_cpu, with_cpu, strict=True))
    label = f"{rep.step} step ({shape}): {rep.what}"
    res.add(f"{rep.key}.with_s", f"{label}: with it", statistics.median(with_wall), "s")
    res.add(f"{rep.key}.plain_s", f"{label}: plain torch", statistics.median(plain_wall), "s")
    at_vit = rep.step != "small"
    res.add(
        f"{rep.key}.gain_pct",
        f"{label}: gain on the whole step",
        100 * gain,
        "%",
        target=">= 10" if at_vit else None,
        met=gain >= 0.10 if at_vit else None,
        note=f"CPU seconds: {100 * gain_cpu:+.1f}%, {len(with_wall)} rounds",
    )


def build_step(name: str, work: Path, quick: bool, device: str) -> tuple[Any, Step]:
    if name == "eval":
        spec = (tiny_spec if quick else vit_b16_spec)("emp")
        return evaluation_step(work, spec, 200 if quick else 10_000, device)
    return training_step(*SHAPES[name if not quick or name == "small" else "tiny"], device)


def shape_name(step: str, quick: bool) -> str:
    if step == "small":
        return "store dim 64"
    return "tiny shapes" if quick else "ViT-B/16 shapes"


def main(argv: list[str] | None = None) -> Path:
    p = parser("replacements", __doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds per step [3]")
    p.add_argument("--only", default="", help="comma-separated replacement keys (default: all)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    chosen = [r for r in REPLACEMENTS if not args.only or r.key in args.only.split(",")]
    res = Result("replacements", quick, device)
    keep_freed_memory()  # as fsar-train and fsar-eval do
    res.config = {
        step: "emp, 5-way 1-shot 5-query, D x tokens x frames = {} x {} x {}".format(*shape)
        for step, shape in SHAPES.items()
    } | {"eval": "otam, 10,000 5-way 1-shot episodes of 5 classes x 8 videos", "rounds": rounds}
    with Scratch(args.work, "replacements") as work:
        for name in dict.fromkeys(rep.step for rep in chosen):
            head, step = build_step(name, work, quick, device)
            of_step = [rep for rep in chosen if rep.step == name]
            times = side_by_side(step, head, of_step, rounds)
            for rep in of_step:
                add_rows(res, rep, times, shape_name(name, quick))
            del head, step
    return res.write(args.out)


if __name__ == "__main__":
    main()
