"""Import images (+ optional masks) described by a spreadsheet (CSV/TSV) as a 3D classification dataset folder.

The table names each image file and its label; an optional group column (typically the patient) keeps every
group on one side of the training/validation split, so no patient is in both (a leak otherwise). Cases and
groups get opaque ids (``case_0001`` in a seeded random order, ``g0001``): nothing from the file names, the
group values or the NIfTI headers (``descrip``, ``aux_file``, ``intent_name``, extensions, the gzip file-name
field) is written into the dataset. A mapping back to the original names is written only when asked for
(``keep_id_map``), to ``<out>/.medtune_local/id_map.json``, which stays on this machine.

Every row is checked before anything is written: a missing or duplicated file, an empty or unknown label, a
missing mask, an unreadable image give one line naming the row (``labels.csv: row 7: ...``).
"""

from __future__ import annotations

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medtune.atomic import write_json_atomic
from medtune.data.contract import create_dataset, staged_folder, validate_dataset, write_datalist
from medtune.data.geometry import check_pair, read_header
from medtune.data.msd_import import ID_MAP, ID_MAP_NOTE, LOCAL_DIR
from medtune.errors import MedTuneError
from medtune.nifti import write_deidentified_nifti

_NIFTI = (".nii.gz", ".nii")


def read_table(table: str | Path, delimiter: str | None = None) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(row number, row)`` pairs of a CSV/TSV file (row numbers as a spreadsheet shows them)."""
    table = Path(table)
    if not table.is_file():
        raise MedTuneError("table not found", table)
    try:
        text = table.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise MedTuneError(f"cannot read the table ({exc})", table) from exc
    if delimiter is None:
        first = text.splitlines()[0] if text.strip() else ""
        delimiter = "\t" if table.suffix.lower() in (".tsv", ".tab") or first.count("\t") > first.count(",") else ","
        if delimiter == "," and first.count(";") > first.count(","):
            delimiter = ";"
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    rows = list(reader)
    if not rows or not any(c.strip() for c in rows[0]):
        raise MedTuneError("the table is empty (expected a header row)", table)
    header = [c.strip() for c in rows[0]]
    if len(set(header)) != len(header):
        dup = next(c for c, n in Counter(header).items() if n > 1)
        raise MedTuneError(f"column {dup!r} appears twice in the header", table)
    out = []
    for i, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue  # blank line
        if len(row) != len(header):
            raise MedTuneError(f"row {i}: {len(row)} cells, the header has {len(header)}", table)
        out.append((i, {h: c.strip() for h, c in zip(header, row, strict=True)}))
    if not out:
        raise MedTuneError("the table has a header but no rows", table)
    return header, out


def _nifti_suffix(name: str) -> str | None:
    low = name.lower()
    return next((s for s in _NIFTI if low.endswith(s)), None)


def _inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` if it stays inside ``folder`` (no absolute paths, no ``..``)."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    return folder / name


def _labels_of(values: list[str], classes: list[str] | None, table: Path, rows: list[int]) -> tuple[list[int], dict]:
    """Integer labels 0..K-1 and the class-name map; one line naming the row for an unknown label."""
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        for v, r in zip(values, rows, strict=True):
            if v not in index:
                raise MedTuneError(f"row {r}: label {v!r} is not one of the classes {classes}", table)
        return [index[v] for v in values], dict(enumerate(classes))
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        ints = sorted({int(v) for v in values})
        if ints == list(range(len(ints))):  # already 0..K-1
            return [int(v) for v in values], {i: f"class {i}" for i in ints}
        by_value = {v: i for i, v in enumerate(ints)}  # e.g. scores 1-5 -> classes 0-4 named "1".."5"
        return [by_value[int(v)] for v in values], {i: str(v) for v, i in by_value.items()}
    names = sorted(set(values))
    index = {v: i for i, v in enumerate(names)}
    return [index[v] for v in values], dict(enumerate(names))


def _group_split(groups: list[str], labels: list[int], val_fraction: float, seed: int) -> tuple[dict[str, int], int]:
    """Fold of every group (fold 0 = validation), groups stratified by their majority label; ``n_folds``."""
    n_folds = max(2, round(1 / val_fraction)) if val_fraction > 0 else 1
    majority: dict[str, int] = {}
    by_group: dict[str, list[int]] = defaultdict(list)
    for g, y in zip(groups, labels, strict=True):
        by_group[g].append(y)
    for g, ys in by_group.items():
        majority[g] = Counter(ys).most_common(1)[0][0]
    rng = np.random.default_rng(seed)
    fold: dict[str, int] = {}
    offset = 0
    for y in sorted(set(majority.values())):
        members = sorted(g for g in by_group if majority[g] == y)
        for pos, idx in enumerate(rng.permutation(len(members))):
            fold[members[int(idx)]] = (pos + offset) % n_folds
        offset += len(members)
    return fold, n_folds


def _write_clean_nifti(src: Path, dst: Path) -> None:
    """Write ``src`` without what could carry identifiers (header text fields ``descrip``, ``aux_file``,
    ``intent_name``, ``db_name``, extensions, gzip file name); voxels and geometry bit for bit
    (:func:`medtune.nifti.deidentified_nifti`, shared with the MSD importer and ``add_case``)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_deidentified_nifti(src, dst)
    except (ValueError, EOFError) as exc:
        raise MedTuneError(f"cannot de-identify the NIfTI header ({exc})", src) from exc


