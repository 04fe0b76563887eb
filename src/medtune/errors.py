"""One error type for bad input: its message is a single line naming the file and what is wrong."""

from __future__ import annotations

from pathlib import Path


class MedTuneError(Exception):
    """A user-facing error. ``str(err)`` is one line: ``<file>: <what is wrong>``."""

    def __init__(self, message: str, path: str | Path | None = None):
        message = " ".join(str(message).split())  # always one line
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
