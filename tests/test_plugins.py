"""Heads from other packages: examples/my_head installed offline trains, evaluates and enters a
study through the `fsar.heads` entry point; built-ins stay; broken plugins are one line, exit 2."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import cli
from heads import registry
from heads.baselines import Prototypes
from heads.probe import LinearProbe
from store.random_store import hidden_order_store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_head"
TRAIN = ["--episodes", "60", "--lr", "5e-3", "--val-every", "60", "--val-episodes", "50"]
HELD_OUT = ["--episodes", "300", "--seed", "7", "--no-progress"]

pytestmark = pytest.mark.usefixtures("quiet_allocator")


@contextmanager
def installed(*sites: Path) -> Iterator[None]:
    """Packages installed in `sites` visible to this process and to the processes it starts."""
    saved_path, saved_env = list(sys.path), os.environ.get("PYTHONPATH")
    sys.path[:0] = [str(site) for site in sites]
    os.environ["PYTHONPATH"] = os.pathsep.join([*map(str, sites), str(ROOT)])
    importlib.invalidate_caches()
    registry.reload()
    try:
        yield
    finally:
        sys.path[:] = saved_path
        if saved_env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_env
        registry.reload()


def fake_package(site: Path, name: str, points: dict[str, str], module: str = "") -> Path:
    """An installed distribution `name` 1.0 with `fsar.heads` entry points (and one module)."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{point} = {target}\n" for point, target in points.items())
    (info / "entry_points.txt").write_text(f"[fsar.heads]\n{lines}")
    if module:
        (site / f"{name.replace('-', '_')}.py").write_text(module)
    return site


def invoke(app, *args: object) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.stdout, result.stderr


def one_line_error(app, *args: object) -> str:  # type: ignore[no-untyped-def]
    code, out, err = invoke(app, *args)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def accuracy(output: str) -> float:
    return float(re.search(r"accuracy ([0-9.]+) ±", output).group(1))


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/my_head pip-installed into a folder, offline (no index, no build isolation)."""
    work = tmp_path_factory.mktemp("my_head")
    source = shutil.copytree(EXAMPLE, work / "source", ignore=shutil.ignore_patterns("build", "*.egg-info"))  # fmt: skip
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
               "--no-build-isolation", "--target", str(work / "site"), str(source)]  # fmt: skip
    done = subprocess.run(command, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return work / "site"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Classes differ only in the order of a signal hidden from fixed metrics (8/6/6 classes)."""
    path = tmp_path_factory.mktemp("hidden") / "store"
    classes = {"train": 8, "val": 6, "test": 6}
    hidden_order_store(path, classes=classes, videos_per_class=8, patches=4, dim=32).close()
    return path


