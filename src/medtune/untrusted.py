"""Files MedTune is handed are data: the checks that keep what is read from them from being evaluated or
from reaching outside where it belongs, and the escaping of what is written back (torch-free).

- :func:`refuse_expressions`: MONAI's config parser evaluates strings starting with ``$``, resolves ``@``
  references and ``%`` macros (which load other files) and instantiates dicts holding ``_target_``. Values read
  from ``run.json``, datalists, ``dataset.json``, model sidecars and bundle metadata never may; only the user's
  own ``--set`` on the command line can use expressions.
- :func:`inside` / :func:`file_identity`: datalist paths must stay inside the dataset, and one file reached
  under two names (symlink, hard link, ``..``) is recognised.
- :func:`csv_cell`: a cell taken from a file name cannot start a spreadsheet formula.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError

# MONAI ConfigParser syntax: ``$`` expression, ``@`` reference, ``%`` macro (another file's content)
EXPRESSION_PREFIXES = ("$", "@", "%")
# ``_target_``, ``_requires_``, ``_mode_``, ``_disabled_``, ``_desc_``: a dict holding one is instantiated
SPECIAL_KEY = re.compile(r"^_[A-Za-z]+_$")
_SPECIAL_KEY = SPECIAL_KEY
_SHOWN = 48


def _walk(value: Any, key: str) -> Iterator[tuple[str, Any, str]]:
    """``(key path, value, what)`` for every string and every mapping key below ``value``."""
    if isinstance(value, str):
        yield key, value, "value"
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = f"{key}.{k}" if key else str(k)
            yield sub, k, "key"
            yield from _walk(v, sub)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}[{i}]")


def expression_problem(value: Any, key: str = "") -> str | None:
    """The first config-parser syntax found in ``value`` (a JSON value read from a file), or ``None``."""
    for where, item, what in _walk(value, key):
        if not isinstance(item, str):
            continue
        shown = item if len(item) <= _SHOWN else item[: _SHOWN - 1] + "…"
        if what == "key" and _SPECIAL_KEY.match(item):
            return f"key {where!r} is MONAI config syntax ({item!r} instantiates code)"
        if what == "key" and item.startswith(EXPRESSION_PREFIXES):
            return f"key {where!r} starts with {item[0]!r} (MONAI config syntax)"
        if what == "value" and item.startswith(EXPRESSION_PREFIXES):
            kind = {"$": "an expression", "@": "a reference", "%": "a macro"}[item[0]]
            return f"{where or 'value'} = {shown!r} is {kind} (starts with {item[0]!r})"
    return None


def refuse_expressions(value: Any, path: str | Path, key: str = "") -> None:
    """Raise a one-line :class:`MedTuneError` naming ``path`` and the key if ``value`` holds config syntax.

    Values read from files are data: nothing in them is evaluated, referenced or instantiated.
    """
    problem = expression_problem(value, key)
    if problem:
        raise MedTuneError(
            f"{problem}; values read from files are data and are never evaluated (only the user's own "
            "--set KEY=VALUE on the command line may use MONAI '$' expressions)",
            path,
        )


# ------------------------------------------------------------------------------------------------ paths


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` (symlinks and ``..`` resolved) lies inside ``root`` (resolved)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return True


def file_identity(path: str | Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of an existing file (the same for hard links, symlinks and ``..`` spellings)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# ------------------------------------------------------------------------------------------------ tables

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "|")


def csv_cell(value: Any) -> Any:
    """A table cell that no spreadsheet runs as a formula: text starting with ``= + - @ | TAB CR LF`` gets a
    leading ``'`` (the OWASP rule); numbers and other values are returned unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


# ----------------------------------------------------------------------------------------------- outputs

DATASET_FILES = ("dataset.json", "datalist.json")
DATASET_DATA_DIRS = ("images", "labels")


def _dataset_root_of(path: Path) -> Path | None:
    """The nearest folder at or above ``path`` holding a ``dataset.json`` (a MedTune dataset), or ``None``."""
    for folder in (path, *path.parents):
        if (folder / DATASET_FILES[0]).is_file():
            return folder
    return None


def refuse_unsafe_output(out: str | Path, inputs: list[Path] | tuple[Path, ...] = ()) -> None:
    """Refuse an output location that would replace user data (one line naming it).

    Refused: a dataset's ``images/`` or ``labels/`` (or anything inside them), its ``dataset.json`` /
    ``datalist.json``, the dataset folder itself, and any input file (also under another name: symlink, hard
    link, ``..``). Whether an existing output may be replaced is the caller's decision (``--overwrite``).
    """
    target = Path(out).absolute()
    resolved = target.resolve()
    for candidate in {target, resolved}:
        root = _dataset_root_of(candidate if candidate.is_dir() else candidate.parent)
        if root is None:
            continue
        if candidate == root:
            raise MedTuneError("is a dataset folder; write predictions to a new folder or file", out)
        rel = candidate.relative_to(root).parts
        if rel and (rel[0] in DATASET_DATA_DIRS or (len(rel) == 1 and rel[0] in DATASET_FILES)):
            raise MedTuneError(
                f"is inside the dataset {root} ({'/'.join(rel[:1])}): predictions never replace images, labels "
                "or the dataset's JSON files; choose an output outside images/ and labels/",
                out,
            )
    ident = file_identity(resolved)
    if ident is not None:
        for src in inputs:
            if file_identity(src) == ident:
                raise MedTuneError(f"is the input file {src}; choose another output", out)
