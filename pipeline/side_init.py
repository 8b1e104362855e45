"""TS-FSAR's side-network initialisation, computed from the CLIP weights at extraction.

The released `LSN.prune_and_initialize` (trainers/model.py): PCA of each block's weight matrices, bicubic
interpolation of its vectors; `fsar-extract` stores the result as `weights/tsfsar_init.safetensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UnsupportedModel
from store.layout import TSFSAR_MLP_RATIO, tsfsar_side_width

PCA_METHODS = ("released", "exact")
# The released main.py calls np.random.seed(cfg.TRAIN.RANDOM_SEED), 0 in every config, then builds
# the model: scikit-learn's unseeded PCA draws from that global stream, in the order of `side_init`.
RELEASED_SEED = 0
RELEASED_SOLVER = (
    "scikit-learn 1.3.2 PCA(n_components).fit_transform, svd_solver auto: full SVD up to 500 rows "
    "and columns, else randomized (10 oversamples, 4 or 7 LU power iterations), float32, signs by "
    "svd_flip on U; the global numpy stream seeded 0, drawn in the released order"
)
EXACT_SOLVER = "full SVD of the centred matrix in float64, signs by svd_flip on U"

Pca = Callable[[np.ndarray, int], np.ndarray]  # (samples x features, n_components) -> scores


# ---------------------------------------------------------------------- scikit-learn 1.3.2's PCA
# Replayed with torch's LAPACK (the released run used MKL's through numpy/scipy): torch's threads
# are the ones fsar sets, so the PCA does not oversubscribe a busy machine.
def _svd_flip(
    u: torch.Tensor, vt: torch.Tensor, u_based: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn.utils.extmath.svd_flip (1.3.2): the largest-magnitude entry of each column of U
    (of each row of Vt when not `u_based`) is made positive (the first of equal magnitudes)."""
    if u_based:
        signs = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True)))[0]
    else:
        signs = torch.sign(vt.gather(1, vt.abs().argmax(dim=1, keepdim=True)))[:, 0]
    return u * signs, vt * signs[:, None]


def _lu_pl(a: torch.Tensor) -> torch.Tensor:
    """scipy.linalg.lu(a, permute_l=True)[0]: the permuted unit-lower factor P @ L."""
    p, lower, _ = torch.linalg.lu(a)
    return p @ lower


def _range_finder(
    a: torch.Tensor, size: int, n_iter: int, rng: np.random.RandomState
) -> torch.Tensor:
    """sklearn's randomized_range_finder with the LU normaliser ('auto' for n_iter > 2)."""
    q = torch.from_numpy(rng.normal(size=(a.shape[1], size)).astype(np.float32))
    for _ in range(n_iter):
        q = _lu_pl(a.T @ _lu_pl(a @ q))
    return torch.linalg.qr(a @ q, mode="reduced")[0]


