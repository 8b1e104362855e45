"""`tsfsar` side by side with the released TS-FSAR code, loaded at run time from a checkout.

Set FSAR_TSFSAR_SRC to a checkout of github.com/yaozhang0417/TS-FSAR (the project never copies it)
and install the `released-check` extra (transformers, scikit-learn, einops, simplejson); otherwise
these tests are skipped. A tiny Hugging Face CLIP with random weights plays the backbone: the released
`TS_FSAR` runs it online, fsar reads the same states as taps. With the same weights: the same
per-frame features, loss terms, total loss, probabilities and gradients to float rounding, 1-shot
and 5-shot; the released side-network initialisation lands in the same modules; the optimiser's
groups and the learning rate at every iteration equal the released ones; the presets equal the
released configs. tests/test_tsfsar_reproduce.py pins the same points by worked examples in CI.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import heads
from heads.config import TrainConfig
from heads.presets import BENCHMARKS, tsfsar_release
from heads.train import learning_rate, make_optimizer

SOURCE = os.environ.get("FSAR_TSFSAR_SRC")
pytestmark = pytest.mark.skipif(
    not SOURCE or not (Path(SOURCE) / "trainers" / "ts_fsar.py").is_file(),
    reason="set FSAR_TSFSAR_SRC to a checkout of github.com/yaozhang0417/TS-FSAR to compare with it",
)

# The tiny backbone and head: 4 CLIP blocks of width 96, 3x3 patches, 4 frames, side width 128 (two
# heads: the released EMBED_DIM // 64), projection 64; side blocks 1 and 3 (0-based) temporal.
WIDTH, DEPTH, FRAMES, SIDE, PROJ, IMAGE, N_BASE = 96, 4, 4, 128, 64, 48, 7
TEMP_LAYERS = [1, 3]  # released 0-based side blocks = fsar's CLIP blocks 2 and 4


@pytest.fixture(scope="module")
def released():
    """The released modules, imported from FSAR_TSFSAR_SRC and removed from sys.modules after."""
    for module in ("transformers", "sklearn", "einops", "simplejson"):
        pytest.importorskip(module, reason="pip install -e '.[released-check]'")
    sys.path.insert(0, SOURCE)
    try:
        modules = SimpleNamespace(
            model=importlib.import_module("trainers.model"),
            ts_fsar=importlib.import_module("trainers.ts_fsar"),
            functions=importlib.import_module("utils.functions"),
            optimizer=importlib.import_module("utils.optimizer"),
            config=importlib.import_module("utils.config"),
        )
        yield modules
    finally:
        sys.path.remove(SOURCE)
        for name in [m for m in sys.modules if m.split(".")[0] in ("trainers", "utils")]:
            del sys.modules[name]


def released_cfg(released, shot: int, test: bool = False, dropout: float = 0.0):
    """A released Config with the yaml's structure at the tiny sizes (HMDB51's weights)."""
    r = tsfsar_release("hmdb51", shot)
    values = {
        "TRAIN": dict(
            WAY=3, SHOT=shot, QUERY_PER_CLASS=2, QUERY_PER_CLASS_TEST=1, NUM_CLASSES=N_BASE,
            KD_ALPHA=r.kd_weight, CLS_ALPHA=0.7, SIDE_CLS_ALPHA=1.3, VIS_ALPHA=1.0, KD_T=r.kd_t,
            DC_ALPHA=0.4,
        ),
        "TEMP_CLIP": 50.0, "TEMP_SIDE": 30.0,
        "LSN": dict(
            EMBED_DIM=SIDE, MLP_RATIO=4.0, QKV_BIAS=True, QK_SCALE=None, DROP=0.0, ATTN_DROP=0.0,
            HIDDEN_DIM=WIDTH, OUTPUT_DIM=SIDE, ADAPTER_DIM=PROJ, GATE_T=0.1, GATE_ALPHA=0,
            USE_GATE="learnable", REMOVE_PROJ=True, NUM_LAYERS=DEPTH, TEMP_LAYERS=TEMP_LAYERS,
            DROPOUT=dropout,
        ),
        "TEST": dict(ENABLE=test, FUSE_CLIP=r.fuse[1], FUSE_VISION=r.fuse[0], FUSE_SIDE=r.fuse[2]),
        "DATA": dict(NUM_INPUT_FRAMES=FRAMES, RES_ALPHA=r.res_alpha),
        "SOLVER": dict(
            GENERATOR_LR=r.generator_lr, LSN_LR=r.lsn_lr, LSNHEAD_LR=r.head_lr,
            WEIGHT_DECAY=0.1, OPTIM_METHOD="adamw", ADAPTER_ALPHA=r.adapter_alpha,
        ),
    }  # fmt: skip
    return released.config.Config(load=False, cfg_dict=values)


def tiny_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
        num_attention_heads=4, image_size=IMAGE, patch_size=16, projection_dim=PROJ,
    )  # fmt: skip
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config).eval()


def fsar_options(cfg) -> dict:
    return dict(
        dim=PROJ, width=WIDTH, taps=list(range(DEPTH + 1)), depth=DEPTH, frames=FRAMES,
        base_classes=N_BASE, side_width=SIDE, temporal_blocks=[b + 1 for b in TEMP_LAYERS],
        dc_alpha=cfg.TRAIN.DC_ALPHA, res_alpha=cfg.DATA.RES_ALPHA, dropout=cfg.LSN.DROPOUT,
        temp_clip=cfg.TEMP_CLIP, temp_side=cfg.TEMP_SIDE, kd_t=cfg.TRAIN.KD_T,
        vision_weight=cfg.TRAIN.VIS_ALPHA, classifier_weight=cfg.TRAIN.CLS_ALPHA,
        side_text_weight=cfg.TRAIN.SIDE_CLS_ALPHA, kd_weight=cfg.TRAIN.KD_ALPHA,
        fuse_vision=cfg.TEST.FUSE_VISION, fuse_clip=cfg.TEST.FUSE_CLIP, fuse_side=cfg.TEST.FUSE_SIDE,
    )  # fmt: skip


# released parameter names (TS_FSAR) -> fsar's (TSFSAR)
RENAMES = [
    (r"^model\.side_LN\.(\d+)\.", r"side.tap_norms.\1."),
    (r"^model\.side_downsample\.(\d+)\.", r"side.tap_downs.\1."),
    (r"^model\.side_transformer\.(\d+)\.attn\.([qkv])_linear\.", r"side.blocks.\1.attn.\2."),
    (r"^model\.side_transformer\.(\d+)\.", r"side.blocks.\1."),
    (r"^model\.side_gate_params\.(\d+)$", r"side.gates.\1"),
    (r"^model\.Adapter\.attn\.([qkv])_linear\.", r"adapter.attn.\1."),
    (r"^model\.Adapter\.", r"adapter."),
    (r"^model\.up_linear\.", r"up_proj."),
    (r"^model\.up_ln\.", r"up_norm."),
    (r"^model\.Linear\.", r"classifier."),
    (r"^ts_dcm\.generator\.", r"generator."),
]


def fsar_name(name: str) -> str | None:
    for pattern, replacement in RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None  # the frozen CLIP


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if fsar_name(n) is not None}


def build_pair(released, cfg):
    """The released TS_FSAR (weights perturbed so no gate, norm or bias sits at its init) and fsar's
    head with the same weights."""
    torch.manual_seed(1)
    model = released.ts_fsar.TS_FSAR(cfg, tiny_clip())
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(0.05 * torch.randn_like(p))
    head = heads.create("tsfsar", **fsar_options(cfg))
    state = {fsar_name(n): p.detach().clone() for n, p in trainable(model).items()}
    assert set(state) == {n for n, _ in head.named_parameters()}
    head.load_state_dict(state, strict=False)
    return model, head


def episode(cfg, shot: int, seed: int = 0):
    """Frames of the support then query videos, their labels (shuffled order) and base classes."""
    g = torch.Generator().manual_seed(seed)
    way, query = cfg.TRAIN.WAY, cfg.TRAIN.QUERY_PER_CLASS if not cfg.TEST.ENABLE else 1
    support_labels = torch.arange(way).repeat_interleave(shot)[
        torch.randperm(way * shot, generator=g)
    ]
    query_labels = torch.arange(way).repeat_interleave(query)[
        torch.randperm(way * query, generator=g)
    ]
    classes = torch.randperm(N_BASE, generator=g)[:way]
    n_videos = way * (shot + query)
    images = torch.randn(n_videos * FRAMES, 3, IMAGE, IMAGE, generator=g)
    return images, support_labels, query_labels, classes


def taps_of(clip, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """fsar's store inputs from the same backbone: every hidden state and the projected last CLS."""
    with torch.no_grad():
        out = clip.vision_model(pixel_values=images, output_hidden_states=True)
        cls = clip.visual_projection(clip.vision_model.post_layernorm(out.hidden_states[-1][:, 0]))
    inputs = {
        f"tap{k:02d}": h.view(-1, FRAMES, *h.shape[1:]) for k, h in enumerate(out.hidden_states)
    }
    inputs["clip"] = cls.view(-1, FRAMES, cls.shape[-1])
    return inputs