@pytest.fixture(scope="module")
def trained(example_site: Path, store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fsar-train --head my-head` with the example package installed."""
    run = tmp_path_factory.mktemp("runs") / "my-head"
    with installed(example_site):
        code, out, err = invoke(
            cli.train_app, "--store", store, "--head", "my-head", *TRAIN, "--out", run,
            "--no-progress",
        )  # fmt: skip
    assert code == 0, (out, err)
    return run


# ---------------------------------------------------------------------------------- the example
def test_example_head_trains_evaluates_and_learns(
    example_site: Path, store: Path, trained: Path
) -> None:
    with installed(example_site):
        code, before, err = invoke(
            cli.eval_app, "--store", store, "--head", "my-head", *HELD_OUT
        )  # untrained
        assert code == 0, err
        code, proto, err = invoke(cli.eval_app, "--store", store, "--head", "proto", *HELD_OUT)
        assert code == 0, err
        code, after, err = invoke(cli.eval_app, "--checkpoint", trained, *HELD_OUT)
        assert code == 0, err
    # the order of a hidden signal: invisible to prototypes and to the untrained head
    assert accuracy(before) < 50 and accuracy(proto) < 50, (before, proto)
    assert accuracy(after) > 85, after
    config = json.loads((trained / "config.json").read_text())
    package = {"distribution": "fsar-my-head", "version": "0.1.0"}
    assert config["head_source"] == {**package, "target": "my_head:TemporalAttentionHead"}
    from heads.checkpoint import read_metadata

    saved = read_metadata(trained / "best.safetensors")
    assert saved["head"] == "my-head"
    assert saved["meta"]["head_source"]["distribution"] == "fsar-my-head"


def test_checkpoint_of_another_plugin_version_warns(
    example_site: Path, store: Path, trained: Path, tmp_path: Path
) -> None:
    from heads.checkpoint import load_model, read_metadata, save_checkpoint
    from heads.evaluate import load_run
    from store import open_store

    saved = read_metadata(trained / "best.safetensors")
    meta = saved["meta"]
    meta["head_source"]["version"] = "0.0.9"
    run = tmp_path / "old"
    run.mkdir()
    shutil.copy(trained / "config.json", run / "config.json")
    with installed(example_site), open_store(store) as s:
        head = registry.create("my-head", **saved["head_config"])
        load_model(trained / "best.safetensors", head)
        save_checkpoint(run / "best.safetensors", head, meta)
        with pytest.warns(UserWarning, match=r"of fsar-my-head 0\.0\.9; here it comes from fsar-my-head 0\.1\.0$"):  # fmt: skip
            assert load_run(run, s).name == "my-head"
        code, out, err = invoke(cli.eval_app, "--checkpoint", run, *HELD_OUT)
    assert code == 0 and "accuracy" in out, err
    assert err == (
        f"warning: checkpoint {run / 'best.safetensors'} was trained with head 'my-head' of "
        "fsar-my-head 0.0.9; here it comes from fsar-my-head 0.1.0\n"
    )


def test_checkpoint_of_a_plugin_not_installed_names_the_package(trained: Path) -> None:
    registry.reload()  # the example package is not on the path here
    line = one_line_error(cli.eval_app, "--checkpoint", trained, *HELD_OUT)
    assert line == (
        f"error: checkpoint {trained / 'best.safetensors'}: head 'my-head' comes from package "
        "fsar-my-head, which is not installed here: install it (pip install "
        "'fsar-my-head==0.1.0') and evaluate again"
    )


def test_help_lists_plugin_heads_without_importing_them(example_site: Path) -> None:
    script = (
        "import sys; from typer.testing import CliRunner; import cli; "
        "out = CliRunner().invoke(cli.train_app, ['--help']).output; "
        "print(out); print('imported:', 'my_head' in sys.modules, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example_site), str(ROOT)])}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(r"my-head +package fsar-my-head 0\.1\.0", out), out
    assert all(re.search(rf"\n  {name} +built in", out) for name in registry.BUILTIN), out
    assert out.strip().endswith("imported: False False")


@pytest.mark.slow
def test_plugin_head_is_a_row_of_a_study(example_site: Path, store: Path, tmp_path: Path) -> None:
    rows = [
        {"id": "proto", "head": "proto"},
        {"id": "mine", "label": "temporal attention", "head": "my-head"},
    ]
    train = {"episodes": 60, "lr": 5e-3, "val_every": 60, "val_episodes": 50}
    plan = {"name": "byo", "reference": "proto", "train": train, "eval": {"episodes": 100},
            "rows": rows}  # fmt: skip
    (tmp_path / "byo.json").write_text(json.dumps(plan))
    out = tmp_path / "study"
    with installed(example_site):
        code, stdout, err = invoke(
            cli.study_app, "--store", store, "--plan", tmp_path / "byo.json", "--out", out,
            "--workers", "1", "--no-progress",
        )  # fmt: skip
    assert code == 0, (stdout, err)
    results = pd.read_parquet(out / "results.parquet").set_index("row")
    assert list(results["status"]) == ["ok", "ok"]
    assert results.at["mine", "accuracy"] > results.at["proto", "accuracy"] + 20, results
    config = json.loads((out / results.at["mine", "run_dir"] / "config.json").read_text())
    assert config["head_source"]["distribution"] == "fsar-my-head"
    assert "temporal attention" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------- registry
def test_registering_a_head_keeps_every_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_registered", {})
    registry.reload()  # as in a fresh process: nothing looked up yet
    registry.register("mine", Prototypes)
    assert registry.available() == sorted([*registry.BUILTIN, "mine"])
    assert registry.create("mine").name == "mine" and registry.create("emp", dim=16).name == "emp"
    with pytest.raises(registry.HeadError, match=r"^head 'proto' is taken \(built into fsar\)"):
        registry.register("proto", Prototypes)
    assert type(registry.create("proto")) is Prototypes


def test_broken_plugins_are_one_line_naming_the_package(tmp_path: Path, store: Path) -> None:
    site = tmp_path / "site"
    fake_package(site, "broken-heads", {"broken": "broken_heads:Head"}, "import no_such_module_x\n")
    picky = (
        "from heads.baselines import Prototypes\n"
        "def make(**options):\n"
        "    if options:\n"
        "        raise ValueError(f'takes no options, got {sorted(options)}')\n"
        "    return Prototypes()\n"
        "def not_a_head():\n"
        "    return object()\n"
    )
    fake_package(site, "picky-heads", {"picky": "picky_heads:make", "odd": "picky_heads:not_a_head"}, picky)  # fmt: skip
    clash = fake_package(
        tmp_path / "clash",
        "clash-heads",
        {"proto": "picky_heads:make", "../up": "picky_heads:make"},
    )
    args = ["--store", store, "--episodes", "5", "--no-progress"]
    with installed(site):
        line = one_line_error(cli.train_app, "--store", store, "--head", "broken")
        assert line == (
            "error: head 'broken': package broken-heads 1.0 (entry point broken = "
            "broken_heads:Head) fails to import (ModuleNotFoundError: No module named "
            "'no_such_module_x'); fix or uninstall broken-heads"
        )
        line = one_line_error(cli.eval_app, *args, "--head", "picky", "--option", "width=3")
        assert line == (
            "error: head 'picky' (package picky-heads 1.0 (entry point picky = picky_heads:make)): "
            "ValueError: takes no options, got ['width']"
        )
        line = one_line_error(cli.eval_app, *args, "--head", "odd")
        assert "head 'odd' (package picky-heads 1.0" in line and "not a heads.FewShotHead" in line
    twins = tmp_path / "twins"
    fake_package(twins, "twin-a", {"twin": "picky_heads:make"})
    fake_package(twins, "twin-b", {"twin": "picky_heads:make"})
    with installed(site, twins):  # two packages, one name: neither gets it
        code, _, err = invoke(cli.eval_app, *args, "--head", "twin")
        warning, error = err.splitlines()  # every command warns; using the name is the error
        assert code == 2 and warning == error.replace("error: ", "warning: ", 1)
        assert error.startswith("error: head 'twin' is claimed by package twin-")
        assert error.endswith(": uninstall one of them") and "and by package twin-" in error
    with installed(site, clash):  # a built-in's name: refused, said by every command; proto stays
        code, out, err = invoke(cli.eval_app, *args, "--head", "proto")
        assert code == 0 and "accuracy" in out, err
        assert err.splitlines() == [
            "warning: package clash-heads 1.0 (entry point ../up = picky_heads:make) is refused: "
            "a head name is letters, digits and '_.+-', 64 at most, starting with a letter or digit",
            "warning: package clash-heads 1.0 (entry point proto = picky_heads:make) is refused: "
            "'proto' is a built-in head, and a name must mean one head in every checkpoint and "
            "plan; rename the entry point",
        ]
        assert type(registry.create("proto")) is Prototypes
    with installed(site):  # a plan row naming a broken plugin: refused before anything runs
        plan = {"name": "p", "rows": [{"id": "proto", "head": "proto"}, {"id": "b", "head": "broken"}]}  # fmt: skip
        (tmp_path / "p.json").write_text(json.dumps(plan))
        out_dir = tmp_path / "study"
        line = one_line_error(cli.study_app, "--store", store, "--plan", tmp_path / "p.json", "--out", out_dir)  # fmt: skip
        assert line.startswith("error: plan p, row b: head 'broken': package broken-heads 1.0")
        assert not out_dir.exists()


class ReadsLayer99(LinearProbe):
    def inputs(self, spec: dict) -> dict[str, str]:
        return {"tokens": "tokens/layer99"}


def test_store_lacking_a_declared_tensor_is_refused_up_front(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "_registered", {})
    registry.register("layer99", ReadsLayer99)
    out = tmp_path / "run"
    line = one_line_error(cli.train_app, "--store", store, "--head", "layer99", "--out", out)
    assert line.startswith(
        "error: head 'layer99' reads tokens/layer99, which the store lacks; it has "
    )
    assert not out.exists()
    line = one_line_error(cli.eval_app, "--store", store, "--head", "layer99")
    assert "reads tokens/layer99, which the store lacks" in line
    plan = {"name": "p", "rows": [{"id": "deep", "head": "layer99"}]}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    line = one_line_error(cli.study_app, "--store", store, "--plan", tmp_path / "p.json", "--out", tmp_path / "s")  # fmt: skip
    assert line == "error: plan p, row deep: the store has no tokens/layer99"