def _randomized_svd(
    m: torch.Tensor, n: int, rng: np.random.RandomState
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, S) of sklearn's randomized_svd (1.3.2) with PCA's arguments: 10 oversamples, n_iter
    'auto' (7 below a tenth of the smaller side, else 4), transposed when wider than tall."""
    n_iter = 7 if n < 0.1 * min(m.shape) else 4
    transpose = m.shape[0] < m.shape[1]
    a = m.T if transpose else m
    q = _range_finder(a, n + 10, n_iter, rng)
    uhat, s, vt = torch.linalg.svd(q.T @ a, full_matrices=False)
    u, vt = _svd_flip(q @ uhat, vt, u_based=not transpose)
    return (vt[:n].T if transpose else u[:, :n]), s[:n]


def released_pca(x: np.ndarray, n: int, rng: np.random.RandomState) -> np.ndarray:
    """`PCA(n_components=n).fit_transform(x)` as scikit-learn 1.3.2 computes it for a float32
    matrix: the solver 'auto' picks, the centring, the sign convention, the scores U * S."""
    t = torch.tensor(np.asarray(x), dtype=torch.float32)
    t = t - t.mean(dim=0)
    if max(t.shape) > 500 and 1 <= n < 0.8 * min(t.shape):
        u, s = _randomized_svd(t, n, rng)
    else:
        u, s, vt = torch.linalg.svd(t, full_matrices=False)
        u, _ = _svd_flip(u, vt, u_based=True)
    return (u[:, :n] * s[:n]).numpy()


def exact_pca(x: np.ndarray, n: int) -> np.ndarray:
    """The PCA the randomized solver approximates: full SVD in float64, the same signs, float32."""
    t = torch.tensor(np.asarray(x), dtype=torch.float64)
    u, s, vt = torch.linalg.svd(t - t.mean(dim=0), full_matrices=False)
    u, _ = _svd_flip(u, vt, u_based=True)
    return (u[:, :n] * s[:n]).float().numpy()


def pca_function(method: str, seed: int = RELEASED_SEED) -> Pca:
    """The PCA a method names; `released` draws from one stream seeded as the released run."""
    if method == "exact":
        return exact_pca
    if method == "released":
        rng = np.random.RandomState(seed)
        return lambda x, n: released_pca(x, n, rng)
    raise ValueError(f"unknown PCA method {method!r}: use {' or '.join(PCA_METHODS)}")


# ---------------------------------------------------------------------- the released LSN.PCA
def reduce_matrix(w: np.ndarray, target_cols: int, target_rows: int, pca: Pca) -> np.ndarray:
    """LSN.PCA for a matrix: PCA over rows (keeping the first `target_rows` rows) when
    target_rows >= target_cols, else over columns of the transpose (keeping the first columns)."""
    if target_rows >= target_cols:
        return pca(w, target_cols)[:target_rows, :]
    return pca(w.T, target_rows).T[:, :target_cols]


def reduce_vector(v: np.ndarray, target: int) -> np.ndarray:
    """LSN.PCA for a vector: bicubic `F.interpolate` of the (1, 1, N, 1) tensor to (target, 1)."""
    t = torch.from_numpy(np.asarray(v, dtype=np.float32))[None, None, :, None]
    return F.interpolate(t, size=(target, 1), mode="bicubic")[0, 0, :, 0].numpy()


# ---------------------------------------------------------------------- CLIP blocks
@dataclass(frozen=True)
class BlockWeights:
    """One CLIP block under the released (Hugging Face) names, float32 (out x in) matrices."""

    attn: dict[str, tuple[np.ndarray, np.ndarray]]  # q, k, v, proj -> (weight, bias)
    norms: dict[str, tuple[np.ndarray, np.ndarray]]  # norm1, norm2 -> (weight, bias)
    mlp: dict[str, tuple[np.ndarray, np.ndarray]]  # fc1, fc2 -> (weight, bias)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()


def block_weights(block: nn.Module) -> BlockWeights:
    """An open_clip resblock under HF CLIP's names: q/k/v_proj are the thirds of in_proj,
    out_proj is out_proj, layer_norm1/2 are ln_1/ln_2, fc1/fc2 are mlp.c_fc/c_proj."""
    attn = block.attn
    if getattr(attn, "in_proj_weight", None) is None or getattr(attn, "in_proj_bias", None) is None:
        raise UnsupportedModel("the side-network init needs blocks with packed q/k/v projections")
    q, k, v = _np(attn.in_proj_weight).reshape(3, -1, attn.in_proj_weight.shape[1])
    qb, kb, vb = _np(attn.in_proj_bias).reshape(3, -1)
    out = attn.out_proj
    return BlockWeights(
        attn={"q": (q, qb), "k": (k, kb), "v": (v, vb), "proj": (_np(out.weight), _np(out.bias))},
        norms={
            "norm1": (_np(block.ln_1.weight), _np(block.ln_1.bias)),
            "norm2": (_np(block.ln_2.weight), _np(block.ln_2.bias)),
        },
        mlp={
            "fc1": (_np(block.mlp.c_fc.weight), _np(block.mlp.c_fc.bias)),
            "fc2": (_np(block.mlp.c_proj.weight), _np(block.mlp.c_proj.bias)),
        },
    )


def _attention(prefix: str, block: BlockWeights, width: int, pca: Pca) -> dict[str, np.ndarray]:
    out = {}
    for name, (w, _) in block.attn.items():  # all four matrices first: the released draw order
        out[f"{prefix}.{name}.weight"] = reduce_matrix(w, width, width, pca)
    for name, (_, b) in block.attn.items():
        out[f"{prefix}.{name}.bias"] = reduce_vector(b, width)
    return out


def side_init(
    blocks: Sequence[BlockWeights],
    side_width: int,
    adapter_dim: int,
    pca: Pca,
    mlp_ratio: float = TSFSAR_MLP_RATIO,
) -> dict[str, np.ndarray]:
    """`LSN.prune_and_initialize` for side blocks 1..depth and the Adapter (from the last block),
    calling `pca` in the released order (q, k, v, out, fc1, fc2 per block, then the Adapter's)."""
    hidden = int(side_width * mlp_ratio)
    out: dict[str, np.ndarray] = {}
    for k, block in enumerate(blocks, start=1):
        prefix = f"block{k:02d}"
        out.update(_attention(f"{prefix}.attn", block, side_width, pca))
        for name, (w, b) in block.norms.items():
            out[f"{prefix}.{name}.weight"] = reduce_vector(w, side_width)
            out[f"{prefix}.{name}.bias"] = reduce_vector(b, side_width)
        (w1, b1), (w2, b2) = block.mlp["fc1"], block.mlp["fc2"]
        out[f"{prefix}.mlp.fc1.weight"] = reduce_matrix(w1, side_width, hidden, pca)
        out[f"{prefix}.mlp.fc2.weight"] = reduce_matrix(w2, hidden, side_width, pca)
        out[f"{prefix}.mlp.fc1.bias"] = reduce_vector(b1, hidden)
        out[f"{prefix}.mlp.fc2.bias"] = reduce_vector(b2, side_width)
    out.update(_attention("adapter.attn", blocks[-1], adapter_dim, pca))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def export_side_init(
    model: nn.Module, model_name: str, pretrained: str, method: str = "released"
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The side-network init of an open_clip model and its config (store/layout.py's keys)."""
    visual = model.visual if hasattr(model, "visual") else model
    blocks = [block_weights(b) for b in visual.transformer.resblocks]
    width, dim = int(visual.transformer.width), int(visual.proj.shape[1])
    side = tsfsar_side_width(width)
    if dim > width:
        raise UnsupportedModel(f"the Adapter width {dim} exceeds the ViT width {width}: no PCA")
    tensors = side_init(blocks, side, dim, pca_function(method))
    config = {
        "side_width": side,
        "mlp_ratio": TSFSAR_MLP_RATIO,
        "adapter_dim": dim,
        "depth": len(blocks),
        "width": width,
        "model": model_name,
        "pretrained": pretrained,
        "pca": {
            "method": method,
            "solver": RELEASED_SOLVER if method == "released" else EXACT_SOLVER,
            **({"seed": RELEASED_SEED} if method == "released" else {}),
        },
    }
    return tensors, config
