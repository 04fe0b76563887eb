"""DICOM series in, DICOM SEG out (torch-free).

Geometry convention (the same as nibabel's DICOM wrappers and dicom2nifti, before any reorientation):

* ``DicomSeries.array`` has shape ``(X, Y, Z)`` = ``(Columns, Rows, slices)``: ``array[i, j, k]`` is
  ``pixel_array[j, i]`` of the ``k``-th slice, i.e. each DICOM frame is transposed and ``i`` runs along
  the row direction cosine (``ImageOrientationPatient[:3]``), ``j`` along the column direction cosine
  (``ImageOrientationPatient[3:]``).
* Slices are sorted by ``ImagePositionPatient`` projected on the slice normal
  ``n = IOP[:3] x IOP[3:]`` (ascending), so ``k`` runs along ``+n`` (for axial slices: towards the head).
* DICOM patient coordinates are LPS; ``affine`` maps voxel indices ``(i, j, k, 1)`` to NIfTI RAS+ world
  millimetres: ``affine = diag(-1, -1, 1, 1) @ affine_lps`` with
  ``affine_lps[:3, :3] = [IOP[:3] * PixelSpacing[1], IOP[3:] * PixelSpacing[0], (IPP_last - IPP_first) / (Z - 1)]``
  and ``affine_lps[:3, 3] = IPP_first``. ``nibabel.Nifti1Image(series.array, series.affine)`` therefore
  saves with the right geometry (no axis flips are applied to the array; use ``nibabel.as_closest_canonical``
  if a canonical RAS voxel order is wanted).

Folder policy: files that are not DICOM (no DICOM header pydicom can parse) and DICOM objects that are not
single-frame images (DICOMDIR, SR, SEG, RT objects, presentation states) are skipped and listed in
``DicomSeries.skipped``. An image file that cannot be fully read or decoded (truncated, missing pixel
data, no decoder for its transfer syntax) raises a one-line :class:`MedTuneError` naming it. Every file's
header is parsed; pixel data is decoded only for the selected series.

pydicom 2.4 (what Slicer 5.10 ships) and 3.x both work for reading. Reading is written on pydicom alone rather
than on highdicom's ``get_volume_from_series`` (highdicom >= 0.28) on purpose: every highdicom that works with
numpy 2 needs pydicom >= 3, so that would break DICOM import in Slicer 5.10 (tested by ``.ci/py312``). DICOM SEG
output needs highdicom >= 0.23 (pydicom >= 3.0.1; 0.22, the last for pydicom 2.4, fails under numpy 2); without
it, :func:`write_dicom_seg` raises a one-line error saying what to install.

Values are modality values (``RescaleSlope`` / ``RescaleIntercept`` applied per slice) as float32.
Compressed transfer syntaxes are decoded by pydicom's plugins (``pylibjpeg`` + ``pylibjpeg-libjpeg`` for
JPEG / JPEG Lossless / JPEG-LS, ``pyjpegls`` for JPEG-LS, numpy for RLE).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medtune import __version__
from medtune.atomic import write_with
from medtune.errors import MedTuneError, one_line

if TYPE_CHECKING:  # pragma: no cover
    from pydicom import Dataset

logger = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOL = 1e-4  # direction cosines
POSITION_TOL_MM = 0.01  # slice positions and in-plane spacing, mm (plus 1% of the slice step)


@dataclass
class DicomSeries:
    """One DICOM image series as a RAS+ volume (see the module docstring for the convention)."""

    array: np.ndarray  # (X, Y, Z) float32
    affine: np.ndarray  # 4x4, voxel (i, j, k) -> RAS+ mm
    spacing: tuple[float, float, float]  # (column spacing, row spacing, slice spacing) mm
    series_instance_uid: str
    files: list[Path]  # one per slice, in Z order
    datasets: list[Dataset] = field(repr=False, default_factory=list)  # headers (no pixel data), in Z order
    skipped: list[Path] = field(default_factory=list)  # non-DICOM / non-image files left out

    @property
    def shape(self) -> tuple[int, int, int]:
        i, j, k = self.array.shape  # the series reader always builds a 3D array
        return (i, j, k)

    @property
    def affine_lps(self) -> np.ndarray:
        """Voxel -> DICOM patient (LPS) mm."""
        return LPS_TO_RAS @ self.affine


def _is_single_image(ds: Dataset) -> bool | None:
    """True: an image SOP class; False: another DICOM object; None: no SOP class at all (broken file)."""
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if not uid:
        return None
    name = UID(str(uid)).name
    if name == str(uid):  # unknown / private SOP class: judge by content
        return "Rows" in ds or "PixelData" in ds
    return "Image Storage" in name


def _scan(folder: Path) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[Path]]:
    """Read every file of ``folder`` (not recursive) and group image files by SeriesInstanceUID."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped: list[Path] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            skipped.append(path)
            continue
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes a one-line error
            raise MedTuneError(f"unreadable DICOM file ({one_line(exc, 160)})", path) from exc
        kind = _is_single_image(ds)
        if kind is None:
            raise MedTuneError("truncated or incomplete DICOM file (no SOP Class UID)", path)
        if not kind:
            skipped.append(path)
            continue
        if "PixelData" not in ds:
            raise MedTuneError("truncated DICOM image (no pixel data)", path)
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            raise MedTuneError("DICOM image without SeriesInstanceUID", path)
        groups.setdefault(uid, []).append((path, ds))
    return groups, skipped


