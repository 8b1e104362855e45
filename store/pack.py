"""A store as one file: `pack` a directory into a zip of stored members, `unpack` it back safely.

The packed file opens directly (`open_store`), read in place; `unpack` writes nothing outside its
destination and keeps the result only when every row, text array and weights file verifies.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from pathlib import Path

from .errors import CorruptStoreError, NotAStoreError, StoreError
from .featurestore import FeatureStore, open_store
from .folders import building, check_new_folder, writing_file
from .layout import LOCK_FILE
from .location import ZIP_DAMAGE, ZIP_FORMAT_DAMAGE, check_zip_members, one_line, resolve
from .lock import StoreLock


def _is_temp(name: str) -> bool:
    return name.startswith(".") and (".tmp-" in name or name.endswith(".part"))


def pack(src: str | Path, out: str | Path) -> int:
    """Write a local store directory into one zip file with uncompressed members; returns bytes.

    The file opens directly (`open_store(out)`, `fsar-train --store out`): chunks are already
    compressed, and stored members can be read without unpacking.
    """
    location = resolve(src)
    if location.local is None:
        raise StoreError(
            f"pack needs a local store directory; {location.describe()} is a {location.kind} store "
            "(fsar-store subset it to a directory first)"
        )
    root = location.local
    StoreLock(root / LOCK_FILE).check_free()  # a lock left by a killed run does not count
    with open_store(root) as s:  # validates the store before anything is written
        problems = s.verify([])  # text and weights only; rows are checked by `fsar-store verify`
    if problems:
        raise CorruptStoreError(
            f"{location.describe()}: {problems[0]}; nothing was packed (run fsar-store verify)"
        )
    out = Path(out)
    if out.exists():
        raise StoreError(f"{out} exists: remove it or choose another name")
    members: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in sorted(dirnames + filenames):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                raise StoreError(f"{src}: {rel} is a symbolic link; packs hold plain files only")
        dirnames.sort()
        for name in sorted(filenames):
            rel = (here / name).relative_to(root).as_posix()
            if rel == LOCK_FILE or _is_temp(name):
                continue
            members.append((here / name, rel))
    members.sort(key=lambda m: (m[1] != "zarr.json", m[1]))
    with writing_file(out, "packing the store") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for path, rel in members:
                zf.write(path, rel)
    return out.stat().st_size


def unpack(file: str | Path, dest: str | Path) -> FeatureStore:
    """Restore a packed store into directory `dest`; nothing is ever written outside `dest`.

    Members with absolute names, `..`, drive letters, link modes or compression are refused before
    anything is written; files are created exclusively (an existing file or link is never followed).
    The result is verified (every row, text array and weights file); if anything fails, `dest` is
    left as it was.
    """
    file, dest = Path(file), Path(dest)
    if not file.is_file():
        raise NotAStoreError(f"store not found: {file}")
    if not zipfile.is_zipfile(file):
        raise NotAStoreError(f"not a packed store: {file} (fsar-store pack writes one)")
    check_new_folder(dest)
    try:
        archive = zipfile.ZipFile(file)
    except ZIP_DAMAGE as exc:
        raise NotAStoreError(f"not a packed store: {file} (damaged zip: {one_line(exc)})") from exc
    with archive as zf:
        check_zip_members(zf, str(file))
        if "zarr.json" not in zf.namelist():
            raise NotAStoreError(f"not a packed store: {file} (no zarr.json inside)")
        with building(dest, "unpacking the store") as folder:
            _extract(zf, folder, file)
            _verify_restored(folder, file)
    return open_store(dest, verify=True)


def _extract(zf: zipfile.ZipFile, folder: Path, file: Path) -> None:
    """Every member into `folder`, created exclusively, never through a link."""
    root_real = os.path.realpath(folder)
    try:
        for info in zf.infolist():
            target = folder / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            parent_real = os.path.realpath(target.parent)
            if parent_real != root_real and not parent_real.startswith(root_real + os.sep):
                raise StoreError(f"{file}: member {info.filename!r} would land outside the store")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(target, flags, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
            with os.fdopen(fd, "wb") as fh, zf.open(info) as src:
                shutil.copyfileobj(src, fh, 1 << 20)
    except ZIP_FORMAT_DAMAGE as exc:
        raise CorruptStoreError(f"{file} is damaged ({one_line(exc)})") from exc


def _verify_restored(folder: Path, file: Path) -> None:
    """Every row, text array and weights file against its checksum before anyone uses it."""
    with open_store(folder, verify=True) as restored:
        problems = restored.verify()
    if problems:
        raise CorruptStoreError(
            f"{file}: {problems[0]} ({len(problems)} problem(s)); nothing was unpacked"
        )
