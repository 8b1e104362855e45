"""The released EMP-Net recipe, point by point: each test pins the released behaviour by a worked example.

References are to github.com/cong-wu/EMP-Net at b4dc006 (docs/reproducing.md has the full table). The
released formulas are re-implemented here from that source; no released file is read at test time.
"""

from __future__ import annotations

import pytest
import torch

import heads
from heads.train import (
    PRESETS,
    RELEASED_NO_DECAY,
    ConfigError,
    TrainConfig,
    learning_rate,
    make_optimizer,
)

# ------------------------------------------------------------------------------ schedule and presets

# Per benchmark, identical in the 1-shot and 5-shot yaml (configs/projects/EMP_Net/<bench>/*.yaml,
# merged with OTAM_base.yaml, pool/run/training/finetune.yaml and pool/base.yaml by utils/config.py):
# SOLVER.BASE_LR, STEPS_ITER, WARMUP_START_LR, TRAIN.NUM_TRAIN_TASKS, VAL_FRE_ITER. Common to all:
# STEPS [0, 4, 6], LRS [1, 0.1, 0.01], MAX_EPOCH 10, WARMUP_EPOCHS 1, TRAIN.BATCH_SIZE 2 (= NUM_GPUS 2),
# BATCH_SIZE_PER_TASK 4, QUERY_PER_CLASS 5, QUERY_PER_CLASS_TEST 1, NUM_FOLDS 1, OPTIMIZER adam with
# WEIGHT_DECAY 1e-3 (finetune.yaml:51; SOLVER.WEIGHT_DECAY 5e-5 is never read), BN.WEIGHT_DECAY 0.0.
RELEASED = {
    "hmdb51": dict(base_lr=1e-4, steps_iter=1_000, warmup_start=1e-6, tasks=5_000, val_iter=500),
    "ucf101": dict(base_lr=1e-4, steps_iter=1_000, warmup_start=1e-6, tasks=5_000, val_iter=500),
    "kinetics100": dict(
        base_lr=1e-4, steps_iter=1_000, warmup_start=1e-6, tasks=5_000, val_iter=500
    ),
    "ssv2_small": dict(
        base_lr=1e-3, steps_iter=2_000, warmup_start=1e-5, tasks=10_000, val_iter=1_000
    ),
    "ssv2_full": dict(
        base_lr=1e-3, steps_iter=8_000, warmup_start=1e-5, tasks=40_000, val_iter=1_000
    ),
}


def released_lr(cur_iter: int, base_lr: float, steps_iter: int, warmup_start: float) -> float:
    """runs/train_net_few_shot.py:59,66,95 feeding models/utils/lr_policy.py:10-70 (steps_with_relative_lrs)."""
    steps, lrs, max_epoch, warmup_epochs, num_folds = [0, 4, 6], [1, 0.1, 0.01], 10, 1, 1
    data_size = steps_iter
    cur_epoch = cur_iter // steps_iter
    epoch = cur_epoch + num_folds * float(cur_iter) / data_size

    def steps_with_relative_lrs(e: float) -> float:
        for ind, step in enumerate(steps + [max_epoch]):  # noqa: B007 (read after the loop)
            if e < step:
                break
        return lrs[ind - 1] * base_lr

    lr = steps_with_relative_lrs(epoch)
    if epoch < warmup_epochs:
        lr_end = steps_with_relative_lrs(warmup_epochs)
        alpha = (lr_end - warmup_start) / warmup_epochs
        lr = epoch * alpha + warmup_start
    return lr


@pytest.mark.parametrize("preset", list(RELEASED))
def test_preset_lr_equals_the_released_lr_at_every_iteration(preset: str) -> None:
    released = RELEASED[preset]
    cfg = TrainConfig(store="x", preset=preset).resolved()
    assert cfg.episodes == 2 * released["tasks"]  # NUM_TRAIN_TASKS iterations of 2 episodes
    for it in range(released["tasks"]):
        expected = released_lr(
            it, released["base_lr"], released["steps_iter"], released["warmup_start"]
        )
        for episode in (2 * it, 2 * it + 1):  # both episodes of an iteration share its lr
            # 0.1**2 * lr and 0.01 * lr may differ in the last bit
            assert learning_rate(cfg, episode) == pytest.approx(expected, rel=1e-12, abs=0), it


def test_released_warmup_lasts_steps_iter_iterations() -> None:
    """The worked example behind the fix: HMDB51, STEPS_ITER 1000, warm-up from 1e-6 to 1e-4."""
    assert released_lr(999, 1e-4, 1000, 1e-6) == pytest.approx(1e-6 + 0.999 * (1e-4 - 1e-6))
    assert released_lr(1000, 1e-4, 1000, 1e-6) == 1e-4  # epoch 1 + 1.0 = 2: full lr
    assert released_lr(1999, 1e-4, 1000, 1e-6) == 1e-4
    assert released_lr(2000, 1e-4, 1000, 1e-6) == pytest.approx(1e-5)  # epoch 2 + 2.0 = 4
    assert released_lr(3000, 1e-4, 1000, 1e-6) == pytest.approx(1e-6)  # epoch 3 + 3.0 = 6
    hmdb = TrainConfig(store="x", preset="hmdb51").resolved()
    assert learning_rate(hmdb, 2 * 999) == pytest.approx(1e-6 + 0.999 * (1e-4 - 1e-6))
    assert learning_rate(hmdb, 2 * 500) == pytest.approx((1e-4 + 1e-6) / 2)


