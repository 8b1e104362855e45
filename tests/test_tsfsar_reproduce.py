"""The released TS-FSAR recipe, point by point: each test pins a released behaviour by a worked example.

References are to github.com/yaozhang0417/TS-FSAR at 1a91053 (docs/reproducing.md has the table). The
released formulas are re-implemented here from that source; no released file is read at test time
(tests/test_tsfsar_released.py compares with the released modules themselves when a checkout is given).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import heads
from heads.config import ConfigError, TrainConfig
from heads.presets import BENCHMARKS
from heads.train import learning_rate, make_optimizer
from heads.tsdcm import alpha_distance_covariance, task_matching, upper_triangle
from heads.tsfsar import distillation
from heads.tsfsar_side import temporal_side_blocks

# configs/<benchmark>/Metatrain_<K>shot.yaml (TRAIN.NUM_TRAIN_TASKS :14, VAL_FRE_ITER :16, KD_ALPHA :23,
# CLS_ALPHA :24, SIDE_CLS_ALPHA :25, KD_T :27, TEMP_CLIP :31, LSN.DROPOUT :58, DATA.RES_ALPHA :84,
# SOLVER.GENERATOR_LR :88, LSN_LR :89, LSNHEAD_LR :90, ADAPTER_ALPHA :93, lines of hmdb51's 1-shot
# file) and Metatest_<K>shot.yaml (TEST.FUSE_CLIP, FUSE_VISION, FUSE_SIDE :68-70).
# Common to all: QUERY_PER_CLASS 5, QUERY_PER_CLASS_TEST 1, BATCH_SIZE_PER_TASK 1, NUM_GPUS 1,
# DC_ALPHA 0.4, VIS_ALPHA 1.0, WEIGHT_DECAY 0.1 with adamw, TEMP_LAYERS [6, 8, 10], GATE_T 0.1.
RELEASED = {
    ("hmdb51", 1): dict(tasks=10_000, val=500, lsn=2e-4, head=2e-4, gen=1e-4, adapter=0.5, kd=6.0,
                        cls=1.0, side=1.0, kd_t=10, temp=50.0, drop=0.7, res=0.4, fuse=(0.15, 0.8, 0.05)),
    ("hmdb51", 5): dict(tasks=10_000, val=500, lsn=2e-4, head=2e-4, gen=1e-4, adapter=0.5, kd=6.0,
                        cls=1.0, side=1.0, kd_t=10, temp=50.0, drop=0.6, res=0.4, fuse=(0.4, 0.55, 0.05)),
    ("ucf101", 1): dict(tasks=10_000, val=500, lsn=1e-4, head=1e-4, gen=1e-4, adapter=0.5, kd=6.0,
                        cls=0.5, side=1.0, kd_t=10, temp=50.0, drop=0.7, res=0.4, fuse=(0.15, 0.8, 0.05)),
    ("ucf101", 5): dict(tasks=10_000, val=500, lsn=1e-4, head=1e-4, gen=5e-5, adapter=0.5, kd=6.0,
                        cls=0.5, side=1.0, kd_t=10, temp=50.0, drop=0.7, res=0.4, fuse=(0.4, 0.5, 0.1)),
    ("kinetics100", 1): dict(tasks=10_000, val=500, lsn=2e-4, head=2e-4, gen=1e-4, adapter=0.5, kd=6.0,
                             cls=0.5, side=1.0, kd_t=10, temp=50.0, drop=0.7, res=0.4, fuse=(0.15, 0.8, 0.05)),
    ("kinetics100", 5): dict(tasks=10_000, val=500, lsn=1e-4, head=1e-4, gen=5e-5, adapter=0.5, kd=6.0,
                             cls=0.5, side=1.0, kd_t=10, temp=50.0, drop=0.7, res=0.4, fuse=(0.15, 0.8, 0.05)),
    ("ssv2_small", 1): dict(tasks=10_000, val=500, lsn=2.5e-4, head=2.5e-4, gen=2.5e-4, adapter=1.0, kd=0.1,
                            cls=2.0, side=0.1, kd_t=4, temp=50.0, drop=0.7, res=1.6, fuse=(0.4, 0.2, 0.4)),
    ("ssv2_small", 5): dict(tasks=10_000, val=500, lsn=3e-4, head=3e-4, gen=3e-4, adapter=1.0, kd=0.01,
                            cls=2.0, side=0.01, kd_t=4, temp=50.0, drop=0.7, res=1.6, fuse=(0.8, 0.05, 0.15)),
    ("ssv2_full", 1): dict(tasks=50_000, val=2000, lsn=2e-4, head=2e-4, gen=2e-4, adapter=1.0, kd=0.01,
                           cls=2.0, side=4.0, kd_t=4, temp=100.0, drop=0.0, res=1.6, fuse=(0.5, 0.1, 0.4)),
    ("ssv2_full", 5): dict(tasks=50_000, val=2000, lsn=2e-4, head=2e-4, gen=2e-4, adapter=1.0, kd=0.01,
                           cls=2.0, side=0.1, kd_t=4, temp=50.0, drop=0.0, res=1.6, fuse=(0.7, 0.05, 0.25)),
}  # fmt: skip


def preset(name: str, shot: int) -> TrainConfig:
    return TrainConfig(store="x", head="tsfsar", preset=name, shot=shot).resolved()


@pytest.mark.parametrize(("name", "shot"), list(RELEASED))
def test_preset_is_the_released_config(name: str, shot: int) -> None:
    r = RELEASED[(name, shot)]
    cfg = preset(name, shot)
    assert cfg.episodes == r["tasks"] and cfg.val_every == r["val"]
    assert (cfg.episodes_per_iteration, cfg.episodes_per_step) == (1, 1)  # BATCH_SIZE_PER_TASK 1
    assert (cfg.query, cfg.val_query) == (5, 1)
    assert cfg.group_lr == {"head": r["head"], "generator": r["gen"], "side": r["lsn"],
                            "adapter": r["lsn"] * r["adapter"]}  # fmt: skip
    assert (cfg.optimizer, cfg.adam_eps, cfg.weight_decay, cfg.decay_groups) == (
        "adamw",
        1e-6,
        0.1,
        "all",
    )
    assert (cfg.schedule, cfg.warmup_episodes, cfg.precision) == ("cosine", 0, "fp16")
    assert cfg.head_options == dict(
        kd_weight=r["kd"], classifier_weight=r["cls"], side_text_weight=r["side"], vision_weight=1.0,
        kd_t=r["kd_t"], temp_clip=r["temp"], temp_side=r["temp"], dropout=r["drop"],
        res_alpha=r["res"], fuse_vision=r["fuse"][0], fuse_clip=r["fuse"][1], fuse_side=r["fuse"][2],
    )  # fmt: skip


def test_presets_are_per_head_and_explicit_options_win() -> None:
    emp = TrainConfig(store="x", head="emp", preset="hmdb51").resolved()
    assert (emp.optimizer, emp.schedule, emp.episodes, emp.head_options) == (
        "adam", "step", 10_000, {"loss": "released"},
    )  # fmt: skip
    chosen = TrainConfig(store="x", head="tsfsar", preset="hmdb51", episodes=300,
                         head_options={"fuse_clip": 0.0})  # fmt: skip
    cfg = chosen.resolved(explicit={"episodes"})
    assert cfg.episodes == 300 and cfg.head_options["fuse_clip"] == 0.0
    assert cfg.head_options["fuse_vision"] == 0.15
    with pytest.raises(ConfigError, match="--schedule 'linear'"):
        TrainConfig(store="x", schedule="linear").resolved()
    with pytest.raises(ConfigError, match="group_lr"):
        TrainConfig(store="x", group_lr={"side": -1.0}).resolved()


# ------------------------------------------------------------------------------ schedule


def released_lrs(base: float, tasks: int) -> list[float]:
    """main.py:33-89 with utils/functions.py:14-26 (cosine_lr(optimizer, 0, NUM_TRAIN_TASKS)): the
    optimiser starts at the base lr; after each iteration's step `lr_scheduler(cur_iter)` sets
    0.5 * (1 + cos(pi * cur_iter / tasks)) * base for the next iteration."""
    lrs, lr = [], base
    for cur_iter in range(tasks):
        lrs.append(lr)
        lr = 0.5 * (1 + math.cos(math.pi * cur_iter / tasks)) * base
    return lrs


@pytest.mark.parametrize("name", BENCHMARKS)
def test_lr_at_every_iteration_equals_the_released_loop(name: str) -> None:
    for shot in (1, 5):
        cfg = preset(name, shot)
        for group, base in cfg.group_lr.items():
            expected = released_lrs(base, RELEASED[(name, shot)]["tasks"])
            if group != "side":  # every group follows the same factor: check its ends
                expected = [expected[0], expected[1], expected[-1]]
                episodes = [0, 1, cfg.episodes - 1]
            else:
                episodes = range(cfg.episodes)
            got = [learning_rate(cfg, e, base) for e in episodes]
            assert got == pytest.approx(expected, rel=1e-12, abs=0), (name, shot, group)


def test_cosine_worked_example() -> None:
    """HMDB51 1-shot, side lr 2e-4 over 10,000 iterations: no warm-up, full lr for the first two
    iterations, half at iteration 5,001 (step 5,000), ~2e-11 at the last (step 9,998, never 0)."""
    cfg = preset("hmdb51", 1)
    assert learning_rate(cfg, 0, 2e-4) == learning_rate(cfg, 1, 2e-4) == 2e-4
    assert learning_rate(cfg, 5_001, 2e-4) == pytest.approx(1e-4, rel=1e-12)
    last = learning_rate(cfg, 9_999, 2e-4)
    assert last == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9998)) * 2e-4) and 0 < last < 2e-11
    assert learning_rate(cfg, 9_999) == last  # the side group's lr is cfg.lr


# ------------------------------------------------------------------------------ optimiser groups


def released_group(name: str) -> str | None:
    """utils/optimizer.py:21-35, in order: Linear/up_linear/up_ln, side, generator, Adapter; else frozen."""
    if any(k in name for k in ("Linear", "up_linear", "up_ln")):
        return "head"
    if "side" in name:
        return "side"
    if "generator" in name:
        return "generator"
    return "adapter" if "Adapter" in name else None


# fsar module -> the released module it stands for (trainers/model.py, trainers/ts_fsar.py:100-105)
RELEASED_MODULES = {
    "side.tap_norms": "model.side_LN", "side.tap_downs": "model.side_downsample",
    "side.blocks": "model.side_transformer", "side.gates": "model.side_gate_params",
    "adapter": "model.Adapter", "up_norm": "model.up_ln", "up_proj": "model.up_linear",
    "classifier": "model.Linear", "generator": "ts_dcm.generator",
}  # fmt: skip


def released_name(name: str) -> str:
    prefix = next(p for p in RELEASED_MODULES if name.startswith(p + "."))
    return RELEASED_MODULES[prefix] + name[len(prefix) :]


def test_parameter_groups_follow_the_released_name_rules() -> None:
    head = heads.create("tsfsar", dim=32, width=48, taps=[0, 2, 4], depth=4, frames=4,
                        base_classes=5, side_width=64)  # fmt: skip
    cfg = preset("ucf101", 5)
    optimizer = make_optimizer(head, cfg)
    names = {id(p): n for n, p in head.named_parameters()}
    assert type(optimizer) is torch.optim.AdamW
    groups = {}
    for group in optimizer.param_groups:
        members = {names[id(p)] for p in group["params"]}
        kinds = {released_group(released_name(n)) for n in members}
        assert len(kinds) == 1, kinds  # one released group per fsar group
        groups[kinds.pop()] = group
    assert list(groups) == ["head", "generator", "side", "adapter"]  # the released order
    lsn = 1e-4
    assert [g["lr"] for g in groups.values()] == [1e-4, 5e-5, lsn, lsn * 0.5]
    assert all(g["weight_decay"] == 0.1 and g["eps"] == 1e-6 for g in groups.values())
    assert sum(len(g["params"]) for g in groups.values()) == len(names)  # gates, norms, biases too


def test_adamw_decays_every_parameter_decoupled() -> None:
    """optimizer.py:48 AdamW(weight_decay=0.1): a zero gradient still shrinks p by lr * wd * p."""
    head = heads.create("tsfsar", dim=32, width=48, taps=[0, 4], depth=4, frames=4,
                        base_classes=5, side_width=64)  # fmt: skip
    cfg = preset("hmdb51", 1)
    optimizer = make_optimizer(head, cfg)
    gate = head.side.gates[0]
    with torch.no_grad():
        gate.fill_(2.0)
    for p in head.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert float(gate.detach()) == pytest.approx(2.0 * (1 - 2e-4 * 0.1), rel=1e-7)


# ------------------------------------------------------------------------------ TS-DCM


def released_alpha_dcov(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """trainers/ts_fsar.py:28-47 verbatim in its arithmetic (the identity and ones matrices)."""
    batch, dim, m = x.shape
    eye = torch.eye(dim).view(1, dim, dim).repeat(batch, 1, 1).type(x.dtype)
    ones = torch.ones(batch, dim, dim).type(x.dtype)
    x_pow2 = x.bmm(x.transpose(1, 2) * 1.0 / (2 * m))
    dcov = ones.bmm(x_pow2 * eye) + (x_pow2 * eye).bmm(ones) - 2 * x_pow2
    dcov = torch.pow(torch.clamp(dcov, min=0.0) + 1e-5, alpha)
    d1 = dcov.bmm(ones * 1.0 / dim)
    d2 = (ones * 1.0 / dim).bmm(dcov)
    d3 = (ones * 1.0 / dim).bmm(dcov).bmm(ones * 1.0 / dim)
    return dcov - d1 - d2 + d3


def test_alpha_distance_covariance_worked_example() -> None:
    """Channels (1, 0), (0, 1), (1, 1) over M = 2: d = |x_i - x_j|^2 / 4 -> 0.5, 0.25, 0.25 off the
    diagonal; then (d + 1e-5) ** 0.4, doubly centred; the upper triangle row-major."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.5, 0.25], [0.5, 0.0, 0.25], [0.25, 0.25, 0.0]], dtype=torch.float64)
    p = (d + 1e-5) ** 0.4
    centred = p - p.mean(1, keepdim=True) - p.mean(0, keepdim=True) + p.mean()
    got = alpha_distance_covariance(x, 0.4)[0]
    assert torch.allclose(got, centred, atol=1e-12)
    assert torch.allclose(got, released_alpha_dcov(x, 0.4)[0], atol=1e-12)
    rows, cols = [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]
    assert torch.equal(upper_triangle(got[None])[0], got[rows, cols])
    wide = torch.randn(5, 16, 9, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(
        alpha_distance_covariance(wide, 0.4), released_alpha_dcov(wide, 0.4), atol=1e-5
    )


def test_task_matching_worked_example() -> None:
    """ts_fsar.py:86-91: score = sum over (tq, ts) of cos(q_tq, p_ts) / (|q||p| + 0.01 form) * W[tq*T+ts]."""
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # one query, T = 2 frames
    p = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # one prototype
    w = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    cos = (q @ p.T) / (
        q.norm(dim=1)[:, None] * p.norm(dim=1)[None] + 0.01
    )  # utils/functions.py:40-49
    expected = (cos.flatten() * w).sum()
    got = task_matching(q[None, None], p[None, None], w[None, None])
    assert got.shape == (1, 1, 1) and float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(expected) == pytest.approx(3 / 3.01 + 1000 * 2 / 2.01, rel=1e-6)


def test_task_prototype_is_the_query_mean_plus_the_support_mean() -> None:
    """ts_fsar.py:73-80: the generator reads mean_t(query CLS) + mean over all support videos and
    frames of their CLS, the same for every class of the query."""
    head = heads.create("tsfsar", dim=16, width=16, taps=[0, 1], depth=1, frames=2,
                        base_classes=4, side_width=64)  # fmt: skip
    head.set_class_text(torch.randn(4, 1, 16))
    task = torch.randn(1, 5, 64)  # 3 supports (classes 0, 1, 1), 2 queries
    adc = torch.randn(1, 5, 2, 64 * 65 // 2)
    unit = F.normalize(torch.randn(1, 5, 16), dim=-1)
    feats = {"task": task, "adc": adc, "clip_text": unit, "side_text": unit}
    head.eval()
    head.process_support_set({k: v[:, :3] for k, v in feats.items()}, torch.tensor([[0, 1, 1]]),
                             torch.tensor([[0, 2]]))  # fmt: skip
    head({k: v[:, 3:] for k, v in feats.items()})
    weights = head.generator(task[:, :3].mean(1, keepdim=True) + task[:, 3:])
    prototypes = torch.stack([adc[0, 0], adc[0, 1:3].mean(0)])[None]
    assert torch.allclose(head._vision, task_matching(adc[:, 3:], prototypes, weights), atol=1e-5)


# ------------------------------------------------------------------------------ losses and fusion


def released_kl(y_s: torch.Tensor, y_t: torch.Tensor, t: float) -> torch.Tensor:
    """utils/functions.py:28-38 DistillKL (size_average=False is a sum)."""
    p_s = F.log_softmax(y_s / t, dim=1)
    p_t = F.softmax(y_t / t, dim=1)
    return (p_t * (p_t.log() - p_s)).sum() * t**2 / y_s.shape[0]


def test_distillation_worked_example() -> None:
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    got = distillation(student, teacher, 10.0)
    assert float(got) == pytest.approx(float(released_kl(student, teacher, 10.0)), rel=1e-6)
    teacher.requires_grad_(True)
    distillation(student, teacher, 4.0).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0  # not detached, as released


def small_episode(shot: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    head = heads.create("tsfsar", dim=32, width=48, taps=[0, 2, 4], depth=4, frames=4,
                        base_classes=6, side_width=64, kd_weight=6.0, classifier_weight=0.5,
                        side_text_weight=2.0, vision_weight=1.5, dropout=0.0)  # fmt: skip
    head.set_class_text(torch.randn(9, 3, 32))
    head.set_base_classes(pd.DataFrame({"label": range(9), "split": ["train"] * 6 + ["test"] * 3}))
    n_videos = 3 * shot + 3
    g = torch.Generator().manual_seed(seed)
    inputs = {f"tap{t:02d}": torch.randn(n_videos, 4, 5, 48, generator=g) for t in head.taps}
    inputs["clip"] = torch.randn(n_videos, 4, 32, generator=g)
    return head, inputs, torch.arange(3).repeat_interleave(shot), torch.tensor([4, 0, 2])


def test_loss_is_the_released_weighted_sum_over_every_video() -> None:
    """ts_fsar.py:129-155: VIS * NLL + CLS * CE(GLAC) + SIDE_CLS * CE(side text) + KD * (KL + CE(clip
    text)); the video terms over supports and queries, labels = the base-class index of each."""
    head, inputs, support_labels, class_ids = small_episode()
    head.train()
    features = head.video_features(inputs)
    head.process_support_set({k: v[:3] for k, v in features.items()}, support_labels, class_ids)
    head({k: v[3:] for k, v in features.items()})
    query_labels = torch.tensor([2, 0, 1])
    loss = head.loss(query_labels)
    t = head.loss_terms
    assert float(loss.detach()) == pytest.approx(
        float(1.5 * t["vision"] + 0.5 * t["classifier"] + 2.0 * t["side_text"] + 6.0 * (t["distill"] + t["clip_text"])),
        rel=1e-6,
    )  # fmt: skip
    base = class_ids[torch.cat([support_labels, query_labels])]  # base index = store label here
    text = head.text_unit[:6]  # the base classes are the store's labels 0..5 here
    features = {k: v.detach() for k, v in features.items()}
    clip = features["clip_text"] @ text.T * 50.0
    assert float(t["clip_text"]) == pytest.approx(float(F.cross_entropy(clip, base)), rel=1e-5)
    glac = head.classifier(features["adc"].mean(1)).detach()
    assert float(t["classifier"]) == pytest.approx(float(F.cross_entropy(glac, base)), rel=1e-5)
    assert float(t["distill"]) == pytest.approx(float(released_kl(glac, clip, 10.0)), rel=1e-5)
    assert float(t["vision"]) == pytest.approx(
        float(F.nll_loss(F.log_softmax(head._vision[0].detach(), 1), query_labels)), rel=1e-6
    )


def test_prediction_is_the_released_test_fusion() -> None:
    """ts_fsar.py:161-174: softmax(vision)^FUSE_VISION * softmax(50 cos clip)^FUSE_CLIP * softmax(50
    cos side)^FUSE_SIDE, texts of the episode's classes."""
    head, inputs, support_labels, class_ids = small_episode(shot=2)
    head.eval()
    with torch.no_grad():
        features = head.video_features(inputs)
        head.process_support_set({k: v[:6] for k, v in features.items()}, support_labels, class_ids)
        prediction = head({k: v[6:] for k, v in features.items()})
        text = head.text_unit[class_ids]
        vision = F.softmax(head._vision[0], 1)
        clip = F.softmax(features["clip_text"][6:] @ text.T * 50.0, 1)
        side = F.softmax(features["side_text"][6:] @ text.T * 50.0, 1)
    assert torch.allclose(prediction, vision**0.15 * clip**0.8 * side**0.05, atol=1e-6)


def test_class_text_is_normalised_averaged_and_normalised() -> None:
    """utils/functions.py:74-77 build_embeddings: each description embedding / its norm, mean, / norm."""
    head = heads.create("tsfsar", dim=8, width=8, taps=[0, 1], depth=1, frames=2, base_classes=1,
                        side_width=64)  # fmt: skip
    text = torch.zeros(1, 2, 8)
    text[0, 0, 0], text[0, 1, 1] = 3.0, 0.5
    assert head.set_class_text(text) is None
    assert head.text_unit[0, :2].tolist() == pytest.approx([2**-0.5, 2**-0.5])


# ------------------------------------------------------------------------------ side network


def test_temporal_blocks_follow_the_released_rule_and_generalise_to_fewer_taps() -> None:
    """LSN.TEMP_LAYERS [6, 8, 10] (model.py:70-74): the side blocks mixed with CLIP blocks 7, 9, 11.
    With fewer taps a block is temporal when a released temporal block lies in the span it covers."""
    every = temporal_side_blocks(list(range(13)), 12)
    assert [j for j, t in enumerate(every) if t] == [6, 8, 10]
    assert temporal_side_blocks([0, 4, 8, 12], 12) == [False, True, True]
    assert temporal_side_blocks([0, 6, 12], 12) == [False, True]
    assert temporal_side_blocks([0, 12], 12) == [True]
    assert temporal_side_blocks([0, 1, 2, 3, 4], 4) == [
        False,
        True,
        True,
        True,
    ]  # 7, 9, 11 of 12 -> 2, 3, 4
    assert temporal_side_blocks([0, 1, 2], 2, temporal_blocks=[1]) == [True, False]


def test_gate_and_adapter_mix_as_released() -> None:
    """model.py:305-308: gate = sigmoid(g / 0.1), g starts at GATE_ALPHA 0 (an even mix); model.py:101-104:
    the Adapter returns (2 - RES_ALPHA) x + RES_ALPHA attn(norm(x))."""
    head = heads.create("tsfsar", dim=8, width=8, taps=[0, 1], depth=1, frames=2, base_classes=1,
                        side_width=64, res_alpha=0.4)  # fmt: skip
    side = head.side
    taps = [torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)]
    down = [side.tap_downs[i](side.tap_norms[i](taps[i].flatten(0, 1))) for i in range(2)]
    out = side(taps).flatten(0, 1)
    assert torch.allclose(out, 0.5 * side.blocks[0](down[0], 2) + 0.5 * down[1], atol=1e-6)
    with torch.no_grad():
        side.gates[0].fill_(0.3)
    gate = torch.sigmoid(torch.tensor(3.0))
    expected = gate * side.blocks[0](down[0], 2) + (1 - gate) * down[1]
    assert torch.allclose(side(taps).flatten(0, 1), expected, atol=1e-6)
    with torch.no_grad():
        head.adapter.attn.proj.weight.zero_()
        head.adapter.attn.proj.bias.zero_()
    x = torch.randn(3, 2, 8)
    assert torch.allclose(head.adapter(x), 1.6 * x)


def test_side_initialisation_maps_each_block_to_its_tap() -> None:
    """TS_INTERFACE.md: side block j starts from CLIP block taps[j + 1]'s PCA entry (with every tap:
    block j <- CLIP block j + 1, model.py:183-184), the Adapter from adapter.attn.*."""
    from heads.tsfsar_side import BLOCK_INIT_KEYS, InitError

    head = heads.create("tsfsar", dim=32, width=48, taps=[0, 2, 4], depth=4, frames=4,
                        base_classes=5, side_width=64)  # fmt: skip
    params = dict(head.named_parameters())
    init = {}
    for block in range(1, 5):
        for key in BLOCK_INIT_KEYS:
            init[f"block{block:02d}.{key}"] = torch.full(
                params[f"side.blocks.0.{key}"].shape, float(block)
            )
    for key in ("q", "k", "v", "proj"):
        init[f"adapter.attn.{key}.weight"] = torch.full((32, 32), 7.0)
        init[f"adapter.attn.{key}.bias"] = torch.full((32,), 7.0)
    head.load_init(init)
    assert float(head.side.blocks[0].attn.q.weight.mean()) == 2.0  # taps [0, 2, 4]: block 0 <- 2
    assert float(head.side.blocks[1].mlp.fc2.bias.mean()) == 4.0
    assert float(head.adapter.attn.proj.weight.mean()) == 7.0
    init["block04.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(InitError, match="block04.mlp.fc1.weight|side.blocks.1.mlp.fc1.weight"):
        head.load_init(init)
    del init["block02.norm1.bias"]
    with pytest.raises(InitError, match="no block02.norm1.bias"):
        head.load_init(init)


# ------------------------------------------------------------------------------ training views


def test_ssv2_views_are_cropped_and_never_flipped() -> None:
    """datasets/video_few_shot.py:366-381: RandomHorizontalFlipVideo only with AUGMENTATION.RANDOM_FLIP,
    which the HMDB51, UCF101 and Kinetics configs set and the SSv2 configs do not. `--preprocess
    emp-noflip` caches the same squash, crop and frames without the flip."""
    import numpy as np

    from heads.presets import TSFSAR_RELEASES
    from pipeline.preprocess import (
        augment_params,
        build_transform,
        preprocess_spec,
        transform_video,
    )
    from tests.test_reproduce import released_clip

    assert {name for (name, _), r in TSFSAR_RELEASES.items() if not r.flip} == {
        "ssv2_small",
        "ssv2_full",
    }
    cfg = {"size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    flipped, cropped = preprocess_spec("emp", cfg), preprocess_spec("emp-noflip", cfg)
    assert cropped == {**flipped, "train_augment": "crop"}
    drawn = [augment_params(cropped, f"video{i}", 1) for i in range(300)]
    emp = [augment_params(flipped, f"video{i}", 1) for i in range(300)]
    assert not any(d.flip for d in drawn) and any(d.flip for d in emp)
    assert [(d.x, d.y) for d in drawn] == [(d.x, d.y) for d in emp]  # the same crops
    pixels = np.random.default_rng(2).integers(0, 256, (3, 2, 60, 80, 3), dtype=np.uint8)
    train = transform_video(cropped, build_transform(cropped), pixels, "vid", train=True)
    np.testing.assert_array_equal(train[0], released_clip(pixels[0]))
    for v in (1, 2):
        a = augment_params(cropped, "vid", v)
        np.testing.assert_array_equal(train[v], released_clip(pixels[v], False, (a.x, a.y)))
