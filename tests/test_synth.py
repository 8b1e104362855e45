"""The synthetic reversal-pair dataset: layout, disjoint splits, containers, and reversal symmetry."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.datasets import DatasetError, list_dataset
from pipeline.synth import FAMILIES, State, make_synthetic_dataset, render_frame, render_video
from runtime.values import OptionError


def test_synthetic_dataset_layout_and_splits(tmp_path: Path) -> None:
    description = make_synthetic_dataset(tmp_path, classes=8, videos_per_class=3, seed=5)
    listing = list_dataset("folder", tmp_path)
    splits = description["classes"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 2, 2]
    assert sorted(listing.classes) == sorted(c for s in splits.values() for c in s)
    assert listing.videos.groupby("split").size().to_dict() == {"train": 12, "val": 6, "test": 6}
    # every class sits in its split together with its time reversal
    split_of = {c: s for s, names in splits.items() for c in names}
    for forward, backward in description["pairs"]:
        assert split_of[forward] == split_of[backward]
    suffixes = {Path(p).suffix for p in listing.videos["relpath"]}
    assert suffixes <= {".mp4", ".avi", ".webm"} and len(suffixes) >= 2
    saved = json.loads((tmp_path / "synth.json").read_text())
    assert saved["pairs"] == description["pairs"] and saved["videos"] == 24
    for relpath in listing.videos["relpath"][:6]:
        with av.open(str(tmp_path / relpath)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert 16 <= len(frames) <= 40 and frames[0].shape[0] <= 112
        assert not np.array_equal(frames[0], frames[-1])


def test_default_dataset_needs_a_smaller_validation_way() -> None:
    # fsar-synth's default 20 classes: 10 train, 4 val, 6 test, so training it takes --val-way 4
    from heads.config import TrainConfig
    from pipeline.synth import split_pairs

    classes = {split: 2 * len(pairs) for split, pairs in split_pairs(20 // 2).items()}
    assert classes == {"train": 10, "val": 4, "test": 6}
    assert classes["val"] < TrainConfig().way


def test_same_seed_same_videos(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", classes=6, videos_per_class=3, seed=3)
    b = make_synthetic_dataset(tmp_path / "b", classes=6, videos_per_class=3, seed=3)
    assert a == b
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    assert files_a == files_b
    videos = [f for f in files_a if f.suffix in (".mp4", ".avi", ".webm")]
    assert {f.suffix for f in videos} == {".mp4", ".avi", ".webm"}
    for name in videos:  # the same pixels (webm files differ in a random segment id only)
        np.testing.assert_array_equal(
            decoded(tmp_path / "a" / name), decoded(tmp_path / "b" / name), err_msg=str(name)
        )


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("family", range(len(FAMILIES)))
def test_reversed_class_shows_the_same_frames_backwards(family: int) -> None:
    _, _, motion = FAMILIES[family]
    jitter = np.array([0.3, -0.2, 0.5, 0.1])
    colour, background = np.array([250.0, 40, 40]), np.array([20.0, 20, 90])

    def frame(t: float) -> np.ndarray:
        return render_frame(motion(t, jitter), "square", 0.15, colour, background, 80, 64)

    assert not np.array_equal(frame(0.0), frame(1.0))  # the motion changes the picture
    assert not np.array_equal(frame(0.25), frame(0.75))
    forward, fps, container = render_video(motion, False, np.random.default_rng(family))
    backward, fps_b, container_b = render_video(motion, True, np.random.default_rng(family))
    assert (fps, container) == (fps_b, container_b)
    np.testing.assert_array_equal(backward, forward[::-1])
    assert render_frame(State(), "circle", 0.15, colour, background, 80, 64).shape == (64, 80, 3)


def test_bad_arguments() -> None:
    with pytest.raises(DatasetError, match="even number"):
        make_synthetic_dataset("unused", classes=7)
    with pytest.raises(OptionError, match="videos-per-class"):
        make_synthetic_dataset("unused", classes=6, videos_per_class=0)


def test_fsar_synth_command(tmp_path: Path) -> None:
    from cli import app, synth_app

    result = CliRunner().invoke(
        synth_app, ["--out", str(tmp_path / "d"), "--classes", "6", "--videos-per-class", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "6 classes" in result.output and (tmp_path / "d" / "synth.json").exists()
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "e"), "--classes", "5"])
    assert result.exit_code == 2 and "--classes" in result.output
