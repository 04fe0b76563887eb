"""The model sidecar for the exporter: re-exported from its one owner, :mod:`medtune.runtime.sidecar`.

The runtime must not import torch, so the format, the readers and the integrity checks live in the runtime
package; the exporter (and ``medtune.export``'s public names) use them from there.
"""

from __future__ import annotations

from medtune.runtime.sidecar import (
    FORMAT,
    METADATA_KEY,
    ONNX_NAME,
    SIDECAR_NAME,
    canonical,
    check_format,
    read_embedded_sidecar,
    read_sidecar,
    sha256_file,
    sidecar_path,
    sidecar_sha256,
    verify_embedded,
)

__all__ = [
    "FORMAT",
    "METADATA_KEY",
    "ONNX_NAME",
    "SIDECAR_NAME",
    "canonical",
    "check_format",
    "read_embedded_sidecar",
    "read_sidecar",
    "sha256_file",
    "sidecar_path",
    "sidecar_sha256",
    "verify_embedded",
]
