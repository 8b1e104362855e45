"""A loopback HTTP server for tests: serves a directory, never lists it, counts and breaks requests."""

from __future__ import annotations

import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path


@dataclass
class Faults:
    """Per-path misbehaviour: `404`, `500`, `truncate` (half the body, then close), `flood`
    (1 MiB blocks, no length, until the client hangs up or FLOOD_LIMIT bytes: `sent` counts them),
    `html` (a 200 answer holding an HTML error page) or `html-once` (that, then the real file);
    `bodies` answers a path with given bytes and headers."""

    by_path: dict[str, str] = field(default_factory=dict)
    bodies: dict[str, tuple[bytes, dict[str, str]]] = field(default_factory=dict)  # path -> answer
    requests: Counter = field(default_factory=Counter)
    sent: Counter = field(default_factory=Counter)


FLOOD_LIMIT = 256 << 20


class _Handler(http.server.SimpleHTTPRequestHandler):
    faults: Faults

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        self.send_error(404, "directory listing disabled")
        return None

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.faults.requests[path] += 1
        mode = self.faults.by_path.get(path)
        if path in self.faults.bodies:  # a given answer: bytes and headers
            body, headers = self.faults.bodies[path]
            self.send_response(200)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            self.faults.sent[path] += len(body)
            return
        if mode == "404":
            self.send_error(404)
            return
        if mode == "500":
            self.send_error(500)
            return
        if mode in ("html", "html-once"):
            if mode == "html-once":
                del self.faults.by_path[path]
            page = b"<html><body>Service temporarily unavailable</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if mode == "flood":
            self.send_response(200)
            self.end_headers()
            self.close_connection = True
            block = b"\0" * (1 << 20)
            try:
                while self.faults.sent[path] < FLOOD_LIMIT:
                    self.wfile.write(block)
                    self.wfile.flush()
                    self.faults.sent[path] += len(block)
            except OSError:  # the client hung up
                pass
            return
        if mode == "truncate":
            local = Path(self.translate_path(path))
            data = local.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextmanager
def serve(root: Path) -> Iterator[tuple[str, Faults]]:
    """Serve `root` on 127.0.0.1; yields (base URL, faults)."""
    faults = Faults()
    handler = type("Handler", (_Handler,), {"faults": faults})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(handler, directory=str(root))
    )
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
