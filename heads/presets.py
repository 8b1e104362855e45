"""The released recipes behind `--preset NAME`, per head: `preset_options(head, name, shot)`.

`tsfsar` gets TS-FSAR's recipe (github yaozhang0417/TS-FSAR, configs/<name>/Metatrain_<K>shot.yaml for
training, Metatest_<K>shot.yaml for the test fusion); every other head gets EMP-Net's schedule
(github cong-wu/EMP-Net, read with its own config loader) and its head options, if it has any.
docs/reproducing.md lists the lines; tests/test_reproduce.py and tests/test_tsfsar_reproduce.py pin them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BENCHMARKS = ("hmdb51", "ucf101", "kinetics100", "ssv2_small", "ssv2_full")


# ------------------------------------------------------------------ EMP-Net
# The released schedules as they actually run (EMP-Net configs, read with the released config loader).
# One iteration = 2 episodes (2 GPUs, gradients averaged), an optimiser step every 4 iterations. The
# released epoch counter `cur_iter // STEPS_ITER + cur_iter / STEPS_ITER` stays below 1 for the whole
# first STEPS_ITER and reaches the decay epochs 4 and 6 at 2 and 3 x STEPS_ITER, so in iterations:
# linear warm-up from WARMUP_START_LR over STEPS_ITER, full lr until 2 x STEPS_ITER, x0.1 until 3 x
# STEPS_ITER, x0.01 after. Weight decay is OPTIMIZER.WEIGHT_DECAY (1e-3; the configs' SOLVER.WEIGHT_DECAY
# 5e-5 is never read) on every parameter whose name has no "norm".
def _emp(
    lr: float, iterations: int, steps_iter: int, val_every_iter: int, warmup_start: float
) -> dict[str, Any]:
    return dict(
        lr=lr, lr_start=warmup_start, episodes=2 * iterations, episodes_per_iteration=2,
        episodes_per_step=8, warmup_episodes=2 * steps_iter, decay_episodes=[4 * steps_iter, 6 * steps_iter],
        decay_factor=0.1, weight_decay=1e-3, decay_groups="released", query=5, val_query=1,
        val_every=2 * val_every_iter,
    )  # fmt: skip


# The 1-shot and 5-shot configs of each benchmark differ only in SHOT, MERGE_BEFORE (what `emp` does
# for K > 1 anyway) and the unused USE_CLASSIFICATION_VALUE: one schedule per benchmark, --shot picks.
EMP_SCHEDULES: dict[str, dict[str, Any]] = {
    "hmdb51": _emp(1e-4, 5_000, 1_000, 500, 1e-6),
    "ucf101": _emp(1e-4, 5_000, 1_000, 500, 1e-6),
    "kinetics100": _emp(1e-4, 5_000, 1_000, 500, 1e-6),
    "ssv2_small": _emp(1e-3, 10_000, 2_000, 1_000, 1e-5),
    "ssv2_full": _emp(1e-3, 40_000, 8_000, 1_000, 1e-5),
}
# A preset reproduces the released run, so its head options are the released ones too.
EMP_HEAD_OPTIONS: dict[str, dict[str, Any]] = {"emp": {"loss": "released"}}


# ------------------------------------------------------------------ TS-FSAR
@dataclass(frozen=True)
class TsfsarRelease:
    """One benchmark and shot of the released TS-FSAR configs (the values that differ between them)."""

    tasks: int  # TRAIN.NUM_TRAIN_TASKS: iterations of one episode, an optimiser step each
    val_every: int  # TRAIN.VAL_FRE_ITER
    lsn_lr: float  # SOLVER.LSN_LR: the side network
    head_lr: float  # SOLVER.LSNHEAD_LR: GLAC classifier, up_ln, up_linear
    generator_lr: float  # SOLVER.GENERATOR_LR
    adapter_alpha: float  # SOLVER.ADAPTER_ALPHA: the Adapter's lr is LSN_LR * ADAPTER_ALPHA
    kd_weight: float  # TRAIN.KD_ALPHA
    classifier_weight: float  # TRAIN.CLS_ALPHA
    side_text_weight: float  # TRAIN.SIDE_CLS_ALPHA
    kd_t: float  # TRAIN.KD_T
    temperature: float  # TEMP_CLIP = TEMP_SIDE
    dropout: float  # LSN.DROPOUT (before the GLAC classifier)
    res_alpha: float  # DATA.RES_ALPHA (the Adapter's mix)
    fuse: tuple[float, float, float]  # Metatest TEST.FUSE_VISION, FUSE_CLIP, FUSE_SIDE
    flip: bool  # AUGMENTATION.RANDOM_FLIP: the training views' horizontal flip


def _ts(*values: Any) -> TsfsarRelease:
    return TsfsarRelease(*values)


# fmt: off
TSFSAR_RELEASES: dict[tuple[str, int], TsfsarRelease] = {
    #                          tasks  val   lsn     head    gen     adpt kd    cls  side  kd_t temp   drop res  fuse (vision, clip, side) flip
    ("hmdb51", 1):      _ts(10_000, 500, 2e-4,   2e-4,   1e-4,   0.5, 6.0,  1.0, 1.0,  10, 50.0,  0.7, 0.4, (0.15, 0.8, 0.05), True),
    ("hmdb51", 5):      _ts(10_000, 500, 2e-4,   2e-4,   1e-4,   0.5, 6.0,  1.0, 1.0,  10, 50.0,  0.6, 0.4, (0.4, 0.55, 0.05), True),
    ("ucf101", 1):      _ts(10_000, 500, 1e-4,   1e-4,   1e-4,   0.5, 6.0,  0.5, 1.0,  10, 50.0,  0.7, 0.4, (0.15, 0.8, 0.05), True),
    ("ucf101", 5):      _ts(10_000, 500, 1e-4,   1e-4,   5e-5,   0.5, 6.0,  0.5, 1.0,  10, 50.0,  0.7, 0.4, (0.4, 0.5, 0.1),   True),
    ("kinetics100", 1): _ts(10_000, 500, 2e-4,   2e-4,   1e-4,   0.5, 6.0,  0.5, 1.0,  10, 50.0,  0.7, 0.4, (0.15, 0.8, 0.05), True),
    ("kinetics100", 5): _ts(10_000, 500, 1e-4,   1e-4,   5e-5,   0.5, 6.0,  0.5, 1.0,  10, 50.0,  0.7, 0.4, (0.15, 0.8, 0.05), True),
    ("ssv2_small", 1):  _ts(10_000, 500, 2.5e-4, 2.5e-4, 2.5e-4, 1.0, 0.1,  2.0, 0.1,  4,  50.0,  0.7, 1.6, (0.4, 0.2, 0.4),   False),
    ("ssv2_small", 5):  _ts(10_000, 500, 3e-4,   3e-4,   3e-4,   1.0, 0.01, 2.0, 0.01, 4,  50.0,  0.7, 1.6, (0.8, 0.05, 0.15), False),
    ("ssv2_full", 1):   _ts(50_000, 2000, 2e-4,  2e-4,   2e-4,   1.0, 0.01, 2.0, 4.0,  4,  100.0, 0.0, 1.6, (0.5, 0.1, 0.4),   False),
    ("ssv2_full", 5):   _ts(50_000, 2000, 2e-4,  2e-4,   2e-4,   1.0, 0.01, 2.0, 0.1,  4,  50.0,  0.0, 1.6, (0.7, 0.05, 0.25), False),
}
# fmt: on
TSFSAR_WEIGHT_DECAY = 0.1  # SOLVER.WEIGHT_DECAY, AdamW on every parameter (utils/optimizer.py:48)
TSFSAR_ADAM_EPS = 1e-6  # utils/optimizer.py:48
TSFSAR_QUERY = 5  # TRAIN.QUERY_PER_CLASS (QUERY_PER_CLASS_TEST 1)


def tsfsar_release(name: str, shot: int) -> TsfsarRelease:
    """The released config of benchmark `name` at `shot` (1 or 5; other shots take the 5-shot one)."""
    return TSFSAR_RELEASES[(name, 1 if shot == 1 else 5)]


def _tsfsar(name: str, shot: int) -> tuple[dict[str, Any], dict[str, Any]]:
    r = tsfsar_release(name, shot)
    training = dict(
        episodes=r.tasks, episodes_per_iteration=1, episodes_per_step=1, lr=r.lsn_lr,
        group_lr={"head": r.head_lr, "generator": r.generator_lr, "side": r.lsn_lr,
                  "adapter": r.lsn_lr * r.adapter_alpha},
        optimizer="adamw", adam_eps=TSFSAR_ADAM_EPS, weight_decay=TSFSAR_WEIGHT_DECAY,
        decay_groups="all", schedule="cosine", warmup_episodes=0, query=TSFSAR_QUERY, val_query=1,
        val_every=r.val_every, precision="fp16",
    )  # fmt: skip
    head = dict(
        kd_weight=r.kd_weight, classifier_weight=r.classifier_weight,
        side_text_weight=r.side_text_weight, vision_weight=1.0, kd_t=r.kd_t,
        temp_clip=r.temperature, temp_side=r.temperature, dropout=r.dropout,
        res_alpha=r.res_alpha, fuse_vision=r.fuse[0], fuse_clip=r.fuse[1], fuse_side=r.fuse[2],
    )  # fmt: skip
    return training, head


def preset_options(head: str, name: str, shot: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training options, head options) of `head`'s released recipe on benchmark `name`."""
    if name not in BENCHMARKS:
        raise KeyError(name)
    if head == "tsfsar":
        return _tsfsar(name, shot)
    return dict(EMP_SCHEDULES[name]), dict(EMP_HEAD_OPTIONS.get(head, {}))
