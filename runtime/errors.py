"""The one base of fsar's own errors: things a user can fix (an option, a file, a store, weights).

The CLI prints their one-line message and exits 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class FsarError(Exception):
    """A problem the user can fix; the message is one line naming the option or file and what to do."""
