"""The process memory policy: keep freed memory in the heap instead of returning it to the OS.

CLI commands apply it in-process; fsar-extract starts its Dask workers with it (`MALLOC_ENVIRON`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# A training step or an encoder forward allocates and frees blocks of tens to hundreds of megabytes.
# By default glibc serves each with a fresh mmap and unmaps it on free, so every step touches
# gigabytes of new pages: on the 2-core benchmark machine about 3 million page faults and a third
# of a training step in the kernel (counted with getrusage around one step).
TRIM_THRESHOLD = 1 << 30  # freed heap kept for the next step (glibc's default is 128 KiB)
M_TRIM_THRESHOLD = -1  # glibc malloc.h: free heap top kept before returning it to the OS
M_MMAP_MAX = -4  # glibc malloc.h: most blocks served by mmap (0: none, all from the heap)

# The same policy for a process yet to start (glibc reads these at start-up).
MALLOC_ENVIRON = {
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
    "MALLOC_MMAP_MAX_": "0",
}


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Serve every allocation from the heap and keep up to `trim_threshold` bytes of freed heap.

    Returns whether the settings were applied (Linux with glibc; elsewhere nothing changes).
    Freed blocks are reused by later allocations rather than returned; a repeating step settles
    after a few repeats. Peak RSS can grow a little through heap fragmentation (`make bench`
    measures it for fsar-train)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
