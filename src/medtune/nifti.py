"""NIfTI-1 writing, the one writer (torch-free): dataset images and labels, the Slicer module's cases and the
runtime's label maps all go through :func:`nifti_bytes`.

Gzip is explicit (the target may be a temp name without ``.nii.gz``) with ``mtime=0``, so the same array gives
the same bytes.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np


def nifti_image(array: Any, affine: np.ndarray | None = None, *, scanner: bool = False, header: Any = None) -> Any:
    """A ``nibabel.Nifti1Image`` of ``array`` with ``affine`` (identity by default).

    ``scanner``: ``affine`` is the scanner's RAS in mm (sform and qform code 1, units mm), as the Slicer module
    writes volumes taken from MRML nodes. ``header``: start from this header (e.g. the input image's).
    """
    import nibabel as nib

    affine = np.eye(4) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(array), affine, header=header)
    if scanner:
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm")
    return img


def nifti_bytes(img: Any, compress: bool = True, compresslevel: int = 9) -> bytes:
    """The file bytes of ``img`` (gzipped unless ``compress`` is false; reproducible: ``mtime=0``)."""
    data = img.to_bytes()
    return gzip.compress(data, compresslevel=compresslevel, mtime=0) if compress else data


def save_nifti(arr: np.ndarray, path: str | Path, affine: np.ndarray | None = None, *, scanner: bool = False) -> None:
    """Save an array as gzipped NIfTI-1 with ``affine`` (identity by default); see :func:`nifti_image`.

    Writes ``path`` directly: callers that replace user data wrap it in :func:`medtune.atomic.write_with`.
    """
    Path(path).write_bytes(nifti_bytes(nifti_image(arr, affine, scanner=scanner)))
