"""Segment NIfTI volumes with an exported 3D model (torch-free): one file, or a folder with per-case errors.

Sidecar fields used (besides those :class:`~medtune.runtime.model.OnnxModel` reads): ``preprocessing`` (volume
ops, :mod:`medtune.runtime.volume`), ``sliding_window`` (``roi_size``, ``overlap``, ``mode``),
``postprocessing`` (``activation``, ``argmax``), ``input.dynamic_spatial`` (``false``: the graph only runs at
exactly ``roi_size``, e.g. SwinUNETR; windows are always ROI-sized, so both work).
Output: a uint8 label map (label values from the sidecar) with the input's exact shape, affine and header.

DICOM input: a folder holding one single-frame image series (files with the ``DICM`` preamble), or a folder of
such folders, is read with :func:`~medtune.runtime.dicom.read_dicom_series` and segmented like a NIfTI volume.
Each series gets ``out_dir/series_<first 8 hex of sha1(SeriesInstanceUID)>/`` holding ``labels.nii.gz`` (the
series' RAS+ geometry) and ``seg.dcm`` (a DICOM SEG referencing the source series; not written when no
foreground label was found). Output names carry no patient identifiers.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medtune.atomic import write_bytes_atomic
from medtune.errors import MedTuneError
from medtune.runtime.model import OnnxModel, softmax
from medtune.runtime.providers import create_session
from medtune.runtime.readers import image_kind
from medtune.runtime.sidecar import read_sidecar, sidecar_path
from medtune.runtime.sliding_window import sliding_window
from medtune.runtime.tta import volume_logits
from medtune.runtime.volume import Volume, check_ops, from_model_space, read_volume, to_model_space

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_volume_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """Read and check a segmentation sidecar (format, sha256, volume preprocessing ops)."""
    onnx_path = Path(onnx_path)
    sidecar = read_sidecar(onnx_path)  # format, plain data, sha256 (medtune.runtime.sidecar)
    path = sidecar_path(onnx_path)
    try:
        check_ops(sidecar.get("preprocessing", []))
    except ValueError as exc:
        raise MedTuneError(str(exc), path) from exc
    if sidecar.get("task", "segmentation") != "segmentation":
        raise MedTuneError(f"model task is {sidecar.get('task')!r}, not segmentation", path)
    if not (sidecar.get("sliding_window") or {}).get("roi_size"):
        raise MedTuneError("sidecar has no sliding_window.roi_size", path)
    return sidecar


def load_volume_model(model_path: str | Path, provider: str = "auto", threads: int | None = None) -> OnnxModel:
    """Open a segmentation model (``model.onnx`` or its folder). ``OnnxModel.load`` only accepts 2D ops."""
    onnx_path = Path(model_path)
    if onnx_path.is_dir():
        onnx_path = onnx_path / "model.onnx"
    sidecar = read_volume_sidecar(onnx_path)
    session, used, message = create_session(onnx_path, provider, threads)
    return OnnxModel(onnx_path, sidecar, session, used, message)


def _window_batch(model: OnnxModel, roi: list[int]) -> int:
    """Windows per ORT call: 1 if the batch axis is fixed; checks a fixed spatial input equals the ROI."""
    shape = list(model.input_shape)
    fixed = list(shape[2:])
    ints = [d for d in fixed if isinstance(d, int)]
    if fixed and len(ints) == len(fixed) and ints != roi:
        raise MedTuneError(f"model input is fixed at {tuple(fixed)} but sliding_window.roi_size is {roi}", model.path)
    return 1 if isinstance(shape[0], int) else 2


def predict_volume(model: OnnxModel, arr: np.ndarray) -> np.ndarray:
    """Blended logits ``(K, *spatial)`` for a model-space volume ``(C, *spatial)``."""
    sw = model.sidecar.get("sliding_window") or {}
    roi = [int(r) for r in sw["roi_size"]]
    if arr.shape[0] != model.channels:
        raise MedTuneError(f"volume has {arr.shape[0]} channels; model expects {model.channels}")
    return sliding_window(
        model.predict_batch,
        arr,
        roi,
        overlap=float(sw.get("overlap", 0.5)),
        mode=str(sw.get("mode", "gaussian")),
        sw_batch_size=_window_batch(model, roi),
    )


def postprocess(model: OnnxModel, logits: np.ndarray) -> np.ndarray:
    """Label map (uint8 label values) from blended logits: softmax/none -> argmax; sigmoid -> per-class > 0.5."""
    values = model.label_values
    if model.activation == "sigmoid":
        probs = 1.0 / (1.0 + np.exp(-logits))
        if probs.shape[0] == 1:
            return (probs[0] > 0.5).astype(np.uint8) * np.uint8(values[-1] if values else 1)
        idx = np.argmax(probs, axis=0)
        idx = np.where(probs.max(axis=0) > 0.5, idx, 0)
    else:
        idx = np.argmax(softmax(logits, axis=0) if model.activation == "softmax" else logits, axis=0)
    if len(values) == logits.shape[0]:
        lut = np.asarray(values)
        if lut.min() < 0 or lut.max() > 255:
            raise MedTuneError("label values must fit in uint8 (0..255)", model.sidecar_path)
        return lut[idx].astype(np.uint8)
    return idx.astype(np.uint8)


def write_labels(labels: np.ndarray, reference: Any, out_path: str | Path) -> None:
    """Write a uint8 label NIfTI with ``reference``'s affine and header, atomically (gzip for ``.nii.gz``); the
    header's free-text fields and extensions, which may name the patient, are not copied."""
    from medtune.nifti import blank_text_fields, nifti_bytes, nifti_image

    header = reference.header.copy() if reference.header is not None else None
    if header is not None and hasattr(header, "extensions"):
        blank_text_fields(header)
    img = nifti_image(np.asarray(labels, dtype=np.uint8), reference.affine, header=header)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    write_bytes_atomic(out_path, nifti_bytes(img, compress=str(out_path).lower().endswith(".gz"), compresslevel=6))


