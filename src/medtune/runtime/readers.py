"""Image readers (torch-free): PNG/JPEG, NIfTI and DICOM to channel-first float32 numpy arrays.

Array layout convention shared by training and runtime: ``(C, rows, cols)`` for 2D images, i.e. the
PIL/numpy orientation of a PNG and the ``pixel_array`` orientation of DICOM; NIfTI keeps nibabel's
voxel axes ``(C, i, j[, k])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

import numpy as np

from medtune.errors import MedTuneError, one_line

PNG_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
# An image larger than this is refused before its voxels are read (a 2 GiB float32 array); real CT is ~10^8
MAX_VOXELS = 1 << 29


def check_shape(shape: tuple[int, ...], path: str | Path) -> None:
    """Refuse a header shape with a zero (or negative) axis or more than :data:`MAX_VOXELS` voxels (one line)."""
    dims = tuple(int(n) for n in shape)
    if not dims or any(n <= 0 for n in dims):
        raise MedTuneError(f"image header has an empty axis (shape {dims}): no voxels to read", path)
    total = 1
    for n in dims:
        total *= n
    if total > MAX_VOXELS:
        raise MedTuneError(
            f"image header claims shape {dims} ({total:.3g} voxels, more than the {MAX_VOXELS:.3g} MedTune reads): "
            "corrupt or not a scan",
            path,
        )


@dataclass
class ImageData:
    """Pixels (channel-first float32) and geometry."""

    array: np.ndarray
    spacing: tuple[float, ...] = ()
    affine: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[1:])


def image_kind(path: str | Path) -> str:
    """``png`` | ``nifti`` | ``dicom`` | ``unknown`` from the file name (DICOM also by its preamble)."""
    name = str(path).lower()
    if name.endswith(PNG_SUFFIXES):
        return "png"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        if len(head) == 132 and head[128:132] == b"DICM":
            return "dicom"
    except OSError:
        pass
    return "unknown"


def read_image(path: str | Path, spatial_dims: int | None = None) -> ImageData:
    """Read one image file. Raises :class:`MedTuneError` (one line, naming the file) on bad input."""
    path = Path(path)
    if not path.is_file():
        raise MedTuneError("image file not found", path)
    kind = image_kind(path)
    try:
        if kind == "png":
            data = _read_png(path)
        elif kind == "nifti":
            data = _read_nifti(path)
        elif kind == "dicom":
            data = _read_dicom_file(path)
        else:
            raise MedTuneError("not an image (expected PNG/JPEG, NIfTI .nii/.nii.gz or DICOM)", path)
    except MedTuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - every reader failure becomes a one-line error
        raise MedTuneError(f"unreadable {kind} image ({one_line(exc, 160)})", path) from exc
    if spatial_dims is not None:
        data = _squeeze_to(data, spatial_dims, path)
    if not np.all(np.isfinite(data.array)):
        raise MedTuneError("image holds NaN or Inf values", path)
    return data


def _squeeze_to(data: ImageData, spatial_dims: int, path: Path) -> ImageData:
    arr = data.array
    while arr.ndim - 1 > spatial_dims and 1 in arr.shape[1:]:
        axis = 1 + list(arr.shape[1:]).index(1)
        arr = np.squeeze(arr, axis=axis)
    if arr.ndim - 1 != spatial_dims:
        raise MedTuneError(f"expected a {spatial_dims}D image, got spatial shape {tuple(arr.shape[1:])}", path)
    data.array = arr
    data.spacing = tuple(data.spacing[:spatial_dims])
    return data


def _read_png(path: Path) -> ImageData:
    from PIL import Image

    with Image.open(path) as im:
        check_shape((im.height, im.width), path)
        im.load()
        mode = im.mode
        image: Image.Image = im
        if mode in ("RGBA", "LA", "P", "CMYK", "YCbCr"):
            image = im.convert("RGB" if mode != "LA" else "L")
        arr = np.asarray(image)
    arr = arr.astype(np.float32)
    arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    return ImageData(arr, spacing=(1.0, 1.0), meta={"format": "png", "mode": mode})


def _read_nifti(path: Path) -> ImageData:
    import nibabel as nib

    img = cast("SpatialImage", nib.load(str(path)))  # a NIfTI image: nibabel types load() as FileBasedImage
    check_shape(img.header.get_data_shape(), path)
    arr = np.asarray(img.dataobj, dtype=np.float32)
    spacing = tuple(float(z) for z in img.header.get_zooms()[: min(arr.ndim, 3)])
    return ImageData(arr[None], spacing=spacing, affine=np.asarray(img.affine), meta={"format": "nifti"})


def _read_dicom_file(path: Path) -> ImageData:
    import pydicom

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise MedTuneError("DICOM file has no pixel data", path)
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    arr = arr * slope + intercept
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "MONOCHROME1":
        arr = arr.max() - arr
    if arr.ndim == 3 and int(getattr(ds, "SamplesPerPixel", 1)) == 3:
        arr = np.moveaxis(arr, -1, 0)  # (rows, cols, 3) -> (3, rows, cols)
    else:
        arr = arr[None]
    ps = getattr(ds, "PixelSpacing", None)
    spacing = (float(ps[0]), float(ps[1])) if ps else (1.0, 1.0)
    return ImageData(arr, spacing=spacing, meta={"format": "dicom", "modality": str(getattr(ds, "Modality", ""))})