def import_table(
    images: str | Path,
    table: str | Path,
    out: str | Path,
    *,
    file_column: str,
    label_column: str,
    group_column: str | None = None,
    masks: str | Path | None = None,
    classes: list[str] | None = None,
    class_names: list[str] | None = None,
    name: str | None = None,
    modality: str = "CT",
    val_fraction: float = 0.2,
    seed: int = 0,
    delimiter: str | None = None,
    keep_id_map: bool = False,
) -> dict[str, Any]:
    """Write the images named by ``table`` as a 3D classification dataset folder at ``out``.

    ``classes`` fixes the class order (labels must be among them); otherwise integer labels 0..K-1 are used as
    they are, other integers (e.g. scores 1-5) and strings map to 0..K-1 in sorted order. ``class_names`` names
    the resulting classes 0..K-1 (e.g. ``["benign", "malignant"]`` for a 0/1 column). ``masks`` (a folder
    holding a mask of the same file name for every image) adds ``"mask"`` to each entry (``labels/case_N``).
    The split: groups (``group_column``, else each case) are stratified by majority label and dealt into
    ``round(1 / val_fraction)`` folds; fold 0 is ``validation``. Entries keep ``group`` (opaque) and ``fold``.
    """
    images, table, out = Path(images), Path(table), Path(out)
    if not 0.0 < val_fraction < 1.0:
        raise MedTuneError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedTuneError("output folder exists and is not empty; refusing to overwrite it (choose a new one)", out)
    for folder in (images, masks):
        if folder is not None and not Path(folder).is_dir():
            raise MedTuneError("folder not found", folder)
    header, rows = read_table(table, delimiter)
    for col in (file_column, label_column, group_column):
        if col is not None and col not in header:
            raise MedTuneError(f"no column {col!r} (columns: {', '.join(header)})", table)

    seen: dict[str, int] = {}
    files, mask_files, raw_labels, groups, row_numbers = [], [], [], [], []
    for r, row in rows:
        fname = row[file_column]
        path = _inside(images, fname)
        if path is None:
            raise MedTuneError(f"row {r}: file {fname!r} is empty, absolute or outside the images folder", table)
        if _nifti_suffix(fname) is None:
            raise MedTuneError(f"row {r}: file {fname!r} is not a NIfTI image (.nii.gz / .nii)", table)
        if fname in seen:
            raise MedTuneError(f"row {r}: file {fname!r} is already listed on row {seen[fname]}", table)
        seen[fname] = r
        if not path.is_file():
            raise MedTuneError(f"row {r}: file {fname!r} not found in {images}", table)
        if not row[label_column]:
            raise MedTuneError(f"row {r}: empty label in column {label_column!r}", table)
        if group_column is not None and not row[group_column]:
            raise MedTuneError(f"row {r}: empty group in column {group_column!r}", table)
        mask = None
        if masks is not None:
            mask = Path(masks) / fname
            if not mask.is_file():
                raise MedTuneError(f"row {r}: no mask of the same name in {masks}", table)
        files.append(path)
        mask_files.append(mask)
        raw_labels.append(row[label_column])
        groups.append(row[group_column] if group_column else f"row{r}")
        row_numbers.append(r)
    labels, names = _labels_of(raw_labels, classes, table, row_numbers)
    if class_names:
        if len(class_names) != len(names):
            raise MedTuneError(
                f"{len(class_names)} class names given, the label column has {len(names)} classes", table
            )
        names = dict(enumerate(class_names))
    if len(names) < 2:
        raise MedTuneError(f"column {label_column!r} holds a single class {list(names.values())}", table)
    channels = set()
    for path, mask, r in zip(files, mask_files, row_numbers, strict=True):  # validate before writing anything
        try:
            ch = read_header(path, 3).channels
            channels.add(ch)
            if mask is not None:
                check_pair(path, mask, None, 3, ch)
        except MedTuneError as exc:
            raise MedTuneError(f"row {r}: {exc}", table) from exc
    if len(channels) != 1:
        raise MedTuneError(f"images have different channel counts {sorted(channels)}", table)

    fold, n_folds = _group_split(groups, labels, val_fraction, seed)
    order = np.random.default_rng(seed + 1).permutation(len(files))  # case numbers carry no row order
    group_ids = {g: f"g{i:04d}" for i, g in enumerate(dict.fromkeys(groups[int(k)] for k in order), 1)}
    case_ids = [""] * len(files)
    for n, k in enumerate(order, 1):
        case_ids[int(k)] = f"case_{n:04d}"

    datalist: dict[str, list[dict[str, Any]]] = {"training": [], "validation": []}
    for k in order:
        k = int(k)
        suffix = _nifti_suffix(files[k].name) or ".nii.gz"
        entry: dict[str, Any] = {"image": f"images/{case_ids[k]}{suffix}", "label": labels[k]}
        mask = mask_files[k]
        if mask is not None:
            entry["mask"] = f"labels/{case_ids[k]}{_nifti_suffix(mask.name)}"
        entry["group"] = group_ids[groups[k]]
        entry["fold"] = fold[groups[k]]
        datalist["validation" if fold[groups[k]] == 0 else "training"].append(entry)
    for split in ("training", "validation"):
        if len({e["label"] for e in datalist[split]}) < 2:
            raise MedTuneError(f"the {split} split would hold a single class; more rows or groups are needed", table)

    with staged_folder(out) as tmp:
        create_dataset(
            tmp,
            name=name or "table import",
            task="classification",
            spatial_dims=3,
            labels=names,
            modality=modality,
            channels=channels.pop(),
            description=f"Imported from a table: {len(files)} images, label column {label_column!r}"
            + (f", grouped by column {group_column!r} ({len(group_ids)} groups)" if group_column else "")
            + f", {n_folds} group folds (fold 0 = validation).",
            source="table",
            synthetic=False,
            positive_label=1 if len(names) == 2 else None,
        )
        for k in order:
            k = int(k)
            entry_image = tmp / f"images/{case_ids[k]}{_nifti_suffix(files[k].name)}"
            _write_clean_nifti(files[k], entry_image)
            mask = mask_files[k]
            if mask is not None:
                _write_clean_nifti(mask, tmp / f"labels/{case_ids[k]}{_nifti_suffix(mask.name)}")
        write_datalist(tmp, datalist)
        if keep_id_map:
            id_map = {
                "note": ID_MAP_NOTE,
                "table": str(table.resolve()),
                "cases": {case_ids[k]: {"file": files[k].name, "row": row_numbers[k]} for k in range(len(files))},
                "groups": {gid: g for g, gid in group_ids.items()},
            }
            write_json_atomic(tmp / LOCAL_DIR / ID_MAP, id_map)
            (tmp / LOCAL_DIR / ".gitignore").write_text("# local only: never commit or share\n*\n")
        summary = validate_dataset(tmp, check_images=False)
    return {
        "out": str(out.absolute()),
        "n_cases": len(files),
        "n_groups": len(group_ids),
        "labels": names,
        "splits": summary,
        "masks": masks is not None,
        "id_map": str(out.absolute() / LOCAL_DIR / ID_MAP) if keep_id_map else None,
    }
