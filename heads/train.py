"""Episodic training of a head from a store, top to bottom in one file (nanoGPT style).

    cfg = TrainConfig(store="stores/hmdb51", head="emp", preset="hmdb51")
    run_dir = train(cfg)

Loop: sample episode -> per-video features -> support set -> query scores -> loss -> backward;
an Adam step every `episodes_per_step` episodes (gradient accumulation); validation on the **val**
split every `val_every` episodes; `best.safetensors` (best val accuracy) and `last.safetensors`
(with optimizer and RNG state, for `--resume`) in the run directory, next to `config.json`,
`metrics.jsonl` and `curves.png`; `runs/latest` points to the newest run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import registry
from .base import FewShotHead
from .checkpoint import load_model, load_training_state, read_metadata, save_checkpoint
from .data import SplitData
from .episodes import EpisodeSampler
from .evaluate import evaluate

LOSS_POINTS = 100  # training-loss records per run in metrics.jsonl (at most one per optimiser step)


class ConfigError(ValueError):
    """A training option users can fix (one-line message)."""


# The released schedules as they actually run (EMP-Net / CLIP-FSAR configs). One iteration = 2
# episodes (2 GPUs, gradients averaged), an optimiser step every 4 iterations; the released code
# counts epochs twice as fast as its config says, so in iterations: linear warm-up from 1e-6 over
# STEPS_ITER/2, full lr until 2*STEPS_ITER, x0.1 until 3*STEPS_ITER, x0.01 after.
def _released(lr: float, iterations: int, steps_iter: int, val_every_iter: int) -> dict[str, Any]:
    return dict(
        lr=lr, episodes=2 * iterations, episodes_per_iteration=2, episodes_per_step=8,
        warmup_episodes=steps_iter, decay_episodes=[4 * steps_iter, 6 * steps_iter],
        weight_decay=1e-3, query=5, val_query=1, val_every=2 * val_every_iter,
    )  # fmt: skip


PRESETS: dict[str, dict[str, Any]] = {
    "hmdb51": _released(1e-4, 5_000, 1_000, 500),
    "ucf101": _released(1e-4, 5_000, 1_000, 500),
    "kinetics100": _released(1e-4, 5_000, 1_000, 500),
    "ssv2_small": _released(1e-3, 10_000, 2_000, 1_000),
    "ssv2_full": _released(1e-3, 40_000, 8_000, 1_000),
}


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
    episodes_per_step: int = 4
    episodes_per_iteration: int = 1  # the per-episode loss is divided by this (released: 2 GPUs)
    lr: float = 1e-4
    lr_start: float = 1e-6
    warmup_episodes: int | None = None  # default: 10% of episodes
    decay_episodes: list[int] | None = None  # default: 40% and 60% of episodes (released shape)
    decay_factor: float = 0.1
    weight_decay: float = 1e-3
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

    def resolved(self, explicit: set[str] | None = None) -> TrainConfig:
        """Apply the preset (explicit options win) and fill schedule defaults."""
        cfg = TrainConfig(**asdict(self))
        if cfg.preset is not None:
            if cfg.preset not in PRESETS:
                raise ConfigError(f"unknown preset {cfg.preset!r}; presets: {', '.join(PRESETS)}")
            for key, value in PRESETS[cfg.preset].items():
                if explicit is None or key not in explicit:
                    setattr(cfg, key, value)
        if cfg.warmup_episodes is None:
            cfg.warmup_episodes = cfg.episodes // 10
        if cfg.decay_episodes is None:
            cfg.decay_episodes = [cfg.episodes * 4 // 10, cfg.episodes * 6 // 10]
        if cfg.val_every % cfg.episodes_per_step:
            raise ConfigError(
                f"--val-every ({cfg.val_every}) must be a multiple of --episodes-per-step ({cfg.episodes_per_step})"
            )
        return cfg


def learning_rate(cfg: TrainConfig, episode: int) -> float:
    """Linear warm-up from lr_start, then step decay (the schedule is counted in iterations)."""
    it = episode // cfg.episodes_per_iteration
    warmup = (cfg.warmup_episodes or 0) // cfg.episodes_per_iteration
    if it < warmup:
        return cfg.lr_start + (cfg.lr - cfg.lr_start) * it / warmup
    drops = sum(it >= d // cfg.episodes_per_iteration for d in cfg.decay_episodes or [])
    return cfg.lr * cfg.decay_factor**drops


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(head: FewShotHead, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam; weight decay on matrices only (no decay on norms, biases and scalars)."""
    decay = [p for p in head.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in head.parameters() if p.requires_grad and p.dim() < 2]
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
    from importlib.metadata import PackageNotFoundError, version

    try:
        fsar_version = version("fsar")
    except PackageNotFoundError:
        fsar_version = "unknown"
    return {
        "config": asdict(cfg),
        "store": {"path": str(cfg.store), "fingerprint": store.fingerprint(), "spec": store.spec},
        "git_commit": commit,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "fsar": fsar_version,
        },
        "command_line": sys.argv,
    }


