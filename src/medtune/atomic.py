"""Atomic file writes (temp file, fsync, rename) and kept previous versions of user data: the one owner.

Single files: :func:`atomic_path` / :func:`write_bytes_atomic` / :func:`write_json_atomic` / :func:`write_with`
and :func:`keep_previous_version`. A set of files that belong together (``model.onnx`` + ``model.json``):
:func:`install_files`, which keeps the previous set in ``.versions/<timestamp>/`` first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync it and rename it over ``path``.

    On any exception the temp file is removed, so nothing half-written is left behind.
    """
    path = Path(path)
    with _naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        with _naming(path):
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An ``OSError`` without a file name (a full disk fails ``write()``, not ``open()``) gets ``path``, so the
    one-line error names the file that could not be written rather than a temp name or nothing."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or str(exc.filename).endswith(".tmp"):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename durable); no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


_fsync_dir = fsync_path


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode())


def write_with(path: str | Path, writer: Callable[[Path], object]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def keep_previous_version(path: str | Path, versions_dir: str | Path | None = None) -> Path | None:
    """Copy an existing ``path`` to ``<versions_dir>/<name>.<timestamp>`` before it is replaced.

    Returns the kept copy (``None`` if ``path`` did not exist). ``versions_dir`` defaults to
    ``<parent>/.versions``.
    """
    path = Path(path)
    if not path.exists():
        return None
    vdir = Path(versions_dir) if versions_dir else path.parent / ".versions"
    vdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"{time.time() % 1:.6f}"[1:]
    kept = vdir / f"{path.name}.{stamp}"
    shutil.copy2(path, kept)
    return kept


def keep_previous_files(paths: list[Path] | tuple[Path, ...], versions_dir: str | Path) -> Path | None:
    """Hard-link (or copy) the existing ``paths`` into ``<versions_dir>/<timestamp>/`` as one kept version.

    Returns that folder (``None`` when none of ``paths`` exists).
    """
    old = [Path(p) for p in paths if Path(p).is_file()]
    if not old:
        return None
    kept = Path(versions_dir) / (time.strftime("%Y%m%dT%H%M%S") + f"{time.time() % 1:.6f}"[1:])
    kept.mkdir(parents=True)
    for path in old:
        try:
            os.link(path, kept / path.name)
        except OSError:
            shutil.copy2(path, kept / path.name)
    return kept


def install_files(
    tmp_dir: str | Path, names: tuple[str, ...], out_dir: str | Path, keep_if: str | None = None
) -> Path | None:
    """Move the files ``names`` from ``tmp_dir`` into ``out_dir`` (fsync, atomic rename each, fsync the folder).

    The previous files of those names are kept first in ``out_dir/.versions/<timestamp>/`` (when ``keep_if`` is
    given: only if a file of that name existed). Returns the kept version folder, or ``None``.
    """
    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = None
    if keep_if is None or (out_dir / keep_if).is_file():
        previous = keep_previous_files([out_dir / n for n in names], out_dir / ".versions")
    for name in names:
        fsync_path(tmp_dir / name)
        os.replace(tmp_dir / name, out_dir / name)
    fsync_path(out_dir)
    return previous