def _geometry(path: Path, ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IOP as 2x3, IPP, PixelSpacing as (row, col)) of one slice, with one-line errors."""
    for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        element = ds.data_element(tag) if tag in ds else None
        if element is None or element.value in (None, ""):
            raise MedTuneError(f"DICOM image without {tag}: cannot place it in a volume", path)
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64).reshape(2, 3)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64).reshape(3)
        ps = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64).reshape(2)
    except (TypeError, ValueError) as exc:
        raise MedTuneError(f"malformed geometry tags ({one_line(exc, 160)})", path) from exc
    if not np.allclose(np.linalg.norm(iop, axis=1), 1.0, atol=1e-3) or abs(float(iop[0] @ iop[1])) > 1e-3:
        raise MedTuneError("ImageOrientationPatient is not two orthonormal direction cosines", path)
    if np.any(ps <= 0):
        raise MedTuneError("PixelSpacing must be positive", path)
    return iop, ipp, ps


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    """Decoded frame (rows, cols) as float32 modality values."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise MedTuneError(f"multi-frame DICOM ({frames} frames) is not supported; expected one file per slice", path)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise MedTuneError("colour DICOM image in a series; expected grayscale slices", path)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data, missing decoder plugin, ...
        raise MedTuneError(f"cannot decode pixel data ({one_line(exc, 160)})", path) from exc
    if arr.ndim != 2:
        raise MedTuneError(f"unexpected pixel array shape {arr.shape}", path)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def read_dicom_series(folder: str | Path, series_instance_uid: str | None = None) -> DicomSeries:
    """Read one single-frame DICOM image series from ``folder`` into a RAS+ volume with its affine.

    If the folder holds several series, pass ``series_instance_uid``; otherwise a one-line error lists them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedTuneError("DICOM folder not found", folder)
    groups, skipped = _scan(folder)
    if skipped:  # a count only: file names may carry identifiers
        logger.info("DICOM series reader skipped %d non-image file(s)", len(skipped))
    if not groups:
        raise MedTuneError("no DICOM image files in folder", folder)
    # UIDs identify a patient's study: messages give counts only, never the UIDs themselves
    if series_instance_uid is not None:
        if series_instance_uid not in groups:
            raise MedTuneError(f"the requested series is not in this folder (it holds {len(groups)} series)", folder)
        members = groups[series_instance_uid]
    elif len(groups) > 1:
        sizes = ", ".join(str(len(v)) for _, v in sorted(groups.items(), key=lambda kv: -len(kv[1])))
        raise MedTuneError(
            f"folder holds {len(groups)} DICOM series ({sizes} files); put each series in its own folder", folder
        )
    else:
        members = next(iter(groups.values()))
    uid = series_instance_uid or str(members[0][1].SeriesInstanceUID)

    # geometry of every slice, checked against the first one
    p0, ds0 = members[0]
    iop0, _, ps0 = _geometry(p0, ds0)
    rows0, cols0 = int(ds0.Rows), int(ds0.Columns)
    normal = np.cross(iop0[0], iop0[1])
    placed = []
    for path, ds in members:
        iop, ipp, ps = _geometry(path, ds)
        if not np.allclose(iop, iop0, atol=ORIENTATION_TOL):
            raise MedTuneError(
                f"slice orientation {iop.ravel().round(5).tolist()} differs from the series' "
                f"{iop0.ravel().round(5).tolist()}",
                path,
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows0, cols0):
            raise MedTuneError(
                f"slice size {int(ds.Rows)}x{int(ds.Columns)} differs from the series' {rows0}x{cols0}", path
            )
        if not np.allclose(ps, ps0, atol=POSITION_TOL_MM):
            raise MedTuneError(f"PixelSpacing {ps.tolist()} differs from the series' {ps0.tolist()}", path)
        placed.append((float(ipp @ normal), ipp, path, ds))
    placed.sort(key=lambda t: t[0])

    n = len(placed)
    positions = np.stack([t[1] for t in placed])
    if n > 1:
        dist = np.diff([t[0] for t in placed])
        if np.any(dist <= POSITION_TOL_MM):
            k = int(np.argmax(dist <= POSITION_TOL_MM)) + 1
            raise MedTuneError(f"duplicate slice position (same as {placed[k - 1][2].name})", placed[k][2])
        step = (positions[-1] - positions[0]) / (n - 1)
        expected = positions[0] + np.arange(n)[:, None] * step
        err = np.linalg.norm(positions - expected, axis=1)
        tol = POSITION_TOL_MM + 0.01 * float(np.linalg.norm(step))
        if np.any(err > tol):
            k = int(np.argmax(err))
            raise MedTuneError(
                f"uneven slice spacing or missing slice (off the regular grid by {err[k]:.3f} mm)", placed[k][2]
            )
    else:
        thickness = float(ds0.get("SpacingBetweenSlices", 0) or ds0.get("SliceThickness", 0) or 1.0)
        step = normal * thickness

    volume = np.empty((cols0, rows0, n), dtype=np.float32)
    headers = []
    for k, (_, _, path, ds) in enumerate(placed):
        volume[:, :, k] = _pixels(path, ds).T
        del ds.PixelData  # keep headers only (SOP instance references for DICOM SEG)
        headers.append(ds)
    if not np.all(np.isfinite(volume)):
        raise MedTuneError("series holds NaN or Inf values", folder)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = iop0[0] * ps0[1]
    affine_lps[:3, 1] = iop0[1] * ps0[0]
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    spacing = (float(ps0[1]), float(ps0[0]), float(np.linalg.norm(step)))
    return DicomSeries(volume, LPS_TO_RAS @ affine_lps, spacing, uid, [t[2] for t in placed], headers, skipped)


# Type 2 Patient / General Study attributes DICOM SEG must carry (present, possibly empty). De-identified
# sources often drop them; they are then added EMPTY, never filled with anything.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def _with_type2_patient_study(datasets: list[Dataset]) -> list[Dataset]:
    missing = [kw for kw in _TYPE2_PATIENT_STUDY if kw not in datasets[0]]
    if not missing:
        return datasets
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        for kw in missing:
            if kw not in ds:
                setattr(ds, kw, "")
        out.append(ds)
    return out


HIGHDICOM_MIN = (0, 23)


def _highdicom(out_path: Path) -> Any:
    """``highdicom`` if a version that writes DICOM SEG is installed, else a one-line :class:`MedTuneError`."""
    import pydicom

    need = "DICOM SEG output needs highdicom>=0.23 (which needs pydicom>=3.0.1)"
    try:
        import highdicom as hd
    except ImportError as exc:
        raise MedTuneError(f"{need}; highdicom is not installed (pydicom {pydicom.__version__})", out_path) from exc
    found = tuple(int(p) for p in hd.__version__.split(".")[:2] if p.isdigit())
    if found < HIGHDICOM_MIN:
        raise MedTuneError(f"{need}; found highdicom {hd.__version__} with pydicom {pydicom.__version__}", out_path)
    return hd


def write_dicom_seg(
    label_map: np.ndarray,
    series: DicomSeries,
    class_names: dict[int, str],
    out_path: str | Path,
    *,
    algorithm_name: str = "MedTune",
    algorithm_version: str = __version__,
    series_description: str = "MedTune segmentation",
) -> Path:
    """Write ``label_map`` (X, Y, Z) integer labels on ``series``' voxel grid as a BINARY DICOM Segmentation.

    One segment per non-zero class present (segment numbers 1..n in class order, labelled from
    ``class_names``), referencing the source series' SOP instances. Patient/study attributes are copied
    from the source as the DICOM standard requires; nothing else identifying is added. Written atomically.
    """
    out_path = Path(out_path)
    hd = _highdicom(out_path)
    from pydicom.sr.codedict import codes

    label_map = np.asarray(label_map)
    if label_map.shape != series.shape:
        raise MedTuneError(f"label map shape {label_map.shape} does not match the series grid {series.shape}", out_path)
    if not np.issubdtype(label_map.dtype, np.integer):
        raise MedTuneError(f"label map must hold integer labels, got {label_map.dtype}", out_path)
    if label_map.size and int(label_map.min()) < 0:
        raise MedTuneError("label map holds negative labels", out_path)
    present = [int(c) for c in np.unique(label_map) if c != 0]
    if not present:
        raise MedTuneError("label map is empty (no non-zero class): nothing to write", out_path)
    unknown = [c for c in present if c not in class_names]
    if unknown:
        raise MedTuneError(f"label map classes {unknown} have no entry in class_names", out_path)
    if not series.datasets:
        raise MedTuneError("series has no source DICOM headers to reference", out_path)

    # relabel classes -> segment numbers 1..n, frames in the series' Z order as (rows, cols)
    lut = np.zeros(int(label_map.max()) + 1, dtype=np.uint8)
    for number, cls in enumerate(present, start=1):
        lut[cls] = number
    frames = np.ascontiguousarray(np.transpose(lut[label_map], (2, 1, 0)))  # (Z, rows, cols)

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=str(algorithm_version)
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=str(class_names[cls])[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=f"class {cls}",
            tracking_uid=hd.UID(),
        )
        for number, cls in enumerate(present, start=1)
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=_with_type2_patient_study(series.datasets),
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=max(int(series.datasets[0].get("SeriesNumber", 0) or 0), 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="MedTune",
            manufacturer_model_name=algorithm_name,
            software_versions=str(algorithm_version),
            device_serial_number="0",
            series_description=series_description[:64],
        )
    except Exception as exc:  # noqa: BLE001 - highdicom validation errors become one line
        raise MedTuneError(f"cannot build DICOM SEG ({one_line(exc, 160)})", out_path) from exc
    write_with(out_path, lambda tmp: seg.save_as(tmp))
    return out_path


__all__ = ["DicomSeries", "read_dicom_series", "write_dicom_seg"]