class Recorder:
    """Stands in for `torch.nn.functional` in the released module, recording what it is asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __getattr__(self, name: str):
        real = getattr(F, name)
        if name not in ("softmax", "log_softmax", "nll_loss"):
            return real

        def record(*args, **kwargs):
            out = real(*args, **kwargs)
            self.calls.append((name, out))
            return out

        return record


def recorded_losses(model) -> list[torch.Tensor]:
    """Wrap the released `self.ce` and `self.kl` modules to record their outputs in call order."""
    calls: list[torch.Tensor] = []
    for attribute in ("ce", "kl"):
        module = getattr(model, attribute)
        original = module.forward

        def forward(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            calls.append(out)
            return out

        module.forward = forward
    return calls


def text_table(seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(N_BASE, PROJ, generator=g), dim=-1)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("shot", [1, 5])
def test_training_step_equals_the_released_one(released, shot: int, monkeypatch) -> None:
    cfg = released_cfg(released, shot)
    model, head = build_pair(released, cfg)
    images, support_labels, query_labels, classes = episode(cfg, shot)
    text = text_table()
    recorder = Recorder()
    monkeypatch.setattr(released.ts_fsar, "F", recorder)
    losses = recorded_losses(model)
    model.train()
    real = classes[torch.cat([support_labels, query_labels])]
    out = model(images, support_labels, query_labels, real_labels=real, class_embeddings=text)
    out["loss"].backward()

    head.train()
    head.set_class_text(text.unsqueeze(1))
    head.base_ids = torch.arange(N_BASE)
    head.base_index = torch.arange(N_BASE)
    features = head.video_features(taps_of(model.model_clip_for_test, images))
    n_support = len(support_labels)
    head.process_support_set(
        {k: v[:n_support] for k, v in features.items()}, support_labels, classes
    )
    head({k: v[n_support:] for k, v in features.items()})
    loss = head.loss(query_labels)
    loss.backward()

    vision = next(out for name, out in recorder.calls if name == "nll_loss")
    classifier, clip_text, side_text, distill = losses  # ce, ce, ce, kl in the released order
    terms = head.loss_terms
    for name, ours, theirs in (("vision", terms["vision"], vision),
                               ("classifier", terms["classifier"], classifier),
                               ("clip_text", terms["clip_text"], clip_text),
                               ("side_text", terms["side_text"], side_text),
                               ("distill", terms["distill"], distill),
                               ("total", loss, out["loss"])):  # fmt: skip
        assert close(ours, theirs), (name, float(ours), float(theirs))
    ours = dict(head.named_parameters())
    theirs = trainable(model)
    largest = max(float(p.grad.abs().max()) for p in theirs.values())
    for name, p in theirs.items():
        mine = ours[fsar_name(name)].grad
        assert p.grad is not None and mine is not None, name
        # float rounding, relative to each gradient and to the largest (a key bias's gradient is
        # zero in exact arithmetic: both sides give rounding noise there)
        assert torch.allclose(mine, p.grad, rtol=1e-3, atol=1e-6 * largest), name


@pytest.fixture(autouse=True)
def keep_clip(released, monkeypatch):
    """TS_FSAR freezes and deep-copies the backbone; keep a handle on it for fsar's taps."""
    original = released.ts_fsar.TS_FSAR.__init__

    def init(self, cfg, image_clip):
        original(self, cfg, image_clip)
        object.__setattr__(self, "model_clip_for_test", image_clip)

    monkeypatch.setattr(released.ts_fsar.TS_FSAR, "__init__", init)


