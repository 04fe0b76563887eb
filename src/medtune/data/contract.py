"""The dataset folder contract: ``dataset.json`` + ``datalist.json`` + ``images/`` + ``labels/``.

Layout (paths in ``datalist.json`` are relative to the dataset folder)::

    DATASET/
      dataset.json     {"format": "medtune.dataset/1", "name", "task", "spatial_dims", "channels",
                        "labels": {"0": "name", ...}, "modality", "description", "source", "synthetic", "license"}
      datalist.json    {"training": [{"image": "images/case_0001.png", "label": 1}, ...],
                        "validation": [...], "testing": [...]}   (Medical Segmentation Decathlon style)
      images/          case_NNNN.png | case_NNNN.nii.gz | ...   (opaque case ids, no patient identifiers)
      labels/          segmentation masks aligned voxel-for-voxel with their image
      .versions/       previous versions of replaced files

Classification labels live in the datalist entry (an int, or a list of ints for multi-label); segmentation
entries name a label file. Torch-free: importable by the Slicer extension.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from medtune.atomic import keep_previous_version, write_json_atomic, write_with
from medtune.data.geometry import check_image, check_pair
from medtune.errors import MedTuneError, read_json_file
from medtune.nifti import save_nifti, write_deidentified_nifti  # one NIfTI writer; save_nifti re-exported
from medtune.runtime.readers import read_image
from medtune.untrusted import file_identity, inside, refuse_expressions

DATASET_FORMAT = "medtune.dataset/1"
DATASET_JSON = "dataset.json"
DATALIST_JSON = "datalist.json"
TASKS = ("classification", "segmentation")
SPLITS = ("training", "validation", "testing")
VERSIONS_DIR = ".versions"
_CASE_RE = re.compile(r"^case_(\d+)(\.|$)")


# ----------------------------------------------------------------------------------------- dataset.json


def create_dataset(
    root: str | Path,
    *,
    name: str,
    task: str,
    spatial_dims: int,
    labels: dict[int, str],
    modality: str,
    channels: int = 1,
    description: str = "",
    source: str = "",
    synthetic: bool = False,
    license: str = "",
    positive_label: int | None = None,
) -> Path:
    """Create (or update the ``dataset.json`` of) a dataset folder; returns its path.

    Refuses an existing non-empty folder that has no ``dataset.json`` (it is not ours to fill). An existing
    ``dataset.json`` is replaced atomically, its previous version kept in ``.versions/``.
    """
    root = Path(root)
    _refuse_foreign_folder(root)
    meta = {
        "format": DATASET_FORMAT,
        "name": name,
        "task": task,
        "spatial_dims": spatial_dims,
        "channels": channels,
        "labels": {str(k): v for k, v in labels.items()} if isinstance(labels, dict) else labels,
        "modality": modality,
        "description": description,
        "source": source,
        "synthetic": synthetic,
        "license": license,
    }
    if positive_label is not None:
        meta["positive_label"] = int(positive_label)
    _check_dataset_meta(meta, root / DATASET_JSON)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    keep_previous_version(root / DATASET_JSON, root / VERSIONS_DIR)
    write_json_atomic(root / DATASET_JSON, meta)
    if not (root / DATALIST_JSON).exists():
        write_json_atomic(root / DATALIST_JSON, {"training": []})
    return root


def _refuse_foreign_folder(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise MedTuneError("exists and is not a folder", root)
    if root.is_dir() and not (root / DATASET_JSON).is_file() and any(root.iterdir()):
        raise MedTuneError(f"folder is not empty and has no {DATASET_JSON}; refusing to write into it", root)


def read_dataset_json(root: str | Path) -> dict[str, Any]:
    """Read and validate ``root/dataset.json``; ``labels`` come back as ``{int: str}``."""
    path = Path(root) / DATASET_JSON
    meta = read_json_file(path, "not found (not a MedTune dataset folder; create one with create_dataset)")
    _check_dataset_meta(meta, path)
    meta = dict(meta)
    meta["labels"] = {int(k): v for k, v in meta["labels"].items()}
    for key, default in (("description", ""), ("source", ""), ("synthetic", False), ("license", "")):
        meta.setdefault(key, default)
    return meta


def _check_dataset_meta(meta: Any, path: Path) -> None:
    """Raise a one-line MedTuneError naming ``path`` for the first problem in ``meta``."""
    if not isinstance(meta, dict):
        raise MedTuneError("must hold a JSON object", path)
    refuse_expressions(meta, path)
    fmt = meta.get("format")
    if fmt != DATASET_FORMAT:
        raise MedTuneError(f"format is {fmt!r}, expected {DATASET_FORMAT!r}", path)
    for key in ("name", "modality"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            raise MedTuneError(f"{key!r} must be a non-empty string", path)
    if meta.get("task") not in TASKS:
        raise MedTuneError(f"unknown task {meta.get('task')!r} (expected one of {', '.join(TASKS)})", path)
    if not _is_int(meta.get("spatial_dims")) or meta["spatial_dims"] not in (2, 3):
        raise MedTuneError(f"spatial_dims must be 2 or 3, got {meta.get('spatial_dims')!r}", path)
    if not _is_int(meta.get("channels")) or meta["channels"] < 1:
        raise MedTuneError(f"channels must be a positive integer, got {meta.get('channels')!r}", path)
    _check_label_map(meta.get("labels"), path)
    values = sorted(int(k) for k in meta["labels"])
    if meta["task"] == "classification" and values != list(range(len(values))):
        raise MedTuneError(
            f"classification 'labels' must be 0..{len(values) - 1} (the network's outputs), got {values}", path
        )
    if "positive_label" in meta and meta["positive_label"] not in values:
        raise MedTuneError(f"'positive_label' {meta['positive_label']!r} is not one of the labels {values}", path)
    for key in ("description", "source", "license"):
        if key in meta and not isinstance(meta[key], str):
            raise MedTuneError(f"{key!r} must be a string", path)
    if "synthetic" in meta and not isinstance(meta["synthetic"], bool):
        raise MedTuneError("'synthetic' must be true or false", path)


def _check_label_map(labels: Any, path: Path) -> None:
    if not isinstance(labels, dict) or not labels:
        raise MedTuneError("'labels' must be a non-empty map of integer value -> class name", path)
    for key, value in labels.items():
        if not (_is_int(key) or (isinstance(key, str) and re.fullmatch(r"-?\d+", key))):
            raise MedTuneError(f"'labels' key {key!r} is not an integer (expected integer value -> name)", path)
        if not isinstance(value, str) or not value.strip():
            raise MedTuneError(f"'labels' name for {key!r} must be a non-empty string", path)
    if len({int(k) for k in labels}) != len(labels):
        raise MedTuneError("'labels' has duplicate integer keys", path)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------- datalist.json


def write_datalist(root: str | Path, datalist: dict[str, list[Any]]) -> Path:
    """Write ``root/datalist.json`` atomically, keeping the previous version in ``root/.versions``.

    A previous file without any entry (the skeleton ``create_dataset`` writes) is not worth keeping.
    """
    root = Path(root)
    path = root / DATALIST_JSON
    if not isinstance(datalist, dict) or not all(isinstance(v, list) for v in datalist.values()):
        raise MedTuneError("datalist must map split names to lists of entries", path)
    if not _is_empty_datalist(path):
        keep_previous_version(path, root / VERSIONS_DIR)
    write_json_atomic(path, datalist)
    return path


def _is_empty_datalist(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return not path.exists()  # unreadable content is kept: it may be someone's work
    return isinstance(data, dict) and not any(data.values())


def read_datalist(root: str | Path) -> dict[str, list[Any]]:
    """The raw ``datalist.json`` (paths relative to ``root``)."""
    path = Path(root) / DATALIST_JSON
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise MedTuneError("must hold a JSON object of split -> list of entries", path)
    for split, entries in data.items():
        if not isinstance(entries, list):
            raise MedTuneError(f"split {split!r} must be a list of entries", path)
    refuse_expressions(data, path)
    return data


def entry_path(root: str | Path, rel: Any, where: str) -> Path:
    """``root / rel`` for a datalist path, refused (one line naming datalist.json and ``where``) unless it is a
    relative path that stays inside the dataset folder once ``..`` and symlinks are resolved."""
    root = Path(root)
    datalist = root / DATALIST_JSON
    if not isinstance(rel, str) or not rel.strip():
        raise MedTuneError(f"{where}: path must be a non-empty string, got {rel!r}", datalist)
    if Path(rel).is_absolute() or re.match(r"^[A-Za-z]:[\\/]", rel):
        raise MedTuneError(f"{where}: {rel!r} is an absolute path (datalist paths are relative)", datalist)
    path = root / rel
    if not inside(path, root):
        raise MedTuneError(f"{where}: {rel!r} leads outside the dataset folder (.. or a symlink)", datalist)
    return path


def load_datalist(root: str | Path, split: str = "training", absolute: bool = True) -> list[dict[str, Any]]:
    """Entries of one split as dicts; ``image`` (and a segmentation ``label`` path) resolved against ``root``.

    Plain-string entries (MSD ``testing`` style) become ``{"image": path}``.
    """
    root = Path(root)
    path = root / DATALIST_JSON
    data = read_datalist(root)
    if split not in data:
        have = ", ".join(data) or "none"
        raise MedTuneError(f"split {split!r} not found (splits present: {have})", path)
    if not data[split]:
        raise MedTuneError(f"split {split!r} is empty", path)
    entries = []
    for i, entry in enumerate(data[split]):
        entry = {"image": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise MedTuneError(f"{split}[{i}]: entry must be an object with an 'image' path", path)
        entry = dict(entry)
        image = entry_path(root, entry["image"], f"{split}[{i}].image")
        label = entry_path(root, entry["label"], f"{split}[{i}].label") if isinstance(entry.get("label"), str) else None
        if absolute:
            entry["image"] = str(image)
            if label is not None:
                entry["label"] = str(label)
        entries.append(entry)
    return entries


# ------------------------------------------------------------------------------------------- validation


def validate_dataset(
    root: str | Path, splits: Iterable[str] = ("training", "validation"), check_images: bool = True
) -> dict[str, dict[str, Any]]:
    """Check every entry of ``splits``; return ``{split: {"n": int, "class_counts": {class: n}}}``.

    ``training`` must be present; other requested splits are checked when present. Checks: image exists
    and (with ``check_images``) is readable with the declared ``spatial_dims`` and ``channels``;
    classification labels are declared classes (labels optional in ``testing``); segmentation label files
    exist and, with ``check_images``, fit their image (:func:`medtune.data.geometry.check_pair`: same shape,
    spacing and affine, integer declared values, no NaN/Inf image voxels); no image is listed twice.
    Raises one MedTuneError for the first problem, saying how many more were found.
    """
    root = Path(root)
    meta = read_dataset_json(root)
    data = read_datalist(root)
    summary: dict[str, dict[str, Any]] = {}
    problems: list[tuple[str, str]] = []
    seen: dict[tuple[int, int] | str, str] = {}  # file identity (or normalised path) -> where first listed
    for split in splits:
        if split not in data and split != "training":
            continue
        entries = load_datalist(root, split, absolute=False)
        counts: dict[int, int] = {k: 0 for k in meta["labels"]} if meta["task"] == "classification" else {}
        for i, entry in enumerate(entries):
            where = f"{split}[{i}] ({entry['image']})"
            problem = _check_entry(root, meta, split, where, entry, check_images, counts)
            if problem:
                problems.append(problem)
            # one file under two names (symlink, hard link, ``..``) is the same (st_dev, st_ino)
            key = file_identity(root / entry["image"]) or os.path.normpath(entry["image"])
            if key in seen:
                problems.append((str(root / DATALIST_JSON), f"{where}: image also listed as {seen[key]} (same file)"))
            seen.setdefault(key, f"{split}[{i}]")
        summary[split] = {"n": len(entries), "class_counts": counts}
    if problems:
        path, msg = problems[0]
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise MedTuneError(msg + more, path)
    return summary


def _check_entry(
    root: Path,
    meta: dict[str, Any],
    split: str,
    where: str,
    entry: dict[str, Any],
    check_images: bool,
    counts: dict[int, int],
) -> tuple[str, str] | None:
    """First problem of one datalist entry as ``(path, message)``, or ``None``."""
    datalist = str(root / DATALIST_JSON)
    image = root / entry["image"]
    if not image.is_file():
        return str(image), f"image file not found (listed in {DATALIST_JSON} as {where.split(' ')[0]})"
    if meta["task"] == "segmentation":
        return _check_seg_entry(root, entry, split, where, meta, check_images, datalist)
    if check_images:
        try:
            arr = read_image(image, meta["spatial_dims"]).array
        except MedTuneError as exc:
            return "", str(exc)
        if arr.shape[0] != meta["channels"]:
            return str(image), f"has {arr.shape[0]} channel(s), dataset.json declares {meta['channels']}"
    return _check_class_label(entry, split, where, meta["labels"], counts, datalist)


def _check_class_label(
    entry: dict[str, Any], split: str, where: str, classes: dict[int, str], counts: dict[int, int], datalist: str
) -> tuple[str, str] | None:
    if "label" not in entry:
        return None if split == "testing" else (datalist, f"{where}: missing 'label'")
    label = entry["label"]
    values = label if isinstance(label, list) else [label]
    if not values or not all(_is_int(v) for v in values):
        return datalist, f"{where}: label {label!r} is not an integer class (or a list of them for multi-label)"
    for v in values:
        if v not in classes:
            return datalist, f"{where}: label {v} not in declared classes {sorted(classes)}"
    for v in set(values):
        counts[v] += 1
    return None


def _check_seg_entry(
    root: Path,
    entry: dict[str, Any],
    split: str,
    where: str,
    meta: dict[str, Any],
    check_images: bool,
    datalist: str,
) -> tuple[str, str] | None:
    """A segmentation entry: its label file exists and (``check_images``) fits the image voxel for voxel.

    The geometry checks (:mod:`medtune.data.geometry`) compare shape, spacing and affine, and refuse NaN/Inf
    image voxels and non-integer or undeclared label values.
    """
    image = root / entry["image"]
    label = entry.get("label")
    path = None
    if label is None:
        if split != "testing":
            return datalist, f"{where}: missing 'label' (segmentation mask path)"
    elif not isinstance(label, str):
        return datalist, f"{where}: segmentation label must be a file path, got {label!r}"
    else:
        path = root / label
        if not path.is_file():
            return str(path), f"label file not found (listed in {DATALIST_JSON} as {where.split(' ')[0]})"
    if not check_images:
        return None
    try:
        if path is None:
            check_image(image, meta["spatial_dims"], meta["channels"])
        else:
            check_pair(image, path, set(meta["labels"]), meta["spatial_dims"], meta["channels"])
    except MedTuneError as exc:
        return "", str(exc)
    return None


# ----------------------------------------------------------------------------------------------- cases


def new_case_id(root: str | Path) -> str:
    """Next free opaque id ``case_NNNN`` (one above the highest ``case_*`` file in ``images/``)."""
    images = Path(root) / "images"
    numbers = [int(m.group(1)) for p in images.iterdir() if (m := _CASE_RE.match(p.name))] if images.is_dir() else []
    return f"case_{max(numbers, default=0) + 1:04d}"


def add_case(
    root: str | Path,
    image_array_or_path: np.ndarray | str | Path,
    *,
    label: int | list[int] | np.ndarray | str | Path | None = None,
    split: str = "training",
    case_id: str | None = None,
    affine: np.ndarray | None = None,
) -> dict[str, Any]:
    """Add one case: write the image into ``images/`` and append its entry to ``datalist.json``.

        Arrays are ``(rows, cols)``, channel-first ``(C, ...)`` or ``(i, j, k)`` for 3D datasets; 2D uint8/uint16
        arrays with 1 (or 3 uint8) channels become PNG, anything else NIfTI. A path is copied (keeping its
        format; a NIfTI file without its header text, extensions and gzip file name, which may name the patient:
        voxels and geometry bit for bit). Classification: ``label`` is a class value (or list); segmentation: a
        mask array (written to ``labels/`` as NIfTI) or a mask file path (copied likewise). A DICOM file is
        stored as de-identified NIfTI (pixels
    and spacing only, never its header). ``affine``: an image array's voxel -> RAS (mm) matrix, written with
    its mask as the scanner frame (sform/qform code 1; the Slicer module's import). Returns the new datalist entry.
    """
    root = Path(root)
    datalist_path = root / DATALIST_JSON
    meta = read_dataset_json(root)
    data = read_datalist(root)
    if split not in SPLITS:
        raise MedTuneError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})", datalist_path)
    if label is None and split != "testing":
        raise MedTuneError(f"a {split} case needs a label", datalist_path)
    classification = meta["task"] == "classification"
    class_label = _class_label(label, meta["labels"], datalist_path) if classification and label is not None else None
    case_id = case_id or new_case_id(root)
    _check_case_id(root, case_id)
    entry: dict[str, Any] = {"image": _store_image(root, case_id, image_array_or_path, meta, affine)}
    if class_label is not None:
        entry["label"] = class_label
    try:
        if label is not None and not classification:
            entry["label"] = _store_mask(root, case_id, label, entry["image"], meta, scanner=affine is not None)
        data.setdefault(split, []).append(entry)
        write_datalist(root, data)
    except BaseException:  # leave no orphan files behind
        for rel in (entry["image"], entry.get("label")):
            if isinstance(rel, str):
                (root / rel).unlink(missing_ok=True)
        raise
    return entry


def _check_case_id(root: Path, case_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", case_id):
        raise MedTuneError(f"case id {case_id!r} must use only letters, digits, '_' and '-'", root / "images")
    for folder in (root / "images", root / "labels"):
        if folder.is_dir() and any(p.name.split(".")[0] == case_id for p in folder.iterdir()):
            raise MedTuneError(f"case id {case_id!r} is already used", folder)


def _class_label(label: Any, classes: dict[int, str], path: Path) -> int | list[int]:
    many = isinstance(label, (list, tuple, np.ndarray))
    values = list(np.asarray(label).ravel().tolist()) if many else [label]
    if not values or not all(_is_int(v) for v in values) or any(v not in classes for v in values):
        raise MedTuneError(f"label {label!r} not in declared classes {sorted(classes)}", path)
    return [int(v) for v in values] if many else int(values[0])


def _store_image(
    root: Path, case_id: str, image: np.ndarray | str | Path, meta: dict[str, Any], affine: np.ndarray | None = None
) -> str:
    if isinstance(image, (str, Path)):
        src = Path(image)
        data = read_image(src, meta["spatial_dims"])  # refuse unreadable input before copying
        arr = data.array
        if arr.shape[0] != meta["channels"]:
            raise MedTuneError(f"has {arr.shape[0]} channel(s), dataset.json declares {meta['channels']}", src)
        if data.meta.get("format") == "dicom":
            return _store_dicom_pixels(root, f"images/{case_id}", data, src)
        rel = f"images/{case_id}{_suffix(src)}"
        write_with(root / rel, lambda tmp: _copy_deidentified(src, tmp))
        return rel
    arr = _channel_first(np.asarray(image), meta["spatial_dims"])
    if arr.shape[0] != meta["channels"]:
        raise MedTuneError(f"image array has {arr.shape[0]} channel(s), dataset.json declares {meta['channels']}")
    if meta["spatial_dims"] == 2 and _png_ok(arr):
        rel = f"images/{case_id}.png"
        write_with(root / rel, lambda tmp: save_png(arr, tmp))
    elif arr.shape[0] == 1:
        rel = f"images/{case_id}.nii.gz"
        write_with(root / rel, lambda tmp: save_nifti(arr[0], tmp, affine, scanner=affine is not None))
    else:  # the readers take NIfTI as single-channel (C=1, i, j[, k])
        raise MedTuneError(f"multi-channel {arr.dtype} image arrays are not supported (use uint8 RGB for PNG)")
    return rel


def _copy_deidentified(src: Path, dst: Path) -> None:
    """Copy ``src`` into the dataset; a NIfTI file without its header text, extensions and gzip file name (they
    may name the patient; voxels and geometry stay bit for bit, :func:`medtune.nifti.deidentified_nifti`)."""
    if not src.name.lower().endswith((".nii", ".nii.gz")):
        shutil.copyfile(src, dst)
        return
    try:
        write_deidentified_nifti(src, dst)
    except (ValueError, EOFError) as exc:
        raise MedTuneError(f"cannot de-identify the NIfTI header ({exc})", src) from exc


def _store_dicom_pixels(root: Path, stem: str, data: Any, src: Path) -> str:
    """A DICOM file enters the dataset as de-identified NIfTI: its pixels (rescaled) and pixel spacing only.

    The DICOM header (patient, study, institution, dates, UIDs) is never copied into the dataset.
    """
    arr = data.array
    if arr.shape[0] != 1:
        raise MedTuneError(f"colour DICOM ({arr.shape[0]} samples per pixel) cannot be stored as a scan", src)
    pixels = arr[0]
    if np.all(pixels == np.round(pixels)) and pixels.min(initial=0) >= -32768 and pixels.max(initial=0) <= 32767:
        pixels = pixels.astype(np.int16)
    spacing = [float(v) for v in (data.spacing or ())][: pixels.ndim]
    affine = np.diag([*spacing, *[1.0] * (3 - len(spacing)), 1.0]) if spacing else None
    rel = f"{stem}.nii.gz"
    write_with(root / rel, lambda tmp: save_nifti(pixels, tmp, affine))
    return rel


def _store_mask(
    root: Path, case_id: str, mask: Any, image_rel: str, meta: dict[str, Any], scanner: bool = False
) -> str:
    if isinstance(mask, (str, Path)):
        src = Path(mask)
        data = read_image(src, meta["spatial_dims"])
        if data.meta.get("format") == "dicom":
            return _store_dicom_pixels(root, f"labels/{case_id}", data, src)
        rel = f"labels/{case_id}{_suffix(src)}"
        write_with(root / rel, lambda tmp: _copy_deidentified(src, tmp))
        return rel
    mask = np.asarray(mask)
    if mask.ndim != meta["spatial_dims"]:
        raise MedTuneError(f"mask array must be {meta['spatial_dims']}D, got shape {mask.shape}")
    undeclared = sorted(set(np.unique(mask).astype(int).tolist()) - set(meta["labels"]))
    if undeclared:
        raise MedTuneError(f"mask values {undeclared[:5]} not in declared labels {sorted(meta['labels'])}")
    image = read_image(root / image_rel, meta["spatial_dims"])
    if tuple(image.spatial_shape) != mask.shape:
        raise MedTuneError(f"mask shape {mask.shape} differs from image shape {image.spatial_shape}")
    rel = f"labels/{case_id}.nii.gz"
    dtype = np.uint8 if mask.max(initial=0) < 256 and mask.min(initial=0) >= 0 else np.int16
    write_with(root / rel, lambda tmp: save_nifti(mask.astype(dtype), tmp, image.affine, scanner=scanner))
    return rel


def _channel_first(arr: np.ndarray, spatial_dims: int) -> np.ndarray:
    if arr.ndim == spatial_dims:
        return arr[None]
    if arr.ndim == spatial_dims + 1:
        return arr
    raise MedTuneError(f"image array of shape {arr.shape} is not a {spatial_dims}D image (channel-first)")


def _png_ok(arr: np.ndarray) -> bool:
    return (arr.dtype == np.uint8 and arr.shape[0] in (1, 3)) or (arr.dtype == np.uint16 and arr.shape[0] == 1)


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def save_png(arr: np.ndarray, path: str | Path) -> None:
    """Save a channel-first ``(1|3, rows, cols)`` uint8 (or 1-channel uint16) array as PNG."""
    from PIL import Image

    img = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    with open(path, "wb") as fh:  # explicit format: ``path`` may be a temp name without .png
        Image.fromarray(np.ascontiguousarray(img)).save(fh, format="PNG")


# ----------------------------------------------------------------------------------------- staging


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success rename it to ``out``, on failure remove it.

    Refuses an ``out`` that exists and is not an empty folder, so user data is never touched.
    """
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedTuneError("output folder exists and is not empty; refusing to overwrite it (choose a new one)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # (not mkdtemp: its 0700 mode would stick to the renamed folder)
    try:
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            raise MedTuneError("output folder appeared while writing; refusing to overwrite it", out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
