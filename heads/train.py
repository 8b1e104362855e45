"""Episodic training of a head from a store, top to bottom in one file (nanoGPT style).

    cfg = TrainConfig(store="stores/hmdb51", head="emp", preset="hmdb51")
    run_dir = train(cfg)

Loop: sample episode -> `head.episode_loss` (per-video features, support set, query scores, loss)
-> backward; an Adam or AdamW step (per head parameter group, its lr from the schedule) every
`episodes_per_step` episodes (gradient accumulation; fp16 on CUDA through a gradient scaler); validation on
the **val** split every `val_every` episodes; `best.safetensors` (best val accuracy) and
`last.safetensors` (with optimizer and RNG state, for `--resume`; also written after the first
optimiser steps, so an early kill loses little) in the run directory, next to `config.json`,
`metrics.jsonl` and `curves.png`; `runs/latest` points to the newest run. Every option is checked,
and the store and episodes are loaded, before the run directory is touched; an existing run is never
overwritten unless asked. A new run is built under a temp name and takes its name at its first
checkpoint (a run that fails before then leaves nothing); its files go through runtime/files.py.
Options: heads/config.py; the released recipes (presets): heads/presets.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime import files
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
from .config import ConfigError, TrainConfig
from .curves import plot_curves
from .data import SplitData, require_inputs
from .episodes import EpisodeError, EpisodeSampler
from .evaluate import evaluate

LOSS_POINTS = 100  # training-loss records per run in metrics.jsonl (at most one per optimiser step)
RUN_FILES = ("config.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "curves.png")
CHECKPOINT_EVERY_S = 600.0  # between validations, last.safetensors at least this often
# models/utils/optimizer.py: names with these substrings get weight decay 0 (BN.WEIGHT_DECAY is 0.0)
RELEASED_NO_DECAY = ("embd", "cls_token", "bn", "norm")
# A head's weights at most (emp at ViT-L/14 shapes: 0.03 GB; lastlayer's block at ViT-bigG's:
# 0.13 GB): a store whose spec asks for more is refused before the head is allocated.
MAX_HEAD_BYTES = 2 << 30


def train(
    cfg: TrainConfig, resume: bool = False, stop_at: int | None = None, overwrite: bool = False
) -> Path:
    """Train; returns the run directory. `stop_at` ends early (as an interruption would).

    Nothing in the run directory changes until every option is valid, the store is open and both
    samplers and their data are ready. A new run refuses a directory that already holds a run
    unless `overwrite`; `resume` refuses a store whose fingerprint changed.
    """
    run = Run.start(cfg, resume, overwrite)
    try:
        _loop(run, stop_at)
    except BaseException:
        run.discard_unpublished()
        raise
    run.publish()
    return run.dir


def _loop(run: Run, stop_at: int | None) -> None:
    cfg = run.cfg
    end = cfg.episodes if stop_at is None else min(cfg.episodes, stop_at)
    episodes = run.train_data.episodes(
        run.sampler, range(run.resumed_at, end), cfg.seed, random_view=True
    )
    for episode, inputs in episodes:
        lr = learning_rate(cfg, episode.index)
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, episode.index, group["base_lr"])
        inputs = {k: v.to(run.device, non_blocking=True) for k, v in inputs.items()}
        with run.autocast:
            loss = run.head.episode_loss(episode, inputs)
        run.scaler.scale(loss.float() / cfg.episodes_per_iteration).backward()
        run.losses.append(float(loss.detach()))
        run.step_losses.append(run.losses[-1])
        done = episode.index + 1
        if done % cfg.episodes_per_step == 0 or done == cfg.episodes:
            run.optimiser_step(done, lr)
        run.show_progress(done)
        if done % cfg.val_every == 0 or done == cfg.episodes:
            run.validate_and_checkpoint(done, lr)
    if run.bar is not None:
        run.bar.close()


@dataclass
class Run:
    """A run's head, optimiser, data and position: what the loop uses and a checkpoint keeps."""

    cfg: TrainConfig
    dir: Path
    store: Any
    device: torch.device
    head: FewShotHead
    optimizer: torch.optim.Optimizer
    sampler: EpisodeSampler
    train_data: SplitData
    val_data: SplitData
    autocast: Any  # bf16 or fp16 autocast on CUDA (cfg.precision), a no-op on CPU
    scaler: torch.amp.GradScaler  # fp16 on CUDA: scales the loss; otherwise a pass-through
    base_meta: dict[str, Any]
    resumed_at: int = 0  # episodes trained before this process (resume)
    best: float = -1.0  # best validation accuracy so far
    losses: list[float] = field(default_factory=list)  # since the last validation
    step_losses: list[float] = field(default_factory=list)  # since the last training-loss record
    steps: int = 0  # optimiser steps in this process
    last_saved: float = 0.0
    bar: Any = None
    tic: float = 0.0
    log_every: int = 1  # optimiser steps between training-loss records
    unpublished: Path | None = None  # a new run's folder (--out), while `dir` is its temp name

    # ---------------------------------------------------------------- set up or resume
    @classmethod
    def start(cls, cfg: TrainConfig, resume: bool, overwrite: bool) -> Run:
        """Check options, open the store, build head, optimiser and data; then start or restore."""
        run = _prepare(cfg, resume, overwrite)
        if resume:
            run.restore()
            _point_latest(run.dir)
        else:
            run.create_dir(overwrite)
        run.last_saved = time.monotonic()
        run.head.train()
        run.bar = _progress(cfg, run.resumed_at)
        run.log_every = max(1, -(-cfg.episodes // cfg.episodes_per_step // LOSS_POINTS))
        run.tic = time.perf_counter()
        return run

    def restore(self) -> None:
        """Weights, optimiser state, position and pending losses from last.safetensors."""
        if (self.dir / "metrics.jsonl").exists():
            files.drop_cut_line(self.dir / "metrics.jsonl", "metrics log")  # a kill mid-record
        last = self.dir / "last.safetensors"
        if not last.exists():  # killed before its first optimiser step, nothing to restore
            return
        meta = read_metadata(last)["meta"]
        load_model(last, self.head)
        load_training_state(last, self.optimizer)
        try:
            self.resumed_at, self.best = int(meta["episode"]), float(meta["best_accuracy"])
            self.losses = [float(x) for x in meta.get("pending_losses", [])]
            self.step_losses = [float(x) for x in meta.get("pending_step_losses", [])]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"checkpoint {last} holds no training position") from None

    def create_dir(self, overwrite: bool) -> None:
        """A new run: config.json and an empty metrics.jsonl in a temp folder beside --out, which
        takes its name at the first checkpoint (`publish`); `overwrite`: the old run's files go
        then, and only then."""
        self.unpublished, self.dir = self.dir, files.new_folder(self.dir, keep_files=overwrite)
        metadata = json.dumps(run_metadata(self.cfg, self.store), indent=2, default=str)
        files.write_file(self.dir / "config.json", metadata)
        files.write_file(self.dir / "metrics.jsonl", b"")

    def publish(self) -> None:
        """A new run takes its name (--out) and runs/latest points to it; once, at its first
        checkpoint or its end."""
        if self.unpublished is not None:
            for name in RUN_FILES:  # (an --overwrite: the old run's files)
                (self.unpublished / name).unlink(missing_ok=True)
            files.publish_folder(self.dir, self.unpublished)
            self.dir, self.unpublished = self.unpublished, None
            _point_latest(self.dir)

    def discard_unpublished(self) -> None:
        """A new run that failed before its first checkpoint leaves nothing behind."""
        if self.unpublished is not None:
            files.remove_folder(self.dir)

    # ---------------------------------------------------------------- optimiser step and log
    def optimiser_step(self, done: int, lr: float) -> None:
        """Optimiser step, then the training-loss record and an early checkpoint when they are due."""
        cfg = self.cfg
        self.scaler.step(self.optimizer)  # (fp16: skipped when a gradient is not finite)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if (done // cfg.episodes_per_step) % self.log_every == 0 or done == cfg.episodes:
            loss = float(np.mean(self.step_losses))
            self.log({"kind": "train", "episode": done, "loss": loss, "lr": lr})
            self.step_losses = []
        validating = done % cfg.val_every == 0 or done == cfg.episodes
        early = self.steps & (self.steps - 1) == 0  # steps 1, 2, 4, 8: an early kill loses little
        if not validating and (early or time.monotonic() - self.last_saved > CHECKPOINT_EVERY_S):
            meta = {**self.base_meta, "episode": done, "best_accuracy": self.best}
            pending = {"pending_losses": self.losses, "pending_step_losses": self.step_losses}
            save_checkpoint(
                self.dir / "last.safetensors", self.head, {**meta, **pending}, self.optimizer
            )
            self.last_saved = time.monotonic()
            self.publish()

    def log(self, record: dict[str, Any]) -> None:
        files.append_line(self.dir / "metrics.jsonl", json.dumps(record))

    def show_progress(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{np.mean(self.losses[-50:]):.3f}",
                best=f"{self.best:.1f}",
                eps=f"{(done - self.resumed_at) / (time.perf_counter() - self.tic):.1f}",
            )

    # ---------------------------------------------------------------- validate and checkpoint
    def validate_and_checkpoint(self, done: int, lr: float) -> None:
        """Score the val episodes; save best.safetensors if better, last.safetensors always."""
        cfg = self.cfg
        result = evaluate(
            self.head, self.store, cfg.val_split, cfg.val_way or cfg.way, cfg.shot, cfg.val_query,
            cfg.val_episodes, cfg.seed + 1, self.device, data=self.val_data,
        )  # fmt: skip
        record = {
            "episode": done, "loss": float(np.mean(self.losses)) if self.losses else math.nan, "lr": lr,
            "val_accuracy": result.accuracy, "val_ci95": result.ci95,
            "episodes_per_s": (done - self.resumed_at) / (time.perf_counter() - self.tic), "time": time.time(),
        }  # fmt: skip
        self.losses = []
        self.log(record)
        meta = {**self.base_meta, "episode": done, "val_accuracy": result.accuracy,
                "pending_step_losses": self.step_losses}  # fmt: skip
        if result.accuracy > self.best:
            self.best = result.accuracy
            save_checkpoint(
                self.dir / "best.safetensors", self.head, {**meta, "best_accuracy": self.best}
            )
        save_checkpoint(
            self.dir / "last.safetensors",
            self.head,
            {**meta, "best_accuracy": self.best},
            self.optimizer,
        )
        self.last_saved = time.monotonic()
        plot_curves(self.dir)
        self.publish()
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.3f}", val=f"{result.accuracy:.1f}", best=f"{self.best:.1f}"
            )
        self.head.train()


