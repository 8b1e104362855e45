"""How far the released side-network init's PCA lands from the exact PCA, and what it costs.

    python -m bench.side_init              # ViT-B/16 (random init: no CLIP weights offline)
    python -m bench.side_init --quick      # the tiny ViT

TS-FSAR's `prune_and_initialize` reduces each CLIP block's matrices with scikit-learn's PCA, whose
'auto' solver is randomized for ViT-B/16's shapes (768 x 768 and 3072 x 768 with 256 components,
the Adapter's 768 x 768 with 512). fsar replays that solver with the released run's seed
(`--side-pca released`, the default) or computes the exact PCA (`--side-pca exact`). For every
reduced matrix: the relative difference ||A - B|| / ||B|| (Frobenius) between released and exact,
and between the released solver under seed 0 and seed 1 (how much the released init depends on the
seed). Per component, for the side blocks' q/k/v/out/fc1/fc2 PCAs: the share whose sign differs
(the sign follows the largest entry of the approximate U) and, signs aligned, the relative
difference of the leading 32 components and of the last one. Vectors are interpolated, not
reduced, and equal in all three. Random weights have a flat
singular spectrum, the hardest case for a randomized solver: real CLIP weights were not measured.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench.common import TINY_MODEL, VIT_B16, Result, parser

# `python -m bench.run_all --report` puts this above the figures in docs/performance.md
HOW_TO_READ = """
Deterministic figures (no timing but the last two rows): how far `--side-pca released`, the released
run's seeded randomized PCA, lands from the exact PCA (`--side-pca exact`) on ViT-B/16 random weights,
and from itself under another seed. Large relative differences with small ones on the leading
components mean the released init's trailing components and signs are products of the solver and
its seed, not of the weights. Real CLIP weights were not available here.
"""


def relative_differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[float]:
    """||a - b|| / ||b|| of every matrix the two inits share."""
    return [
        float(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k]))
        for k in sorted(b)
        if b[k].ndim == 2
    ]


def component_differences(blocks: list, side: int) -> tuple[float, float, float]:
    """Over the side blocks' PCAs: share of components with another sign, and the median over
    matrices of the sign-aligned relative difference of components 1-32 (mean) and of the last."""
    from pipeline.side_init import exact_pca, released_pca

    flips, leading, last = [], [], []
    for block in blocks:
        pairs = [*block.attn.values(), *block.mlp.values()]
        for i, (w, _) in enumerate(pairs):
            x = w.T if i == len(pairs) - 1 else w  # fc2 is reduced through its transpose
            exact = exact_pca(x, side)
            released = released_pca(x, side, np.random.RandomState(0))
            signs = np.sign((exact * released).sum(axis=0))
            per = np.linalg.norm(released * signs - exact, axis=0) / np.linalg.norm(exact, axis=0)
            flips.append(float((signs < 0).mean()))
            leading.append(float(per[:32].mean()))
            last.append(float(per[-1]))
    return statistics.mean(flips), statistics.median(leading), statistics.median(last)


def run(model: str) -> Result:
    import torch

    from pipeline.model import load_clip
    from pipeline.side_init import block_weights, pca_function, side_init
    from store.layout import tsfsar_side_width

    torch.set_num_threads(1)
    clip = load_clip(model, "none")
    blocks = [block_weights(b) for b in clip.visual.transformer.resblocks]
    side = tsfsar_side_width(clip.width)
    res = Result("side_init", quick=model == TINY_MODEL, device="cpu")
    res.config.update(model=model, pretrained="none", side_width=side, adapter_dim=clip.dim)
    inits, seconds = {}, {}
    for label, method, seed in (("released", "released", 0), ("seed1", "released", 1)) + (
        ("exact", "exact", 0),
    ):
        start = time.process_time()
        inits[label] = side_init(blocks, side, clip.dim, pca_function(method, seed))
        seconds[label] = time.process_time() - start
    for label, other, what in (
        ("exact", "released", "released vs exact PCA"),
        ("seed1", "released", "released solver, seed 1 vs seed 0"),
    ):
        diffs = relative_differences(inits[other], inits[label])
        res.add(
            f"{label}.median",
            f"{what}: median relative difference",
            statistics.median(diffs),
            "rel.",
        )
        res.add(f"{label}.max", f"{what}: largest relative difference", max(diffs), "rel.")
    flips, leading, last = component_differences(blocks, side)
    res.add("components.sign", "released vs exact: components of the other sign", 100 * flips, "%")
    res.add(
        "components.leading", "released vs exact, signs aligned: components 1-32", leading, "rel."
    )
    res.add("components.last", f"released vs exact, signs aligned: component {side}", last, "rel.")
    vectors = [k for k, v in inits["exact"].items() if v.ndim == 1]
    same = all(np.array_equal(inits["exact"][k], inits["released"][k]) for k in vectors)
    res.notes.append(
        f"{model} random init, {len(blocks)} blocks, side width {side}, Adapter {clip.dim}: "
        f"{len(inits['exact']) - len(vectors)} matrices compared; the {len(vectors)} vectors are "
        f"{'identical' if same else 'NOT identical'} (bicubic interpolation, no PCA)"
    )
    for label in ("released", "exact"):
        res.add(
            f"seconds.{label}", f"CPU seconds to compute the init ({label})", seconds[label], "s"
        )
    return res


def main(argv: list[str] | None = None) -> int:
    args = parser("side_init", __doc__.splitlines()[0]).parse_args(argv)
    run(TINY_MODEL if args.quick else VIT_B16["model"]).write(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
