"""The model sidecar (``model.json``, format ``medtune.model/1``): names, reading, and the checks that make an
exported model trustworthy as a whole. The one owner of the format; torch-free (onnx only when installed).

An export writes the sidecar twice: ``model.json`` (with ``onnx_sha256``, the hex sha256 of ``model.onnx``) and
the same object without ``onnx_sha256`` as JSON in the ONNX file's ``metadata_props["medtune"]``. A model is
used only when both agree:

- the ONNX file's sha256 equals ``model.json``'s ``onnx_sha256`` (the weights are the exported ones), and
- ``model.json`` without ``onnx_sha256`` equals the copy embedded in the ONNX file (:func:`verify_embedded`),
  so an edited label order or normalisation in ``model.json`` is refused instead of silently shifting every
  prediction.

Values in a sidecar are data: a string in MONAI config syntax (``$``, ``@``, ``%``) is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError, one_line
from medtune.untrusted import refuse_expressions

FORMAT = "medtune.model/1"
SIDECAR_FORMAT = FORMAT
SIDECAR_NAME = "model.json"
ONNX_NAME = "model.onnx"
METADATA_KEY = "medtune"
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


file_sha256 = sha256_file  # the runtime's older name


def sidecar_path(onnx_path: str | Path) -> Path:
    """The sidecar of ``onnx_path``: ``<stem>.json`` if present, else ``model.json`` in the same folder."""
    own = Path(onnx_path).with_suffix(".json")
    return own if own.is_file() else Path(onnx_path).parent / SIDECAR_NAME


def check_format(sidecar: Any, where: str | Path) -> None:
    """Raise unless ``sidecar`` is a JSON object declaring the format this code reads (``medtune.model/1``)."""
    if not isinstance(sidecar, dict):
        raise MedTuneError(f"not a MedTune model sidecar (a JSON {type(sidecar).__name__}, expected an object)", where)
    fmt = sidecar.get("format")
    if fmt != FORMAT:
        raise MedTuneError(f"not a MedTune model sidecar (format {fmt!r}, expected {FORMAT!r})", where)


def canonical(sidecar: dict[str, Any]) -> str:
    """The sidecar without ``onnx_sha256`` as canonical JSON (sorted keys): what the ONNX file embeds."""
    return json.dumps({k: v for k, v in sidecar.items() if k != "onnx_sha256"}, sort_keys=True)


def sidecar_sha256(sidecar: dict[str, Any]) -> str:
    """sha256 of :func:`canonical` ``(sidecar)``: one number for the sidecar's whole content."""
    return hashlib.sha256(canonical(sidecar).encode("utf-8")).hexdigest()


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """Read ``onnx_path``'s sidecar and check it: JSON object, format, plain data, ``onnx_sha256`` of the file.

    One-line :class:`MedTuneError` naming the file for a missing ONNX file or sidecar, invalid JSON, an unknown
    format, config syntax in a value, or a sha256 that does not match.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise MedTuneError("ONNX model file not found", onnx_path)
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise MedTuneError(
            f"model sidecar not found (expected {path.name} next to {onnx_path.name}, written by `medtune export`)",
            path,
        )
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MedTuneError(f"model sidecar is not valid JSON ({one_line(exc)})", path) from None
    check_format(sidecar, path)
    refuse_expressions(sidecar, path)
    expected = sidecar.get("onnx_sha256")
    if not isinstance(expected, str) or not expected:
        raise MedTuneError("model sidecar has no onnx_sha256", path)
    actual = sha256_file(onnx_path)
    if actual != expected.lower():
        raise MedTuneError(
            f"sha256 mismatch: {onnx_path.name} is {actual[:12]}..., {path.name} says {expected[:12]}... (the ONNX "
            "file was changed or truncated after export, or the sidecar belongs to another model)",
            onnx_path,
        )
    return sidecar


def embedded_text(onnx_path: str | Path, session: Any = None) -> str | None:
    """The raw ``metadata_props["medtune"]`` string of an ONNX file (``None`` when it has none).

    From an open onnxruntime ``session`` when given (no second read), else with ``onnx`` when installed, else
    with an onnxruntime session of its own. One-line error for a file that is not a readable ONNX model.
    """
    onnx_path = Path(onnx_path)
    if session is not None and hasattr(session, "get_modelmeta"):  # onnxruntime (OpenVINO's session has none)
        return session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not onnx_path.is_file():
        raise MedTuneError("ONNX model file not found", onnx_path)
    try:
        import onnx
    except ImportError:
        onnx = None  # type: ignore[assignment]  # optional (not in the torch-free base): read with onnxruntime
    if onnx is not None:
        try:
            model = onnx.load(str(onnx_path), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - DecodeError, ValueError, OSError: one user-facing line
            reason = f"not a readable ONNX model, corrupt or truncated ({type(err).__name__})"
            raise MedTuneError(reason, onnx_path) from None
        return {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        reason = f"not a readable ONNX model, corrupt or truncated ({type(err).__name__})"
        raise MedTuneError(reason, onnx_path) from None
    return sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)


def parse_embedded(text: str | None, onnx_path: str | Path) -> dict[str, Any]:
    """The embedded sidecar object from its raw metadata string (one-line error when absent or invalid)."""
    if text is None:
        raise MedTuneError(f"no {METADATA_KEY!r} metadata: not a MedTune export, or the file is truncated", onnx_path)
    try:
        sidecar = json.loads(text)
    except ValueError as err:
        raise MedTuneError(f"embedded {METADATA_KEY!r} metadata is not valid JSON ({err})", onnx_path) from None
    if not isinstance(sidecar, dict):
        raise MedTuneError(f"embedded {METADATA_KEY!r} metadata is not a JSON object", onnx_path)
    check_format(sidecar, onnx_path)
    refuse_expressions(sidecar, onnx_path, METADATA_KEY)
    return sidecar


def read_embedded_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The sidecar embedded in the ONNX file's ``metadata_props`` under ``"medtune"`` (without ``onnx_sha256``)."""
    return parse_embedded(embedded_text(onnx_path), onnx_path)


def verify_embedded(sidecar: dict[str, Any], text: str | None, onnx_path: str | Path) -> bool:
    """Check ``model.json`` (``sidecar``) against the copy embedded in the ONNX file (``text``).

    Returns ``False`` when the ONNX file embeds no MedTune sidecar (a model not exported by MedTune, whose
    hand-written sidecar only the sha256 ties to it); ``True`` when both agree. A difference is a one-line
    :class:`MedTuneError` naming ``model.json`` and the first key that differs.
    """
    if text is None:
        return False
    embedded = parse_embedded(text, onnx_path)
    if canonical(embedded) == canonical(sidecar):
        return True
    keys = sorted((set(sidecar) | set(embedded)) - {"onnx_sha256"})
    differs = next((k for k in keys if _dump(sidecar.get(k)) != _dump(embedded.get(k))), "?")
    raise MedTuneError(
        f"key {differs!r} differs from the copy embedded in {Path(onnx_path).name} at export: the sidecar was edited "
        "or belongs to another model; refusing to predict with it (re-export, or restore the exported model.json)",
        sidecar_path(onnx_path),
    )


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