@pytest.mark.parametrize("shot", [1, 5])
def test_test_probabilities_equal_the_released_ones(released, shot: int, monkeypatch) -> None:
    cfg = released_cfg(released, shot, test=True)
    model, head = build_pair(released, cfg)
    images, support_labels, query_labels, classes = episode(cfg, shot, seed=1)
    text = text_table()
    recorder = Recorder()
    monkeypatch.setattr(released.ts_fsar, "F", recorder)
    model.eval()
    with torch.no_grad():  # main.py:106-115: the episode's class texts, in label order
        out = model(images, support_labels, query_labels, class_embeddings=text[classes])
    softmaxes = [o for name, o in recorder.calls if name == "softmax"]
    fused_log = next(o for name, o in recorder.calls if name == "nll_loss")

    head.eval()
    head.set_class_text(text.unsqueeze(1))
    with torch.no_grad():
        features = head.video_features(taps_of(model.model_clip_for_test, images))
        n_support = len(support_labels)
        head.process_support_set(
            {k: v[:n_support] for k, v in features.items()}, support_labels, classes
        )
        prediction = head({k: v[n_support:] for k, v in features.items()})
    vision, clip, side = softmaxes  # released order: vision, adapted CLIP text, side text
    assert close(F.softmax(head._vision, -1), vision)
    fused = (
        vision.pow(cfg.TEST.FUSE_VISION)
        * clip.pow(cfg.TEST.FUSE_CLIP)
        * side.pow(cfg.TEST.FUSE_SIDE)
    )
    assert close(prediction, fused)
    assert close(torch.log(prediction + 1e-8), torch.log(fused + 1e-8), atol=1e-4)
    assert torch.equal(prediction.argmax(1), fused.argmax(1))
    assert close(F.nll_loss(torch.log(prediction + 1e-8), query_labels), out["loss"])
    assert float(fused_log.exp().sum()) > 0  # (the released loss reads the same fused product)


