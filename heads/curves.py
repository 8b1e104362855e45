"""curves.png of a run: training loss, validation accuracy with its 95% CI, and the learning rate,
drawn from the last CURVES_TAIL bytes of its metrics.jsonl (a huge or damaged log costs no more).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from runtime import files

CURVES_TAIL = 8 << 20  # bytes of metrics.jsonl the curves are drawn from (about 40,000 records)


def plot_curves(run_dir: Path) -> None:
    """curves.png: training loss, validation accuracy with its 95% CI, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = metric_records(run_dir / "metrics.jsonl", CURVES_TAIL)
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
    files.write_file(run_dir / "curves.png", lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


def metric_records(path: Path, tail: int) -> list[dict[str, Any]]:
    """The records among the last `tail` bytes of a metrics log that fsar wrote: a training record
    (episode, loss, lr) or a validation record (episode, val_accuracy); other lines (a cut one,
    other JSON) are skipped, so a damaged log never stops a run."""
    lines, _ = files.read_log_tail(path, tail, "metrics log")
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(record, dict):
            continue
        keys = ("loss", "lr") if record.get("kind") == "train" else ("val_accuracy",)
        if all(_number(record.get(k)) for k in ("episode", *keys)):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
