"""The one base of fsar's own errors (things a user can fix: an option, a file, a store, weights),
and the one line a user sees for any error they can act on (`user_message`).

The CLI prints that line and exits 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import re


class FsarError(Exception):
    """A problem the user can fix; the message is one line naming the option or file and what to do."""


# Not fsar's own, yet no bug: the machine ran out of memory or of disk. One line each, exit 2.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
MEMORY_ADVICE = (
    "lower --max-ram (splits then stream from the store), use fewer or smaller episodes, "
    "or a machine with more memory"
)


def user_message(error: BaseException) -> str | None:
    """The one line a user sees for an error they can act on (fsar's own, memory or disk exhausted),
    None for anything else: that is a bug, and keeps its traceback."""
    if isinstance(error, FsarError):
        return first_line(error)
    if isinstance(error, MemoryError) or _allocator_refused(error):
        return f"out of memory: {_allocation(error)}; {MEMORY_ADVICE}"
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        where = f" writing {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}: free space or choose another location, then run it again"
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _allocator_refused(error: BaseException) -> bool:
    """torch reports a failed allocation as a RuntimeError (CPU) or its OutOfMemoryError (GPU)."""
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _allocation(error: BaseException) -> str:
    """What could not be allocated, from numpy's or torch's message."""
    text = " ".join(str(error).split())
    found = re.search(r"(?:tried to allocate|Tried to allocate) ([\d.]+ ?\w+)", text)
    if found:
        size = found.group(1)
        return f"could not allocate {size}" + (" bytes" if size.isdigit() else "")
    return text[:200] or "an allocation failed"