def test_side_initialisation_lands_in_the_released_modules(released) -> None:
    """LSN.prune_and_initialize's PCA weights, exported under TS_INTERFACE.md's keys, load into the
    modules the released code puts them in (side block j <- CLIP block j + 1, Adapter <- the last)."""
    cfg = released_cfg(released, 1)
    torch.manual_seed(1)
    model = released.ts_fsar.TS_FSAR(cfg, tiny_clip())  # TEST.ENABLE false: PCA-initialised
    exported = {}
    for j, layer in enumerate(model.model.side_transformer):
        for key, value in layer.state_dict().items():
            key = re.sub(r"attn\.([qkv])_linear", r"attn.\1", key)
            exported[f"block{j + 1:02d}.{key}"] = value
    for key, value in model.model.Adapter.attn.state_dict().items():
        key = re.sub(r"([qkv])_linear", r"\1", key)
        exported[f"adapter.attn.{key}"] = value
    head = heads.create("tsfsar", **fsar_options(cfg))
    head.load_init(exported)
    ours = dict(head.named_parameters())
    for name, p in trainable(model).items():
        if name.startswith(("model.side_transformer.", "model.Adapter.attn.")):
            assert torch.equal(ours[fsar_name(name)], p), name


def test_parameter_groups_equal_the_released_optimiser(released) -> None:
    for name in BENCHMARKS:
        for shot in (1, 5):
            cfg = released_cfg(released, shot)
            r = tsfsar_release(name, shot)
            cfg.SOLVER.LSN_LR, cfg.SOLVER.LSNHEAD_LR = r.lsn_lr, r.head_lr
            cfg.SOLVER.GENERATOR_LR, cfg.SOLVER.ADAPTER_ALPHA = r.generator_lr, r.adapter_alpha
            model, head = build_pair(released, cfg)
            theirs = released.optimizer.construct_optimizer(model, cfg)
            train = TrainConfig(store="x", head="tsfsar", preset=name, shot=shot).resolved()
            mine = make_optimizer(head, train)
            names = {id(p): n for n, p in head.named_parameters()}
            released_names = {id(p): fsar_name(n) for n, p in model.named_parameters()}
            assert type(mine) is type(theirs) is torch.optim.AdamW
            assert len(mine.param_groups) == len(theirs.param_groups) == 4
            for a, b in zip(mine.param_groups, theirs.param_groups, strict=True):
                assert {names[id(p)] for p in a["params"]} == {
                    released_names[id(p)] for p in b["params"]
                }
                for key in ("lr", "weight_decay", "eps", "betas", "amsgrad"):
                    assert a[key] == pytest.approx(b[key], rel=1e-15), (name, shot, key)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_learning_rate_at_every_iteration_equals_the_released_scheduler(released, name) -> None:
    for shot in (1, 5):
        train = TrainConfig(store="x", head="tsfsar", preset=name, shot=shot).resolved()
        groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr}
                  for lr in train.group_lr.values()]  # fmt: skip
        optimizer = torch.optim.AdamW(groups)
        scheduler = released.functions.cosine_lr(optimizer, 0, tsfsar_release(name, shot).tasks)
        for cur_iter in range(train.episodes):  # main.py:33-89: train at the lr, then set the next
            for group, base in zip(optimizer.param_groups, train.group_lr.values(), strict=True):
                mine = learning_rate(train, cur_iter, base)
                assert mine == pytest.approx(group["lr"], rel=1e-12, abs=0), (name, cur_iter)
            scheduler(cur_iter)


