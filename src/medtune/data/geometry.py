"""Geometry checks for segmentation cases: an image and its label map must describe the same voxel grid.

Used by the MSD importer (before anything is written) and by :func:`medtune.data.validate_dataset` (before
training). NIfTI files are checked from their headers first (shape, spacing, affine); voxel data is read only
for the value checks (NaN/Inf in the image, integer and declared values in the label). Every problem is one
:class:`MedTuneError` line naming the offending file. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

import numpy as np

from medtune.errors import MedTuneError, one_line
from medtune.runtime.readers import check_shape, image_kind, read_image

#: relative tolerance on voxel spacing; affines may differ by this fraction of the smallest voxel size
SPACING_RTOL = 1e-3
AFFINE_TOL = 1e-3


@dataclass
class VolumeHeader:
    """What a file says about its voxel grid, read without loading the voxels (NIfTI)."""

    path: Path
    spatial_shape: tuple[int, ...]
    channels: int
    stored_shape: tuple[int, ...]
    spacing: tuple[float, ...] | None = None  # None: format without trustworthy geometry (PNG)
    affine: np.ndarray | None = None  # NIfTI only
    source: Any = None  # the nibabel image, or the already-read ImageData

    @property
    def is_nifti(self) -> bool:
        return self.affine is not None

    def data(self) -> np.ndarray:
        """The voxels as stored (NIfTI scaling applied); reads the file for NIfTI."""
        if self.is_nifti:
            try:
                return np.asanyarray(self.source.dataobj)
            except Exception as exc:  # noqa: BLE001 - truncated gzip, short file, ...
                raise MedTuneError(f"unreadable nifti voxel data ({one_line(exc, 160)})", self.path) from exc
        return self.source.array


def read_header(path: str | Path, expect_dims: int = 3) -> VolumeHeader:
    """Header of one image or label file, its shape read as ``expect_dims`` spatial axes (+ one channel axis).

    NIfTI axes past ``expect_dims`` of size 1 are dropped (``(x, y, z, 1)`` is 3D); one remaining axis is the
    channel axis (multi-modal MSD images are ``(x, y, z, C)``). Other formats go through the runtime reader.
    """
    path = Path(path)
    if not path.is_file():
        raise MedTuneError("file not found", path)
    if image_kind(path) != "nifti":
        data = read_image(path, expect_dims)
        spacing = tuple(float(s) for s in data.spacing) if data.meta.get("format") == "dicom" else None
        shape = tuple(data.array.shape)
        return VolumeHeader(path, shape[1:], shape[0], shape, spacing=spacing, source=data)
    import nibabel as nib

    try:
        img = cast("SpatialImage", nib.load(str(path)))  # a NIfTI image: nibabel types load() as FileBasedImage
        stored = tuple(int(n) for n in img.header.get_data_shape())
        zooms = tuple(float(z) for z in img.header.get_zooms())
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes a one-line error
        raise MedTuneError(f"unreadable nifti image ({one_line(exc, 160)})", path) from exc
    check_shape(stored, path)  # a zero axis or an absurd size is refused before any voxel is read
    if len(stored) < expect_dims:
        raise MedTuneError(f"is {len(stored)}D (shape {stored}), expected a {expect_dims}D volume", path)
    extra = [n for n in stored[expect_dims:] if n != 1]
    if len(extra) > 1:
        raise MedTuneError(
            f"has shape {stored}: expected a {expect_dims}D volume, optionally with one channel axis", path
        )
    return VolumeHeader(
        path,
        spatial_shape=stored[:expect_dims],
        channels=extra[0] if extra else 1,
        stored_shape=stored,
        spacing=zooms[:expect_dims],
        affine=affine,
        source=img,
    )


def check_image(path: str | Path, expect_dims: int = 3, channels: int = 1) -> VolumeHeader:
    """Check one image: ``expect_dims`` spatial axes, ``channels`` channels, no NaN/Inf voxels."""
    head = read_header(path, expect_dims)
    _check_channels(head, expect_dims, channels)
    _check_finite(head)
    return head


def _check_channels(head: VolumeHeader, expect_dims: int, channels: int) -> None:
    if head.channels == channels:
        return
    if channels == 1 and head.is_nifti:
        raise MedTuneError(
            f"is a {len(head.stored_shape)}D volume (shape {head.stored_shape}) where a {expect_dims}D one is "
            "expected (the dataset declares 1 channel)",
            head.path,
        )
    raise MedTuneError(f"has {head.channels} channel(s), dataset.json declares {channels}", head.path)


def _check_finite(head: VolumeHeader) -> None:
    """NaN/Inf voxels (non-NIfTI images were checked by the runtime reader)."""
    if head.is_nifti and _may_hold_nonfinite(head.source):
        arr = head.data()
        finite = np.isfinite(arr)
        if not finite.all():
            raise MedTuneError(
                f"image holds {int(finite.size - np.count_nonzero(finite))} NaN or Inf voxel(s)", head.path
            )


def check_label(path: str | Path, declared_labels: set[int] | None, expect_dims: int = 3) -> set[int]:
    """Check one label map: ``expect_dims`` axes, integer values, all in ``declared_labels`` (``None``: any
    value >= 0). Returns the values present."""
    head = read_label_header(path, expect_dims)
    return _label_values(head, declared_labels)


def read_label_header(path: str | Path, expect_dims: int = 3) -> VolumeHeader:
    """Header of a label map, refusing one with a channel axis."""
    head = read_header(path, expect_dims)
    if head.channels != 1:
        kind = f"{len(head.stored_shape)}D" if head.is_nifti else f"{head.channels}-channel"
        raise MedTuneError(
            f"label map is {kind} (shape {head.stored_shape}) where a {expect_dims}D label map is expected", head.path
        )
    return head


def check_pair(
    image_path: str | Path,
    label_path: str | Path,
    declared_labels: set[int] | None,
    expect_dims: int = 3,
    channels: int = 1,
) -> set[int]:
    """Check that a label map fits its image; raise a one-line MedTuneError naming the offending file.

    Checks, cheapest first: dimensionality (a channel axis on the image only if ``channels > 1``), spatial shape,
    spacing (relative tolerance 1e-3), affine (orientation and origin, tolerance 1e-3 of the smallest voxel size),
    integer label values all in ``declared_labels`` (``None``: any value >= 0), no NaN/Inf image voxels. Spacing
    and affine are compared only when both files are NIfTI. Returns the label values present.
    """
    image = read_header(image_path, expect_dims)
    label = read_label_header(label_path, expect_dims)
    _check_channels(image, expect_dims, channels)
    if label.spatial_shape != image.spatial_shape:
        raise MedTuneError(
            f"label shape {label.spatial_shape} differs from image shape {image.spatial_shape} "
            f"(image {_short(image.path)})",
            label.path,
        )
    if image.is_nifti and label.is_nifti:
        _check_same_grid(image, label)
    values = _label_values(label, declared_labels)
    _check_finite(image)
    return values


def _check_same_grid(image: VolumeHeader, label: VolumeHeader) -> None:
    assert image.spacing is not None and label.spacing is not None and image.affine is not None
    img_sp, lab_sp = np.asarray(image.spacing), np.asarray(label.spacing)
    if not np.all(np.abs(img_sp - lab_sp) <= SPACING_RTOL * np.maximum(np.abs(img_sp), np.abs(lab_sp))):
        raise MedTuneError(
            f"label spacing {_fmt(label.spacing)} differs from image spacing {_fmt(image.spacing)} "
            f"(image {_short(image.path)})",
            label.path,
        )
    a, b = image.affine, label.affine
    assert b is not None
    tol = AFFINE_TOL * max(float(np.min(np.abs(img_sp))), 1e-6)
    diff = float(np.max(np.abs(a[:3, :4] - b[:3, :4])))
    if diff > tol:
        import nibabel as nib

        a_codes, b_codes = "".join(nib.aff2axcodes(a)), "".join(nib.aff2axcodes(b))
        what = (
            f"label orientation {b_codes} differs from image orientation {a_codes}"
            if a_codes != b_codes
            else f"label affine (orientation/origin) differs from the image's by up to {diff:.4g} mm"
        )
        raise MedTuneError(
            f"{what} (image {_short(image.path)}); the label map is not aligned with its image", label.path
        )


def _label_values(label: VolumeHeader, declared: set[int] | None) -> set[int]:
    arr = np.asarray(label.data())
    if arr.dtype.kind not in "iub":
        finite = np.isfinite(arr)
        if not finite.all():
            raise MedTuneError("label map holds NaN or Inf values", label.path)
        off = arr != np.round(arr)
        if off.any():
            examples = sorted({float(v) for v in arr[off].ravel()[:1000].tolist()})[:5]
            raise MedTuneError(f"label map holds non-integer values (e.g. {examples})", label.path)
        arr = arr.astype(np.int64)
    lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
    if lo >= 0 and hi < 1 << 16:
        values = set(np.flatnonzero(np.bincount(arr.ravel().astype(np.intp, copy=False))).tolist())
    else:
        values = set(np.unique(arr).astype(np.int64).tolist())
    if declared is None:
        negative = sorted(v for v in values if v < 0)
        if negative:
            raise MedTuneError(f"label map holds negative values {negative[:10]}", label.path)
    else:
        undeclared = sorted(values - set(declared))
        if undeclared:
            raise MedTuneError(f"label values {undeclared[:10]} not in declared labels {sorted(declared)}", label.path)
    return values


def _may_hold_nonfinite(img: Any) -> bool:
    """Integer voxels with finite (or no) scaling cannot be NaN/Inf: skip reading them."""
    if np.dtype(img.get_data_dtype()).kind in "iub":
        slope, inter = img.header.get_slope_inter()
        return not all(v is None or np.isfinite(v) for v in (slope, inter))
    return True


def _short(path: Path) -> str:
    """``folder/name`` of a file, enough to tell the image from its label in a message."""
    return f"{path.parent.name}/{path.name}"


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
