"""Dataset listings: the shipped few-shot splits (`pipeline/splits/`) or a `folder` tree -> videos table.

`list_dataset(name, data_root)` returns the class list (train, then val, then test, in split-file
order) and a DataFrame with `video_id`, `relpath` (relative to the data root), `class_name`, `split`,
`status` (`pending`, or `failed` for listed videos that are not on disk) and `error` (`missing`).

Class names for prompts: `*_class_names_from_config.txt` verbatim (train, test); val names from
`val_class_index.tsv` with the rule that turns the train/test folder names into the config names
(underscores to spaces; UCF101 CamelCase split into words). SSv2-Full's val names are in no list: they
are read from the user's SSv2 label files (per-video `template` fields), else placeholders are used and
a note says so.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.hashing import in_part
from runtime.errors import FsarError

if TYPE_CHECKING:  # imported where used: the CLI reads DATASETS when it starts
    import pandas as pd

SPLITS = ("train", "val", "test")
LISTED_DATASETS = ("hmdb51", "ucf101", "kinetics100", "ssv2_small", "ssv2_full")
DATASETS = (*LISTED_DATASETS, "folder")
SPLITS_DIR = Path(__file__).resolve().parent / "splits"
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
SSV2_LABEL_FILES = (
    "something-something-v2-train.json",
    "something-something-v2-validation.json",
    "train.json",
    "validation.json",
)
SSV2_LABEL_DIRS = ("", "labels", "annotations", "label")

LAYOUTS = {
    "hmdb51": "DATA_ROOT/<class>/<video>.avi or DATA_ROOT/videos/<class>/<video>.avi "
    "(e.g. DATA_ROOT/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi)",
    "ucf101": "DATA_ROOT/<Class>/v_<Class>_gXX_cYY.avi, DATA_ROOT/videos/<Class>/... "
    "or DATA_ROOT/UCF-101/<Class>/...",
    "kinetics100": "DATA_ROOT/train_256/<class>/<youtube id>_<start>_<end>.mp4 and "
    "DATA_ROOT/val_256/<class>/<youtube id>.mp4 (.mkv/.webm also accepted)",
    "ssv2_small": "DATA_ROOT/<id>.webm or DATA_ROOT/<id>.mp4 "
    "(also DATA_ROOT/20bn-something-something-v2/<id>.webm)",
    "ssv2_full": "DATA_ROOT/<id>.webm or DATA_ROOT/<id>.mp4 "
    "(also DATA_ROOT/20bn-something-something-v2/<id>.webm)",
    "folder": "DATA_ROOT/{train,val,test}/<class name>/<video>",
}


class DatasetError(FsarError):
    """A dataset problem the user can fix; the message is one line."""


@dataclass
class DatasetListing:
    """Classes (train, val, test order), videos table and notes to show the user."""

    dataset: str
    classes: list[str]
    videos: pd.DataFrame
    split_source: str
    notes: list[str] = field(default_factory=list)


def video_path(data_root: str | Path, relpath: str) -> Path:
    """The file of a manifest `relpath`: relative, no `..`, inside the data root (checked on read)."""
    rel = str(relpath)
    parts = rel.split("/")
    drive = re.match(r"^[A-Za-z]:", rel)
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or ".." in parts or drive:
        raise DatasetError(f"video path {rel!r} leaves the data root; refusing to read it")
    root = os.path.normpath(os.path.abspath(data_root))
    path = os.path.normpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root:
        raise DatasetError(f"video path {rel!r} leaves the data root; refusing to read it")
    return Path(path)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tidy_class_name(folder_name: str, dataset: str) -> str:
    name = folder_name.replace("_", " ")
    if dataset == "ucf101":
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return name


@dataclass
class _ListedVideo:
    split: str
    class_index: int
    path: str  # as written in the split file (relative path, or SSv2 numeric id)


_LINE = re.compile(r"^(train|val|test)(\d+)/(/?)(.+)$")


def read_split_file(path: Path) -> list[_ListedVideo]:
    """Parse `<split><classIdx>//<relative path>` or `<split><classIdx>/<ssv2 id>` lines."""
    videos = []
    for number, line in enumerate(_lines(path), 1):
        match = _LINE.match(line)
        if not match:
            raise DatasetError(f"{path}:{number}: cannot parse {line!r}")
        videos.append(_ListedVideo(match.group(1), int(match.group(2)), match.group(4)))
    return videos


def _ssv2_templates(data_root: Path) -> tuple[dict[str, str], list[Path]]:
    """video id -> template (e.g. 'Putting [something] on a surface') from the user's label files."""
    templates: dict[str, str] = {}
    used = []
    for folder in SSV2_LABEL_DIRS:
        for name in SSV2_LABEL_FILES:
            path = data_root / folder / name
            if not path.is_file():
                continue
            try:
                entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise DatasetError(f"{path}: not a readable SSv2 label file ({error})") from None
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if isinstance(entry, dict) and "id" in entry and "template" in entry:
                    templates[str(entry["id"])] = str(entry["template"])
            used.append(path)
    return templates, used


