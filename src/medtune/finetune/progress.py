"""The machine-readable progress stream (JSON lines, see docs/formats.md §2): its writer and its one reader
(torch-free: the Slicer module and the report read it too)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ProgressWriter:
    """Appends one JSON object per line to ``path`` (flushed each line) and optionally to a stream."""

    def __init__(self, path: str | Path | None, echo: IO[str] | None = None):
        self.path = Path(path) if path else None
        self.echo = echo
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        line = json.dumps(record)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
                fh.flush()
        if self.echo is not None:
            self.echo.write(line + "\n")
            self.echo.flush()
        return record


class ProgressTail:
    """Incremental reader of a growing ``progress.jsonl`` (complete lines only; survives a partial last line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0

    def read_new(self) -> list[dict[str, Any]]:
        """Records appended since the last call."""
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        records = []
        for line in data[: end + 1].decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "event" in rec:
                records.append(rec)
        return records


def read_progress(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a progress stream (an incomplete last line is ignored; no file: none)."""
    return ProgressTail(path).read_new()


def format_record(rec: dict[str, Any]) -> str:
    """A one-line human rendering of a progress record (used by the CLI and Slicer)."""
    ev = rec.get("event")
    eta = rec.get("eta_seconds")
    eta_s = f", ETA {int(eta // 60)}:{int(eta % 60):02d}" if isinstance(eta, (int, float)) else ""
    if ev == "epoch":
        metric = rec.get("metric")
        m = f", {rec.get('metric_name')} {metric:.4f}" if isinstance(metric, (int, float)) else ""
        return f"epoch {rec['epoch']}/{rec['max_epochs']}: loss {rec.get('loss', float('nan')):.4f}{m}{eta_s}"
    if ev == "step":
        return f"epoch {rec['epoch']} step {rec['step']}/{rec['steps_per_epoch']}: loss {rec['loss']:.4f}{eta_s}"
    if ev == "done":
        return f"done ({rec.get('status')}): best {rec.get('best_metric')} at epoch {rec.get('best_epoch')}"
    return json.dumps(rec)