def _prepare(cfg: TrainConfig, resume: bool, overwrite: bool) -> Run:
    """Everything a run needs, checked and loaded, with the run directory still untouched."""
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
    cfg.head_options = head_options(cfg.head, cfg.head_options, store.spec, store.manifest)
    head = build_head(cfg.head, cfg.head_options, store, device)
    if not head.trainable:
        raise ConfigError(
            f"head {cfg.head!r} has nothing to train; evaluate it with fsar-eval --head {cfg.head}"
        )
    optimizer = make_optimizer(head, cfg)
    manifest = store.manifest
    sampler = head.train_sampler(manifest[manifest["split"] == "train"], cfg)
    try:
        val_rows = EpisodeSampler(
            manifest[manifest["split"] == cfg.val_split], cfg.val_way or cfg.way, cfg.shot,
            cfg.val_query, cfg.seed, 0, cfg.val_split,
        ).rows  # fmt: skip
    except EpisodeError as error:
        raise ConfigError(f"{error}: validate with fewer classes (--val-way N)") from None
    roles = head.inputs(store.spec)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = (
        torch.autocast("cuda", dtype=half)
        if device.type == "cuda" and half is not None
        else torch.autocast(device.type, enabled=False)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.precision == "fp16")
    return Run(
        cfg=cfg, dir=run_dir, store=store, device=device, head=head, optimizer=optimizer,
        sampler=sampler, train_data=SplitData(store, sampler.rows, roles, cfg.max_ram),
        val_data=SplitData(store, val_rows, roles, cfg.max_ram, views=1), autocast=autocast,
        scaler=scaler,
        base_meta={"store_fingerprint": fingerprint, "store_spec": store.spec, "config": asdict(cfg),
                   "head_source": registry.source(cfg.head).to_json()},
    )  # fmt: skip