def mean_entropy(model: OnnxModel, logits: np.ndarray) -> float:
    """Mean normalized predictive entropy (0 = certain, 1 = uniform) of blended logits ``(K, *spatial)``."""
    logits = np.asarray(logits, dtype=np.float64)
    k = logits.shape[0]
    if model.activation == "sigmoid" or k == 1:  # independent binary outputs: mean binary entropy
        p = np.clip(1.0 / (1.0 + np.exp(-logits)), 1e-12, 1 - 1e-12)
        return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))) / np.log(2))
    p = softmax(logits, axis=0) if model.activation == "softmax" else logits
    p = np.clip(p, 1e-12, 1.0)
    return float(np.mean(-np.sum(p * np.log(p), axis=0)) / np.log(k))


def segment_volume(model: OnnxModel, volume: Volume, path: str | Path | None = None) -> tuple[np.ndarray, float]:
    """``(label map, mean entropy)`` for a loaded volume: uint8 labels on the volume's grid; errors name ``path``.

    The entropy (see :func:`mean_entropy`, computed in model space) orders a labeling queue most-uncertain-first.
    """
    path = path or volume.path
    if volume.array.ndim != 4:
        raise MedTuneError(f"expected a 3D volume, got array shape {volume.array.shape}", path)
    if volume.array.shape[0] != model.channels:
        raise MedTuneError(f"volume has {volume.array.shape[0]} channel(s); model expects {model.channels}", path)
    if model.spatial_dims != 3:
        raise MedTuneError(f"model is {model.spatial_dims}D; a volume needs a 3D segmentation model", path)
    try:
        arr, info = to_model_space(volume, model.sidecar.get("preprocessing", []))
    except (ValueError, KeyError, TypeError) as exc:
        raise MedTuneError(f"preprocessing failed ({exc})", path) from exc
    try:
        logits = volume_logits(model, arr, predict_volume)  # with the sidecar's test-time flips, if any
    except MedTuneError as exc:
        raise MedTuneError(str(exc).removeprefix(f"{model.path}: "), path) from exc
    return from_model_space(postprocess(model, logits), info), mean_entropy(model, logits)


def _segment_volume(model: OnnxModel, volume: Volume, path: str | Path) -> np.ndarray:
    return segment_volume(model, volume, path)[0]


