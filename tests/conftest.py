"""Test-wide guards: no network (loopback only), hub libraries offline, one torch thread per process."""

from __future__ import annotations

import ipaddress
import os
import socket

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
