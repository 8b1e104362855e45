"""The benchmarks must keep running: each script's `--quick` run and the results' schema.

Quick mode uses tiny sizes; no timing is asserted, only that every figure exists and is finite.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from bench.run_all import BENCHMARKS

FIGURE_KEYS = {"key", "label", "value", "unit", "target", "met", "note"}
MACHINE_KEYS = {"cores", "cpu_model", "torch", "torch_threads", "device", "memory_gib"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Every benchmark's quick run, in this process (what `run_all --quick` runs one per process)."""
    out = tmp_path_factory.mktemp("bench")
    for name in BENCHMARKS:
        importlib.import_module(f"bench.{name}").main(["--quick", "--out", str(out)])
    return out


@pytest.mark.slow
def test_run_all_prints_the_table_of_the_results(results, capsys) -> None:
    from bench.run_all import main

    assert main(["--report", "--out", str(results)]) == 0
    printed = capsys.readouterr().out
    assert "| benchmark | figure | value | unit | target |" in printed
    assert all(f"| {name} |" in printed for name in BENCHMARKS)
    assert "Machine: " in printed


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARKS)
def test_result_schema_and_finite_figures(results, name: str) -> None:
    data = json.loads((results / f"{name}.json").read_text())
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