def learning_rate(cfg: TrainConfig, episode: int, base: float | None = None) -> float:
    """The lr of `episode` for a group whose full lr is `base` (default cfg.lr). `step`: linear
    warm-up from lr_start, then step decay; `cosine`: TS-FSAR's cosine_lr. Counted in iterations."""
    base = cfg.lr if base is None else base
    it = episode // cfg.episodes_per_iteration
    warmup = (cfg.warmup_episodes or 0) // cfg.episodes_per_iteration
    if cfg.schedule == "cosine":
        return cosine_lr(base, it, warmup, cfg.episodes // cfg.episodes_per_iteration)
    if it < warmup:  # the released arithmetic: epoch * (lr - lr_start) + lr_start
        lr = it / warmup * (cfg.lr - cfg.lr_start) + cfg.lr_start
    else:
        drops = sum(it >= d // cfg.episodes_per_iteration for d in cfg.decay_episodes or [])
        lr = cfg.lr * cfg.decay_factor**drops
    return lr if base == cfg.lr else lr * base / cfg.lr


def cosine_lr(base: float, iteration: int, warmup: int, iterations: int) -> float:
    """TS-FSAR's schedule as its loop applies it (main.py:89, utils/functions.py:14-26): the lr is set
    after each iteration, so iteration 0 trains at `base` and iteration i at cosine_lr's value for
    step i - 1: `base * (step + 1) / warmup` during warm-up, then `base * (1 + cos(pi * e / es)) / 2`,
    e = step - warmup, es = iterations - warmup. The last iteration trains at step iterations - 2."""
    if iteration == 0:
        return base
    step = iteration - 1
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (iterations - warmup))) * base


