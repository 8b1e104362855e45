"""The released EMP-Net recipe, point by point: each test pins the released behaviour by a worked example.

References are to github.com/cong-wu/EMP-Net at b4dc006 (docs/reproducing.md has the full table). The
released formulas are re-implemented here from that source; no released file is read at test time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import heads
from cli import app
from heads.config import ConfigError, TrainConfig
from heads.emp import released_text_ids
from heads.episodes import EpisodeSampler, draw_keys
from heads.evaluate import evaluate, with_random_views
from heads.train import RELEASED_NO_DECAY, learning_rate, make_optimizer
from pipeline.preprocess import (
    Augment,
    augment_params,
    build_transform,
    preprocess_spec,
    transform_video,
)
from pipeline.sampling import sample_frame_indices
from store import open_store
from tests.heads_fixtures import reversal_pair_store

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
    five = TrainConfig(store="x", preset=preset, shot=5).resolved()
    assert {**vars(five), "shot": 1} == vars(cfg)  # 1-shot and 5-shot share the schedule


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


# ------------------------------------------------------------------------------ frames and pixels

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def released_clip(
    frames: np.ndarray,
    flip: bool = False,
    corner: tuple[float, float] | None = None,
    scale: int = 256,
    crop: int = 224,
) -> np.ndarray:
    """datasets/base/ssv2_few_shot.py:528-534 (train: ToTensorVideo, RandomHorizontalFlipVideo,
    KineticsResizedCropFewshot) and :622-637 (test, centre crop), the crop as in
    datasets/utils/transformations.py:676-737, NormalizeVideo, then `.permute(1, 0, 2, 3)` (:434).
    `corner`: the two `random.uniform(0, x_max)` draws of a random crop, None for the test crop."""
    clip = torch.from_numpy(frames).float().permute(3, 0, 1, 2) / 255.0  # to_tensor
    if flip:
        clip = clip.flip(-1)  # _functional_video.hflip
    new_clip = torch.nn.functional.interpolate(clip, size=(scale, scale), mode="bilinear")
    x_max = y_max = int(scale - crop)
    x, y = (int(corner[0]), int(corner[1])) if corner else (x_max // 2, y_max // 2)
    clip = new_clip[:, :, y : y + crop, x : x + crop]
    mean, std = torch.as_tensor(CLIP_MEAN), torch.as_tensor(CLIP_STD)
    clip = clip.sub_(mean[:, None, None, None]).div_(std[:, None, None, None])
    return clip.permute(1, 0, 2, 3).numpy()


def emp_spec(size: int = 224) -> dict:
    return preprocess_spec("emp", {"size": size, "mean": (0.5,) * 3, "std": (0.5,) * 3})


def test_emp_test_transform_worked_example_on_a_2x4_frame() -> None:
    """A 2x4 frame, model size 7: squashed to 8x8 (256/224 x 7), crop 7 at offset (8 - 7) // 2 = 0.

    Bilinear without align_corners samples source x = 0.5 * col - 0.25 (clamped at 0) and source
    y = 0.25 * row - 0.375, so channel 0 (columns 0, 85, 170, 255) reads 0, 21.25, 63.75, 106.25,
    148.75, 191.25, 233.75 and channel 1 (rows 0, 255) reads 0, 0, 31.875, 95.625, 159.375, 223.125, 255.
    """
    frame = np.zeros((1, 2, 4, 3), dtype=np.uint8)
    frame[0, :, :, 0] = [0, 85, 170, 255]
    frame[0, 1, :, 1] = 255
    spec = emp_spec(7)
    assert (spec["resize"], spec["crop"]) == (8, 7)
    out = build_transform(spec)(frame)
    assert out.shape == (1, 3, 7, 7)
    columns = np.array([0, 21.25, 63.75, 106.25, 148.75, 191.25, 233.75]) / 255
    rows = np.array([0, 0, 31.875, 95.625, 159.375, 223.125, 255]) / 255
    np.testing.assert_allclose(
        out[0, 0], np.tile((columns - CLIP_MEAN[0]) / CLIP_STD[0], (7, 1)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        out[0, 1],
        np.tile((rows[:, None] - CLIP_MEAN[1]) / CLIP_STD[1], (1, 7)),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_array_equal(out, released_clip(frame, scale=8, crop=7))


@pytest.mark.parametrize("height,width", [(240, 320), (256, 340), (300, 180), (72, 96)])
def test_emp_test_transform_equals_the_released_one(height: int, width: int) -> None:
    frames = np.random.default_rng(height).integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    np.testing.assert_array_equal(build_transform(emp_spec())(frames), released_clip(frames))


def test_emp_training_augmentation_equals_the_released_one() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (2, 240, 320, 3), dtype=np.uint8)
    transform = build_transform(emp_spec())
    for flip, x, y in ((True, 15, 7), (False, 0, 31), (True, 31, 0)):
        ours = transform(frames, Augment(flip, x, y))
        np.testing.assert_array_equal(ours, released_clip(frames, flip, (x + 0.5, y + 0.5)))


def test_training_flip_and_crop_are_seeded_per_video_and_drawn_as_released() -> None:
    spec = emp_spec()
    assert [augment_params(spec, "videos/brush_hair/x", v) for v in (1, 2, 3)] == [
        Augment(True, 15, 7), Augment(False, 20, 18), Augment(True, 31, 4),
    ]  # fmt: skip
    draws = [augment_params(spec, f"video{i}", 1) for i in range(4000)]
    assert 0.46 < np.mean([d.flip for d in draws]) < 0.54  # RandomHorizontalFlipVideo p = 0.5
    # int(random.uniform(0, 32)): every offset 0..31 about equally often, never 32
    for offsets in ([d.x for d in draws], [d.y for d in draws]):
        counts = np.bincount(offsets, minlength=33)
        assert counts[32] == 0 and counts[:32].min() > 80


def test_random_views_take_the_released_segments() -> None:
    """base_dataset.py:505-509 (SAMPLING_RATE 50 > 40): interval = n // T, then
    randint(i * interval, i * interval + interval - 1) per segment; the last n % T frames are never used."""
    for n_frames in (8, 9, 57, 100, 301):
        interval = n_frames // 8
        seen = set()
        for i in range(300):
            for view in sample_frame_indices(n_frames, 8, 3, f"v{i}")[1:]:
                for segment, index in enumerate(view):
                    assert interval * segment <= index < interval * (segment + 1)
                    seen.add(index)
        assert seen == set(range(8 * interval)), n_frames  # every frame of every segment occurs


def test_views_of_train_videos_are_augmented_and_other_videos_are_not() -> None:
    spec = emp_spec()
    transform = build_transform(spec)
    pixels = np.random.default_rng(2).integers(0, 256, (3, 2, 60, 80, 3), dtype=np.uint8)
    train = transform_video(spec, transform, pixels, "vid", train=True)
    test = transform_video(spec, transform, pixels, "vid", train=False)
    assert train.shape == test.shape == (3, 2, 3, 224, 224)
    for v in range(3):
        np.testing.assert_array_equal(test[v], released_clip(pixels[v]))
    np.testing.assert_array_equal(train[0], test[0])  # view 0: centre frames, test transform
    for v in (1, 2):
        a = augment_params(spec, "vid", v)
        np.testing.assert_array_equal(train[v], released_clip(pixels[v], a.flip, (a.x, a.y)))
    # openclip has no training augmentation: every view gets its eval transform
    clip_spec = preprocess_spec("openclip", {"size": 64, "mean": CLIP_MEAN, "std": CLIP_STD})
    clip_transform = build_transform(clip_spec)
    np.testing.assert_array_equal(
        transform_video(clip_spec, clip_transform, pixels, "vid", train=True),
        transform_video(clip_spec, clip_transform, pixels, "vid", train=False),
    )


def test_extraction_augments_views_of_train_videos(tmp_path) -> None:
    from pipeline.decode_child import DecodeRequest, close_decoders
    from pipeline.decoding import decode_sampled
    from pipeline.synth import write_video
    from pipeline.tasks import EncoderConfig, decode_task
    from tests.bad_videos import moving_square_frames

    path = tmp_path / "clip.mp4"
    write_video(path, moving_square_frames(40), 25)
    spec = emp_spec(32)
    config = EncoderConfig(
        model="m", pretrained="none", weights_sha256="", recipe="emp", layers=(1, 2, 3),
        device="cpu", precision="fp32", torch_threads=1, batch_frames=8, batch_across_videos=False,
    )  # fmt: skip
    try:
        train, test = (
            decode_task(DecodeRequest(str(path), "clip", 4, 2), spec, config, 60.0, train=t)
            for t in (True, False)
        )
    finally:
        close_decoders()
    frames = decode_sampled(path, 4, 2, "clip").frames
    transform = build_transform(spec)
    a = augment_params(spec, "clip", 1)
    np.testing.assert_array_equal(train.pixels[1], transform(frames[1], a))
    np.testing.assert_array_equal(test.pixels[1], transform(frames[1]))
    np.testing.assert_array_equal(train.pixels[0], test.pixels[0])


# ------------------------------------------------------------------------------ test-time views


@pytest.fixture(scope="module")
def three_view_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("views") / "store"
    classes = {"train": 4, "val": 4, "test": 6}
    reversal_pair_store(path, frames=4, views=3, classes=classes, videos_per_class=4).close()
    return path


def test_eval_random_view_draws_one_of_views_1_to_v_minus_1_per_video_and_episode(
    three_view_store: Path,
) -> None:
    store = open_store(three_view_store)
    head = heads.create("otam")
    result = evaluate(head, store, "test", 3, 1, 1, 60, seed=5, view="random")
    again = evaluate(
        head,
        store,
        "test",
        3,
        1,
        1,
        60,
        seed=5,
        view="random",
        max_ram_gb=0.0,
        episodes_per_batch=7,
    )
    assert np.array_equal(
        result.per_episode, again.per_episode
    )  # any batching, memory or streaming
    assert result.summary().endswith("(95% CI, 60 episodes, 3-way 1-shot, test, view random)")
    sampler = EpisodeSampler(store.manifest[store.manifest["split"] == "test"], 3, 1, 1, 5, 60)
    batch = sampler.batch(range(60))
    drawn = with_random_views(batch, 5, 2)
    views = np.concatenate([drawn.support_rows % 2, drawn.query_rows % 2], 1) + 1
    assert set(np.unique(views)) == {1, 2}  # view 0 (the centre frames) is never drawn
    ((role, name),) = head.inputs(store.spec).items()

    def accuracy(i: int, views_i: np.ndarray) -> float:
        rows = np.concatenate([batch.support_rows[i], batch.query_rows[i]])
        tokens = store.read(rows, [name])[name][np.arange(len(rows)), views_i]
        with torch.no_grad():
            feats = head.video_features({role: torch.from_numpy(tokens)})
            head.process_support_set(
                {k: v[:3] for k, v in feats.items()},
                torch.as_tensor(batch.support_labels[i]),
                torch.as_tensor(batch.class_ids[i]),
            )
            scores = head({k: v[3:] for k, v in feats.items()})
        return float((scores.argmax(-1).numpy() == batch.query_labels[i]).mean())

    # each episode is scored on exactly the drawn views of its videos (the other views score differently)
    drawn_acc = [accuracy(i, views[i]) for i in range(60)]
    other_acc = [accuracy(i, 3 - views[i]) for i in range(60)]
    np.testing.assert_allclose(drawn_acc, result.per_episode, rtol=1e-6)
    assert not np.allclose(other_acc, result.per_episode, rtol=1e-6)
    centre = evaluate(head, store, "test", 3, 1, 1, 60, seed=5)
    assert centre.view == "centre" and np.array_equal(
        evaluate(head, store, "test", 3, 1, 1, 60, seed=5, view=0).per_episode, centre.per_episode
    )


def test_eval_view_errors_are_one_line(three_view_store: Path, tmp_path: Path) -> None:
    store = open_store(three_view_store)
    with pytest.raises(ValueError, match=r"--view 3: the store has views 0..2"):
        evaluate(heads.create("proto"), store, "test", 3, 1, 1, 5, view=3)
    with pytest.raises(ValueError, match="--view 'middle': use centre, random or a view number"):
        evaluate(heads.create("proto"), store, "test", 3, 1, 1, 5, view="middle")
    one = tmp_path / "one"
    reversal_pair_store(one, frames=4, views=1, classes={"train": 2, "val": 2, "test": 4}).close()
    result = CliRunner().invoke(
        app, ["eval", "--store", str(one), "--head", "proto", "--view", "random", "--no-progress"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        "--view random draws among views 1..V-1: extract the store with --views 2" in result.output
    )


# ------------------------------------------------------------------------------ 5-shot text quirk


def released_real_unique_labels(support_labels, support_real_class, first_class: int) -> list[int]:
    """models/base/few_shot.py:1368-1373 (torch.zeros(5): id 0 is the split's first class)."""
    real_unique_labels = [first_class] * 5
    for i in range(5):
        for j in range(5):
            if i == support_labels[j]:
                real_unique_labels[int(i)] = support_real_class[int(j)]
                continue
    return real_unique_labels


def test_released_5shot_text_ids_follow_the_released_loop_on_shuffled_supports() -> None:
    rng = np.random.default_rng(0)
    labels = torch.arange(5).repeat_interleave(5).expand(4000, -1)  # fsar: class-major supports
    class_ids = torch.as_tensor(
        np.stack([rng.choice(np.arange(11, 41), 5, replace=False) for _ in range(4000)])
    )
    fallback = torch.full((4000,), 10)
    ids = released_text_ids(labels, class_ids, fallback)
    # the shuffle it stands for: the slots ordered by a hash of the episode's class ids
    keys = draw_keys(draw_keys(*class_ids.numpy().astype(np.uint64).T)[:, None], np.arange(25))
    for e in range(0, 4000, 97):
        order = np.argsort(keys[e], kind="stable")
        real = class_ids[e][labels[e]].tolist()
        want = released_real_unique_labels(labels[e][order].tolist(), [real[j] for j in order], 10)
        assert ids[e].tolist() == want
    # with shuffled supports, P(the first five cover all five classes) = 5^5 * 5! / (25*24*23*22*21)
    lost = (ids != class_ids).any(1).float().mean().item()
    assert lost == pytest.approx(1 - 5**5 * 120 / (25 * 24 * 23 * 22 * 21), abs=0.01)  # 0.941
    one_shot = released_text_ids(torch.arange(5).expand(50, -1), class_ids[:50], fallback[:50])
    assert torch.equal(one_shot, class_ids[:50])  # 1-shot 5-way: every class among the five


def test_emp_released_5shot_text_option_scores_missing_classes_against_the_first_class(
    tmp_path: Path,
) -> None:
    classes = {"train": 2, "val": 2, "test": 6}
    reversal_pair_store(
        tmp_path / "s", frames=4, views=1, classes=classes, videos_per_class=6
    ).close()
    store = open_store(tmp_path / "s")
    torch.manual_seed(0)
    quirk = heads.create("emp", dim=32, released_5shot_text=True)
    plain = heads.create("emp", dim=32)
    plain.load_state_dict(quirk.state_dict())
    for head in (quirk, plain):
        head.prepare(store)
        head.eval()
    # classes: train 0-1, val 2-3, test 4-9; index 0 of the released test texts is class 4
    assert quirk.split_first.tolist() == [0, 0, 2, 2] + [4] * 6
    assert quirk.config()["released_5shot_text"] and "released_5shot_text" not in plain.config()
    sampler = EpisodeSampler(store.manifest[store.manifest["split"] == "test"], 5, 5, 1, 0, 400)
    every = sampler.batch(range(400))
    every_ids = released_text_ids(
        torch.as_tensor(every.support_labels),
        torch.as_tensor(every.class_ids),
        torch.full((400,), 4),
    )
    complete = (every_ids == torch.as_tensor(every.class_ids)).all(1).numpy()
    picked = np.concatenate([np.flatnonzero(complete)[:3], np.flatnonzero(~complete)[:3]])
    batch = sampler.batch(picked)
    rows = np.concatenate([batch.support_rows, batch.query_rows], 1)
    roles = quirk.inputs(store.spec)
    data = store.read(rows.reshape(-1), list(roles.values()))
    inputs = {role: torch.from_numpy(data[name][:, 0]) for role, name in roles.items()}
    labels, class_ids = torch.as_tensor(batch.support_labels), torch.as_tensor(batch.class_ids)
    text_ids = released_text_ids(labels, class_ids, torch.full((6,), 4))
    lost = (text_ids != class_ids).any(1)
    assert lost.tolist() == [False] * 3 + [True] * 3
    with torch.no_grad():
        feats = plain.video_features(inputs)
        feats = {k: v.reshape(6, 30, *v.shape[1:]) for k, v in feats.items()}
        support = {k: v[:, :25] for k, v in feats.items()}
        query = {k: v[:, 25:] for k, v in feats.items()}
        quirk.process_support_set(support, labels, class_ids)
        quirked = quirk(query)
        plain.process_support_set(support, labels, class_ids)
        right = plain(query)
        texts = plain.class_text.mean(1)[text_ids].unsqueeze(1)  # (E, 1, N, D), template mean
        for level, scores in quirk._support_text.items():  # the quirk moves only the text scores
            want = plain._text_scores({level: support[level]}, texts)[level]
            torch.testing.assert_close(scores, want)
    torch.testing.assert_close(quirked[~lost], right[~lost])  # all five texts: the same prediction
    assert not torch.allclose(quirked[lost], right[lost])


def test_views_cost_command_prints_the_figures_docs_quote(capsys) -> None:
    from bench import views

    assert views.store_bytes(1) == 4_866_048 and views.store_bytes(4) == 4 * 4_866_048
    assert views.split_videos("hmdb51") == 4280 + 1194 + 1292
    views.main(["--videos", "1", "--views", "1,2"])
    out = capsys.readouterr().out
    assert "CPU seconds per video" in out and "  V=2: decode " in out
    assert "V=1: 4.87 MB per video; hmdb51 33 GB" in out