def _class_names(dataset: str, data_root: Path, listed: list[_ListedVideo]) -> tuple[dict, list]:
    """(split, class index) -> class name, plus notes for the user."""
    folder = SPLITS_DIR / dataset
    names: dict[tuple[str, int], str] = {}
    notes: list[str] = []
    for split in ("train", "test"):
        for index, name in enumerate(_lines(folder / f"{split}_class_names_from_config.txt")):
            names[(split, index)] = name
    val_index = folder / "val_class_index.tsv"
    n_val = max((v.class_index for v in listed if v.split == "val"), default=-1) + 1
    if dataset == "ssv2_small":
        for line in _lines(val_index):
            key, name = line.split("\t", 1)
            names[("val", int(key[3:]))] = name
    elif dataset != "ssv2_full":
        for line in _lines(val_index):
            key, name = line.split("\t", 1)
            names[("val", int(key[3:]))] = _tidy_class_name(name, dataset)
    else:
        templates, used = _ssv2_templates(data_root)
        votes: dict[int, Counter[str]] = {k: Counter() for k in range(n_val)}
        for video in listed:
            if video.split == "val" and video.path in templates:
                votes[video.class_index][templates[video.path]] += 1
        unresolved = [k for k in range(n_val) if not votes[k]]
        for k in range(n_val):
            names[("val", k)] = (
                votes[k].most_common(1)[0][0] if votes[k] else f"ssv2 full val class {k}"
            )
        if unresolved:
            looked_for = ", ".join(SSV2_LABEL_FILES[:2])
            found = f" (read {', '.join(str(p) for p in used)})" if used else ""
            notes.append(
                f"ssv2_full: val class names are not in the split lists and {len(unresolved)} of "
                f"{n_val} could not be read from the SSv2 label files{found}; put {looked_for} "
                f"(or labels/train.json, labels/validation.json) in DATA_ROOT to name them; "
                f"using placeholders 'ssv2 full val class K'"
            )
        else:
            notes.append(f"ssv2_full: val class names read from {', '.join(map(str, used))}")
    return names, notes


def _candidates(dataset: str, path: str) -> list[str]:
    """Relative paths where a listed video may be, in order of preference."""
    if dataset in ("ssv2_small", "ssv2_full"):
        return [
            f"{prefix}{path}{suffix}"
            for prefix in ("", "20bn-something-something-v2/", "videos/")
            for suffix in (".webm", ".mp4")
        ]
    if dataset in ("hmdb51", "ucf101"):
        inner = path[len("videos/") :] if path.startswith("videos/") else path
        options = [path, inner]
        if dataset == "ucf101":
            options.append(f"UCF-101/{inner}")
        return options
    stem = path.rsplit(".", 1)[0]
    top, _, rest = stem.partition("/")
    class_folder, _, file_stem = rest.partition("/")
    options = [path] + [stem + s for s in (".mp4", ".mkv", ".webm") if not path.endswith(s)]
    spaced = f"{top}/{class_folder.replace('_', ' ')}/{file_stem}"
    options += [spaced + s for s in (".mp4", ".mkv", ".webm")]
    return options


def _video_id(dataset: str, path: str) -> str:
    if dataset in ("ssv2_small", "ssv2_full"):
        return path
    return path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path


