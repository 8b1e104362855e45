"""fsspec's HTTP filesystem with every answer bounded: streamed, cut off past its cap, downloads atomic.

The only home-made part of the remote store; what fsspec would do instead is pinned by the tests named below.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsspec.implementations.http import HTTPFileSystem


class TooLargeError(Exception):
    """An answer grew past the bytes its key may hold (never retried)."""


class BoundedHTTPFileSystem(HTTPFileSystem):
    """Reads take `cap=`, the most bytes the answer may hold, counted after any Content-Encoding.

    fsspec's `_cat_file` reads a whole answer into memory and its `_get_file` writes into the final
    file as bytes arrive, so a flooding server would fill memory or disk and a cut download would be
    cached (tests/test_integrity.py::test_remote_answer_is_streamed_and_cut_off,
    tests/test_remote.py::test_truncated_download_is_retried_bounded_and_never_cached,
    tests/test_remote.py::test_compressed_metadata_answer_is_capped_after_decoding).
    """

    block = 1 << 20

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(skip_instance_cache=True, **kwargs)

    async def _stream(self, url: str, cap: int, write: Callable[[bytes], Any]) -> None:
        session = await self.set_session()
        async with session.get(self.encode_url(url), **self.kwargs) as response:
            self._raise_not_found_for_status(response, url)
            if int(response.headers.get("Content-Length") or 0) > cap:
                raise TooLargeError(cap)
            total = 0
            async for block in response.content.iter_chunked(self.block):
                total += len(block)
                if total > cap:
                    raise TooLargeError(cap)
                write(block)

    async def _cat_file(
        self, url: str, start: Any = None, end: Any = None, *, cap: int, **kw: Any
    ) -> bytes:
        if start is not None or end is not None:
            raise NotImplementedError("fsar reads whole objects")
        parts: list[bytes] = []
        await self._stream(url, cap, parts.append)
        return b"".join(parts)

    async def _get_file(self, rpath: str, lpath: str, *, cap: int, **kw: Any) -> None:
        """Download into a temp file beside `lpath`, renamed only once complete."""
        target = Path(lpath)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                await self._stream(rpath, cap, fh.write)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
