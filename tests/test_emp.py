"""EMP-Net head: parameter count, invariances, caching and ablations."""

from __future__ import annotations

import pytest
import torch

import heads
from tests.heads_fixtures import SPEC, random_inputs, reverse_time, take

DIM = 32


def make(**cfg) -> heads.FewShotHead:
    torch.manual_seed(0)
    head = heads.create("emp", dim=DIM, **cfg)
    head.set_class_text(torch.randn(12, 4, DIM, generator=torch.Generator().manual_seed(3)))
    return head.eval()


def scores(head, inputs, support_idx, labels, class_ids, query_idx):
    with torch.no_grad():
        feats = head.video_features(inputs)
        head.process_support_set(
            take(feats, support_idx), torch.tensor(labels), torch.tensor(class_ids)
        )
        return head(take(feats, query_idx))


def test_parameter_count_matches_released_model() -> None:
    def count(head) -> int:
        return sum(p.numel() for p in head.parameters() if p.requires_grad)

    assert count(heads.create("emp", dim=512, loss="released")) == 7_495_296
    # the default loss adds one learnable scale per score: 3 matching + 3 text-visual
    assert count(heads.create("emp", dim=512)) == 7_495_296 + 6
    assert count(heads.create("emp", dim=512, learn_temperature=False)) == 7_495_296


def test_ablations_change_the_architecture() -> None:
    full = sum(p.numel() for p in heads.create("emp", dim=64).parameters())
    no_text = sum(p.numel() for p in heads.create("emp", dim=64, no_text=True).parameters())
    token = sum(p.numel() for p in heads.create("emp", dim=64, levels="token").parameters())
    assert no_text < full and token < no_text
    assert heads.create("emp", dim=64, no_skip_fusion=True).inputs(SPEC) == {
        "deep": "tokens/layer12"
    }
    with pytest.raises(ValueError, match="levels"):
        heads.create("emp", dim=64, levels="patch")


def test_any_dims_frames_patches() -> None:
    head = heads.create("emp", dim=48).eval()
    head.set_class_text(torch.randn(5, 2, 48))
    inputs = random_inputs(head, 4, frames=3, patches=16, dim=48)
    out = scores(head, inputs, [0, 1], [0, 1], [2, 4], [2, 3])
    assert out.shape == (2, 2) and torch.allclose(out.sum(-1), torch.ones(2))


def test_class_order_permutation_permutes_scores() -> None:
    head = make()
    inputs = random_inputs(head, 6, dim=DIM)
    a = scores(head, inputs, [0, 1, 2], [0, 1, 2], [3, 5, 7], [3, 4, 5])
    # class 0 <-> 2 swapped in labels and ids
    b = scores(head, inputs, [0, 1, 2], [2, 1, 0], [7, 5, 3], [3, 4, 5])
    assert torch.allclose(a, b[:, [2, 1, 0]], atol=1e-6)