def train(cfg: TrainConfig, resume: bool = False, stop_at: int | None = None) -> Path:
    """Train; returns the run directory. `stop_at` ends early (as an interruption would)."""
    from store import open_store

    store = open_store(cfg.store)
    device = pick_device(cfg.device)
    run_dir = (
        Path(cfg.out)
        if cfg.out
        else Path("runs") / f"{cfg.head}-{Path(cfg.store).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    torch.manual_seed(cfg.seed)
    cfg.head_options = head_options(cfg.head, cfg.head_options, store.spec)
    head = build_head(cfg.head, cfg.head_options, store, device)
    if not head.trainable:
        raise ConfigError(
            f"head {cfg.head!r} has nothing to train; evaluate it with fsar-eval --head {cfg.head}"
        )
    optimizer = make_optimizer(head, cfg)
    start, best = 0, -1.0
    if resume:
        last = run_dir / "last.safetensors"
        if not last.exists():
            raise ConfigError(f"nothing to resume: {last} does not exist")
        meta = read_metadata(last)["meta"]
        load_model(last, head)
        load_training_state(last, optimizer)
        start, best = int(meta["episode"]), float(meta["best_accuracy"])
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(
            json.dumps(run_metadata(cfg, store), indent=2, default=str)
        )
        (run_dir / "metrics.jsonl").write_text("")
    _point_latest(run_dir)

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
    train_data = SplitData(store, train_sampler.rows, head.inputs(store.spec), cfg.max_ram)
    val_rows = EpisodeSampler(
        manifest[manifest["split"] == cfg.val_split],
        cfg.val_way or cfg.way,
        cfg.shot,
        cfg.val_query,
        cfg.seed,
        0,
        cfg.val_split,
    ).rows
    val_data = SplitData(store, val_rows, head.inputs(store.spec), cfg.max_ram, views=1)
    labels_all = torch.as_tensor(manifest["label"].to_numpy().copy())
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    head.train()
    bar = _progress(cfg, start)
    losses: list[float] = []
    step_losses: list[float] = []  # since the last training-loss record
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
        if (step + 1) % cfg.episodes_per_step == 0 or step + 1 == cfg.episodes:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ((step + 1) // cfg.episodes_per_step) % log_every == 0 or step + 1 == cfg.episodes:
                record = {"kind": "train", "episode": step + 1, "loss": float(np.mean(step_losses)),
                          "lr": learning_rate(cfg, step)}  # fmt: skip
                step_losses = []
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        done = step + 1
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
            meta = {
                "episode": done,
                "val_accuracy": result.accuracy,
                "store_fingerprint": store.fingerprint(),
                "store_spec": store.spec,
                "config": asdict(cfg),
            }
            if result.accuracy > best:
                best = result.accuracy
                save_checkpoint(run_dir / "best.safetensors", head, {**meta, "best_accuracy": best})
            save_checkpoint(
                run_dir / "last.safetensors", head, {**meta, "best_accuracy": best}, optimizer
            )
            plot_curves(run_dir)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", val=f"{result.accuracy:.1f}", best=f"{best:.1f}"
                )
            head.train()
    if bar is not None:
        bar.close()
    return run_dir


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
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=cfg.episodes,
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
    """The resolved TrainConfig a run was started with."""
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in names})