def decays(name: str, parameter: torch.Tensor, groups: str) -> bool:
    """Whether `parameter` gets weight decay: `released` by name, `matrices` by shape, `all`."""
    if groups == "all":
        return True
    if groups == "released":
        return not any(part in name for part in RELEASED_NO_DECAY)
    return parameter.dim() >= 2


def make_optimizer(head: FewShotHead, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (L2 weight decay, EMP-Net) or AdamW (TS-FSAR): one group per head parameter group
    (`head.parameter_groups()`, lr from `cfg.group_lr`, else cfg.lr), split by `cfg.decay_groups`."""
    grouping = getattr(head, "parameter_groups", None)
    named_groups = (grouping and grouping()) or {"all": list(head.named_parameters())}
    unknown = sorted(set(cfg.group_lr) - set(named_groups))
    if unknown:
        raise ConfigError(
            f"group_lr names {', '.join(unknown)}; head {cfg.head!r} has groups "
            f"{', '.join(named_groups)}"
        )
    groups = []
    for group, named in named_groups.items():
        lr = float(cfg.group_lr.get(group, cfg.lr))
        named = [(n, p) for n, p in named if p.requires_grad]
        for decayed in (True, False):
            params = [p for n, p in named if decays(n, p, cfg.decay_groups) == decayed]
            if params or group == "all":  # (one group: decayed and exempt, as before)
                wd = cfg.weight_decay if decayed else 0.0
                groups.append({"params": params, "weight_decay": wd, "lr": lr, "base_lr": lr})
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=cfg.lr, eps=cfg.adam_eps, fused=True)  # one kernel for all parameters


def head_options(
    name: str, options: dict[str, Any], spec: dict[str, Any], manifest: Any = None
) -> dict[str, Any]:
    """Options with the store's shapes filled in: a head's own `store_options(spec, manifest)`, else
    the store's dim for heads that take one. Options given win."""
    import inspect

    factory = registry.factory(name)
    from_store = getattr(factory, "store_options", None)
    if from_store is not None:
        return {**from_store(spec, manifest), **options}
    if "dim" in inspect.signature(factory).parameters:
        return {"dim": int(spec["dim"]), **options}
    return dict(options)


def build_head(name: str, options: dict[str, Any], store: Any, device: torch.device) -> FewShotHead:
    """Head `name` at the store's shapes, refused (one line) when the store lacks what it reads or
    its weights at those shapes would exceed MAX_HEAD_BYTES (checked on the meta device first)."""
    options = head_options(name, options, store.spec, store.manifest)
    registry.factory(name)  # (a plugin's module is imported outside the meta device)
    with torch.device("meta"):
        probe = registry.create(name, **options)
    size = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    if size > MAX_HEAD_BYTES:
        raise ConfigError(
            f"head {name!r} at the store's shapes (dim {store.spec.get('dim')}) would hold "
            f"{size / 1e9:.1f} GB of weights, more than {MAX_HEAD_BYTES / 1e9:.1f} GB: the store's "
            "spec is not one a CLIP model gives (check its dims)"
        )
    head = registry.create(name, **options)
    require_inputs(head, store)
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
        "head_source": registry.source(cfg.head).to_json(),
        "command_line": sys.argv,
    }


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
    """The run's config.json must name this store with the fingerprint it had when the run began;
    its files are regular files (a link to a file outside the run is refused, never written)."""
    path = run_dir / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"nothing to resume: {path} does not exist")
    try:
        started_on = files.read_json(path, "run config")["store"]["fingerprint"]
    except (KeyError, TypeError):
        raise ConfigError(f"{path} is not a run's config: cannot resume it") from None
    for name in RUN_FILES[1:]:
        if (run_dir / name).is_symlink() or (run_dir / name).exists():
            files.regular_file(run_dir / name, None, "run file")
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