def test_presets_equal_the_released_configs(released) -> None:
    """Every value of every Metatrain/Metatest yaml the presets use, read by the released loader."""
    import yaml

    Config = released.config.Config
    merger = Config(load=False, cfg_dict={})
    for name in BENCHMARKS:
        for shot in (1, 5):
            loaded = {}
            for kind in ("Metatrain", "Metatest"):
                base = yaml.safe_load((Path(SOURCE) / "configs" / "base.yaml").read_text())
                path = Path(SOURCE) / "configs" / name / f"{kind}_{shot}shot.yaml"
                merged = merger._merge_cfg_from_base(base, yaml.safe_load(path.read_text()))
                loaded[kind] = Config(load=False, cfg_dict=merged)
            train, test = loaded["Metatrain"], loaded["Metatest"]
            cfg = TrainConfig(store="x", head="tsfsar", preset=name, shot=shot).resolved()
            options = cfg.head_options
            assert cfg.episodes == train.TRAIN.NUM_TRAIN_TASKS
            assert (cfg.episodes_per_iteration, cfg.episodes_per_step) == (
                1,
                train.TRAIN.BATCH_SIZE_PER_TASK,
            )
            assert train.TRAIN.BATCH_SIZE == train.NUM_GPUS == 1
            assert cfg.val_every == train.TRAIN.VAL_FRE_ITER
            assert (cfg.query, cfg.val_query) == (
                train.TRAIN.QUERY_PER_CLASS,
                train.TRAIN.QUERY_PER_CLASS_TEST,
            )
            assert cfg.group_lr == {
                "head": train.SOLVER.LSNHEAD_LR, "generator": train.SOLVER.GENERATOR_LR,
                "side": train.SOLVER.LSN_LR, "adapter": train.SOLVER.LSN_LR * train.SOLVER.ADAPTER_ALPHA,
            }  # fmt: skip
            assert (cfg.optimizer, cfg.weight_decay) == (
                train.SOLVER.OPTIM_METHOD,
                train.SOLVER.WEIGHT_DECAY,
            )
            assert options == dict(
                kd_weight=train.TRAIN.KD_ALPHA, classifier_weight=train.TRAIN.CLS_ALPHA,
                side_text_weight=train.TRAIN.SIDE_CLS_ALPHA, vision_weight=train.TRAIN.VIS_ALPHA,
                kd_t=train.TRAIN.KD_T, temp_clip=test.TEMP_CLIP, temp_side=test.TEMP_SIDE,
                dropout=train.LSN.DROPOUT, res_alpha=train.DATA.RES_ALPHA,
                fuse_vision=test.TEST.FUSE_VISION, fuse_clip=test.TEST.FUSE_CLIP,
                fuse_side=test.TEST.FUSE_SIDE,
            )  # fmt: skip
            head = heads.create("tsfsar", **options)
            assert head.dc_alpha == train.TRAIN.DC_ALPHA and head.side.gate_t == train.LSN.GATE_T
            assert [b.temporal for b in head.side.blocks] == [
                n in train.LSN.TEMP_LAYERS for n in range(train.LSN.NUM_LAYERS)
            ]
            assert head.side.tap_downs[0].out_features == train.LSN.OUTPUT_DIM
            assert (
                head.side.blocks[0].mlp.fc1.out_features
                == train.LSN.OUTPUT_DIM * train.LSN.MLP_RATIO
            )
            assert head.classifier_dropout.p == train.LSN.DROPOUT
            flip = getattr(train.AUGMENTATION, "RANDOM_FLIP", False)
            assert tsfsar_release(name, shot).flip == flip
            assert train.AUGMENTATION.COLOR_AUG is False and train.DATA.NUM_INPUT_FRAMES == 8
