"""Episodic training of a head from a store, top to bottom in one file (nanoGPT style).

    cfg = TrainConfig(store="stores/hmdb51", head="emp", preset="hmdb51")
    run_dir = train(cfg)

Loop: sample episode -> per-video features -> support set -> query scores -> loss -> backward;
an Adam step every `episodes_per_step` episodes (gradient accumulation); validation on the **val**
split every `val_every` episodes; `best.safetensors` (best val accuracy) and `last.safetensors`
(with optimizer and RNG state, for `--resume`; also written after the first optimiser steps, so an
early kill loses little) in the run directory, next to `config.json`, `metrics.jsonl` and `curves.png`;
`runs/latest` points to the newest run. Every option is checked, and the store and episodes are
loaded, before the run directory is touched; an existing run is never overwritten unless asked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from runtime.device import pick_device
from runtime.progress import progress_bar
from runtime.versions import versions

from . import registry
from .base import FewShotHead
from .checkpoint import (
    CheckpointError,
    load_model,
    load_training_state,
    read_metadata,
    save_checkpoint,
)
from .data import SplitData
from .episodes import EpisodeError, EpisodeSampler
from .evaluate import evaluate

LOSS_POINTS = 100  # training-loss records per run in metrics.jsonl (at most one per optimiser step)


class ConfigError(ValueError):
    """A training option users can fix (one-line message)."""


RUN_FILES = ("config.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "curves.png")
CHECKPOINT_EVERY_S = 600.0  # between validations, last.safetensors at least this often
# Options that count something: (option, smallest value). None-able ones are checked when set.
_COUNTS = (
    ("way", 1), ("shot", 1), ("query", 1), ("episodes", 1), ("episodes_per_step", 1),
    ("episodes_per_iteration", 1), ("batch_size", 1), ("val_every", 1), ("val_episodes", 1),
    ("val_query", 1), ("val_way", 1), ("warmup_episodes", 0),
)  # fmt: skip


# The released schedules as they actually run (EMP-Net configs, read with the released config loader;
# docs/reproducing.md lists every line). One iteration = 2 episodes (2 GPUs, gradients averaged), an
# optimiser step every 4 iterations. The released epoch counter `cur_iter // STEPS_ITER + cur_iter /
# STEPS_ITER` stays below 1 for the whole first STEPS_ITER and reaches the decay epochs 4 and 6 at
# 2 and 3 x STEPS_ITER, so in iterations: linear warm-up from WARMUP_START_LR over STEPS_ITER, full
# lr until 2 x STEPS_ITER, x0.1 until 3 x STEPS_ITER, x0.01 after. Weight decay is OPTIMIZER.WEIGHT_DECAY
# (1e-3; the configs' SOLVER.WEIGHT_DECAY 5e-5 is never read) on every parameter whose name has no "norm".
def _released(
    lr: float, iterations: int, steps_iter: int, val_every_iter: int, warmup_start: float
) -> dict[str, Any]:
    return dict(
        lr=lr, lr_start=warmup_start, episodes=2 * iterations, episodes_per_iteration=2,
        episodes_per_step=8, warmup_episodes=2 * steps_iter, decay_episodes=[4 * steps_iter, 6 * steps_iter],
        decay_factor=0.1, weight_decay=1e-3, decay_groups="released", query=5, val_query=1,
        val_every=2 * val_every_iter,
    )  # fmt: skip


# The 1-shot and 5-shot configs of each benchmark differ only in SHOT, MERGE_BEFORE (what `emp` does
# for K > 1 anyway) and the unused USE_CLASSIFICATION_VALUE: one preset per benchmark, --shot picks.
PRESETS: dict[str, dict[str, Any]] = {
    "hmdb51": _released(1e-4, 5_000, 1_000, 500, 1e-6),
    "ucf101": _released(1e-4, 5_000, 1_000, 500, 1e-6),
    "kinetics100": _released(1e-4, 5_000, 1_000, 500, 1e-6),
    "ssv2_small": _released(1e-3, 10_000, 2_000, 1_000, 1e-5),
    "ssv2_full": _released(1e-3, 40_000, 8_000, 1_000, 1e-5),
}
DECAY_GROUPS = ("matrices", "released")
# models/utils/optimizer.py: names with these substrings get weight decay 0 (BN.WEIGHT_DECAY is 0.0)
RELEASED_NO_DECAY = ("embd", "cls_token", "bn", "norm")


# A preset reproduces the released run, so its head options are the released ones too.
PRESET_HEAD_OPTIONS: dict[str, dict[str, Any]] = {"emp": {"loss": "released"}}


@dataclass
class TrainConfig:
    store: str = ""
    head: str = "emp"
    head_options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    way: int = 5
    shot: int = 1
    query: int = 5
    episodes: int = 2_000
    episodes_per_step: int = 1
    episodes_per_iteration: int = 1  # the per-episode loss is divided by this (released: 2 GPUs)
    lr: float = 1e-3
    lr_start: float = 1e-6
    warmup_episodes: int | None = None  # default: 5% of episodes
    decay_episodes: list[int] | None = None  # default: 70% and 90% of episodes
    decay_factor: float = 0.1
    weight_decay: float = 1e-3
    decay_groups: str = "matrices"  # or "released": by name, as models/utils/optimizer.py
    batch_size: int = 32  # lastlayer --strategy finetune: videos per step
    val_every: int = 500
    val_episodes: int = 1_000
    val_query: int = 1
    val_way: int | None = None  # default: way (small val splits may need fewer)
    val_split: str = "val"
    out: str | None = None
    seed: int = 0
    device: str = "auto"
    max_ram: float = 8.0  # GB
    progress: bool = True

    def validate(self) -> None:
        """Refuse values no run can use, naming the option (ConfigError, one line)."""
        for name, smallest in _COUNTS:
            value = getattr(self, name)
            if value is None and name in ("val_way", "warmup_episodes"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                what = "a positive whole number" if smallest else "a whole number >= 0"
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: use {what}")
        for name, low, strict in (("lr", 0.0, True), ("lr_start", 0.0, False),
                                  ("decay_factor", 0.0, True), ("weight_decay", 0.0, False),
                                  ("max_ram", 0.0, False)):  # fmt: skip
            value = getattr(self, name)
            bad = isinstance(value, bool) or not isinstance(value, int | float)
            if bad or not math.isfinite(value) or value < low or (strict and value == low):
                sign = "positive" if strict else "non-negative"
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: use a {sign} number")
        if self.decay_episodes is not None and not (
            isinstance(self.decay_episodes, list)
            and all(isinstance(d, int) and not isinstance(d, bool) for d in self.decay_episodes)
        ):
            raise ConfigError(f"decay_episodes {self.decay_episodes!r}: use a list of episodes")
        if not isinstance(self.head_options, dict):
            raise ConfigError(f"head_options {self.head_options!r}: use a JSON object")
        for name in ("store", "head", "val_split", "device"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: use text")
        pick_device(self.device)

    def resolved(self, explicit: set[str] | None = None) -> TrainConfig:
        """Apply the preset (explicit options win), fill schedule defaults and validate."""
        self.validate()
        cfg = TrainConfig(**asdict(self))
        if cfg.preset is not None:
            if cfg.preset not in PRESETS:
                raise ConfigError(f"unknown preset {cfg.preset!r}; presets: {', '.join(PRESETS)}")
            for key, value in PRESETS[cfg.preset].items():
                if explicit is None or key not in explicit:
                    setattr(cfg, key, value)
            if isinstance(cfg.head_options, dict):  # (anything else: validate() says so)
                for key, value in PRESET_HEAD_OPTIONS.get(cfg.head, {}).items():
                    cfg.head_options.setdefault(key, value)
        if cfg.warmup_episodes is None:
            cfg.warmup_episodes = cfg.episodes // 20
        if cfg.decay_episodes is None:
            cfg.decay_episodes = [cfg.episodes * 7 // 10, cfg.episodes * 9 // 10]
        if cfg.decay_groups not in DECAY_GROUPS:
            raise ConfigError(
                f"--decay-groups {cfg.decay_groups!r}: use {' or '.join(DECAY_GROUPS)}"
            )
        cfg.validate()
        if cfg.val_every % cfg.episodes_per_step:
            raise ConfigError(
                f"--val-every ({cfg.val_every}) must be a multiple of --episodes-per-step ({cfg.episodes_per_step})"
            )
        return cfg


def learning_rate(cfg: TrainConfig, episode: int) -> float:
    """Linear warm-up from lr_start, then step decay (the schedule is counted in iterations)."""
    it = episode // cfg.episodes_per_iteration
    warmup = (cfg.warmup_episodes or 0) // cfg.episodes_per_iteration
    if it < warmup:  # the released arithmetic: epoch * (lr - lr_start) + lr_start
        return it / warmup * (cfg.lr - cfg.lr_start) + cfg.lr_start
    drops = sum(it >= d // cfg.episodes_per_iteration for d in cfg.decay_episodes or [])
    return cfg.lr * cfg.decay_factor**drops


def decays(name: str, parameter: torch.Tensor, groups: str) -> bool:
    """Whether `parameter` gets weight decay: `released` by name, `matrices` by shape."""
    if groups == "released":
        return not any(part in name for part in RELEASED_NO_DECAY)
    return parameter.dim() >= 2


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
    "dict[str, Any]": (dict,), "list[int]": (list,),
}  # fmt: skip


def config_values(path: str | Path) -> dict[str, Any]:
    """Training options from a JSON file, each checked for its type (ConfigError naming the file)."""
    where = f"--config {path}"
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read it ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{where}: expected a JSON object of options, got {type(values).__name__}"
        )
    annotations = {f.name: str(f.type) for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(annotations))
    if unknown:
        raise ConfigError(f"{where}: unknown training option(s) {', '.join(unknown)}")
    for name, value in values.items():
        kinds = [k.strip() for k in annotations[name].split("|")]
        if (value is None and "None" in kinds) or any(
            k not in _TYPES and k != "None" for k in kinds
        ):
            continue  # (a type this check does not know: the option's own validation decides)
        allowed = tuple(t for k in kinds for t in _TYPES.get(k, ()))
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if not isinstance(value, allowed) or wrong_bool:
            want = " or ".join(k for k in kinds if k != "None")
            raise ConfigError(f"{where}: {name} must be {want}, got {value!r}")
    return values


def make_optimizer(head: FewShotHead, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam (L2 weight decay, as released); `cfg.decay_groups` picks the parameters decayed."""
    named = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if decays(n, p, cfg.decay_groups)]
    no_decay = [p for n, p in named if not decays(n, p, cfg.decay_groups)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.Adam(groups, lr=cfg.lr)


def head_options(name: str, options: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Options with the store's dim filled in for heads that take one."""
    import inspect

    if "dim" in inspect.signature(registry.factory(name)).parameters:
        return {"dim": int(spec["dim"]), **options}
    return dict(options)


def build_head(name: str, options: dict[str, Any], store: Any, device: torch.device) -> FewShotHead:
    head = registry.create(name, **head_options(name, options, store.spec))
    head.prepare(store)
    return head.to(device)


def run_metadata(cfg: TrainConfig, store: Any) -> dict[str, Any]:
    """What config.json records besides the resolved config."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "config": asdict(cfg),
        "store": {"path": str(cfg.store), "fingerprint": store.fingerprint(), "spec": store.spec},
        "git_commit": commit,
        "versions": versions("python", "torch", "fsar"),
        "command_line": sys.argv,
    }


def train(
    cfg: TrainConfig, resume: bool = False, stop_at: int | None = None, overwrite: bool = False
) -> Path:
    """Train; returns the run directory. `stop_at` ends early (as an interruption would).

    Nothing in the run directory changes until every option is valid, the store is open and both
    samplers and their data are ready. A new run refuses a directory that already holds a run
    unless `overwrite`; `resume` refuses a store whose fingerprint changed.
    """
    from store import open_store

    cfg.validate()
    device = pick_device(cfg.device)
    store = open_store(cfg.store)
    run_dir = (
        Path(cfg.out)
        if cfg.out
        else Path("runs") / f"{cfg.head}-{Path(cfg.store).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    fingerprint = store.fingerprint()
    if resume:
        _check_resumable(run_dir, cfg, fingerprint)
    else:
        _check_new_run_dir(run_dir, overwrite)
    torch.manual_seed(cfg.seed)
    cfg.head_options = head_options(cfg.head, cfg.head_options, store.spec)
    head = build_head(cfg.head, cfg.head_options, store, device)
    if not head.trainable:
        raise ConfigError(
            f"head {cfg.head!r} has nothing to train; evaluate it with fsar-eval --head {cfg.head}"
        )
    optimizer = make_optimizer(head, cfg)

    manifest = store.manifest
    train_manifest = manifest[manifest["split"] == "train"]
    finetune = getattr(head, "strategy", None) == "finetune"
    way, shot, query = cfg.way, cfg.shot, cfg.query
    if finetune:  # batches spread over as many base classes as fit in batch_size
        n_classes = len(EpisodeSampler(train_manifest, 1, 1, 0, split="train").class_names)
        way, shot, query = min(n_classes, cfg.batch_size), max(1, cfg.batch_size // n_classes), 0
    train_sampler = EpisodeSampler(
        train_manifest, way, shot, query, cfg.seed, cfg.episodes, "train"
    )
    try:
        val_rows = EpisodeSampler(
            manifest[manifest["split"] == cfg.val_split],
            cfg.val_way or cfg.way,
            cfg.shot,
            cfg.val_query,
            cfg.seed,
            0,
            cfg.val_split,
        ).rows
    except EpisodeError as error:
        raise ConfigError(f"{error}: validate with fewer classes (--val-way N)") from None
    train_data = SplitData(store, train_sampler.rows, head.inputs(store.spec), cfg.max_ram)
    val_data = SplitData(store, val_rows, head.inputs(store.spec), cfg.max_ram, views=1)
    labels_all = torch.as_tensor(manifest["label"].to_numpy().copy())
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    start, best = 0, -1.0
    losses: list[float] = []
    step_losses: list[float] = []  # since the last training-loss record
    if resume:
        last = run_dir / "last.safetensors"
        if last.exists():  # absent: killed before its first optimiser step, nothing to restore
            meta = read_metadata(last)["meta"]
            load_model(last, head)
            load_training_state(last, optimizer)
            try:
                start, best = int(meta["episode"]), float(meta["best_accuracy"])
                losses = [float(x) for x in meta.get("pending_losses", [])]
                step_losses = [float(x) for x in meta.get("pending_step_losses", [])]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"checkpoint {last} holds no training position") from None
    else:
        if overwrite:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(
            json.dumps(run_metadata(cfg, store), indent=2, default=str)
        )
        (run_dir / "metrics.jsonl").write_text("")
    _point_latest(run_dir)
    base_meta = {"store_fingerprint": fingerprint, "store_spec": store.spec, "config": asdict(cfg)}
    steps, last_saved = 0, time.monotonic()

    head.train()
    bar = _progress(cfg, start)
    log_every = max(1, -(-cfg.episodes // cfg.episodes_per_step // LOSS_POINTS))  # optimiser steps
    tic = time.perf_counter()
    end = min(cfg.episodes, stop_at) if stop_at is not None else cfg.episodes
    for episode, inputs in train_data.episodes(
        train_sampler, range(start, end), cfg.seed, random_view=True
    ):
        step = episode.index
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        with amp:
            if (
                finetune
            ):  # batch cross-entropy over all base classes (episode rows serve as the batch)
                rows = np.concatenate([episode.support_rows, episode.query_rows])
                logits = head.classifier_logits(head.video_features(inputs))
                target = torch.searchsorted(head.classifier_ids, labels_all[rows].to(device))
                loss = F.cross_entropy(logits.float(), target)
            else:
                feats = head.video_features(inputs)
                n_support = len(episode.support_rows)
                support = {k: v[:n_support] for k, v in feats.items()}
                query = {k: v[n_support:] for k, v in feats.items()}
                head.process_support_set(
                    support,
                    torch.as_tensor(episode.support_labels, device=device),
                    torch.as_tensor(episode.class_ids, device=device),
                )
                head(query)
                loss = head.loss(torch.as_tensor(episode.query_labels, device=device))
        (loss.float() / cfg.episodes_per_iteration).backward()
        losses.append(float(loss.detach()))
        step_losses.append(losses[-1])
        done = step + 1
        if done % cfg.episodes_per_step == 0 or done == cfg.episodes:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if (done // cfg.episodes_per_step) % log_every == 0 or done == cfg.episodes:
                record = {"kind": "train", "episode": done, "loss": float(np.mean(step_losses)),
                          "lr": learning_rate(cfg, step)}  # fmt: skip
                step_losses = []
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            validating = done % cfg.val_every == 0 or done == cfg.episodes
            early = steps & (steps - 1) == 0  # steps 1, 2, 4, 8, ...: an early kill loses little
            if not validating and (early or time.monotonic() - last_saved > CHECKPOINT_EVERY_S):
                meta = {**base_meta, "episode": done, "best_accuracy": best}
                save_checkpoint(
                    run_dir / "last.safetensors",
                    head,
                    {**meta, "pending_losses": losses, "pending_step_losses": step_losses},
                    optimizer,
                )
                last_saved = time.monotonic()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{np.mean(losses[-50:]):.3f}",
                best=f"{best:.1f}",
                eps=f"{(done - start) / (time.perf_counter() - tic):.1f}",
            )
        if done % cfg.val_every == 0 or done == cfg.episodes:
            result = evaluate(
                head,
                store,
                cfg.val_split,
                cfg.val_way or cfg.way,
                cfg.shot,
                cfg.val_query,
                cfg.val_episodes,
                cfg.seed + 1,
                device,
                data=val_data,
            )
            record = {
                "episode": done, "loss": float(np.mean(losses)) if losses else math.nan, "lr": learning_rate(cfg, step),
                "val_accuracy": result.accuracy, "val_ci95": result.ci95,
                "episodes_per_s": (done - start) / (time.perf_counter() - tic), "time": time.time(),
            }  # fmt: skip
            losses = []
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            meta = {**base_meta, "episode": done, "val_accuracy": result.accuracy,
                    "pending_step_losses": step_losses}  # fmt: skip
            if result.accuracy > best:
                best = result.accuracy
                save_checkpoint(run_dir / "best.safetensors", head, {**meta, "best_accuracy": best})
            save_checkpoint(
                run_dir / "last.safetensors", head, {**meta, "best_accuracy": best}, optimizer
            )
            last_saved = time.monotonic()
            plot_curves(run_dir)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", val=f"{result.accuracy:.1f}", best=f"{best:.1f}"
                )
            head.train()
    if bar is not None:
        bar.close()
    return run_dir


def _check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a run directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"--out {run_dir} already holds a run: continue it with --resume, replace it with "
            "--overwrite, or choose another --out"
        )
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--out {run_dir}: cannot write in {existing} (permission denied)")


def _check_resumable(run_dir: Path, cfg: TrainConfig, fingerprint: str) -> None:
    """The run's config.json must name this store with the fingerprint it had when the run began."""
    path = run_dir / "config.json"
    try:
        started_on = json.loads(path.read_text())["store"]["fingerprint"]
    except FileNotFoundError:
        raise ConfigError(f"nothing to resume: {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a run's config: cannot resume it") from None
    if started_on != fingerprint:
        raise ConfigError(
            f"--resume: {cfg.store} has changed since {run_dir} began (fingerprint {fingerprint}, "
            f"the run's is {started_on}); resume on the same store or start a new run"
        )


def _point_latest(run_dir: Path) -> None:
    """runs/latest -> the newest run (relative link next to the run directory)."""
    latest = run_dir.parent / "latest"
    if latest.is_symlink() or not latest.exists():
        tmp = run_dir.parent / f".latest-{os.getpid()}"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)


def _progress(cfg: TrainConfig, start: int):
    return progress_bar(
        cfg.episodes,
        cfg.progress,
        initial=start,
        unit="episode",
        desc=f"train {cfg.head}",
        dynamic_ncols=True,
    )


def plot_curves(run_dir: Path) -> None:
    """curves.png: training loss, validation accuracy with its 95% CI, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line
    ]
    val = [r for r in records if "val_accuracy" in r]
    trained = [r for r in records if r.get("kind") == "train"] or val  # older runs: loss at val
    if not records:
        return
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(13, 3.6))
    marker = "o" if len(trained) <= 30 else None
    ax_loss.plot([r["episode"] for r in trained], [r["loss"] for r in trained], marker=marker, lw=1)
    ax_loss.set(xlabel="training episode", ylabel="training loss", title="training loss")
    x = np.array([r["episode"] for r in val], dtype=float)
    acc = np.array([r["val_accuracy"] for r in val], dtype=float)
    ci = np.array([r.get("val_ci95", math.nan) for r in val], dtype=float)
    ax_acc.plot(x, acc, marker="o", color="tab:green", label="val accuracy")
    ax_acc.fill_between(x, acc - ci, acc + ci, color="tab:green", alpha=0.2, lw=0, label="95% CI")
    if len(val):
        best = int(np.argmax(acc))
        ax_acc.plot(x[best], acc[best], "*", color="black", ms=10, label="best (best.safetensors)")
    ax_acc.set(xlabel="training episode", ylabel="val accuracy (%)", title="validation accuracy")
    ax_acc.legend(fontsize=8, loc="best")
    ax_lr.plot([r["episode"] for r in trained], [r["lr"] for r in trained], color="tab:purple")
    ax_lr.set(xlabel="training episode", ylabel="learning rate", title="learning rate")
    if trained and min(r["lr"] for r in trained) > 0:
        ax_lr.set(yscale="log", title="learning rate (log scale)")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=80)
    plt.close(fig)


def config_from_run(run_dir: Path) -> TrainConfig:
    """The resolved TrainConfig a run was started with (ConfigError naming the file if unusable)."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())["config"]
        names = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    except FileNotFoundError:
        raise ConfigError(f"nothing to resume: {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path} is not a run's config: cannot resume it") from None
    try:
        cfg.validate()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return cfg
