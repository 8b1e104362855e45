"""One writer per store: an exclusive lock file, with stale-lock detection after a crash."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

import psutil

from .errors import StoreError, StoreLockedError

MAX_LOCK_BYTES = 4096  # a lock file holds one small JSON object


def _process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class StoreLock:
    """Held by the driver (the only manifest writer) from open to close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def _read_info(self) -> dict:
        """The lock's JSON object; {} when it is empty or not one fsar writes (FileNotFoundError
        when there is none). A link, FIFO or device is refused, never opened."""
        mode = os.lstat(self.path).st_mode
        if not stat.S_ISREG(mode):
            raise StoreError(
                f"{self.path} is not a regular file (a link, FIFO or device): remove it"
            )
        try:
            with open(self.path, "rb") as fh:
                info = json.loads(fh.read(MAX_LOCK_BYTES + 1)[:MAX_LOCK_BYTES] or b"{}")
        except FileNotFoundError:
            raise
        except (OSError, ValueError, RecursionError):
            return {}
        return info if isinstance(info, dict) else {}

    def _is_stale(self, info: dict) -> bool:
        if info.get("host") != socket.gethostname():
            return False  # cannot see that machine's processes: never break it silently
        try:
            pid, pid_started = int(info.get("pid", -1)), float(info.get("pid_started", 0))
        except (TypeError, ValueError, OverflowError):
            return True  # not a lock fsar wrote on this host
        started = _process_start_time(pid) if 0 < pid < 2**31 else None
        # Dead pid, or a reused pid whose process started after the lock was taken.
        return started is None or abs(started - pid_started) > 1.0

    def check_free(self) -> None:
        """Raise StoreLockedError when a live writer holds the lock; a stale lock is no obstacle."""
        try:
            info = self._read_info()
        except FileNotFoundError:
            return
        if not info:
            if time.time() - self.path.stat().st_mtime > 10:
                return  # an empty lock file left by a crash between create and write
        elif self._is_stale(info):
            return
        raise StoreLockedError(
            f"store is being written by pid {info.get('pid')} on {info.get('host')}: "
            f"wait for it to finish, or if that run is dead remove {self.path}"
        )

    def acquire(self) -> None:
        me = os.getpid()
        payload = {
            "pid": me,
            "host": socket.gethostname(),
            "pid_started": _process_start_time(me),
            "locked_at": time.time(),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    info = self._read_info()
                except FileNotFoundError:
                    continue
                if not info:  # a writer is between create and write, or left an empty file
                    if time.time() - self.path.stat().st_mtime > 10:
                        self.path.unlink(missing_ok=True)
                        continue
                    time.sleep(0.2)
                    continue
                if self._is_stale(info):
                    self.path.unlink(missing_ok=True)
                    continue
                raise StoreLockedError(
                    f"store is being written by pid {info.get('pid')} on {info.get('host')}: "
                    f"wait for it, or if that run is dead remove {self.path}"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh)
            self.held = True
            return
        raise StoreLockedError(
            f"could not take the lock {self.path}; remove it if no run is writing"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
