"""Import a Medical Segmentation Decathlon-style folder pair (``imagesTr/``, ``labelsTr/``) as a dataset folder.

Images and labels are matched by file name (macOS ``._*`` and other hidden files are skipped). Every pair is
checked (:func:`medtune.data.geometry.check_pair`) before anything is written, so a bad case stops the import
with a one-line error naming it. Cases get opaque ids ``case_0001, ...`` in natural name order; the mapping back
to the original names is kept only in ``<out>/.medtune_local/id_map.json``, which stays on this machine (never
in ``dataset.json``/``datalist.json``). NIfTI headers may name the patient: every file is written without its
header text fields, extensions and gzip file name (:func:`medtune.nifti.deidentified_nifti`; voxels and geometry
bit for bit), and hard-linked instead (``link=True``) only when it holds none of these.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medtune.atomic import write_json_atomic
from medtune.data.contract import create_dataset, staged_folder, validate_dataset, write_datalist
from medtune.data.geometry import check_pair, read_header
from medtune.errors import MedTuneError, read_json_file
from medtune.nifti import deidentified_nifti

LOCAL_DIR = ".medtune_local"
ID_MAP = "id_map.json"
ID_MAP_NOTE = (
    "LOCAL ONLY: maps MedTune's opaque case ids to the original file names, which may carry identifiers. "
    "Keep this file on this machine; do not share, upload or commit it."
)
_NIFTI = (".nii.gz", ".nii")


def import_msd(
    images: str | Path,
    labels: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    modality: str | None = None,
    label_names: dict[int, str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    link: bool = False,
) -> dict[str, Any]:
    """Write the MSD-style pair ``images``/``labels`` (e.g. ``imagesTr``, ``labelsTr``) as a 3D segmentation
    dataset folder at ``out``.

    Class names and modality come from the arguments, else from an MSD ``dataset.json`` next to ``images``
    (its ``labels``, ``modality``, ``name``, ``licence``), else ``"class N"`` for the values found (0 is
    ``"background"``). Channels come from the images (a 4D ``(x, y, z, C)`` MSD image has ``C``). The split is
    a seeded shuffle: ``round(n * val_fraction)`` cases go to ``validation``; every entry stores its ``fold``
    (shuffle position // validation size, so fold 0 is the validation split and the other folds, of the same
    size, can serve for cross-validation). ``out`` is built in a temp folder and renamed at the end; a
    non-empty ``out`` is refused. Returns ``{"out", "name", "n_cases", "channels", "labels", "splits",
    "linked", "copied", "id_map", "ignored", "header_text_removed"}`` (field -> number of files).
    """
    images, labels, out = Path(images), Path(labels), Path(out)
    if not 0.0 <= val_fraction < 1.0:
        raise MedTuneError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedTuneError(
            "output folder exists and is not empty; refusing to overwrite it (choose a new one)", out.absolute()
        )
    pairs, ignored = _match_pairs(images, labels)
    msd = _read_msd_json(images.parent / "dataset.json")

    declared = _declared_labels(label_names, msd)
    channels = _channels(pairs, msd)
    found: set[int] = set()
    for image, label in pairs:  # validate everything before writing anything
        found |= check_pair(image, label, set(declared) if declared else None, 3, channels)
    if declared is None:
        declared = {v: "background" if v == 0 else f"class {v}" for v in sorted(found | {0})}

    name = name or str(msd.get("name") or "").strip() or images.absolute().parent.name or "msd"
    modality = modality or _msd_modality(msd) or "unknown"
    ids = [f"case_{i:04d}" for i in range(1, len(pairs) + 1)]
    datalist = _split(ids, pairs, val_fraction, seed)

    linked = copied = 0
    with staged_folder(out) as tmp:
        create_dataset(
            tmp,
            name=name,
            task="segmentation",
            spatial_dims=3,
            labels=declared,
            modality=modality,
            channels=channels,
            description=_description(msd, len(pairs)),
            source=f"msd:{name.lower()}",
            synthetic=False,
            license=str(msd.get("licence") or msd.get("license") or ""),
        )
        link_error: OSError | None = None
        scrubbed: Counter[str] = Counter()
        for case_id, (image, label) in zip(ids, pairs, strict=True):
            for src, folder in ((image, "images"), (label, "labels")):
                ok, err, removed = _place(src, tmp / folder / f"{case_id}{_suffix(src)}", link and link_error is None)
                linked, copied = linked + ok, copied + (not ok)
                link_error = link_error or err
                scrubbed.update(removed)
        if link_error is not None:
            print(f"note: could not hard-link ({link_error.strerror or link_error}); copied the files", file=sys.stderr)
        if scrubbed:
            what = ", ".join(f"{k} ({n} files)" for k, n in sorted(scrubbed.items()))
            print(f"note: removed NIfTI header text that may identify a patient: {what}", file=sys.stderr)
        write_datalist(tmp, datalist)
        id_map = {
            "note": ID_MAP_NOTE,
            "images": str(images.resolve()),
            "labels": str(labels.resolve()),
            "cases": {cid: {"image": im.name, "label": lb.name} for cid, (im, lb) in zip(ids, pairs, strict=True)},
        }
        write_json_atomic(tmp / LOCAL_DIR / ID_MAP, id_map)
        (tmp / LOCAL_DIR / ".gitignore").write_text("# local only: never commit or share\n*\n")
        summary = validate_dataset(tmp, splits=tuple(datalist), check_images=False)
    return {
        "out": str(out.absolute()),
        "name": name,
        "n_cases": len(pairs),
        "channels": channels,
        "labels": declared,
        "splits": summary,
        "linked": linked,
        "copied": copied,
        "id_map": str(out.absolute() / LOCAL_DIR / ID_MAP),
        "ignored": ignored,
        "header_text_removed": dict(sorted(scrubbed.items())),
    }


def _match_pairs(images: Path, labels: Path) -> tuple[list[tuple[Path, Path]], list[str]]:
    """``(image, label)`` pairs matched by file name, in natural name order, and the ignored non-NIfTI names."""
    for folder in (images, labels):
        if not folder.is_dir():
            raise MedTuneError("folder not found (expected an MSD-style imagesTr/labelsTr pair)", folder)
    img_files, ignored = _nifti_files(images)
    lab_files, lab_ignored = _nifti_files(labels)
    ignored += [f"{labels.name}/{n}" for n in lab_ignored]
    if not img_files:
        raise MedTuneError("holds no NIfTI images (.nii.gz / .nii)", images)
    pairs = []
    for fname in sorted(img_files, key=_natural_key):
        if fname not in lab_files:
            hint = " (nnU-Net-style per-channel files are not supported)" if re.search(r"_\d{4}\.nii", fname) else ""
            raise MedTuneError(f"no label file of the same name in {labels}{hint}", images / fname)
        pairs.append((images / fname, labels / fname))
    orphans = sorted(set(lab_files) - set(img_files), key=_natural_key)
    if orphans:
        more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
        raise MedTuneError(f"label has no image of the same name in {images}{more}", labels / orphans[0])
    return pairs, ignored


def _nifti_files(folder: Path) -> tuple[set[str], list[str]]:
    names, ignored = set(), []
    for p in folder.iterdir():
        if p.name.startswith("."):  # ._* AppleDouble files of the MSD tarballs, .DS_Store, ...
            continue
        if p.is_file() and p.name.lower().endswith(_NIFTI):
            names.add(p.name)
        else:
            ignored.append(p.name)
    return names, sorted(ignored)


def _natural_key(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _read_msd_json(path: Path) -> dict[str, Any]:
    """The MSD ``dataset.json`` next to ``imagesTr`` (``{}`` when absent)."""
    if not path.is_file():
        return {}
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise MedTuneError("must hold a JSON object", path)
    for key in ("labels", "modality"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(
            re.fullmatch(r"\d+", str(k)) and isinstance(v, str) and v.strip() for k, v in value.items()
        ):
            raise MedTuneError(f"{key!r} must map integers (as strings) to names, got {value!r}"[:200], path)
    return data


def _declared_labels(label_names: dict[int, str] | None, msd: dict[str, Any]) -> dict[int, str] | None:
    """Class names from ``label_names`` or the MSD ``labels``, with 0 as background; ``None`` when neither."""
    if label_names:
        labels = {int(k): str(v) for k, v in label_names.items()}
    elif msd.get("labels"):
        labels = {int(k): v for k, v in msd["labels"].items()}
    else:
        return None
    labels.setdefault(0, "background")
    return dict(sorted(labels.items()))


def _msd_modality(msd: dict[str, Any]) -> str:
    names = [v for _, v in sorted((int(k), v) for k, v in (msd.get("modality") or {}).items())]
    return ", ".join(dict.fromkeys(names))


def _channels(pairs: list[tuple[Path, Path]], msd: dict[str, Any]) -> int:
    """Channels: the MSD ``modality`` count when given (checked against the images), else the images' majority
    (so one odd 4D case is reported as the odd one, not every other case)."""
    if msd.get("modality"):
        return len(msd["modality"])
    counts = Counter(read_header(image, 3).channels for image, _ in pairs)
    return max(counts, key=lambda c: (counts[c], -c))


def _split(
    ids: list[str], pairs: list[tuple[Path, Path]], val_fraction: float, seed: int
) -> dict[str, list[dict[str, Any]]]:
    n = len(ids)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    n_val = min(n_val, n - 1)
    order = np.random.default_rng(seed).permutation(n)
    fold_size = n_val or n
    n_folds = max(n // fold_size, 1)
    fold = {int(idx): min(pos // fold_size, n_folds - 1) for pos, idx in enumerate(order)}
    datalist: dict[str, list[dict[str, Any]]] = {"training": [], "validation": []}
    for i, (case_id, (image, label)) in enumerate(zip(ids, pairs, strict=True)):
        entry = {
            "image": f"images/{case_id}{_suffix(image)}",
            "label": f"labels/{case_id}{_suffix(label)}",
            "fold": fold[i],
        }
        datalist["validation" if n_val and fold[i] == 0 else "training"].append(entry)
    if not datalist["validation"]:
        del datalist["validation"]
    return datalist


def _place(src: Path, dst: Path, link: bool) -> tuple[bool, OSError | None, list[str]]:
    """Write ``src`` de-identified to ``dst`` (:func:`medtune.nifti.deidentified_nifti`), or hard-link it
    (``link``) when it holds nothing to remove; ``(linked, link_error, removed)``. A failed link falls back to a
    copy (other file system, or a file the user does not own under ``fs.protected_hardlinks``)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        data, removed = deidentified_nifti(src)
    except (OSError, ValueError, EOFError) as exc:
        raise MedTuneError(f"cannot de-identify the NIfTI header ({exc})", src) from exc
    err = None
    if link and not removed:
        try:
            os.link(src, dst)
            return True, None, removed
        except OSError as exc:
            err = exc
    dst.write_bytes(data)
    return False, err, removed


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"


def _description(msd: dict[str, Any], n: int) -> str:
    parts = [f"Imported from a Medical Segmentation Decathlon-style folder pair (imagesTr/labelsTr), {n} cases."]
    for key in ("description", "reference", "release"):
        value = msd.get(key)
        if isinstance(value, str) and value.strip():
            parts.append(value.strip().rstrip(".") + ".")
    return " ".join(parts)
