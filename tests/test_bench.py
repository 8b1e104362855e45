"""The benchmarks must keep running: `python -m bench.run_all --quick` and the results' schema.

Quick mode uses tiny sizes; no timing is asserted, only that every figure exists and is finite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run_all import BENCHMARKS

ROOT = Path(__file__).resolve().parent.parent
FIGURE_KEYS = {"key", "label", "value", "unit", "target", "met", "note"}
MACHINE_KEYS = {"cores", "cpu_model", "torch", "torch_threads", "device", "memory_gib"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return out, proc


@pytest.mark.slow
def test_quick_run_succeeds_and_prints_the_table(results) -> None:
    out, proc = results
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| benchmark | figure | value | unit | target |" in proc.stdout
    assert (out / "summary.md").read_text().startswith("Command: `python -m bench.run_all --quick`")


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_result_schema_and_finite_figures(results, name: str) -> None:
    out, _ = results
    data = json.loads((out / f"{name}.json").read_text())
    assert data["name"] == name and data["schema"] == 1 and data["quick"] is True
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["machine"]["device"] == "cpu"
    assert isinstance(data["config"], dict) and isinstance(data["notes"], list)
    assert data["figures"], "no figures"
    keys = [f["key"] for f in data["figures"]]
    assert len(keys) == len(set(keys)), "duplicate figure keys"
    for fig in data["figures"]:
        assert set(fig) == FIGURE_KEYS, fig
        assert isinstance(fig["value"], float) and math.isfinite(fig["value"]), fig
        assert fig["unit"] and fig["label"]
        assert fig["met"] in (None, True, False)


def test_table_formats_every_figure() -> None:
    from bench.common import markdown_table

    res = {
        "name": "x",
        "figures": [
            {"label": "a", "value": 1234.5, "unit": "s", "target": "<= 2", "met": False},
            {"label": "b", "value": 0.001234, "unit": "x", "target": None, "met": None},
        ],
    }
    table = markdown_table([res]).splitlines()
    assert table[2] == "| x | a | 1,234 | s | <= 2 ✗ |"
    assert table[3] == "| x | b | 0.0012 | x |  |"