class _DirectoryCache:
    """`exists(relpath)` from one listing per directory (fast for 100k-file flat folders)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.listings: dict[str, set[str]] = {}

    def exists(self, relpath: str) -> bool:
        parent, _, name = relpath.rpartition("/")
        if parent not in self.listings:
            try:
                self.listings[parent] = set(os.listdir(self.root / parent))
            except OSError:
                self.listings[parent] = set()
        return name in self.listings[parent]


def _list_from_splits(dataset: str, data_root: Path) -> DatasetListing:
    folder = SPLITS_DIR / dataset
    listed: list[_ListedVideo] = []
    for split in SPLITS:
        listed += read_split_file(folder / f"{split}_few_shot.txt")
    names, notes = _class_names(dataset, data_root, listed)
    classes = [names[key] for key in sorted(names, key=lambda k: (SPLITS.index(k[0]), k[1]))]
    if len(set(classes)) != len(classes):
        duplicated = [name for name, count in Counter(classes).items() if count > 1]
        raise DatasetError(f"{dataset}: class names repeat across splits: {duplicated[:3]}")
    rows = []
    preferred = 0  # the candidate layout that matched last time is tried first
    on_disk = _DirectoryCache(data_root)
    for video in listed:
        options = _candidates(dataset, video.path)
        order = [preferred, *(i for i in range(len(options)) if i != preferred)]
        found_at = next((i for i in order if on_disk.exists(options[i])), None)
        found = options[found_at] if found_at is not None else None
        preferred = found_at if found_at is not None else preferred
        rows.append(
            {
                "video_id": _video_id(dataset, video.path),
                "relpath": found if found is not None else options[0],
                "class_name": names[(video.split, video.class_index)],
                "split": video.split,
                "status": "pending" if found is not None else "failed",
                "error": None if found is not None else "missing",
            }
        )
    import pandas as pd

    videos = pd.DataFrame(rows)
    n_missing = int((videos["status"] == "failed").sum())
    if n_missing == len(videos):
        raise DatasetError(
            f"no {dataset} video found under {data_root}: expected {LAYOUTS[dataset]}"
        )
    if n_missing:
        notes.append(
            f"{dataset}: {n_missing} of {len(videos)} listed videos are not under {data_root} "
            f"(recorded as failed: missing)"
        )
    return DatasetListing(dataset, classes, videos, "emp_net", notes)


def _list_folder(data_root: Path) -> DatasetListing:
    rows = []
    classes: list[str] = []
    for split in SPLITS:
        split_dir = data_root / split
        if not split_dir.is_dir():
            continue
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if class_dir.name.startswith("."):
                continue
            class_name = class_dir.name.replace("_", " ")
            if class_name in classes:
                raise DatasetError(
                    f"class {class_name!r} appears in more than one split under {data_root}: "
                    "few-shot splits must have disjoint classes"
                )
            videos = sorted(
                p
                for p in class_dir.iterdir()
                if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")
            )
            if not videos:
                continue
            classes.append(class_name)
            for video in videos:
                rows.append(
                    {
                        "video_id": f"{split}/{class_dir.name}/{video.stem}",
                        "relpath": f"{split}/{class_dir.name}/{video.name}",
                        "class_name": class_name,
                        "split": split,
                        "status": "pending",
                        "error": None,
                    }
                )
    if not rows:
        raise DatasetError(f"no videos found under {data_root}: expected {LAYOUTS['folder']}")
    import pandas as pd

    table = pd.DataFrame(rows)
    duplicated = table["video_id"][table["video_id"].duplicated()]
    if len(duplicated):
        raise DatasetError(
            f"two videos share the id {duplicated.iloc[0]!r} (same name, different extension): "
            "rename one"
        )
    return DatasetListing("folder", classes, table, "folder")


def list_dataset(dataset: str, data_root: str | Path) -> DatasetListing:
    """All videos of `dataset` under `data_root` (listed-but-absent ones as `failed: missing`)."""
    data_root = Path(data_root)
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not data_root.is_dir():
        raise DatasetError(
            f"--data-root {data_root} is not a directory: expected {LAYOUTS[dataset]}"
        )
    if dataset == "folder":
        return _list_folder(data_root)
    return _list_from_splits(dataset, data_root)


def parse_part(text: str | None) -> tuple[int, int] | None:
    """`"I/N"` -> (I, N) with 1 <= I <= N; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise DatasetError(f"--part {text!r}: use I/N with 1 <= I <= N, e.g. --part 2/4")
    return int(match.group(1)), int(match.group(2))


def parse_splits(text: str | None) -> list[str] | None:
    """`"train,val"` -> ["train", "val"]; None means all splits."""
    if text is None:
        return None
    splits = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if not splits or unknown:
        raise DatasetError(f"--splits {text!r}: use a comma-separated subset of train,val,test")
    return splits


def select_videos(
    videos: pd.DataFrame, splits: list[str] | None = None, part: tuple[int, int] | None = None
) -> pd.Series:
    """Boolean mask of the videos in `splits` (all if None) and in part I of N by `video_id` hash."""
    import pandas as pd

    mask = pd.Series(True, index=videos.index)
    if splits is not None:
        mask &= videos["split"].isin(splits)
    if part is not None:
        index, count = part
        mask &= videos["video_id"].map(lambda vid: in_part(str(vid), index, count))
    return mask
