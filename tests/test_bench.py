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
    """Every benchmark's quick run, in this process (what `run_all --quick` runs one per process),
    leaving the process's allocator alone: a benchmark applies fsar's malloc policy for the rest of
    its process, which here is every later test's."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("runtime.memory.keep_freed_memory", lambda: False)
        for name in BENCHMARKS:
            module = importlib.import_module(f"bench.{name}")
            if hasattr(module, "keep_freed_memory"):
                patch.setattr(module, "keep_freed_memory", lambda: False)
            module.main(["--quick", "--out", str(out)])
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


@pytest.mark.slow
def test_gpu_script_runs_every_step_on_cpu(tmp_path: Path) -> None:
    """bench/gpu.sh --device cpu --quick: extraction, emp training with the loader stall, emp
    1-shot and 5-shot evaluation, TS-FSAR from the store vs online with its loader rates, each
    writing its figures, then the table (no GPU here)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    cmd = ["bash", str(root / "bench" / "gpu.sh"), "--device", "cpu", "--quick"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = {}
    for name in ("extraction", "training", "evaluation", "tsfsar"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["quick"] is True and data["machine"]["device"] == "cpu"
        figures[name] = {f["key"] for f in data["figures"]}
    assert {"ratio_e2e", "bare_fps", "pipeline_fps_e2e"} <= figures["extraction"]
    assert {"speedup.emp.vs_online", "ceiling.emp.vs_online", "episodes_per_s.store.emp"} <= (
        figures["training"]
    )
    assert "loader_stall_pct.emp" in figures["training"]
    assert {"ratio.emp.1shot", "ratio.emp.5shot", "flop_floor.emp.5shot"} <= figures["evaluation"]
    assert {"bytes.taps13", "ceiling.taps13", "speedup.taps4", "break_even_mbps.taps4"} <= (
        figures["tsfsar"]
    )
    assert {"loader_mbps.cold.taps4", "overtake_tflops.ram.taps4", "loader_stall_pct.taps4"} <= (
        figures["tsfsar"]
    )
    assert "| evaluation | emp 5-shot: ratio eval / pass |" in proc.stdout
    rc = subprocess.run([*cmd, "--bogus"], capture_output=True, text=True).returncode
    assert rc == 2


def test_report_writes_the_performance_doc_and_the_readme_headline(tmp_path: Path) -> None:
    """The doc holds one section per benchmark with its how-to-read text and table; the README
    block between the markers is replaced by the headline table, the rest kept."""
    from bench.run_all import HEADLINE_BEGIN, HEADLINE_END, write_docs

    out = tmp_path / "results"
    out.mkdir()
    fig = {"target": None, "met": None, "note": ""}
    machine = {"cores": 2, "cpu_model": "x", "memory_gib": 1, "torch": "t", "torch_threads": 2}
    machine |= {"device": "cpu", "load_average_at_start": [1.0, 1.0, 1.0]}
    evaluation = {
        "name": "evaluation", "quick": False, "command": "python -m bench.evaluation",
        "machine": machine, "seconds": 60.0, "notes": [],
        "figures": [
            {**fig, "key": "ratio.otam.5shot", "label": "otam 5-shot: ratio", "value": 1.5,
             "unit": "x", "target": "<= 2", "met": True},
            {**fig, "key": "ratio.emp.5shot", "label": "emp 5-shot: ratio", "value": 7.25,
             "unit": "x", "target": "<= 2", "met": False},
        ],
    }  # fmt: skip
    (out / "evaluation.json").write_text(json.dumps(evaluation))
    doc, readme = tmp_path / "performance.md", tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{HEADLINE_BEGIN}\nold\n{HEADLINE_END}\n\nafter\n")
    write_docs(out, out / "gpu", doc, readme)
    text = doc.read_text()
    assert "### evaluation" in text and "How to read it: `fsar-eval` seconds" in text
    assert "| evaluation | emp 5-shot: ratio | 7.25 | x | <= 2 ✗ |" in text
    assert "No GPU figures yet" in text
    # a missed headline says why under the table; targets met or not measured say nothing
    why = text[text.index("Missed here, and why:") : text.index("## CPU")]
    assert "- Evaluation: 10,000 episodes" in why and "emp 5-shot fuses" in why
    assert "Extraction" not in why and "Small head" not in why
    new = readme.read_text()
    assert "old" not in new and new.endswith("\n\nafter\n")
    assert (
        "| Evaluation: 10,000 episodes / one pass over the split, worst head and shot | 7.25x |"
        in new
    )
    assert "| Extraction: pipeline / bare encoder, steady state | not measured |" in new
    # rerunning one other benchmark: its section joins, evaluation's section and headline stay
    again = tmp_path / "again"
    again.mkdir()
    training = {**evaluation, "name": "training", "command": "python -m bench.training"}
    training["figures"] = [
        {**fig, "key": "episode_s.store.emp", "label": "emp: s/episode", "value": 8.5, "unit": "s"}
    ]
    (again / "training.json").write_text(json.dumps(training))
    write_docs(again, again / "gpu", doc, readme)
    text = doc.read_text()
    assert text.index("### training") < text.index("### evaluation")
    assert "| evaluation | emp 5-shot: ratio | 7.25 | x | <= 2 ✗ |" in text
    assert "| training | emp: s/episode | 8.50 | s |  |" in text
    assert "emp 5-shot fuses" in text  # the kept headline's reason stays
    assert "| worst head and shot | 7.25x |" in readme.read_text().replace(
        "Evaluation: 10,000 episodes / one pass over the split, ", ""
    )


def test_report_writes_the_learning_map_into_its_doc(tmp_path: Path) -> None:
    """docs/learning.md: the map (stores x heads) and a reading per row replace the block between
    its markers; the text around it stays; performance.md points there instead."""
    from bench.learning_map import COLUMNS, TRAINED
    from bench.run_all import write_docs

    out = tmp_path / "results"
    out.mkdir()
    machine = {"cores": 2, "cpu_model": "x", "memory_gib": 1, "torch": "t", "torch_threads": 2}
    machine |= {"device": "cpu", "load_average_at_start": [1.0, 1.0, 1.0]}
    accuracy = {c: 20.0 for c in COLUMNS} | {"probe": 99.0, "zeroshot": 60.0}
    runs = {c: {"untrained": 20.0, "base_accuracy": 20.0} for c in TRAINED}
    runs["emp"]["base_accuracy"] = 95.0  # fits the base classes, transfers nothing
    rows = {"base": {"accuracy": accuracy, "runs": runs}}
    res = {
        "name": "learning_map", "quick": False, "command": "python -m bench.learning --map",
        "machine": machine, "seconds": 60.0, "notes": ["a note"], "config": {"rows": rows},
        "figures": [],
    }  # fmt: skip
    (out / "learning_map.json").write_text(json.dumps(res))
    begin = "<!-- learning_map: written by python -m bench.run_all --report -->"
    learning = tmp_path / "learning.md"
    learning.write_text(f"# x\n\nbefore\n\n{begin}\nold\n<!-- end of learning_map -->\n\nafter\n")
    doc = tmp_path / "performance.md"
    write_docs(out, out / "gpu", doc, None, learning)
    text = learning.read_text()
    assert text.startswith("# x\n\nbefore\n\n" + begin) and text.endswith("\n\nafter\n")
    assert "old" not in text and "Command: `python -m bench.learning --map`" in text
    assert "| store | zeroshot | proto | otam | emp untrained | probe |" in text
    assert "| base | 60.0 | 20.0 | 20.0 | 20.0 | 99.0 |" in text
    assert "- **base**: training-free best zeroshot 60; training lifts probe 20 -> 99;" in text
    assert (
        "above every training-free head: probe; fit the base classes without transferring: emp (base 95, test 20)."
        in text
    )
    assert "[learning.md](learning.md)" in doc.read_text() and "learning_map" not in doc.read_text()


def test_learning_variants_become_one_table_and_the_curves_plot_reaches_the_doc(
    tmp_path: Path,
) -> None:
    """docs/learning.md: bench.learning's figures become one line per variant with test / base /
    cosine per row, and its plot is copied into the doc's img/ folder and shown."""
    from bench.run_all import learning_blocks

    out = tmp_path / "results"
    out.mkdir()
    figures = [
        {"label": "independent: emp, fsar default: test classes", "value": 20.2, "unit": "%"},
        {"label": "independent: emp, fsar default: base classes", "value": 93.3, "unit": "%"},
        {"label": "independent: emp, fsar default: cosine between videos", "value": 0.27, "unit": "cos"},
        {"label": "shallow: emp, fsar default: test classes", "value": 63.0, "unit": "%"},
        {"label": "independent: probe (reference): test classes", "value": 84.2, "unit": "%"},
    ]  # fmt: skip
    machine = {"cores": 2, "cpu_model": "x", "memory_gib": 1.0, "torch": "t", "torch_threads": 1,
               "device": "cpu", "load_average_at_start": [0.0, 0.0, 0.0]}  # fmt: skip
    res = {"name": "learning", "quick": False, "command": "python -m bench.learning",
           "machine": machine, "seconds": 60.0, "notes": [], "figures": figures,
           "config": {"rows": ["independent", "shallow"]}}  # fmt: skip
    (out / "learning.json").write_text(json.dumps(res))
    (out / "learning.png").write_bytes(b"png")
    begin = "<!-- learning: written by python -m bench.run_all --report -->"
    text = learning_blocks(f"{begin}\nold\n<!-- end of learning -->\n", out, tmp_path / "img")
    assert "| variant | independent: test % | independent: base % | independent: cosine |" in text
    assert "| emp, fsar default | 20.2 | 93.3 | 0.27 | 63.0 |  |  |" in text
    assert "| probe (reference) | 84.2 |  |  |  |  |  |" in text
    assert "![learning](img/learning.png)" in text and "old" not in text
    assert (tmp_path / "img" / "learning.png").read_bytes() == b"png"


def test_tsfsar_episode_bytes_follow_the_store_layout() -> None:
    """A 5-way 1-shot 5-query ViT-B/16 episode at T = 8 reads 30 videos x (13 taps of 197 x 768
    float16 per frame + the projected CLS): 0.94 GB; 4 taps read under a third of it."""
    from bench.common import vit_b16_spec
    from bench.tsfsar import episode_bytes, tap_choices

    spec = vit_b16_spec("ts")
    every, six, three = tap_choices(12)
    assert (len(every), six, three) == (13, [0, 2, 4, 6, 8, 10, 12], [0, 4, 8, 12])
    assert episode_bytes(spec, every) == 30 * (13 * 197 * 768 + 512) * 8 * 2
    assert round(episode_bytes(spec, every) / 1e9, 2) == 0.94
    assert episode_bytes(spec, three) < episode_bytes(spec, every) / 3


def test_update_replaces_only_the_rerun_sections() -> None:
    """--report --update: a rerun benchmark's CPU section is replaced (or added), every other
    section, the headline and the GPU part stay as they were."""
    from bench.run_all import update_doc

    doc = "# P\n\n## Headline\n\nrow\n\n## CPU\n\n### training\n\nold t\n\n### store\n\nold s\n\n## GPU\n\n### training\n\ngpu t\n"
    res = {"name": "training", "quick": False, "command": "python -m bench.training",
           "seconds": 60, "machine": {"cores": 2, "cpu_model": "x", "memory_gib": 8,
           "torch": "2", "torch_threads": 2, "device": "cpu", "load_average_at_start": [1.0]},
           "figures": [], "notes": ["new t"]}  # fmt: skip
    new = update_doc(doc, [res, {**res, "name": "tsfsar", "notes": ["new ts"]}])
    cpu, gpu = new.split("## GPU")
    assert "old t" not in cpu and "- new t" in cpu and "old s" in cpu and "row" in cpu
    assert cpu.index("### store") < cpu.index("### tsfsar") and "- new ts" in cpu
    assert gpu == "\n\n### training\n\ngpu t\n"
    placeholder = update_doc("# P\n\n## CPU\n\n## GPU\n\nold words\n", [res], ["new words", ""])
    assert placeholder.endswith("## GPU\n\nnew words\n") and "old words" not in placeholder
