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


#: NIfTI header fields that hold free text (and so may hold a patient's name or number): ``descrip``,
#: ``aux_file``, ``intent_name`` and the Analyze-era ``db_name`` / ``data_type`` (NIfTI-1 only)
TEXT_FIELDS = ("descrip", "aux_file", "intent_name", "db_name", "data_type")
_GZIP_FNAME, _GZIP_FCOMMENT = 0x08, 0x10


def blank_text_fields(header: Any) -> list[str]:
    """Blank a nibabel NIfTI header's free-text fields (:data:`TEXT_FIELDS`) and drop its extensions, in place
    (a header copied from an input image, e.g. for a label map written on its grid); returns what was removed."""
    removed = []
    for name in TEXT_FIELDS:
        if name in header.keys() and header[name].item().strip(b"\0 "):
            removed.append(name)
            header[name] = b""
    if len(header.extensions):
        removed.append(f"{len(header.extensions)} header extension(s)")
        header.extensions.clear()
    return removed


def deidentified_nifti(src: str | Path) -> tuple[bytes, list[str]]:
    """The bytes of ``src`` (a single-file NIfTI-1 or NIfTI-2, ``.nii`` or ``.nii.gz``) without what may name a
    patient, and what was removed (``[]``: nothing to remove).

    Removed: the header's text fields (:data:`TEXT_FIELDS`, blanked), header extensions (a DICOM or comment
    extension can hold the whole DICOM header), and the gzip member's stored file name and comment. Every other
    header byte (dimensions, data type, pixdim, qform/sform, scaling, intent codes, byte order) and the voxel bytes
    are kept bit for bit: the header is not re-derived, only those fields are zeroed, and ``vox_offset`` is set to
    the end of the header (extensions dropped). Written by hand because nibabel re-derives headers when it
    saves (it would change the stored geometry codes and scaling of some files). Raises ``ValueError``.
    """
    import io

    import nibabel as nib

    raw = Path(src).read_bytes()
    removed: list[str] = []
    gzipped = raw[:2] == b"\x1f\x8b"
    if gzipped:
        if len(raw) > 3 and raw[3] & _GZIP_FNAME:
            removed.append("gzip file name")
        if len(raw) > 3 and raw[3] & _GZIP_FCOMMENT:
            removed.append("gzip comment")
        raw = gzip.decompress(raw)
    size = int.from_bytes(raw[:4], "little")
    if size not in (348, 540):
        size = int.from_bytes(raw[:4], "big")
    klass = {348: nib.Nifti1Header, 540: nib.Nifti2Header}.get(size)
    if klass is None:
        raise ValueError("not a NIfTI-1/-2 file (header size is neither 348 nor 540)")
    header = klass.from_fileobj(io.BytesIO(raw), check=False)
    if header["magic"].item() not in (b"n+1", b"n+2"):
        raise ValueError("not a single-file NIfTI (magic is not n+1 / n+2)")
    offset = int(header["vox_offset"])
    if offset < size + 4 or offset > len(raw):
        raise ValueError(f"vox_offset {offset} is outside the file")
    removed += blank_text_fields(header)
    header["vox_offset"] = size + 4  # header, the 4-byte extension flag (no extensions), then the voxels
    out = header.binaryblock + b"\0\0\0\0" + raw[offset:]
    return (gzip.compress(out, compresslevel=6, mtime=0) if gzipped else out), removed


def write_deidentified_nifti(src: str | Path, dst: str | Path) -> list[str]:
    """Write :func:`deidentified_nifti` of ``src`` to ``dst``; returns what was removed."""
    data, removed = deidentified_nifti(src)
    Path(dst).write_bytes(data)
    return removed
