"""Read and verify the ``model.json`` sidecar of an exported model, and the copy embedded in the ONNX file.

Torch-free on purpose (the runtime and 3D Slicer use it): imports only json, hashlib and onnx.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from medtune.errors import MedTuneError

SIDECAR_NAME = "model.json"
FORMAT = "medtune.model/1"
METADATA_KEY = "medtune"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(onnx_path: str | Path) -> Path:
    """The sidecar of ``onnx_path``: ``<stem>.json`` if present, else ``model.json`` in the same folder.

    (The same rule as :func:`medtune.runtime.model.sidecar_path`; for ``model.onnx`` both are ``model.json``.)
    """
    own = Path(onnx_path).with_suffix(".json")
    return own if own.is_file() else Path(onnx_path).parent / SIDECAR_NAME


def check_format(sidecar: dict[str, Any], where: str | Path) -> None:
    """Raise unless ``sidecar`` declares a format version this code reads (``medtune.model/1``)."""
    fmt = sidecar.get("format")
    if fmt != FORMAT:
        raise MedTuneError(f"unsupported sidecar format {fmt!r} (expected {FORMAT!r})", where)


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise MedTuneError(f"{what} not found", path)


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """Read the sidecar (``model.json``) next to ``onnx_path`` and verify its ``onnx_sha256`` against the ONNX file.

    Raises a one-line :class:`MedTuneError` naming the file when the ONNX file or ``model.json`` is
    missing, ``model.json`` is not a JSON object of a known format, or the sha256 does not match.
    """
    onnx_path = Path(onnx_path)
    json_path = sidecar_path(onnx_path)
    _require_file(onnx_path, "ONNX model")
    _require_file(json_path, f"sidecar {SIDECAR_NAME} (written by `medtune export` next to the ONNX file)")
    try:
        sidecar = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MedTuneError(f"not valid JSON ({err})", json_path) from None
    if not isinstance(sidecar, dict):
        raise MedTuneError(f"expected a JSON object, got {type(sidecar).__name__}", json_path)
    check_format(sidecar, json_path)
    expected = sidecar.get("onnx_sha256")
    if not isinstance(expected, str):
        raise MedTuneError("no onnx_sha256 entry", json_path)
    actual = sha256_file(onnx_path)
    if actual != expected.lower():
        raise MedTuneError(
            f"sha256 {actual[:16]}… does not match {json_path.name}'s {expected[:16]}…: the ONNX file was changed "
            "or truncated after export, or the sidecar belongs to another model",
            onnx_path,
        )
    return sidecar


def read_embedded_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The sidecar embedded in the ONNX file's ``metadata_props`` under ``"medtune"`` (without ``onnx_sha256``).

    Raises a one-line :class:`MedTuneError` naming the file when it is missing, not a readable ONNX model
    (corrupt or truncated), or carries no valid MedTune metadata.
    """
    onnx_path = Path(onnx_path)
    _require_file(onnx_path, "ONNX model")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as err:
        reason = f"not a readable ONNX model, corrupt or truncated ({type(err).__name__})"
        raise MedTuneError(reason, onnx_path) from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise MedTuneError(f"no {METADATA_KEY!r} metadata: not a MedTune export, or the file is truncated", onnx_path)
    try:
        sidecar = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise MedTuneError(f"embedded {METADATA_KEY!r} metadata is not valid JSON ({err})", onnx_path) from None
    if not isinstance(sidecar, dict):
        raise MedTuneError(f"embedded {METADATA_KEY!r} metadata is not a JSON object", onnx_path)
    check_format(sidecar, onnx_path)
    return sidecar