@pytest.mark.parametrize("preset", list(RELEASED))
def test_preset_numbers_match_the_released_configs(preset: str) -> None:
    released = RELEASED[preset]
    cfg = TrainConfig(store="x", preset=preset).resolved()
    assert (cfg.lr, cfg.lr_start) == (released["base_lr"], released["warmup_start"])
    assert cfg.warmup_episodes == 2 * released["steps_iter"]
    assert cfg.decay_episodes == [4 * released["steps_iter"], 6 * released["steps_iter"]]
    assert cfg.decay_factor == 0.1
    assert (cfg.episodes_per_iteration, cfg.episodes_per_step) == (2, 8)  # 2 GPUs x 4 iterations
    assert (cfg.query, cfg.val_query) == (5, 1)
    assert cfg.val_every == 2 * released["val_iter"]
    assert (cfg.weight_decay, cfg.decay_groups) == (1e-3, "released")
    assert "shot" not in PRESETS[preset]  # 1-shot and 5-shot share the schedule: --shot picks


def test_explicit_options_win_over_the_preset() -> None:
    cfg = TrainConfig(store="x", preset="ssv2_small", decay_groups="matrices", lr_start=0.0)
    cfg = cfg.resolved(explicit={"decay_groups", "lr_start"})
    assert (cfg.decay_groups, cfg.lr_start, cfg.lr) == ("matrices", 0.0, 1e-3)
    with pytest.raises(ConfigError, match="--decay-groups 'biases'"):
        TrainConfig(store="x", decay_groups="biases").resolved()


# ------------------------------------------------------------------------------ weight decay groups


def decayed_names(head: torch.nn.Module, groups: str) -> tuple[set[str], set[str]]:
    cfg = TrainConfig(store="x", weight_decay=1e-3, decay_groups=groups).resolved()
    optimizer = make_optimizer(head, cfg)
    names = {id(p): n for n, p in head.named_parameters()}
    by_decay = {
        g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups
    }
    return by_decay[1e-3], by_decay[0.0]


def test_released_groups_decay_linear_biases_and_exempt_only_norms() -> None:
    emp = heads.create("emp", dim=32)
    decay, exempt = decayed_names(emp, "released")
    assert decay | exempt == {n for n, _ in emp.named_parameters()} and not decay & exempt
    # the released optimiser (models/utils/optimizer.py:59-71): "norm" in name -> BN.WEIGHT_DECAY 0.0,
    # everything else under the head -> OPTIMIZER.WEIGHT_DECAY; Linear biases are decayed
    assert "refine.token.attn.to_out.0.bias" in decay and "refine.token.ffn.0.bias" in decay
    assert "spatiotemporal.0.ffn.3.bias" in decay and "fusion.patch.attn.to_q.weight" in decay
    assert exempt == {n for n, _ in emp.named_parameters() if "norm" in n}
    assert "spatiotemporal.1.norm_temporal.bias" in exempt and "refine.frame.norm.weight" in exempt
    # fsar's own choice, kept as --decay-groups matrices: no decay on norms, biases and scalars
    decay, exempt = decayed_names(emp, "matrices")
    assert "refine.token.attn.to_out.0.bias" in exempt and "refine.frame.norm.weight" in exempt
    assert decay == {n for n, p in emp.named_parameters() if p.dim() >= 2}


def test_released_rule_is_by_name_substring() -> None:
    """optimizer.py:59 `"embd" in name or "cls_token" in name`, :63 `"bn" in name or "norm" in name`."""
    assert RELEASED_NO_DECAY == ("embd", "cls_token", "bn", "norm")
    module = torch.nn.Module()
    for name in ("pos_embd", "cls_token", "bn1", "prenorm", "scale", "ln_1"):
        module.register_parameter(name, torch.nn.Parameter(torch.zeros(3)))
    decay, exempt = decayed_names(module, "released")
    assert exempt == {"pos_embd", "cls_token", "bn1", "prenorm"}
    assert decay == {"scale", "ln_1"}  # a 1-d parameter named without "norm" is decayed


def test_released_decay_is_adams_l2_on_the_gradient() -> None:
    """torch.optim.Adam(weight_decay=wd) adds wd * p to the gradient (optimizer.py:105-110), not AdamW."""
    head = heads.create("emp", dim=32)
    cfg = TrainConfig(store="x", lr=1e-2, weight_decay=1e-3, decay_groups="released").resolved()
    optimizer = make_optimizer(head, cfg)
    assert type(optimizer) is torch.optim.Adam
    assert [g["betas"] for g in optimizer.param_groups] == [(0.9, 0.999)] * 2
    bias = dict(head.named_parameters())["refine.token.ffn.0.bias"]
    with torch.no_grad():
        bias.fill_(2.0)
    for p in head.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero loss gradient: only decay moves the bias, by lr * sign (first Adam step)
    assert torch.allclose(bias, torch.full_like(bias, 2.0 - 1e-2), atol=1e-6)
