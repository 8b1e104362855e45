"""Training-free baselines: zeroshot, proto, otam."""

from __future__ import annotations

import pytest
import torch

import heads
from tests.heads_fixtures import SPEC, random_inputs, take


def run(head, inputs, support, labels, class_ids, query):
    feats = head.video_features(inputs)
    head.process_support_set(take(feats, support), torch.tensor(labels), torch.tensor(class_ids))
    return head(take(feats, query))


@pytest.mark.parametrize("name", ["zeroshot", "proto", "otam"])
def test_reads_last_cls_and_permutation(name: str) -> None:
    head = heads.create(name)
    head.set_class_text(torch.randn(6, 3, 16))
    assert head.inputs({"layers": [2, 4, 6]}) == {"cls": "cls/layer06"}
    assert not head.trainable
    inputs = random_inputs(head, 6, dim=16)
    a = run(head, inputs, [0, 1, 2], [0, 1, 2], [1, 3, 5], [3, 4, 5])
    b = run(head, inputs, [0, 1, 2], [1, 2, 0], [5, 1, 3], [3, 4, 5])
    assert torch.allclose(a, b[:, [1, 2, 0]], atol=1e-6)


@pytest.mark.parametrize("name", ["proto", "otam"])
def test_identical_shots_equal_one_shot(name: str) -> None:
    head = heads.create(name)
    inputs = random_inputs(head, 5, dim=16)
    one = run(head, inputs, [0, 1], [0, 1], [0, 1], [2, 3, 4])
    many = run(head, inputs, [1, 0, 1, 0], [1, 0, 1, 0], [0, 1], [2, 3, 4])
    assert torch.allclose(one, many, atol=1e-6)


def test_time_reversal_changes_otam_not_proto() -> None:
    for name, should_change in (("proto", False), ("otam", True)):
        head = heads.create(name)
        inputs = random_inputs(head, 4, dim=16)
        a = run(head, inputs, [0, 1], [0, 1], [0, 1], [2, 3])
        flipped = {k: torch.cat([v[:2], v[2:].flip(1)]) for k, v in inputs.items()}
        b = run(head, flipped, [0, 1], [0, 1], [0, 1], [2, 3])
        assert bool((a - b).abs().max() > 1e-4) == should_change, name


def test_zeroshot_ignores_support_and_matches_text() -> None:
    head = heads.create("zeroshot")
    text = torch.randn(4, 3, 16)
    head.set_class_text(text)
    # a video whose frames all equal class 2's mean text is classified as class 2
    video = text.mean(1)[2].expand(1, 5, 16)
    feats = head.video_features({"cls": video})
    head.process_support_set(feats, torch.tensor([0]), torch.tensor([0, 2, 3]))
    assert head(feats).argmax(-1).item() == 1
    assert SPEC["layers"][-1] == 12