def segment_file(model: OnnxModel, path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Segment one NIfTI volume into ``out_path``. Returns ``{file, out, shape, labels_present}``."""
    path = Path(path)
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        kinds = {"png": "a 2D image", "dicom": "a single DICOM file (pass its series folder)"}
        kind = kinds.get(image_kind(path), "not a NIfTI volume")
        raise MedTuneError(f"{kind}: a 3D segmentation model expects a .nii/.nii.gz volume or a DICOM series", path)
    volume = read_volume(path)
    labels = _segment_volume(model, volume, path)
    write_labels(labels, volume, out_path)
    return {
        "file": str(path),
        "out": str(out_path),
        "shape": list(labels.shape),
        "labels_present": [int(v) for v in np.unique(labels)],
    }


def is_dicom_file(path: str | Path) -> bool:
    """True if ``path`` is a file with the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def series_output_name(series_instance_uid: str) -> str:
    """Opaque, identifier-free output name for a series: ``series_<first 8 hex of sha1(UID)>``."""
    return "series_" + hashlib.sha1(series_instance_uid.encode("ascii", "replace")).hexdigest()[:8]


def segment_dicom_series(model: OnnxModel, folder: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Segment the DICOM series in ``folder`` into ``out_dir/series_<hash>/`` (``labels.nii.gz`` + ``seg.dcm``).

    Returns ``{file, out, shape, labels_present, seg}`` (``seg`` is ``None`` when no foreground was found).
    Nothing is left in ``out_dir`` if writing fails.
    """
    from medtune.runtime.dicom import read_dicom_series, write_dicom_seg

    folder, out_dir = Path(folder), Path(out_dir)
    series = read_dicom_series(folder)
    volume = Volume(np.ascontiguousarray(series.array[None]), np.asarray(series.affine, dtype=np.float64))
    labels = _segment_volume(model, volume, folder)
    target = out_dir / series_output_name(series.series_instance_uid)
    if target.exists():
        raise MedTuneError(f"output {target.name} already exists (series given twice?)", folder)
    class_names = dict(zip(model.label_values, model.labels, strict=False))
    has_fg = bool(np.any(labels != 0))
    try:
        write_labels(labels, volume, target / "labels.nii.gz")
        if has_fg:
            write_dicom_seg(labels, series, class_names, target / "seg.dcm")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return {
        "file": str(folder),
        "out": str(target / "labels.nii.gz"),
        "seg": str(target / "seg.dcm") if has_fg else None,
        "shape": list(labels.shape),
        "labels_present": [int(v) for v in np.unique(labels)],
    }


def find_volumes(input_path: str | Path) -> list[Path]:
    """One file as given, or a folder's NIfTI files (recursive, sorted, no hidden files)."""
    root = Path(input_path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise MedTuneError("input not found (expected a NIfTI file, a DICOM series folder or a folder)", root)
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and str(p).lower().endswith(NIFTI_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def find_dicom_series_folders(input_path: str | Path) -> list[Path]:
    """Folders (``input_path`` itself or below it, no hidden ones) directly holding DICOM files, sorted."""
    root = Path(input_path)
    if not root.is_dir():
        return []
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    return [
        d
        for d in folders
        if not any(part.startswith(".") for part in d.relative_to(root).parts)
        and any(f.is_file() and not f.name.startswith(".") and is_dicom_file(f) for f in d.iterdir())
    ]


def segment_folder(
    model_path: str | Path,
    input_path: str | Path,
    out_dir: str | Path,
    provider: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Segment a NIfTI file, a DICOM series folder, or a folder of NIfTI files / series folders into ``out_dir``
    (NIfTI: same relative names; DICOM: see :func:`segment_dicom_series`). A failing case is reported (stderr
    and its result's ``error``) and the rest go on. Returns ``{n_ok, n_failed, provider, provider_message,
    out_dir, results}``."""
    from tqdm import tqdm

    model = load_volume_model(model_path, provider=provider)
    root, out_dir = Path(input_path), Path(out_dir)
    files = find_volumes(root)
    out_abs = out_dir.resolve()
    series_dirs = [d for d in find_dicom_series_folders(root) if not d.resolve().is_relative_to(out_abs)]
    if not files and not series_dirs:
        raise MedTuneError("no NIfTI files (.nii / .nii.gz) or DICOM series found", root)
    results: list[dict[str, Any]] = []
    cases = [(f, False) for f in files] + [(d, True) for d in series_dirs]
    with tqdm(total=len(cases), unit="vol", file=sys.stderr, disable=not progress, desc="segment") as bar:
        for f, is_series in cases:
            try:
                if is_series:
                    row = segment_dicom_series(model, f, out_dir)
                else:
                    out = out_dir / (f.relative_to(root) if root.is_dir() else Path(f.name))
                    if out.resolve() == f.resolve():
                        raise MedTuneError("output would overwrite the input (choose another output folder)", f)
                    row = segment_file(model, f, out)
                row["error"] = None
            except MedTuneError as exc:
                row = {"file": str(f), "out": None, "error": str(exc)}
                bar.write(f"error: {exc}", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - one bad case must not stop the folder
                row = {"file": str(f), "out": None, "error": f"{f}: {type(exc).__name__}: {exc}"}
                bar.write(f"error: {row['error']}", file=sys.stderr)
            results.append(row)
            bar.update(1)
    n_failed = sum(1 for r in results if r["error"])
    return {
        "n_ok": len(results) - n_failed,
        "n_failed": n_failed,
        "provider": model.provider,
        "provider_message": model.provider_message,
        "out_dir": str(out_dir),
        "results": results,
    }
