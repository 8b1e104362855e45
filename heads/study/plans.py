"""Study plans as data: JSON files of rows (a head and its options), parsed, checked and expanded.

A plan's rows expand into cells, one per row x shot x training seed (training-free rows: one per
shot); each cell carries its resolved training config and a hash of everything its result depends on.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

PLAN_DIR = Path(__file__).resolve().parent / "plans"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_PLAN_KEYS = {"name", "title", "description", "reference", "marks", "shots", "seeds", "train", "eval", "rows", "notes", "reported"}  # fmt: skip
_ROW_KEYS = {"id", "label", "head", "options", "train", "marks", "optional"}
# Set by the study for every cell, or execution details that do not change a result.
_TRAIN_PER_CELL = {"store", "head", "head_options", "shot", "seed", "out", "progress", "device", "max_ram"}  # fmt: skip
MAX_PLAN_BYTES = 1 << 20


class PlanError(ValueError):
    """A plan or a cell that cannot run (one-line message naming the plan, row or cell)."""


@dataclass(frozen=True)
class EvalSettings:
    """The test episodes every cell is scored on: same split, counts and seed for all."""

    way: int = 5
    query: int = 1
    episodes: int = 10_000
    split: str = "test"
    seed: int = 0


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    head: str
    options: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    marks: tuple[str, ...] = ()
    optional: bool = False  # dropped, with a note, when the store lacks what the head reads


@dataclass(frozen=True)
class Plan:
    name: str
    title: str
    rows: tuple[Row, ...]
    reference: str
    shots: tuple[int, ...] = (1,)
    seeds: tuple[int, ...] = (0,)
    train: dict[str, Any] = field(default_factory=dict)
    eval: EvalSettings = EvalSettings()
    marks: tuple[str, ...] = ()
    description: str = ""
    notes: tuple[str, ...] = ()
    source: str = ""
    reported: Reported | None = None

    def row(self, row_id: str) -> Row:
        return next(r for r in self.rows if r.id == row_id)


@dataclass(frozen=True)
class Reported:
    """Published accuracies per row and shot, for stores of `dataset` encoded by `model` `pretrained`."""

    source: str
    model: str
    pretrained: str
    accuracy: dict[str, dict[str, dict[int, float]]]  # dataset -> row id -> shot -> accuracy (%)

    def of(self, store: dict[str, Any], row_id: str, shot: int) -> float | None:
        """The reported accuracy of a row when the store is that benchmark with those weights."""
        if (store.get("model"), store.get("pretrained")) != (self.model, self.pretrained):
            return None
        return self.accuracy.get(str(store.get("dataset")), {}).get(row_id, {}).get(shot)


def _reported(raw: Any, where: str, ids: list[str]) -> Reported:
    raw = _dict(raw, f"{where}: 'reported'")
    for key in ("source", "model", "pretrained"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise PlanError(f"{where}: 'reported' needs a '{key}' string")
    accuracy: dict[str, dict[str, dict[int, float]]] = {}
    for dataset, rows in _dict(raw.get("accuracy"), f"{where}: reported 'accuracy'").items():
        for row_id, shots in _dict(rows, f"{where}: reported {dataset}").items():
            if row_id not in ids:
                raise PlanError(
                    f"{where}: reported {dataset} names row {row_id!r}, not in the plan"
                )
            for shot, value in _dict(shots, f"{where}: reported {dataset} {row_id}").items():
                if (
                    not str(shot).isdigit()
                    or not isinstance(value, int | float)
                    or not 0 <= value <= 100
                ):
                    raise PlanError(
                        f'{where}: reported {dataset} {row_id}: use {{"SHOT": accuracy in %}}'
                    )
                accuracy.setdefault(dataset, {}).setdefault(row_id, {})[int(shot)] = float(value)
    return Reported(raw["source"], raw["model"], raw["pretrained"], accuracy)


@dataclass(frozen=True)
class Cell:
    """One training (or none) and one evaluation: a row at one shot and one training seed."""

    id: str
    row: str
    head: str
    head_options: dict[str, Any]
    train: (
        dict[str, Any] | None
    )  # resolved TrainConfig fields but the per-cell ones; None: training-free
    shot: int
    seed: int | None
    eval: EvalSettings
    store_fingerprint: str
    config_hash: str = ""
    head_package: str = ""  # "distribution version" of a plugin head; "" for a built-in

    def identity(self) -> dict[str, Any]:
        """Everything the cell's result depends on (hashed into config_hash); a plugin head's
        package version too, so upgrading the plugin reruns its cells."""
        package = {"head_package": self.head_package} if self.head_package else {}
        return {
            **package,
            "head": self.head,
            "head_options": self.head_options,
            "train": self.train,
            "shot": self.shot,
            "seed": self.seed,
            "eval": asdict(self.eval),
            "store_fingerprint": self.store_fingerprint,
        }


def config_hash(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def builtin_plans() -> list[str]:
    return sorted(p.stem for p in PLAN_DIR.glob("*.json"))


def load_plan(name_or_path: str) -> Plan:
    """A built-in plan by name, or a plan file (JSON)."""
    path = PLAN_DIR / f"{name_or_path}.json"
    if name_or_path not in builtin_plans():
        path = Path(name_or_path)
        if path.suffix != ".json" or not path.is_file():
            raise PlanError(
                f"--plan {name_or_path}: not a built-in plan ({', '.join(builtin_plans())}) "
                "nor a .json plan file"
            )
    if path.stat().st_size > MAX_PLAN_BYTES:
        raise PlanError(f"plan {path}: larger than {MAX_PLAN_BYTES} bytes")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlanError(f"plan {path}: not valid JSON ({error})") from None
    return parse_plan(data, default_name=path.stem, source=str(path))


def _ints(value: Any, what: str, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise PlanError(f"{what} must be a non-empty list of integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        raise PlanError(f"{what} must hold integers >= {minimum} (got {value})")
    if len(set(value)) != len(value):
        raise PlanError(f"{what} has duplicates ({value})")
    return tuple(value)


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanError(f"{what} must be a JSON object")
    return dict(value)


def _check_train_keys(train: dict[str, Any], where: str) -> None:
    from heads.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(train) - known)
    if unknown:
        raise PlanError(f"{where}: unknown training option(s) {', '.join(unknown)}")
    fixed = sorted(set(train) & _TRAIN_PER_CELL)
    if fixed:
        raise PlanError(
            f"{where}: {', '.join(fixed)} cannot be set here (the study sets them per cell)"
        )


def parse_plan(data: Any, default_name: str = "plan", source: str = "") -> Plan:
    """Check a plan's structure (no store needed) and return it typed."""
    data = _dict(data, f"plan {default_name}")
    name = str(data.get("name", default_name))
    where = f"plan {name}"
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if not _ID.match(name):
        raise PlanError(f"{where}: name must be letters, digits, '_.+-' (64 at most)")
    marks = tuple(str(m) for m in data.get("marks", []))
    raw_rows = data.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise PlanError(f"{where}: 'rows' must be a non-empty list")
    rows = []
    for i, raw in enumerate(raw_rows):
        raw = _dict(raw, f"{where}, row {i + 1}")
        row_id = raw.get("id")
        here = f"{where}, row {row_id or i + 1}"
        bad = sorted(set(raw) - _ROW_KEYS)
        if bad:
            raise PlanError(f"{here}: unknown key(s) {', '.join(bad)}")
        if not isinstance(row_id, str) or not _ID.match(row_id):
            raise PlanError(f"{here}: 'id' must be letters, digits, '_.+-' (64 at most)")
        if not isinstance(raw.get("head"), str):
            raise PlanError(f"{here}: 'head' must name a head")
        row_marks = tuple(str(m) for m in raw.get("marks", []))
        if set(row_marks) - set(marks):
            raise PlanError(
                f"{here}: marks {sorted(set(row_marks) - set(marks))} are not in the plan's marks"
            )
        train = _dict(raw.get("train", {}), f"{here}: 'train'")
        _check_train_keys(train, here)
        rows.append(
            Row(
                id=row_id,
                label=str(raw.get("label", row_id)),
                head=raw["head"],
                options=_dict(raw.get("options", {}), f"{here}: 'options'"),
                train=train,
                marks=row_marks,
                optional=bool(raw.get("optional", False)),
            )
        )
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise PlanError(f"{where}: row ids must be unique")
    reference = data.get("reference", ids[0])
    if reference not in ids:
        raise PlanError(f"{where}: reference {reference!r} is not a row id")
    train = _dict(data.get("train", {}), f"{where}: 'train'")
    _check_train_keys(train, where)
    eval_raw = _dict(data.get("eval", {}), f"{where}: 'eval'")
    bad = sorted(set(eval_raw) - {f.name for f in fields(EvalSettings)})
    if bad:
        raise PlanError(f"{where}: unknown eval key(s) {', '.join(bad)}")
    settings = EvalSettings(**eval_raw)
    for key, minimum in (("way", 2), ("query", 1), ("episodes", 1), ("seed", 0)):
        _ints([getattr(settings, key)], f"{where}: eval {key}", minimum)
    if not isinstance(settings.split, str):
        raise PlanError(f"{where}: eval split must name a split (train, val or test)")
    return Plan(
        name=name,
        title=str(data.get("title", name)),
        description=str(data.get("description", "")),
        rows=tuple(rows),
        reference=reference,
        shots=_ints(data.get("shots", [1]), f"{where}: 'shots'", 1),
        seeds=_ints(data.get("seeds", [0]), f"{where}: 'seeds'", 0),
        train=train,
        eval=settings,
        marks=marks,
        notes=tuple(str(n) for n in data.get("notes", [])),
        source=source,
        reported=_reported(data["reported"], where, ids) if "reported" in data else None,
    )


