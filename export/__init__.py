"""Validated torch -> ONNX export (``medtune.export``) and the sidecar readers.

Importing this package imports neither torch nor onnx: the names below load their module on first use
(PEP 562), so ``medtune.export.bench`` runs on a torch-free edge install.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "ExportParityError": "onnx_export",
    "ExportReport": "onnx_export",
    "ParityResult": "onnx_export",
    "export_onnx": "onnx_export",
    "FORMAT": "sidecar",
    "read_embedded_sidecar": "sidecar",
    "read_sidecar": "sidecar",
    "sha256_file": "sidecar",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
