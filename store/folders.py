"""Folders and files built whole: under a temp name beside the target, renamed into place at the end.

A failure (a full disk included) leaves nothing half-made, so the rerun works; a full disk is one
line (`DiskFullError`). Store-side until `runtime/files.py` offers the same gate; then it moves there.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from .errors import DiskFullError, StoreError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_MARK = ".building-"
SETTLE_S = 60.0  # the longest wait for writes a failed batch left in flight


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full(target: Path | str, what: str) -> DiskFullError:
    return DiskFullError(
        f"{target}: no space left on the device while {what}; nothing was kept "
        "(free some space and run it again)"
    )


def check_new_folder(target: Path, option: str = "") -> None:
    """`target` must not exist, or be an empty directory that is not a link."""
    name = f"{option} {target}".strip()
    if target.is_symlink() or (target.exists() and (not target.is_dir() or any(target.iterdir()))):
        raise StoreError(f"{name} exists and is not an empty directory: choose another")


def _remove_stale(target: Path) -> None:
    """Temp folders of `target` left by processes that no longer run (a kill, a crash)."""
    prefix = f".{target.name}{_MARK}"
    for old in target.parent.glob(f"{prefix}*"):
        pid = old.name[len(prefix) :]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


async def _in_flight() -> None:
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    if others:
        await asyncio.wait(others, timeout=SETTLE_S)


def _discard(tmp: Path) -> None:
    """Remove a temp folder once the writes zarr still has in flight are done: when one write of a
    batch fails (zarr gathers an array's and its parents' zarr.json), its siblings keep running and
    would create their folders again after the removal (seen on a full tmpfs)."""
    from zarr.core.sync import sync

    sync(_in_flight())
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def building(target: Path, what: str) -> Iterator[Path]:
    """Yield a fresh folder beside `target`; rename it to `target` when the block succeeds, remove
    it when anything fails. `target` must not exist or be an empty directory."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.with_name(f".{target.name}{_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if target.is_dir() and not target.is_symlink():
            target.rmdir()  # empty (checked by the caller): the rename takes its place
        os.rename(tmp, target)
    except (OSError, DiskFullError) as exc:
        _discard(tmp)
        if is_disk_full(exc) or isinstance(exc, DiskFullError):  # named after `target`, not tmp
            raise disk_full(target, what) from None
        raise
    except BaseException:
        _discard(tmp)
        raise


@contextmanager
def writing_file(target: Path, what: str) -> Iterator[Path]:
    """Yield a temp file name beside `target`, renamed to `target` when the block succeeds."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(target, what) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