def test_identical_shots_equal_one_shot() -> None:
    head = make()
    inputs = random_inputs(head, 5, dim=DIM)
    one = scores(head, inputs, [0, 1], [0, 1], [1, 2], [2, 3, 4])
    three = scores(head, inputs, [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [1, 2], [2, 3, 4])
    assert torch.allclose(one, three, atol=1e-6)


def test_reversing_query_frames_changes_scores() -> None:
    head = make()
    inputs = random_inputs(head, 5, dim=DIM)
    a = scores(head, inputs, [0, 1, 2], [0, 1, 2], [0, 1, 2], [3, 4])
    reversed_query = {k: torch.cat([v[:3], v[3:].flip(1)]) for k, v in inputs.items()}
    b = scores(head, reversed_query, [0, 1, 2], [0, 1, 2], [0, 1, 2], [3, 4])
    assert (a - b).abs().max() > 1e-4
    assert reverse_time(inputs).keys() == inputs.keys()


@pytest.mark.parametrize("shot", [1, 2])
def test_cached_features_and_batched_episodes_equal_direct(shot: int) -> None:
    head = make()
    inputs = random_inputs(head, 8, dim=DIM)
    own_class = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    support = [0, 1, 2] if shot == 1 else [0, 3, 1, 4, 2, 5]
    labels = own_class[support].tolist()
    direct = scores(head, inputs, support, labels, [0, 1, 2], [6, 7])
    with torch.no_grad():
        cached = head.cache_features(head.video_features(inputs), own_class, shot)
        # two identical episodes scored in one batched call
        s = {k: torch.stack([v[support]] * 2) for k, v in cached.items()}
        q = {k: torch.stack([v[[6, 7]]] * 2) for k, v in cached.items()}
        head.process_support_set(s, torch.tensor([labels] * 2), torch.tensor([[0, 1, 2]] * 2))
        batched = head(q)
    assert batched.shape == (2, 2, 3)
    assert torch.allclose(batched[0], direct, atol=1e-5) and torch.allclose(
        batched[1], direct, atol=1e-5
    )


def test_loss_trains_every_parameter_and_options() -> None:
    head = make().train()
    inputs = random_inputs(head, 6, dim=DIM)
    feats = head.video_features(inputs)
    head.process_support_set(
        take(feats, [0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 5, 7])
    )
    prediction = head(take(feats, [3, 4, 5]))
    loss = head.loss(torch.tensor([0, 1, 2]))
    loss.backward()
    assert torch.allclose(prediction.sum(-1), torch.ones(3))
    assert all(p.grad is not None for p in head.parameters())
    assert head.log_scale.grad is not None and head.log_scale.grad.abs().min() > 0
    options = make(temperature=0.1, layer_weights=True, score_weights=True).train()
    feats = options.video_features(inputs)
    options.process_support_set(
        take(feats, [0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 5, 7])
    )
    options(take(feats, [3, 4, 5]))
    options.loss(torch.tensor([0, 1, 2])).backward()
    assert options.score_weights.grad is not None and options.layer_weights.grad is not None


def test_no_text_head_needs_no_text() -> None:
    torch.manual_seed(0)
    head = heads.create("emp", dim=DIM, no_text=True, levels="token,patch").eval()
    inputs = random_inputs(head, 4, dim=DIM)
    out = scores(head, inputs, [0, 1], [0, 1], [0, 1], [2, 3])
    assert out.shape == (2, 2) and not head.uses_text


def test_released_loss_is_cross_entropy_of_probabilities() -> None:
    """Worked example: the released loss is F.cross_entropy applied to softmax outputs, six terms."""
    head = make(loss="released").train()
    inputs = random_inputs(head, 6, dim=DIM)
    torch.manual_seed(1)
    feats = head.video_features(inputs)
    head.process_support_set(
        take(feats, [0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 5, 7])
    )
    prediction = head(take(feats, [3, 4, 5]))
    labels = torch.tensor([0, 1, 2])
    loss = head.loss(labels)
    scores = list(head._scores.values())  # three matching, then three text-visual (E, V, N)
    both = torch.tensor([[0, 1, 2, 0, 1, 2]])
    expected = sum(
        torch.nn.functional.cross_entropy(torch.softmax(s[0], -1), labels) for s in scores[:3]
    ) + sum(
        torch.nn.functional.cross_entropy(
            torch.softmax(torch.cat([head._support_text[lv], head._query_text[lv]], 1)[0], -1),
            both[0],
        )
        for lv in head.levels
    )
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(
        prediction, torch.stack([torch.softmax(s, -1) for s in scores[:6]]).mean(0)[0], atol=1e-6
    )
    # each term is bounded by log(N) + 1: the plateau the released loss trains on
    assert 0 < loss.item() < 6 * (torch.log(torch.tensor(3.0)).item() + 1)


def test_ce_loss_scales_each_score_by_its_learnable_temperature() -> None:
    head = make(temperature=0.5, text_temperature=0.1).train()
    assert torch.allclose(head.log_scale.exp(), torch.tensor([2.0, 2.0, 2.0, 10.0, 10.0, 10.0]))
    inputs = random_inputs(head, 6, dim=DIM)
    feats = head.video_features(inputs)
    head.process_support_set(
        take(feats, [0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 5, 7])
    )
    prediction = head(take(feats, [3, 4, 5]))
    labels = torch.tensor([0, 1, 2])
    scores = list(head._scores.values())
    expected = sum(torch.nn.functional.cross_entropy(2.0 * s[0], labels) for s in scores[:3]) + sum(
        torch.nn.functional.cross_entropy(
            10.0 * torch.cat([head._support_text[lv], head._query_text[lv]], 1)[0],
            torch.tensor([0, 1, 2, 0, 1, 2]),
        )
        for lv in head.levels
    )
    assert torch.allclose(head.loss(labels), expected, atol=1e-5)
    scaled = [2.0 * s for s in scores[:3]] + [10.0 * s for s in scores[3:]]
    assert torch.allclose(
        prediction, torch.stack([torch.softmax(s, -1) for s in scaled]).mean(0)[0], atol=1e-6
    )
    with pytest.raises(ValueError, match="loss"):
        heads.create("emp", dim=DIM, loss="focal")


def test_attention_equals_the_released_formula() -> None:
    """Released `Attention_qkv.forward` (models/base/few_shot.py:926-944): bias-free q/k/v, heads
    split, softmax(q k^T * dim_head^-0.5) v, heads joined, to_out; values and gradients, for the
    8-frame temporal, 9-token fusion and 197-token spatial sequences."""
    from heads.emp import Attention

    torch.manual_seed(0)
    attn = Attention(DIM, 4, DIM // 8, 0.0)
    for n, m in ((8, 8), (8, 9), (197, 197)):
        q, kv = torch.randn(3, n, DIM, requires_grad=True), torch.randn(3, m, DIM)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], x.shape[1], 4, -1).transpose(1, 2)

        qh, kh, vh = split(attn.to_q(q)), split(attn.to_k(kv)), split(attn.to_v(kv))
        dots = torch.einsum("bhid,bhjd->bhij", qh, kh) * (DIM // 8) ** -0.5
        out = torch.einsum("bhij,bhjd->bhid", dots.softmax(dim=-1), vh)
        want = attn.to_out(out.transpose(1, 2).reshape(3, n, -1))
        ours = attn(q, kv, kv)
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
        (g_ours,) = torch.autograd.grad(ours.sum(), q)
        (g_want,) = torch.autograd.grad(want.sum(), q)
        torch.testing.assert_close(g_ours, g_want, atol=1e-5, rtol=1e-4)


def test_text_fusion_per_text_equals_the_layer_on_the_concatenated_tokens() -> None:
    """fuse_text projects each text once for the sequences sharing it (patch positions): the
    same as the released call layer(x + t, [x; t]) with t repeated per sequence."""
    from heads.emp import TransformerLayer

    torch.manual_seed(0)
    layer = TransformerLayer(DIM, 4, DIM // 8, DIM // 4, 0.2, 0.05).eval()
    x, text = torch.randn(12, 5, DIM), torch.randn(3, DIM)  # 3 texts, 4 sequences each
    t = text.repeat_interleave(4, 0).unsqueeze(1)
    want = layer(x + t, torch.cat([x, t], dim=1))
    torch.testing.assert_close(layer.fuse_text(x, text), want, atol=1e-5, rtol=1e-5)
