"""One error type for bad input: its message is a single line naming the file and what is wrong, and the one
helper that turns a library's exception text into such a line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MedTuneError(Exception):
    """A user-facing error. ``str(err)`` is one line: ``<file>: <what is wrong>``."""

    def __init__(self, message: str, path: str | Path | None = None):
        message = " ".join(str(message).split())  # always one line
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


def read_json_file(path: str | Path, missing: str = "not found") -> Any:
    """The parsed content of a JSON file MedTune is handed (never evaluated), or a one-line :class:`MedTuneError`
    naming it: ``missing`` when it is not a file, unreadable, not UTF-8, or invalid JSON (with line and column)."""
    path = Path(path)
    if not path.is_file():
        raise MedTuneError(missing, path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedTuneError(f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", path) from exc
    except UnicodeDecodeError as exc:
        raise MedTuneError(f"not UTF-8 text (byte {exc.start}); JSON files must be UTF-8", path) from None
    except OSError as exc:
        raise MedTuneError(f"cannot read ({exc.strerror or exc})", path) from None


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
