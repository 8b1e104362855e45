"""Training options: `TrainConfig`, the released schedules as presets, and the checks that refuse
bad values, from the command line, a --config file or a run's config.json, before a run starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.device import pick_device

from .presets import BENCHMARKS, preset_options


class ConfigError(ValueError):
    """A training option users can fix (one-line message)."""


# Options that count something: (option, smallest value). None-able ones are checked when set.
_COUNTS = (
    ("way", 1), ("shot", 1), ("query", 1), ("episodes", 1), ("episodes_per_step", 1),
    ("episodes_per_iteration", 1), ("batch_size", 1), ("val_every", 1), ("val_episodes", 1),
    ("val_query", 1), ("val_way", 1), ("warmup_episodes", 0),
)  # fmt: skip


# Presets (`--preset NAME`): the released recipes, per head (heads/presets.py owns every number).
PRESETS = BENCHMARKS
DECAY_GROUPS = ("matrices", "released", "all")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("step", "cosine")
PRECISIONS = ("bf16", "fp16", "fp32")  # autocast in training on CUDA; CPU always runs fp32


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
    decay_groups: str = "matrices"  # "released": by name, as EMP-Net's optimizer.py; "all"
    optimizer: str = "adam"  # adam (L2 decay, EMP-Net) or adamw (decoupled decay, TS-FSAR)
    adam_eps: float = 1e-8
    schedule: str = "step"  # step: warm-up then step decay; cosine: TS-FSAR's cosine_lr
    group_lr: dict[str, float] = field(default_factory=dict)  # lr per head parameter group
    precision: str = "bf16"  # autocast on CUDA: bf16, fp16 (with a gradient scaler) or fp32
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
        for name, low, strict in (("lr", 0.0, True), ("lr_start", 0.0, False), ("adam_eps", 0.0, True),
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
        for name, allowed in (("decay_groups", DECAY_GROUPS), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES), ("precision", PRECISIONS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: use {' or '.join(allowed)}"
                )
        if not isinstance(self.group_lr, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v) and v > 0 for k, v in self.group_lr.items()
        ):  # fmt: skip
            raise ConfigError(f"group_lr {self.group_lr!r}: use a JSON object of positive numbers")
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
            training, head = preset_options(cfg.head, cfg.preset, cfg.shot)
            for key, value in training.items():
                if explicit is None or key not in explicit:
                    setattr(cfg, key, value)
            if isinstance(cfg.head_options, dict):  # (anything else: validate() says so)
                for key, value in head.items():
                    cfg.head_options.setdefault(key, value)
        if cfg.warmup_episodes is None:
            cfg.warmup_episodes = cfg.episodes // 20
        if cfg.decay_episodes is None:
            cfg.decay_episodes = [cfg.episodes * 7 // 10, cfg.episodes * 9 // 10]
        cfg.validate()
        if cfg.val_every % cfg.episodes_per_step:
            raise ConfigError(
                f"--val-every ({cfg.val_every}) must be a multiple of --episodes-per-step ({cfg.episodes_per_step})"
            )
        return cfg


_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
    "dict[str, Any]": (dict,), "dict[str, float]": (dict,), "list[int]": (list,),
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


def config_from_run(run_dir: Path) -> TrainConfig:
    """The resolved TrainConfig a run was started with (ConfigError naming the file if unusable)."""
    from runtime import files

    path = run_dir / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"nothing to resume: {path} does not exist")
    try:
        saved = files.read_json(path, "run config")["config"]
        names = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    except files.FileRefused as error:
        raise ConfigError(str(error)) from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path} is not a run's config: cannot resume it") from None
    try:
        cfg.validate()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return cfg


def config_from_options(
    options: dict[str, Any],
    head_pairs: dict[str, Any] | None = None,
    head_flags: dict[str, Any] | None = None,
    config_file: str | None = None,
) -> TrainConfig:
    """A new run's resolved config: `options` given (not None) win over the `config_file`'s, which
    win over the defaults and the preset. Head options: the file's, then `head_pairs` (KEY=VALUE),
    then `head_flags` that were given (neither None nor False)."""
    values = config_values(config_file) if config_file else {}
    values.update({k: v for k, v in options.items() if v is not None})
    head = dict(values.get("head_options", {}))
    head.update(head_pairs or {})
    head.update({k: v for k, v in (head_flags or {}).items() if v is not None and v is not False})
    values["head_options"] = head
    if not values.get("store"):
        raise ConfigError("--store is required (e.g. --store stores/hmdb51)")
    unknown = set(values) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    return TrainConfig(**values).resolved(explicit=set(values))


def resume_config(run_dir: Path, episodes: int | None, progress: bool) -> TrainConfig:
    """The config of the run in `run_dir`, to continue it (`episodes` may lengthen it)."""
    cfg = config_from_run(run_dir.resolve())
    cfg.out = str(run_dir.resolve())
    if episodes is not None:
        cfg.episodes = episodes
    cfg.progress = progress
    return cfg
