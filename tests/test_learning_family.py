"""The generated stores of the learning map are what their factors say (store/learning_family.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from heads.clip_block import load_last_block
from store import open_store
from store.learning_family import (
    BASE,
    FAMILY,
    class_paths,
    class_texts,
    layer_share,
    write_learning_store,
)

SMALL = dict(base_classes=4, val_classes=2, test_classes=2, videos_per_class=2, dim=16, frames=4,
             patches=4, carriers=1)  # fmt: skip


def test_rows_change_one_factor_of_the_base_row() -> None:
    base = vars(BASE)
    for name, factors in FAMILY.items():
        changed = {k for k, v in vars(factors).items() if base[k] != v}
        assert (len(changed) == 1) == (name not in ("base", "independent")), (name, changed)
    assert len({k for k, v in vars(FAMILY["independent"]).items() if base[k] != v}) > 1


def test_order_pairs_are_time_reversals_and_content_classes_hold_still() -> None:
    rng = np.random.default_rng(0)
    order = class_paths(BASE, 6, rng)
    assert order.shape == (6, BASE.frames, BASE.signal_dim)
    assert np.allclose(np.linalg.norm(order, axis=-1), 1)
    assert np.allclose(order[1], order[0][::-1]) and np.allclose(order[5], order[4][::-1])
    assert not np.allclose(order[0], order[1])  # a pair differs only in order, but it does differ
    content = class_paths(replace(BASE, classes_by="content"), 6, rng)
    assert np.allclose(content, content[:, :1])  # one direction for the whole video


def test_texts_informative_random_or_misleading() -> None:
    rng = np.random.default_rng(0)
    paths = class_paths(BASE, 8, rng)
    out = np.linalg.qr(rng.standard_normal((BASE.dim, BASE.dim)))[0][: BASE.signal_dim]
    texts = {
        kind: class_texts(replace(BASE, text=kind), paths, [4, 4], out, np.random.default_rng(1))
        for kind in ("informative", "random", "misleading")
    }
    assert texts["informative"].shape == (8, 16, BASE.dim)
    mean = {
        k: t.mean(1) / np.linalg.norm(t.mean(1), axis=-1, keepdims=True) for k, t in texts.items()
    }
    truth = paths.mean(1) @ out
    truth /= np.linalg.norm(truth, axis=-1, keepdims=True)
    assert np.all(np.sum(mean["informative"] * truth, -1) > 0.9)
    # misleading: each class gets the text of the class two on in its own split (another pair's)
    shifted = np.concatenate([np.roll(truth[:4], -2, 0), np.roll(truth[4:], -2, 0)])
    assert np.all(np.sum(mean["misleading"] * shifted, -1) > 0.9)
    assert np.abs(np.sum(mean["random"] * truth, -1)).mean() < 0.5


def test_layer_shares() -> None:
    taps = range(13)
    assert [layer_share("graded", k) for k in (0, 4, 11, 12)] == [0, 4 / 11, 1, 1]
    assert [layer_share("deep", k) for k in taps] == [0.0] * 9 + [1.0] * 4
    assert [layer_share("shallow", k) for k in taps] == [0.0] + [1.0] * 4 + [0.0] * 8
    assert {layer_share("equal", k) for k in taps[1:]} == {1.0}


def test_store_is_consistent_like_an_extraction(tmp_path: Path) -> None:
    """tokens/layer12 is the cached last block applied to tokens/layer12_in; cls/ is token 0."""
    write_learning_store(tmp_path / "s", replace(BASE, **SMALL)).close()
    store = open_store(tmp_path / "s")
    assert store.spec["recipe"] == "emp+last+ts" and store.spec["dim"] == 16
    assert len(store.classes) == 8 and len(store.manifest) == 16
    rows = store.select(split="test")
    data = store.read(rows, ["tokens/layer12", "tokens/layer12_in", "cls/layer12"])
    block = load_last_block(*store.read_lastblock())
    x = torch.as_tensor(data["tokens/layer12_in"][:, 0].astype(np.float32))
    with torch.no_grad():
        out = block(x.flatten(0, 1)).reshape(data["tokens/layer12"][:, 0].shape).numpy()
    np.testing.assert_allclose(out, data["tokens/layer12"][:, 0], atol=0.02)
    np.testing.assert_array_equal(data["cls/layer12"], data["tokens/layer12"][:, :, :, 0])
    # the ts taps: every block's raw stream; the last block starts as the identity (tap 12 = its input)
    assert store.spec["taps"] == list(range(13))
    taps = store.read(rows, ["resid/layer00", "resid/layer04", "resid/layer12"])
    np.testing.assert_array_equal(taps["resid/layer12"], data["tokens/layer12_in"])
    assert taps["resid/layer04"].shape == (len(rows), 1, 4, 5, 16)
    assert np.abs(taps["resid/layer00"]).max() > 0  # tap 0: nuisance and noise, no signal
    text, _ = store.text()
    assert text.shape == (8, 16, 16)


def test_odd_class_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even number of classes"):
        write_learning_store(tmp_path / "s", replace(BASE, **{**SMALL, "test_classes": 3}))
