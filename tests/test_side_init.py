"""TS-FSAR's side-network init (pipeline/side_init.py) equals the released prune_and_initialize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.side_init import (
    BlockWeights,
    block_weights,
    exact_pca,
    export_side_init,
    pca_function,
    reduce_matrix,
    reduce_vector,
    released_pca,
    side_init,
)
from store.layout import check_tsfsar_init, tsfsar_init_shapes
from tests.reference.tsfsar_weights import CASES, DEPTH, layer_weights, sample

REFERENCE = Path(__file__).resolve().parent / "reference"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small LAPACK calls: a second thread only adds waiting on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Six centred samples in two uncorrelated features (sums of squares 14 and 6): the principal
# components are the features, the scores the columns, signed by their largest entry.
X = np.array([[3, 0], [0, 2], [-1, 0], [-2, 0], [0, -1], [0, -1]], dtype=np.float32)


@pytest.mark.parametrize(
    "pca", [exact_pca, lambda x, n: released_pca(x, n, np.random.RandomState(0))]
)
def test_pca_scores_and_signs_worked_example(pca) -> None:
    np.testing.assert_allclose(pca(X, 1)[:, 0], [3, 0, -1, -2, 0, 0], atol=1e-5)
    # U's largest entry decides the sign, not the data's direction:
    np.testing.assert_allclose(pca(-X, 1)[:, 0], [3, 0, -1, -2, 0, 0], atol=1e-5)
    np.testing.assert_allclose(pca(X + 5.0, 2), X, atol=1e-5)  # centred first


def test_released_matrix_reduction_keeps_the_first_rows_or_columns() -> None:
    pca = pca_function("exact")
    # target rows >= target columns: PCA over the rows, the first target rows kept
    np.testing.assert_allclose(reduce_matrix(X, 1, 3, pca), [[3], [0], [-1]], atol=1e-5)
    # fewer target rows: PCA of the transpose, transposed back, the first target columns kept
    np.testing.assert_allclose(reduce_matrix(X.T, 3, 1, pca), [[3, 0, -1]], atol=1e-5)


def test_vectors_are_bicubically_interpolated_as_released() -> None:
    v = np.arange(12, dtype=np.float32) ** 2
    want = F.interpolate(torch.from_numpy(v).view(1, 1, 12, 1), size=(4, 1), mode="bicubic")
    np.testing.assert_array_equal(reduce_vector(v, 4), want.view(4).numpy())
    np.testing.assert_allclose(reduce_vector(np.full(768, 0.5, np.float32), 256), 0.5)


def _blocks(width: int) -> list[BlockWeights]:
    out = []
    for k in range(1, DEPTH + 1):
        w = layer_weights(width, k)

        def pair(name: str, w: dict = w) -> tuple[np.ndarray, np.ndarray]:
            return w[f"{name}.weight"], w[f"{name}.bias"]

        attn = {n: pair(f"self_attn.{n}_proj") for n in ("q", "k", "v")}
        attn["proj"] = pair("self_attn.out_proj")
        norms = {"norm1": pair("layer_norm1"), "norm2": pair("layer_norm2")}
        out.append(BlockWeights(attn, norms, {"fc1": pair("mlp.fc1"), "fc2": pair("mlp.fc2")}))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_released_method_equals_the_released_code(case: str) -> None:
    """tests/reference/make_tsfsar_init.py ran the released LSN (scikit-learn 1.3.2, numpy seeded 0
    as its main.py) on these blocks; fsar's replay matches it to float32 rounding."""
    ref = np.load(REFERENCE / "tsfsar_init_reference.npz")
    width, side, adapter = CASES[case]
    got = side_init(_blocks(width), side, adapter, pca_function("released"))
    assert set(got) == set(tsfsar_init_shapes(DEPTH, side, adapter))
    for key, value in got.items():
        want = ref[f"{case}/{key}"]
        assert value.shape == tuple(ref[f"{case}/{key}/shape"]), key
        scale = np.abs(want).max()
        np.testing.assert_allclose(sample(value), want, atol=2e-3 * scale, rtol=0, err_msg=key)
    if case == "full":  # matrices of at most 500 rows: the released solver is the exact PCA
        exact = side_init(_blocks(width), side, adapter, pca_function("exact"))
        for key, value in exact.items():
            np.testing.assert_allclose(value, got[key], atol=5e-4 * np.abs(value).max())


def test_open_clip_blocks_map_to_the_released_names() -> None:
    """A Hugging Face CLIP layer computed from `block_weights` equals the open_clip resblock."""
    from pipeline.model import load_clip

    clip = load_clip("fsar-tiny-vit", "none")
    block = clip.visual.transformer.resblocks[3]
    w = block_weights(block)
    x = torch.randn(2, 17, clip.width)
    heads = block.attn.num_heads

    def linear(x: torch.Tensor, pair: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        return F.linear(x, torch.from_numpy(pair[0]), torch.from_numpy(pair[1]))

    def norm(x: torch.Tensor, pair: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        weight, bias = (torch.from_numpy(p) for p in pair)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=block.ln_1.eps)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 17, heads, -1).transpose(1, 2)

    h = norm(x, w.norms["norm1"])
    q, k, v = (split(linear(h, w.attn[n])) for n in ("q", "k", "v"))
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, -1)
    y = x + linear(attended, w.attn["proj"])
    y = y + linear(F.gelu(linear(norm(y, w.norms["norm2"]), w.mlp["fc1"])), w.mlp["fc2"])
    with torch.no_grad():
        torch.testing.assert_close(y, block(x), atol=1e-5, rtol=1e-5)


def test_export_from_an_open_clip_model_has_the_store_keys() -> None:
    from pipeline.model import load_clip

    clip = load_clip("fsar-tiny-vit", "none")
    tensors, config = export_side_init(clip.model, clip.model_name, clip.pretrained, "exact")
    check_tsfsar_init(tensors, config)
    assert (config["side_width"], config["adapter_dim"], config["depth"]) == (16, 32, 12)
    assert config["pca"]["method"] == "exact"
    first = block_weights(clip.visual.transformer.resblocks[0])
    np.testing.assert_allclose(
        tensors["block01.attn.q.weight"], exact_pca(first.attn["q"][0], 16)[:16], atol=1e-6
    )
