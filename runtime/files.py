"""The one gate for files fsar reads from folders it does not trust or writes into folders.

Reads take regular files only (a link, FIFO, device or folder is refused without being opened for
reading or followed), at most a stated number of bytes, and JSON at most MAX_JSON_DEPTH levels deep.
Writes go through `write_file`: a temp file in the same folder, written, fsynced and renamed over
the target, never through a link, and removed on any error; a full disk is one line (DiskFullError).
`append_line` adds a record to an append-only log the same careful way, and `building` makes a
folder under a temp name that takes its real name only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from runtime.errors import FsarError

MAX_JSON_DEPTH = 64  # nesting of any JSON document fsar reads (its own are at most 6 deep)
JSON_CAP = 16 << 20  # bytes of a JSON file fsar reads (a run's config.json is a few KB)
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class FileRefused(FsarError):
    """A file fsar will not read or write as it is (a link, not a regular file, too large, too deep)."""


class DiskFullError(FsarError):
    """The disk filled up during a write; what was there before is unchanged."""


# ---------------------------------------------------------------------------------------- reads
def _open_regular(path: Path, what: str) -> tuple[int, os.stat_result]:
    """A read descriptor of the regular file `path` and its stat, or FileRefused.

    Opened without following a final link and without blocking (a FIFO is refused, not waited on),
    then checked on the open descriptor, so the file read is the file checked."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileRefused(f"{what} {path} does not exist") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileRefused(f"{what} {path} is a link; fsar reads only regular files") from None
        raise FileRefused(f"{what} {path} cannot be read ({error.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FileRefused(f"{what} {path} is not a regular file (a folder, FIFO or device)")
    return fd, info


def regular_file(path: str | Path, cap: int | None, what: str = "file") -> Path:
    """`path`, checked to be a regular file (not a link, FIFO, device or folder) of at most `cap`
    bytes (None: any size), for a library that opens it by name (safetensors, pyarrow)."""
    fd, info = _open_regular(Path(path), what)
    os.close(fd)
    if cap is not None and info.st_size > cap:
        raise FileRefused(f"{what} {path} holds {info.st_size:,} bytes, more than {cap:,}")
    return Path(path)


def read_bytes(path: str | Path, cap: int, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, at most `cap` of them; anything else is refused."""
    fd, info = _open_regular(Path(path), what)
    with os.fdopen(fd, "rb") as f:
        if info.st_size > cap:
            raise FileRefused(f"{what} {path} holds {info.st_size:,} bytes, more than {cap:,}")
        data = f.read(cap + 1)
    if len(data) > cap:  # it grew while read
        raise FileRefused(f"{what} {path} holds more than {cap:,} bytes")
    return data


def json_depth(data: bytes | str) -> int:
    """How deeply arrays and objects nest in a JSON text (strings do not count), without parsing."""
    raw = data.encode() if isinstance(data, str) else data
    codes = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.isin(codes, (91, 123)).astype(np.int64) - np.isin(codes, (93, 125))
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: bytes | str, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON document from untrusted bytes: nested at most `max_depth` levels, else one line."""
    if json_depth(data) > max_depth:
        raise FileRefused(f"{what} nests JSON more than {max_depth} levels deep; refusing it")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise FileRefused(f"{what} is not valid JSON ({type(error).__name__})") from None


def read_json(path: str | Path, what: str = "file", cap: int = JSON_CAP) -> Any:
    """`parse_json` of `read_bytes(path, cap)`."""
    return parse_json(read_bytes(path, cap, what), f"{what} {path}")


# --------------------------------------------------------------------------------------- writes
def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise FileRefused(f"{path} is a link; fsar does not write through links (remove it)")
    if path.exists() and not path.is_file():
        raise FileRefused(f"{path} is not a regular file; fsar will not replace it")


def _disk_full(path: Path, error: OSError) -> DiskFullError:
    return DiskFullError(
        f"{path.parent}: the disk is full (writing {path.name}); free space and rerun: "
        "the previous file, if any, is unchanged"
    )


def write_file(path: str | Path, data: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Replace `path` by `data` (bytes, text, or a function writing to a binary file object).

    The content goes to a temp file in the same folder, is fsynced and renamed over `path`, so a
    reader sees the old file or the new one, never half of one. A link or non-file at `path` is
    refused; the temp file is removed on any error, and a full disk raises DiskFullError."""
    path = Path(path)
    _refuse_link(path)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise _disk_full(path, error) from None
        raise
    _sync_folder(path.parent)


def append_line(path: str | Path, line: str) -> None:
    """Append one record (a line, newline added) to the append-only log `path`, creating it.

    Opened without following a link and checked to be a regular file; the line is written in one
    call and fsynced. A crash or a full disk can cut the last line: readers of the log drop a cut
    last record (`read_log_tail`), and a full disk raises DiskFullError."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileRefused(f"{path} is a link; fsar does not write through links") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused(f"{path} is not a regular file; fsar will not append to it")
        data = memoryview((line.rstrip("\n") + "\n").encode())
        while data:  # a nearly full disk takes part of a write, then refuses the rest
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except OSError as error:
        if error.errno in _DISK_FULL:
            raise _disk_full(path, error) from None
        raise
    finally:
        os.close(fd)


def read_log_tail(path: str | Path, cap: int, what: str = "log") -> tuple[list[str], bool]:
    """The complete lines among the last `cap` bytes of a log, and whether its last line was cut.

    A line cut at the front of the window is dropped; so is a last line without its newline (a
    record a crash or a full disk cut short)."""
    fd, info = _open_regular(Path(path), what)
    with os.fdopen(fd, "rb") as f:
        start = max(0, info.st_size - cap)
        f.seek(max(0, start - 1))  # and the byte before the window: is it a line's end?
        lines = f.read(cap + (start > 0)).split(b"\n")
    if start > 0:
        lines = lines[1:]  # the part of a line before the window (empty if none)
    cut = lines[-1] != b""
    return [line.decode("utf-8", "replace") for line in lines[:-1] if line], cut


def drop_cut_line(path: str | Path, what: str = "log") -> int:
    """Cut a log back to its last complete line (a record a crash or a full disk cut short);
    returns the bytes dropped. The file is opened without following a link."""
    path = Path(path)
    fd, info = _open_regular(path, what)
    try:
        end = info.st_size
        while end > 0:  # search back for the last newline, a block at a time
            block = os.pread(fd, min(end, 1 << 16), end - min(end, 1 << 16))
            found = block.rfind(b"\n")
            if found >= 0:
                end = end - len(block) + found + 1
                break
            end -= len(block)
        dropped = info.st_size - end
        if dropped:
            writable = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                if os.fstat(writable).st_ino != info.st_ino:
                    raise FileRefused(f"{what} {path} changed while it was repaired")
                os.ftruncate(writable, end)
            finally:
                os.close(writable)
        return dropped
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------- folders
def new_folder(path: str | Path, keep_files: bool = False) -> Path:
    """An empty temp folder beside `path`, where the folder `path` is built (`publish_folder`).

    Refused when `path` is a link or a file, or a folder that is not empty (unless `keep_files`:
    then what it holds stays, beside what is built)."""
    path = Path(path)
    if path.is_symlink():
        raise FileRefused(f"{path} is a link; fsar builds folders only where it names them")
    if path.exists() and not path.is_dir():
        raise FileRefused(f"{path} exists and is not a folder: choose another")
    if path.is_dir() and not keep_files and any(path.iterdir()):
        raise FileRefused(f"{path} is a folder that is not empty: choose another")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.building"
        try:
            tmp.mkdir()  # (mode 0777 less the umask, as the folder would have)
            return tmp
        except FileExistsError:
            continue


def publish_folder(tmp: Path, path: str | Path) -> None:
    """Give the folder built at `tmp` (`new_folder`) its name `path`: one rename, or, where `path`
    holds files that stay (`keep_files`), one rename per file built."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink() and any(path.iterdir()):
        for built in tmp.iterdir():
            os.replace(built, path / built.name)  # (a link of that name is replaced, not followed)
        tmp.rmdir()
    else:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        os.rename(tmp, path)
    _sync_folder(path.parent)


def remove_folder(tmp: Path) -> None:
    """Remove a temp folder (`new_folder`) and what it holds, quietly (it is being abandoned)."""
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def building(path: str | Path) -> Iterator[Path]:
    """Build the folder `path` under a temp name next to it; it takes its name when the block ends.

    On any error, or an interruption, the temp folder is removed and `path` stays as it was (absent,
    or an empty folder). A full disk raises DiskFullError."""
    tmp = new_folder(path)
    try:
        yield tmp
        publish_folder(tmp, path)
    except BaseException as error:
        remove_folder(tmp)
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            raise _disk_full(Path(path), error) from None
        raise


def _sync_folder(folder: Path) -> None:
    """fsync a folder so a rename in it survives a power cut (where the platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """A new file next to `path`, created exclusively (never through a link), mode 0666 & ~umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
