"""Every user error is one line naming the option or file, exit 2, never a traceback; nonsense
counts are refused; untrained heads evaluate on any store; help texts are shown whole."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cli

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("quiet_allocator")


@pytest.fixture(scope="module")
def store(pair_store: Path) -> Path:
    return pair_store  # D = 32, not 512


def run(app, *args: object) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def one_line_error(app, *args: object) -> str:  # type: ignore[no-untyped-def]
    code, out = run(app, *args)
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    return errors[0]


# ---------------------------------------------------------------------- fsar-eval
@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--device", "gpu"], "--device 'gpu'"),
        (["--episodes", "0"], "--episodes 0"),
        (["--episodes", "-5"], "--episodes -5"),
        (["--query", "0"], "--query 0"),
        (["--way", "0"], "--way 0"),
        (["--shot", "0"], "--shot 0"),
        (["--max-ram", "-1"], "--max-ram -1"),
    ],
)
def test_eval_refuses_bad_options(store: Path, args: list[str], names: str) -> None:
    line = one_line_error(cli.eval_app, "--store", store, "--head", "proto", *args)
    assert names in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused(store: Path, tmp_path: Path) -> None:
    line = one_line_error(cli.eval_app, "--store", store, "--head", "proto", "--device", "cuda")
    assert "--device cuda: no CUDA GPU" in line
    line = one_line_error(
        cli.train_app, "--store", store, "--device", "cuda", "--out", tmp_path / "r"
    )
    assert "--device cuda: no CUDA GPU" in line and not (tmp_path / "r").exists()


def test_output_paths_are_checked_before_evaluating(store: Path, tmp_path: Path) -> None:
    line = one_line_error(
        cli.eval_app,
        "--store",
        store,
        "--head",
        "otam",
        "--episodes",
        "1000000",
        "--per-episode",
        tmp_path / "nodir" / "x.parquet",
    )  # fmt: skip  (refused at once: a million episodes would take minutes)
    assert "--per-episode" in line and "nodir" in line and "does not exist" in line
    line = one_line_error(
        cli.eval_app, "--store", store, "--head", "proto", "--json", tmp_path,
    )  # fmt: skip
    assert f"--json {tmp_path} is a directory" in line


@pytest.mark.parametrize("name", ["emp", "zeroshot", "proto", "otam", "lastlayer"])
def test_every_head_evaluates_untrained(store: Path, last_store: Path, name: str) -> None:
    code, out = run(
        cli.eval_app, "--store", last_store, "--head", name, "--episodes", "5", "--no-progress"
    )
    assert code == 0 and re.search(r"accuracy \d+\.\d\d ± ", out), out
    if name == "lastlayer":  # a store without the last block: one line saying what to do
        line = one_line_error(cli.eval_app, "--store", store, "--head", name, "--episodes", "5")
        assert "extract with --recipe emp+last" in line


def test_untrained_emp_is_built_at_the_stores_dim(store: Path) -> None:
    code, out = run(
        cli.eval_app, "--store", store, "--head", "emp", "--episodes", "5", "--no-progress"
    )
    assert code == 0 and "(95% CI, 5 episodes, 5-way 1-shot, test)" in out


@pytest.mark.parametrize("bug", [ValueError, KeyError, RuntimeError])
def test_a_bug_keeps_its_traceback(store: Path, monkeypatch, bug: type[Exception]) -> None:  # type: ignore[no-untyped-def]
    """Only fsar's own error types become one line and exit 2: a bug inside a command (here an
    internal function that raises) is not passed off as a user error."""

    def broken(*args: object, **kwargs: object) -> None:
        raise bug("an internal bug")

    monkeypatch.setattr("heads.eval_run.evaluate", broken)
    result = runner.invoke(
        cli.eval_app, ["--store", str(store), "--head", "proto", "--episodes", "5"]
    )
    assert result.exit_code == 1 and isinstance(result.exception, bug)
    assert "error: " not in result.output


def test_fsar_errors_from_anywhere_are_one_line(store: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from heads.config import ConfigError

    def refuses(*args: object, **kwargs: object) -> None:
        raise ConfigError("--something 3: use 4\nsecond line")

    monkeypatch.setattr("heads.eval_run.evaluate", refuses)
    line = one_line_error(cli.eval_app, "--store", store, "--head", "proto", "--episodes", "5")
    assert line == "error: --something 3: use 4"


# ---------------------------------------------------------------------- fsar-train
@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--episodes-per-step", "0"], "--episodes-per-step 0"),
        (["--val-every", "0"], "--val-every 0"),
        (["--episodes", "0"], "--episodes 0"),
        (["--episodes", "-3"], "--episodes -3"),
        (["--way", "0"], "--way 0"),
        (["--query", "0"], "--query 0"),
        (["--val-episodes", "0"], "--val-episodes 0"),
        (["--lr", "-1"], "--lr -1"),
        (["--device", "gpu"], "--device 'gpu'"),
    ],
)
def test_train_refuses_bad_options(
    store: Path, tmp_path: Path, args: list[str], names: str
) -> None:
    line = one_line_error(cli.train_app, "--store", store, "--out", tmp_path / "run", *args)
    assert names in line
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("{not json", "not valid JSON"),
        ('{"episodes": "many"}', "episodes must be int, got 'many'"),
        ('{"lr": true}', "lr must be float, got True"),
        ("[1, 2]", "expected a JSON object"),
        ('{"epochs": 3}', "unknown training option(s) epochs"),
    ],
)
def test_config_file_errors_name_the_file(
    store: Path, tmp_path: Path, text: str, names: str
) -> None:
    config = tmp_path / "train.json"
    config.write_text(text)
    line = one_line_error(
        cli.train_app, "--store", store, "--config", config, "--out", tmp_path / "run"
    )
    assert f"--config {config}" in line and names in line
    assert not (tmp_path / "run").exists()


def test_a_split_too_small_for_the_way_names_val_way(store: Path, tmp_path: Path) -> None:
    line = one_line_error(
        cli.train_app, "--store", store, "--query", "1", "--val-way", "7", "--out", tmp_path / "run"
    )
    assert "7-way episodes need 7 classes" in line and "'val'" in line and "--val-way" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- fsar-synth
def test_synth_refuses_a_file_or_an_existing_dataset(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("mine")
    line = one_line_error(cli.synth_app, "--out", target, "--classes", "6")
    assert f"--out {target} is a file" in line and target.read_text() == "mine"
    existing = tmp_path / "data"
    (existing / "train" / "x").mkdir(parents=True)
    (existing / "train" / "x" / "mine.mp4").write_bytes(b"mine")
    line = one_line_error(cli.synth_app, "--out", existing, "--classes", "6")
    assert f"--out {existing} exists and is not empty" in line
    assert sorted(p.name for p in existing.rglob("*")) == ["mine.mp4", "train", "x"]


def test_synth_hint_extracts_offline(tmp_path: Path) -> None:
    code, out = run(cli.synth_app, "--out", tmp_path / "s", "--classes", "6", "--videos-per-class", "1")  # fmt: skip
    assert code == 0
    assert 'ARGS="--model fsar-tiny-vit --pretrained none"' in out  # no weights download needed
    assert f"DATA_ROOT={tmp_path / 's'}" in out


# ---------------------------------------------------------------------- fsar-extract
def _folder_dataset(root: Path) -> Path:
    for split, names in (("train", "ab"), ("val", "cd"), ("test", "ef")):
        for name in names:
            (root / split / name).mkdir(parents=True)
            (root / split / name / "v0.mp4").write_bytes(b"not decoded by these tests")
    return root


def _resumable_store(data_root: Path, path: Path):  # type: ignore[no-untyped-def]
    """The store `fsar-extract --model fsar-tiny-vit --pretrained none` creates, all rows pending."""
    from pipeline.datasets import list_dataset
    from pipeline.extract import ExtractOptions, build_run_spec
    from pipeline.model import load_clip
    from store import create_store

    listing = list_dataset("folder", str(data_root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = load_clip("fsar-tiny-vit", "none")
    options = ExtractOptions("folder", str(data_root), str(path), "fsar-tiny-vit", "none")
    spec = build_run_spec(clip, options, "cpu", "fp32")
    return create_store(
        path, spec, listing.classes, listing.videos, dataset="folder", split_source="folder"
    )


TINY = ["--model", "fsar-tiny-vit", "--pretrained", "none", "--no-progress"]


def test_extract_store_must_be_a_local_directory(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    data = _folder_dataset(tmp_path / "data")
    (tmp_path / "f").write_text("mine")
    line = one_line_error(cli.extract_app, "--dataset", "folder", "--data-root", data, "--store", "f", *TINY)  # fmt: skip
    assert "--store f is a file" in line and (tmp_path / "f").read_text() == "mine"
    url = "http://127.0.0.1:9/stores/x"
    line = one_line_error(cli.extract_app, "--dataset", "folder", "--data-root", data, "--store", url, *TINY)  # fmt: skip
    assert f"--store {url}: fsar-extract writes a local directory" in line
    assert not (tmp_path / "http:").exists()


def test_resume_never_reads_paths_the_store_names(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path / "data")
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"not yours")
    for i, evil in enumerate((str(secret), "../secret.mp4", "train/a/../../../secret.mp4")):
        store = tmp_path / f"s{i}"
        with _resumable_store(data, store) as s:
            s.commit([{"row": 2, "relpath": evil}])
        line = one_line_error(cli.extract_app, "--dataset", "folder", "--data-root", data, "--store", store, *TINY)  # fmt: skip
        assert f"{store}: row 2 names video file {evil!r}" in line
        code, out = run(cli.store_app, "verify", store)  # and verify says so
        assert code == 1 and "BAD row 2 (val/c/v0) relpath: leaves the data root" in out
    from pipeline.datasets import DatasetError, video_path

    for evil in (str(secret), "../secret.mp4", "a/../../secret.mp4", "C:/x.mp4", "a\\..\\b"):
        with pytest.raises(DatasetError, match="leaves the data root"):
            video_path(data, evil)
    assert video_path(data, "train/a/v0.mp4") == data.resolve() / "train" / "a" / "v0.mp4"


def test_store_spec_never_names_weights_to_load(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = _folder_dataset(tmp_path / "data")
    store = tmp_path / "s"
    _resumable_store(data, store).close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pipeline.model import load_clip

        scripted = torch.jit.script(load_clip("fsar-tiny-vit", "none").model)
        (store / "weights").mkdir()
        torch.jit.save(scripted, str(store / "weights" / "evil.pt"))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("TorchScript was loaded"))
    meta = json.loads((store / "zarr.json").read_text())
    for named in (str(store / "weights" / "evil.pt"), "weights/evil.pt", "evil.pt", "no-such-tag"):
        meta["attributes"]["spec"]["pretrained"] = named
        (store / "zarr.json").write_text(json.dumps(meta))
        line = one_line_error(
            cli.extract_app, "--dataset", "folder", "--data-root", data, "--store", store,
            "--model", "fsar-tiny-vit", "--no-progress",
        )  # fmt: skip
        assert f"names pretrained {named!r}, which is not an open_clip tag" in line
        assert "pass --pretrained" in line
    line = one_line_error(
        cli.extract_app, "--dataset", "folder", "--data-root", data, "--store", tmp_path / "new",
        "--model", "fsar-tiny-vit", "--pretrained", store / "weights" / "evil.pt",
    )  # fmt: skip
    assert "is a TorchScript archive" in line and "--allow-torchscript" in line


def test_garbage_weights_message_is_whole(tmp_path: Path) -> None:
    data = _folder_dataset(tmp_path / "data")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    line = one_line_error(
        cli.extract_app, "--dataset", "folder", "--data-root", data, "--store", tmp_path / "s",
        "--model", "fsar-tiny-vit", "--pretrained", garbage,
    )  # fmt: skip
    assert line.startswith("error: cannot read weights file garbage.pt: ")
    assert line.endswith("pass a state dict saved by torch.save(model.state_dict()) or safetensors")


# ---------------------------------------------------------------------- --help
@pytest.mark.parametrize(
    ("app", "option", "text"),
    [
        (cli.train_app, "--out", "Run directory [runs/<head>-<store>-<time>]."),
        (cli.train_app, "--val-way", "Classes per validation episode [--way]."),
        (cli.train_app, "--device", "auto, cpu, cuda, cuda:1 ... [default: auto]"),
        (cli.eval_app, "--checkpoint", "Run directory [runs/latest]."),
        (cli.eval_app, "--store", "Store path [the store the run's config names]."),
        (cli.extract_app, "--store", "Store directory to create or resume (stores/<dataset>)."),
        (cli.synth_app, "--out", "Directory to write {train,val,test}/<class>/<video> into."),
    ],
)
def test_help_texts_are_shown_whole(app, option: str, text: str) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    assert re.search(re.escape(option) + r"\b.*?" + re.escape(text), flat), flat


def help_defaults(app) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """{option: the default its help shows} of the options that take a value."""
    result = runner.invoke(app, ["--help"], terminal_width=200, env={"COLUMNS": "200"})
    blocks: list[str] = []
    for line in result.output.splitlines():  # an option's block starts with "  --name"
        if line.startswith("  --"):
            blocks.append(line)
        elif blocks and line.startswith("   "):
            blocks[-1] += " " + line.strip()
    found = (re.match(r"\s+--([a-z-]+) <[^>]+> .*\[default: ([^\]]+)\]", b) for b in blocks)
    return dict(m.groups() for m in found if m)


@pytest.mark.parametrize(
    ("app", "owner", "count"),
    [
        (cli.train_app, "TrainConfig", 13),
        (cli.eval_app, "EvalOptions", 9),
        (cli.extract_app, "ExtractOptions", 7),
    ],
)
def test_help_shows_the_defaults_of_the_options_dataclass(app, owner: str, count: int) -> None:  # type: ignore[no-untyped-def]
    """One owner per default: what --help shows is the options dataclass's value, not a copy."""
    import heads.config
    import pipeline.options

    options = getattr(heads.config, owner, None) or getattr(pipeline.options, owner)
    shown = help_defaults(app)
    assert len(shown) == count, shown
    for option, text in shown.items():
        assert text == str(getattr(options, option.replace("-", "_"))), option


def test_emp_loss_named_in_help_is_the_heads_default() -> None:
    import inspect

    from heads.emp import EMPNet

    flat = " ".join(runner.invoke(cli.train_app, ["--help"], terminal_width=200).output.split())
    assert f"double softmax) [{inspect.signature(EMPNet).parameters['loss'].default};" in flat


def test_train_passes_on_only_the_options_given(store: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The help shows TrainConfig's defaults, yet a default the user did not type never overrides
    a --preset or a --config file: the preset's lr stays, the typed --episodes wins."""
    seen = {}
    monkeypatch.setattr("heads.train.train", lambda cfg, **kw: seen.setdefault("cfg", cfg) and "r")
    config = tmp_path / "c.json"
    config.write_text('{"way": 3, "val_every": 8}')
    code, out = run(
        cli.train_app, "--store", store, "--preset", "hmdb51", "--config", config,
        "--episodes", "16", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, out
    cfg = seen["cfg"]
    assert (cfg.lr, cfg.episodes_per_step, cfg.episodes, cfg.way) == (1e-4, 8, 16, 3)
