"""One error type for bad input: its message is a single line naming the file and what is wrong, and the one
helper that turns a library's exception text into such a line."""

from __future__ import annotations

from pathlib import Path


class MedTuneError(Exception):
    """A user-facing error. ``str(err)`` is one line: ``<file>: <what is wrong>``."""

    def __init__(self, message: str, path: str | Path | None = None):
        message = " ".join(str(message).split())  # always one line
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``exc``'s message (its type name when it has none), at most ``limit`` chars."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unpickling_refusal(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line: torch's own reason (the line naming
    the blocked GLOBAL) rather than its first line, which only says that loading failed."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "WeightsUnpickler" in ln), None)
    if reason is None:
        return one_line(exc)
    return (
        f"not a weights-only checkpoint, refused to unpickle it: {reason} MedTune loads checkpoints with "
        "weights_only=True and never runs code from a file; only tensors and plain containers are accepted"
    )
