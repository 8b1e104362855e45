"""Test-wide guards (no network but loopback, hub libraries offline) and the fixtures tests share."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cli.py: no spinning threads on a busy CI

_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: object) -> object:
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and self.family in (socket.AF_INET, socket.AF_INET6):
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise OSError(f"tests must not touch the network (tried to connect to {host})")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only  # type: ignore[method-assign]


# ---------------------------------------------------------------------- shared stores
@pytest.fixture(scope="session")
def pair_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Time-reversal pairs (tests/heads_fixtures.py): 6 train, 6 val, 6 test classes of 6 videos,
    T=4, 2 views, D=32: enough for 5-way 1-shot 5-query training episodes."""
    from tests.heads_fixtures import reversal_pair_store

    path = tmp_path_factory.mktemp("pairs") / "store"
    classes = {"train": 6, "val": 6, "test": 6}
    reversal_pair_store(path, frames=4, views=2, classes=classes, videos_per_class=6).close()
    return path


@pytest.fixture(scope="session")
def last_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An `emp+last` pair store (8/6/6 classes of 6 videos, T=4, 1 view) with a random last block."""
    import torch

    from heads.clip_block import LastBlock
    from tests.heads_fixtures import reversal_pair_store

    path = tmp_path_factory.mktemp("last") / "store"
    s = reversal_pair_store(path, recipe="emp+last", views=1, frames=4, videos_per_class=6)
    torch.manual_seed(0)
    block = LastBlock(width=48, heads=4, dim=32)
    s.write_lastblock(block.state_tensors(), block.config)
    s.close()
    return path


@pytest.fixture
def quiet_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands keep freed memory for speed; not in the long-lived test process."""
    monkeypatch.setattr("runtime.memory.keep_freed_memory", lambda: False)


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder on a 256 KiB tmpfs, mounted when the test may (and unmounted after); without the
    right to mount, a folder where fsync of a file over 256 KiB fails with ENOSPC (injected: a
    full disk reported at fsync, as delayed allocation reports it)."""
    import shutil
    import subprocess

    folder = tmp_path / "small"
    folder.mkdir()
    mount = shutil.which("mount")
    command = [mount or "mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)]
    mounted = mount is not None and subprocess.run(command, capture_output=True).returncode == 0
    if not mounted:
        _fsync_fails_when_full(monkeypatch, folder, 256 << 10)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def _fsync_fails_when_full(monkeypatch: pytest.MonkeyPatch, folder: Path, capacity: int) -> None:
    import errno

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.startswith(str(folder)) and os.fstat(fd).st_size > capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
