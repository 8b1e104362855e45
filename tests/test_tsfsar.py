"""TS-FSAR head: sizes, invariances, episode independence, store roles and the evaluation shortcuts."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import heads
from heads.config import ConfigError
from heads.evaluate import class_major
from heads.tsfsar import TSFSAR, parse_layers

TAPS = [0, 2, 4]


def make(**options) -> TSFSAR:
    torch.manual_seed(0)
    options = {"taps": TAPS, **options}
    head = heads.create("tsfsar", dim=32, width=48, depth=4, frames=4, base_classes=6,
                        side_width=32, **options)  # fmt: skip
    head.set_class_text(torch.randn(12, 3, 32, generator=torch.Generator().manual_seed(3)))
    head.set_base_classes(pd.DataFrame({"label": range(12), "split": ["train"] * 6 + ["test"] * 6}))
    return head.eval()


def inputs(n_videos: int, seed: int = 0, frames: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"tap{t:02d}": torch.randn(n_videos, frames, 10, 48, generator=g).half() for t in TAPS}
    out["clip"] = torch.randn(n_videos, frames, 32, generator=g).half()
    return out


def scores(head, feats, support, labels, class_ids, query) -> torch.Tensor:
    with torch.no_grad():
        head.process_support_set(
            {k: v[support] for k, v in feats.items()}, torch.tensor(labels), torch.tensor(class_ids)
        )
        return head({k: v[query] for k, v in feats.items()})


def test_parameter_count_at_vit_b16_shapes() -> None:
    """13 taps of width 768, side width 256 (12 blocks), adapter 512, 31 base classes (HMDB51)."""
    head = heads.create("tsfsar", base_classes=31)
    count = {name: sum(p.numel() for p in params) for name, params in
             ((g, [p for _, p in named]) for g, named in head.parameter_groups().items())}  # fmt: skip
    side_block = 4 * (256 * 256 + 256) + 2 * 2 * 256 + 256 * 1024 * 2 + 1024 + 256
    assert count["side"] == 13 * (2 * 768 + 768 * 256) + 12 * (side_block + 1)
    assert count["head"] == 256 * 257 // 2 * 31 + 2 * 256 + 256 * 512
    assert count["generator"] == 256 * 64 and count["adapter"] == 4 * (512 * 512 + 512) + 2 * 512
    assert sum(count.values()) == sum(p.numel() for p in head.parameters()) == 14_272_396


def test_features_are_per_video_and_float32() -> None:
    head = make()
    feats = head.video_features(inputs(3))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "adc": (3, 4, 32 * 33 // 2), "task": (3, 32), "clip_text": (3, 32), "side_text": (3, 32),
    }  # fmt: skip
    assert all(v.dtype == torch.float32 for v in feats.values())
    one = head.video_features({k: v[1:2] for k, v in inputs(3).items()})
    assert all(torch.allclose(one[k][0], feats[k][1], atol=1e-5) for k in feats)  # no batch mixing


def test_class_order_permutation_permutes_scores() -> None:
    head = make()
    feats = head.video_features(inputs(6))
    a = scores(head, feats, [0, 1, 2], [0, 1, 2], [7, 8, 9], [3, 4, 5])
    b = scores(head, feats, [0, 1, 2], [2, 1, 0], [9, 8, 7], [3, 4, 5])
    assert torch.allclose(a, b[:, [2, 1, 0]], atol=1e-6)


def test_identical_shots_equal_one_shot_and_queries_are_scored_alone() -> None:
    head = make()
    feats = head.video_features(inputs(6))
    one = scores(head, feats, [0, 1], [0, 1], [7, 8], [2, 3, 4])
    three = scores(head, feats, [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [7, 8], [2, 3, 4])
    assert torch.allclose(one, three, atol=1e-6)
    alone = scores(head, feats, [0, 1], [0, 1], [7, 8], [3])
    assert torch.allclose(alone, one[1:2], atol=1e-6)


def test_reversing_query_frames_changes_the_vision_scores() -> None:
    head = make(fuse_clip=0.0, fuse_side=0.0)
    x = inputs(4)
    forward = head.video_features(x)
    backward = head.video_features({k: v.flip(1) for k, v in x.items()})
    a = scores(head, forward, [0, 1, 2], [0, 1, 2], [7, 8, 9], [3])
    b = scores(head, {k: torch.cat([forward[k][:3], backward[k][3:]]) for k in forward},
               [0, 1, 2], [0, 1, 2], [7, 8, 9], [3])  # fmt: skip
    assert not torch.allclose(a, b, atol=1e-4)


def test_class_means_from_the_feature_table_equal_the_supports() -> None:
    """Evaluation passes K-shot supports as class means of `adc` and `task` (support_means)."""
    head = make()
    feats = head.video_features(inputs(9))
    labels = [0, 0, 1, 1, 2, 2]
    assert class_major(torch.tensor([labels]).numpy(), 3, 2)
    full = scores(head, feats, list(range(6)), labels, [7, 8, 9], [6, 7, 8])
    means = {k: feats[k][:6].view(3, 2, *feats[k].shape[1:]).mean(1) for k in head.support_means(2)}
    with torch.no_grad():
        head.process_support_set(means, torch.arange(3), torch.tensor([7, 8, 9]))
        shortcut = head({k: v[6:] for k, v in feats.items()})
    assert torch.allclose(full, shortcut, atol=1e-5)


def test_store_roles_and_missing_taps() -> None:
    head = make()
    spec = {"recipe": "emp+ts", "taps": [0, 1, 2, 3, 4], "depth": 4, "layers": [1, 2, 4]}
    assert head.inputs(spec) == {
        "tap00": "resid/layer00", "tap02": "resid/layer02", "tap04": "resid/layer04",
        "clip": "cls/layer04",
    }  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"reads taps 0,2,4; the store has 0,4: extract with --recipe ts"
    ):
        head.inputs({**spec, "taps": [0, 4]})
    spec.update(dim=32, width=48, frames=4)
    manifest = pd.DataFrame({"label": [0, 1, 1, 2], "split": ["train"] * 3 + ["test"]})
    assert TSFSAR.store_options(spec, manifest) == dict(
        dim=32, width=48, taps=[0, 1, 2, 3, 4], depth=4, frames=4, base_classes=2, side_width=16
    )  # side width: store.layout.tsfsar_side_width(48), as the store's init file
    assert "base_classes" not in TSFSAR.store_options(spec)


def test_options_are_checked() -> None:
    assert parse_layers("0, 4,8,12", "taps", 2) == [0, 4, 8, 12]
    for bad in ("0", "0,0", "a,b", "-1,3"):
        with pytest.raises(ValueError, match="taps"):
            make(taps=bad)
    assert [b.temporal for b in make(temporal_blocks="").side.blocks] == [False, False]
    assert [b.temporal for b in make(temporal_blocks="1,2").side.blocks] == [True, False]


def test_training_needs_base_classes_the_store_has() -> None:
    head = make()
    from heads.config import TrainConfig

    manifest = pd.DataFrame({"label": [0, 1, 2], "status": ["ok"] * 3, "split": ["train"] * 3,
                             "class_name": ["a", "b", "c"], "video_id": ["x", "y", "z"], "row": [0, 1, 2]})  # fmt: skip
    with pytest.raises(ConfigError, match="built for 6 train classes.*has 3.*base_classes=3"):
        head.train_sampler(manifest, TrainConfig(store="x"))