@dataclass
class Expansion:
    """A plan checked against a store: its cells in plan order, rows left out, and notes."""

    plan: Plan
    cells: list[Cell]
    rows: list[Row]  # the rows that have cells
    notes: list[str]


def expand(
    plan: Plan,
    store: Any,
    store_path: str,
    seeds: list[int] | None = None,
    episodes: int | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> Expansion:
    """Every cell of `plan` on `store`, checked before anything runs (PlanError names the cell)."""
    from dataclasses import replace

    from heads.episodes import EpisodeError

    overrides = dict(train_overrides or {})
    _check_train_keys(overrides, "--train")
    if seeds is not None:
        plan = replace(plan, seeds=_ints(list(seeds), "--seeds", 0))
    settings = plan.eval if episodes is None else replace(plan.eval, episodes=episodes)
    if settings.episodes < 1:
        raise PlanError(f"--episodes {settings.episodes}: use at least 1")
    notes: list[str] = []
    cells: list[Cell] = []
    rows: list[Row] = []
    for row in plan.rows:
        head = _build(row, store, plan)
        message = _missing_inputs(head, store)
        if message:
            if row.optional:
                notes.append(f"row {row.id} left out: {message}")
                continue
            raise PlanError(f"plan {plan.name}, row {row.id}: {message}")
        rows.append(row)
        trained = bool(head.trainable)
        for shot in plan.shots:
            for seed in plan.seeds if trained else (None,):
                cell_id = f"{row.id}.{shot}shot" + (f".seed{seed}" if seed is not None else "")
                where = f"plan {plan.name}, cell {cell_id}"
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        _check_episodes(store, settings.split, settings.way, shot, settings.query)
                        train = (
                            _train_config(
                                plan, row, head, store, store_path, shot, seed, overrides, notes
                            )
                            if trained
                            else None
                        )
                except (EpisodeError, PlanError) as error:
                    raise PlanError(f"{where}: {error}") from None
                for w in caught:
                    if str(w.message) not in notes:
                        notes.append(str(w.message))
                options = head.config() if train is None else _trained_config(row, train)
                cell = Cell(
                    id=cell_id, row=row.id, head=row.head, head_options=options, train=train,
                    shot=shot, seed=seed, eval=settings, store_fingerprint=store.fingerprint(),
                    head_package=_package(row.head),
                )  # fmt: skip
                cells.append(replace(cell, config_hash=config_hash(cell.identity())))
    if plan.reference not in {r.id for r in rows}:
        notes.append(f"reference row {plan.reference} has no cells: no paired differences")
    return Expansion(plan=replace(plan, eval=settings), cells=cells, rows=rows, notes=notes)


def _build(row: Row, store: Any, plan: Plan) -> Any:
    from heads import registry
    from heads.train import head_options

    try:
        return registry.create(
            row.head, **head_options(row.head, row.options, store.spec, store.manifest)
        )
    except ValueError as error:
        raise PlanError(f"plan {plan.name}, row {row.id}: {str(error).splitlines()[0]}") from None


def _package(name: str) -> str:
    from heads import registry

    source = registry.source(name)
    plugin = source.distribution and not source.builtin
    return f"{source.distribution} {source.version}" if plugin else ""


def _trained_config(row: Row, train: dict[str, Any]) -> dict[str, Any]:
    """The full config of the head a trained cell trains (its row's options over its preset's)."""
    from heads import registry

    return registry.create(row.head, **train["head_options"]).config()


def _missing_inputs(head: Any, store: Any) -> str:
    """Why the store cannot serve this head ("" when it can)."""
    from heads.data import missing_inputs

    try:
        missing = missing_inputs(head, store)
    except (
        ValueError
    ) as error:  # a head that says what the store lacks (tsfsar's taps, emp's layers)
        return str(error).splitlines()[0]
    hint = " (extract with --recipe emp+last)" if any(m.endswith("_in") for m in missing) else ""
    return f"the store has no {', '.join(missing)}{hint}" if missing else ""


def _check_episodes(store: Any, split: str, way: int, shot: int, query: int) -> int:
    """Classes the split offers for these episodes (EpisodeError when fewer than `way`)."""
    from heads.episodes import EpisodeSampler

    m = store.manifest
    return len(EpisodeSampler(m[m["split"] == split], way, shot, query, 0, 0, split).class_names)


def _train_config(
    plan: Plan,
    row: Row,
    head: Any,
    store: Any,
    store_path: str,
    shot: int,
    seed: int,
    overrides: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """The resolved TrainConfig of a trained cell, minus the fields set when it runs."""
    from heads.config import PRESETS, ConfigError, TrainConfig
    from heads.train import head_options

    values = {**plan.train, **row.train, **overrides}
    preset = values.pop("preset", None)
    if preset == "auto":
        preset = store.dataset if store.dataset in PRESETS else None
    explicit = set(values)
    try:
        # the store's shapes and the row's options; the preset fills the head options they leave
        options = head_options(row.head, row.options, store.spec, store.manifest)
        cfg = TrainConfig(
            store=store_path, head=row.head, head_options=options, shot=shot, seed=seed,
            preset=preset, progress=False, **values,
        ).resolved(explicit=explicit)  # fmt: skip
    except (TypeError, ConfigError) as error:
        raise PlanError(str(error).splitlines()[0]) from None
    if cfg.val_way is None:  # small val splits (the demo's has 4 classes): as many as it has
        n_val = _check_episodes(store, cfg.val_split, 1, shot, cfg.val_query)
        if 2 <= n_val < cfg.way:
            cfg.val_way = n_val
            note = f"validation uses {n_val}-way episodes: the {cfg.val_split} split has {n_val} classes"
            if note not in notes:
                notes.append(note)
    _check_episodes(store, cfg.val_split, cfg.val_way or cfg.way, shot, cfg.val_query)
    if getattr(head, "strategy", None) != "finetune":
        _check_episodes(store, "train", cfg.way, shot, cfg.query)
    return {
        k: v
        for k, v in asdict(cfg).items()
        if k not in {"store", "out", "progress", "device", "max_ram"}
    }
