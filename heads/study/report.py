"""A study's results: results.parquet, report.md (the paper's table shape) and three pictures.

Rows are the plan's rows in order, columns its shots. Accuracy is the mean over training seeds with a
95% interval; each row's difference to the reference row is paired over the identical test episodes.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..stats import Paired, SeedMean, format_p, mean_over_seeds, paired_comparison
from .folder import StudyFolder, write_atomic
from .plans import Cell, Expansion, Row


@dataclass
class Entry:
    """One row at one shot: its finished cells, its failures, its mean and paired difference."""

    row: Row
    shot: int
    cells: list[Cell] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    mean: SeedMean | None = None
    per_episode: np.ndarray | None = None  # mean over seeds, per test episode
    paired: Paired | None = None


def collect(folder: StudyFolder, expansion: Expansion) -> dict[tuple[str, int], Entry]:
    entries = {(r.id, s): Entry(r, s) for r in expansion.rows for s in expansion.plan.shots}
    for cell in expansion.cells:
        entry = entries[(cell.row, cell.shot)]
        record = folder.record(cell)
        if folder.finished(cell):
            entry.cells.append(cell)
            entry.records.append(record)
        else:
            entry.failed.append((cell, (record or {}).get("error") or "did not finish"))
    for entry in entries.values():
        if entry.records:
            entry.mean = mean_over_seeds(
                [r["accuracy"] for r in entry.records], [r["ci95"] for r in entry.records]
            )
            entry.per_episode = np.mean([folder.per_episode(c) for c in entry.cells], axis=0)
    reference = expansion.plan.reference
    for (row_id, shot), entry in entries.items():
        base = entries.get((reference, shot))
        if row_id != reference and base is not None and base.per_episode is not None:
            if entry.per_episode is not None:
                entry.paired = paired_comparison(base.per_episode, entry.per_episode)
    return entries


def results_table(folder: StudyFolder, expansion: Expansion) -> pd.DataFrame:
    """One row per cell (row x shot x seed): accuracy, CI, seconds, run dir, config hash, status."""
    labels = {r.id: r.label for r in expansion.rows}
    rows = []
    for cell in expansion.cells:
        record = folder.record(cell) or {}
        ok = folder.finished(cell)
        rows.append({
            "cell": cell.id, "row": cell.row, "label": labels[cell.row], "head": cell.head,
            "options": json.dumps(cell.head_options, sort_keys=True), "shot": cell.shot,
            "seed": cell.seed, "trained": cell.train is not None,
            "status": "ok" if ok else record.get("status", "missing"),
            "accuracy": record.get("accuracy") if ok else None,
            "ci95": record.get("ci95") if ok else None,
            "episodes": cell.eval.episodes, "way": cell.eval.way, "query": cell.eval.query,
            "split": cell.eval.split, "episode_seed": cell.eval.seed,
            "seconds": record.get("seconds"), "train_seconds": record.get("train_seconds"),
            "eval_seconds": record.get("eval_seconds"),
            "best_val_accuracy": record.get("best_val_accuracy"), "run_dir": record.get("run_dir"),
            "config_hash": cell.config_hash, "error": record.get("error"),
        })  # fmt: skip
    table = pd.DataFrame(rows)
    table["seed"] = table["seed"].astype("Int64")
    for name in (
        "accuracy",
        "ci95",
        "seconds",
        "train_seconds",
        "eval_seconds",
        "best_val_accuracy",
    ):
        table[name] = table[name].astype("float64")
    return table


# ---------------------------------------------------------------------------------- markdown
def _accuracy_text(entry: Entry) -> str:
    if entry.mean is None:
        return "failed" if entry.failed else "n/a"
    text = f"{entry.mean.mean:.2f} ± {entry.mean.ci95:.2f}"
    return text + (f" ({len(entry.failed)} failed)" if entry.failed else "")


def _reported_text(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _seeds_text(expansion: Expansion) -> str:
    seeds = expansion.plan.seeds
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def markdown(
    folder: StudyFolder,
    expansion: Expansion,
    store: dict[str, Any],
    entries: dict[tuple[str, int], Entry],
) -> str:
    plan, settings = expansion.plan, expansion.plan.eval
    reference = plan.row(plan.reference)
    trained = [c for c in expansion.cells if c.train is not None]
    lines = [f"# Study: {plan.title}", ""]
    if plan.description:
        lines += [plan.description, ""]
    lines += [
        f"Store `{store['path']}` (dataset {store['dataset']}, {store['model']} {store['pretrained']}, "
        f"fingerprint {store['fingerprint']}). Test: {settings.way}-way, {settings.query} query per "
        f"class, {settings.episodes:,} episodes of split `{settings.split}` drawn with episode seed "
        f"{settings.seed}: the same episodes for every row. "
        + (
            f"Trained rows: {_train_text(trained)}, checkpoint selected on val, training "
            f"{_seeds_text(expansion)}."
            if trained
            else "No row trains."
        ),
        "",
        "## Accuracy (%), mean over training seeds ± 95% CI",
        "",
    ]
    shots = plan.shots
    marks = [m for m in plan.marks if any(m in r.marks for r in expansion.rows)]
    reported = {
        (row.id, s): plan.reported.of(store, row.id, s)
        for row in expansion.rows
        for s in shots
        if plan.reported is not None
    }
    reported_shots = [s for s in shots if any(reported.get((r.id, s)) for r in expansion.rows)]
    header = ["row", *marks, *[f"{s}-shot" for s in shots]]
    header += [f"{s}-shot reported" for s in reported_shots]
    lines += [
        "| " + " | ".join(header) + " |",
        "|---" + "|:-:" * len(marks) + "|---:" * (len(shots) + len(reported_shots)) + "|",
    ]
    for row in expansion.rows:
        name = f"**{row.label}** (reference)" if row.id == reference.id else row.label
        cells = [name, *["✓" if m in row.marks else "" for m in marks]]
        cells += [_accuracy_text(entries[(row.id, s)]) for s in shots]
        cells += [_reported_text(reported.get((row.id, s))) for s in reported_shots]
        lines.append("| " + " | ".join(cells) + " |")
    if reported_shots:
        lines += ["", f"Reported: as published, not measured here; source: {plan.reported.source}."]
    lines += ["", f'## Paired difference to "{reference.label}" over identical episodes', ""]
    header = ["row", *[f"{s}-shot {part}" for s in shots for part in ("Δ (pp)", "95% CI", "p")]]
    lines += ["| " + " | ".join(header) + " |", "|---" + "|---:" * (3 * len(shots)) + "|"]
    for row in expansion.rows:
        if row.id == reference.id:
            continue
        cells = [row.label]
        for s in shots:
            paired = entries[(row.id, s)].paired
            if paired is None:
                cells += ["n/a", "", ""]
            else:
                cells += [
                    f"{paired.mean:+.2f}",
                    f"[{paired.low:+.2f}, {paired.high:+.2f}]",
                    format_p(paired.p_value),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_method_notes(expansion)]
    failed = [(c, e) for entry in entries.values() for c, e in entry.failed]
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [
            f"- `{c.id}`: {e} (see `{folder.cell_dir(c).relative_to(folder.path)}/error.log`)"
            for c, e in failed
        ]
    lines += ["", "## Cells", "", "| cell | test accuracy (%) | best val (%) | train s | test s | run |",
              "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for entry in entries.values():
        for cell, record in zip(entry.cells, entry.records, strict=True):
            best = record.get("best_val_accuracy")
            lines.append(
                f"| `{cell.id}` | {record['accuracy']:.2f} ± {record['ci95']:.2f} | "
                f"{'' if best is None else f'{best:.2f}'} | "
                f"{'–' if cell.train is None else format(record['train_seconds'], '.0f')} | "
                f"{record['eval_seconds']:.0f} | {'`' + record['run_dir'] + '`' if record.get('run_dir') else 'training-free'} |"
            )
    lines += [
        "",
        "Pictures: `accuracy.png`, `paired.png`, `curves.png`; every cell: `results.parquet`.",
        "",
    ]
    return "\n".join(lines)


def _train_text(cells: list[Cell]) -> str:
    """The training schedule of the trained cells (the first row's, when rows differ)."""
    keys = ("preset", "episodes", "way", "query", "lr", "val_every", "val_episodes", "val_way")
    schedules = {tuple(str(c.train.get(k)) for k in keys) for c in cells if c.train is not None}
    train = cells[0].train or {}
    preset = f"preset {train['preset']}, " if train.get("preset") else ""
    differ = (
        " for the first trained row (others differ: see each run's config.json)"
        if len(schedules) > 1
        else ""
    )
    return (
        f"{preset}{train['episodes']:,} episodes ({train['way']}-way, {train['query']} queries), "
        f"lr {train['lr']:g}, validation every {train['val_every']:,} episodes on {train['val_episodes']:,} "
        f"{train.get('val_way') or train['way']}-way episodes{differ}"
    )


def _method_notes(expansion: Expansion) -> list[str]:
    seeds = len(expansion.plan.seeds)
    over = (
        "a t-interval over the training seeds' test accuracies (training-free rows: over episodes)"
        if seeds > 1
        else "over test episodes (1.96 x the episodes' standard error, as fsar-eval prints)"
    )
    notes = [
        f"± is {over}. Δ is the row minus the reference, per test episode (seed-averaged), in "
        "percentage points; its 95% CI is the t-interval of the mean difference and p the two-sided "
        "paired t-test. Both condition on the trained models: they say how sure the test episodes "
        "make the difference, not how it varies over training seeds.",
    ]
    extra = [*expansion.notes, *expansion.plan.notes]
    return notes + (["", "Notes:", "", *[f"- {n}" for n in extra]] if extra else [])


# ---------------------------------------------------------------------------------- pictures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(label: str, width: int = 32) -> str:
    return "\n".join(textwrap.wrap(label, width)) or label


def _shot_colors(shots: tuple[int, ...]) -> dict[int, str]:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    return {s: palette[i % len(palette)] for i, s in enumerate(shots)}


def plot_accuracy(path: Path, expansion: Expansion, entries: dict[tuple[str, int], Entry]) -> None:
    """Rows with their accuracy and 95% CI per shot; the reference row bold, its accuracy a line."""
    plt = _pyplot()
    plan = expansion.plan
    rows = expansion.rows
    colors = _shot_colors(plan.shots)
    fig, ax = plt.subplots(figsize=(8.5, 1.4 + 0.55 * len(rows)))
    offsets = np.linspace(-0.18, 0.18, len(plan.shots)) if len(plan.shots) > 1 else [0.0]
    for shot, dy in zip(plan.shots, offsets, strict=True):
        ys, xs, errs = [], [], []
        for i, row in enumerate(rows):
            mean = entries[(row.id, shot)].mean
            if mean is not None:
                half = 0.0 if math.isnan(mean.ci95) else mean.ci95
                ys.append(i + dy)
                xs.append(mean.mean)  # the interval drawn within 0..100%
                errs.append(
                    (
                        mean.mean - max(0.0, mean.mean - half),
                        min(100.0, mean.mean + half) - mean.mean,
                    )
                )
        xerr = np.array(errs).T if errs else None
        ax.errorbar(xs, ys, xerr=xerr, fmt="o", capsize=4, color=colors[shot], label=f"{shot}-shot")
        base = entries.get((plan.reference, shot))
        if base is not None and base.mean is not None:
            ax.axvline(base.mean.mean, color=colors[shot], linestyle=":", linewidth=1)
    chance = 100.0 / plan.eval.way
    low = min((e.mean.mean - e.mean.ci95 for e in entries.values() if e.mean), default=chance)
    if low - chance < 15:  # draw chance only where it does not squeeze the rows together
        ax.axvline(
            chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.0f}%)"
        )
    names = [
        r.label if any(entries[(r.id, s)].mean for s in plan.shots) else f"{r.label} (failed)"
        for r in rows
    ]
    ax.set_yticks(range(len(rows)), [_wrap(n) for n in names])
    for tick, row in zip(ax.get_yticklabels(), rows, strict=True):
        if row.id == plan.reference:
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%): mean over seeds, 95% CI")
    ax.set_title(
        f"{plan.name}: {plan.eval.way}-way (chance {chance:.0f}%), {plan.eval.episodes:,} test "
        "episodes; reference in bold, dotted",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_paired(path: Path, expansion: Expansion, entries: dict[tuple[str, int], Entry]) -> None:
    """Forest plot: each row's paired difference to the reference with its 95% CI and p-value."""
    plt = _pyplot()
    plan = expansion.plan
    rows = [r for r in expansion.rows if r.id != plan.reference]
    colors = _shot_colors(plan.shots)
    reference = plan.row(plan.reference).label
    fig, ax = plt.subplots(figsize=(9.5, 1.4 + 0.55 * max(1, len(rows))))
    offsets = np.linspace(-0.18, 0.18, len(plan.shots)) if len(plan.shots) > 1 else [0.0]
    for shot, dy in zip(plan.shots, offsets, strict=True):
        ys, xs, errs = [], [], []
        for i, row in enumerate(rows):
            paired = entries[(row.id, shot)].paired
            if paired is not None:
                ys.append(i + dy)
                xs.append(paired.mean)
                errs.append(0 if math.isnan(paired.ci95) else paired.ci95)
                ax.annotate(
                    f"p {format_p(paired.p_value)}" if paired.p_value < 0.001 else f"p = {format_p(paired.p_value)}",
                    xy=(1.01, i + dy), xycoords=("axes fraction", "data"), va="center",
                    fontsize=8, color=colors[shot],
                )  # fmt: skip
        ax.errorbar(xs, ys, xerr=errs, fmt="s", capsize=4, color=colors[shot], label=f"{shot}-shot")
    ax.axvline(0.0, color="black", linewidth=1)
    names = [
        r.label if any(entries[(r.id, s)].paired for s in plan.shots) else f"{r.label} (no result)"
        for r in rows
    ]
    ax.set_yticks(range(len(rows)), [_wrap(n) for n in names])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(f'difference to "{_wrap(reference, 60)}" (percentage points), 95% CI')
    ax.set_title("paired over identical test episodes (p: paired t-test)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_study_curves(path: Path, folder: StudyFolder, expansion: Expansion) -> None:
    """Validation accuracy against training episodes of every trained cell, on one chart."""
    plt = _pyplot()
    labels = {r.id: r.label for r in expansion.rows}
    trained = [c for c in expansion.cells if c.train is not None]
    val_way = (trained[0].train.get("val_way") or trained[0].train["way"]) if trained else None
    fig, ax = plt.subplots(figsize=(10, 4.8))
    cmap = plt.get_cmap("tab10" if len(trained) <= 10 else "tab20")
    drawn = 0
    for cell in trained:
        record = folder.record(cell)
        validation = (record or {}).get("validation") or []
        if record is None or record.get("status") != "ok" or not validation:
            continue
        x = np.array([r["episode"] for r in validation], dtype=float)
        y = np.array([r["val_accuracy"] for r in validation], dtype=float)
        color, style = cmap(drawn % cmap.N), ("-", "--", ":", "-.")[(drawn // cmap.N) % 4]
        name = labels[cell.row] + (f", {cell.shot}-shot" if len(expansion.plan.shots) > 1 else "")
        name += f", seed {cell.seed}" if len(expansion.plan.seeds) > 1 else ""
        ax.plot(x, y, style, marker="o", markersize=3, color=color, label=_wrap(name, 40))
        best = int(np.argmax(y))  # the checkpoint tested (best.safetensors)
        ax.plot(x[best], y[best], "*", color=color, markersize=12, markeredgecolor="black", markeredgewidth=0.5)  # fmt: skip
        drawn += 1
    if drawn:
        ax.set_xlabel("training episode")
        ax.set_ylabel(f"validation accuracy (%), {val_way}-way")
        ax.set_title(
            "validation accuracy during training (star: the checkpoint tested; "
            "95% CIs in each run's curves.png)",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no trained cell finished in this study", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(folder: StudyFolder, expansion: Expansion, store: dict[str, Any]) -> list[Path]:
    """results.parquet, report.md, accuracy.png, paired.png and curves.png in the study folder."""
    out = folder.path
    table = results_table(folder, expansion)
    table.to_parquet(out / "results.parquet", index=False)
    entries = collect(folder, expansion)
    write_atomic(out / "report.md", markdown(folder, expansion, store, entries))
    plot_accuracy(out / "accuracy.png", expansion, entries)
    plot_paired(out / "paired.png", expansion, entries)
    plot_study_curves(out / "curves.png", folder, expansion)
    return [
        out / n
        for n in ("report.md", "results.parquet", "accuracy.png", "paired.png", "curves.png")
    ]
