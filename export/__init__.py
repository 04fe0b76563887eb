"""Validated torch -> ONNX export (``medtune.export``) and the torch-free sidecar readers.

Importing this package does not import torch: :func:`export_onnx` imports it when called, so
``medtune.export.sidecar`` can be used by the torch-free runtime.
"""

from .onnx_export import ExportParityError, ExportReport, ParityResult, export_onnx
from .sidecar import FORMAT, read_embedded_sidecar, read_sidecar, sha256_file

__all__ = [
    "FORMAT",
    "ExportParityError",
    "ExportReport",
    "ParityResult",
    "export_onnx",
    "read_embedded_sidecar",
    "read_sidecar",
    "sha256_file",
]
