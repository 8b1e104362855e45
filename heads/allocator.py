"""The process memory policy moved to `runtime.memory`; this name stays for existing importers.

New code imports `runtime.memory.keep_freed_memory` (one owner for pipeline and heads alike).
"""

from runtime.memory import keep_freed_memory

__all__ = ["keep_freed_memory"]
