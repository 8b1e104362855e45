"""Dataset listings from the shipped splits and from folders, with fake layouts of empty files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.datasets import (
    SPLITS_DIR,
    DatasetError,
    list_dataset,
    parse_part,
    parse_splits,
    read_split_file,
    select_videos,
)


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def listed_paths(dataset: str, split: str) -> list[str]:
    return [v.path for v in read_split_file(SPLITS_DIR / dataset / f"{split}_few_shot.txt")]


def test_hmdb51_class_folders_without_videos_prefix(tmp_path: Path) -> None:
    all_paths = [p for split in ("train", "val", "test") for p in listed_paths("hmdb51", split)]
    absent = set(all_paths[:3])
    for path in all_paths:
        if path not in absent:
            touch(tmp_path / path.removeprefix("videos/"))
    listing = list_dataset("hmdb51", tmp_path)
    assert len(listing.classes) == 51
    assert listing.classes[:3] == ["brush hair", "catch", "chew"]
    assert "draw_sword" in listing.classes[:31]  # config names verbatim, quirks included
    assert listing.classes[31:33] == ["cartwheel", "eat"]
    assert "shoot ball" in listing.classes[31:41]  # val names from val_class_index.tsv, tidied
    assert listing.classes[41:44] == ["fencing", "kick", "kick ball"]
    videos = listing.videos
    assert list(videos.columns) == ["video_id", "relpath", "class_name", "split", "status", "error"]
    assert videos.groupby("split").size().to_dict() == {"train": 4280, "val": 1194, "test": 1292}
    first = videos.iloc[3]
    assert first["video_id"] == all_paths[3].removesuffix(".avi")
    assert first["video_id"].startswith("videos/brush_hair/")
    assert first["relpath"] == all_paths[3].removeprefix("videos/")
    assert first["class_name"] == "brush hair"
    missing = videos[videos["status"] == "failed"]
    assert len(missing) == 3 and set(missing["error"]) == {"missing"}
    assert any("3 of 6766" in note for note in listing.notes)


def test_ucf101_listed_layout_and_camel_case_val_names(tmp_path: Path) -> None:
    for path in listed_paths("ucf101", "val")[:5]:
        touch(tmp_path / path)
    listing = list_dataset("ucf101", tmp_path)
    assert listing.classes[70:72] == ["Apply Lipstick", "Cricket Shot"]
    assert "Blow DryHair" in listing.classes  # config spelling kept
    found = listing.videos[listing.videos["status"] == "pending"]
    assert len(found) == 5 and found["relpath"].str.startswith("videos/ApplyLipstick/").all()


def test_kinetics100_train_256_val_256_and_mkv(tmp_path: Path) -> None:
    val = listed_paths("kinetics100", "val")
    train = listed_paths("kinetics100", "train")
    touch(tmp_path / train[0])
    val_256 = next(p for p in val if p.startswith("val_256/"))
    touch(tmp_path / val_256.replace(".mp4", ".mkv"))
    listing = list_dataset("kinetics100", tmp_path)
    ok = listing.videos[listing.videos["status"] == "pending"].set_index("video_id")
    assert ok.loc[train[0].removesuffix(".mp4"), "relpath"] == train[0]
    assert ok.loc[val_256.removesuffix(".mp4"), "relpath"] == val_256.replace(".mp4", ".mkv")
    assert ok.loc[val_256.removesuffix(".mp4"), "class_name"] == "baking cookies"
    assert listing.classes[0] == "air drumming" and len(listing.classes) == 100


def test_ssv2_small_webm_and_mp4(tmp_path: Path) -> None:
    ids = listed_paths("ssv2_small", "train")[:2] + listed_paths("ssv2_small", "val")[:1]
    touch(tmp_path / f"{ids[0]}.webm")
    touch(tmp_path / f"{ids[1]}.mp4")
    touch(tmp_path / "20bn-something-something-v2" / f"{ids[2]}.webm")
    listing = list_dataset("ssv2_small", tmp_path)
    ok = listing.videos[listing.videos["status"] == "pending"].set_index("video_id")
    assert ok["relpath"].to_dict() == {
        ids[0]: f"{ids[0]}.webm",
        ids[1]: f"{ids[1]}.mp4",
        ids[2]: f"20bn-something-something-v2/{ids[2]}.webm",
    }
    assert listing.classes[0] == "Pouring [something] into [something]"
    assert listing.classes[64] == "Lifting something up completely without letting it drop down"


def test_ssv2_full_val_names_from_label_files_or_placeholders(tmp_path: Path) -> None:
    val_lines = (SPLITS_DIR / "ssv2_full" / "val_few_shot.txt").read_text().split()
    touch(tmp_path / f"{listed_paths('ssv2_full', 'train')[0]}.webm")
    without = list_dataset("ssv2_full", tmp_path)
    assert without.classes[64] == "ssv2 full val class 0"
    assert any("val class names" in n and "something-something-v2" in n for n in without.notes)

    entries = []
    for line in val_lines:
        key, video = line.split("/")
        entries.append({"id": video, "template": f"Template number {int(key[3:])} of [something]"})
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "validation.json").write_text(json.dumps(entries[:1000]))
    (tmp_path / "labels" / "train.json").write_text(json.dumps(entries[1000:]))
    named = list_dataset("ssv2_full", tmp_path)
    assert named.classes[64:67] == [f"Template number {k} of [something]" for k in range(3)]
    assert named.classes[:2] == ["Bending [something] until it breaks", "Closing [something]"]
    assert len(named.classes) == 100
    assert any("read from" in n for n in named.notes)


@pytest.mark.parametrize("dataset", ["hmdb51", "ucf101", "kinetics100", "ssv2_small", "ssv2_full"])
def test_no_video_found_names_the_expected_layout(tmp_path: Path, dataset: str) -> None:
    with pytest.raises(
        DatasetError, match=rf"^no {dataset} video found under .*: expected DATA_ROOT"
    ):
        list_dataset(dataset, tmp_path)


def test_folder_dataset(tmp_path: Path) -> None:
    for rel in (
        "train/jumping_jacks/b.mp4",
        "train/jumping_jacks/a.avi",
        "train/archery/x.webm",
        "train/archery/notes.txt",
        "val/diving/d.mkv",
        "test/push_ups/p.mp4",
    ):
        touch(tmp_path / rel)
    listing = list_dataset("folder", tmp_path)
    assert listing.classes == ["archery", "jumping jacks", "diving", "push ups"]
    assert listing.videos["video_id"].tolist() == [
        "train/archery/x",
        "train/jumping_jacks/a",
        "train/jumping_jacks/b",
        "val/diving/d",
        "test/push_ups/p",
    ]
    assert listing.videos["relpath"].tolist()[0] == "train/archery/x.webm"
    assert (listing.videos["status"] == "pending").all()


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"expected DATA_ROOT/\{train,val,test\}/<class name>"):
        list_dataset("folder", tmp_path)
    with pytest.raises(DatasetError, match="is not a directory"):
        list_dataset("folder", tmp_path / "nowhere")
    touch(tmp_path / "train/run/a.mp4")
    touch(tmp_path / "test/run/b.mp4")
    with pytest.raises(DatasetError, match="more than one split"):
        list_dataset("folder", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        list_dataset("kinetics400", tmp_path)


def test_splits_and_part_filters(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        for k in range(30):
            touch(tmp_path / split / f"class_{split}" / f"v{k}.mp4")
    videos = list_dataset("folder", tmp_path).videos
    assert select_videos(videos, parse_splits("val,test")).sum() == 60
    parts = [select_videos(videos, None, parse_part(f"{i}/3")) for i in (1, 2, 3)]
    assert sum(int(p.sum()) for p in parts) == 90
    assert not (parts[0] & parts[1]).any() and all(p.sum() > 10 for p in parts)
    both = select_videos(videos, ["train"], (2, 3))
    assert (videos[both]["split"] == "train").all() and both.sum() == (
        parts[1] & (videos["split"] == "train")
    ).sum()
    for bad in ("0/3", "4/3", "a/b", "1-3"):
        with pytest.raises(DatasetError, match="--part"):
            parse_part(bad)
    with pytest.raises(DatasetError, match="--splits"):
        parse_splits("train,holdout")


def test_every_listed_benchmark_has_its_released_preset() -> None:
    """Dataset names have one owner (pipeline.datasets); the presets (heads.config, which may not
    import pipeline/) are keyed by the same names."""
    from heads.config import PRESETS
    from pipeline.datasets import LISTED_DATASETS

    assert list(PRESETS) == list(LISTED_DATASETS)
