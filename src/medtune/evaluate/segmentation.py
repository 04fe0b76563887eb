"""Segmentation metrics per class and per case (Dice, HD95, mean surface distance) with bootstrap CIs over cases.

Distances are computed by MONAI (``compute_hausdorff_distance``, ``compute_average_surface_distance``) on
one-hot tensors, in physical units (mm) using each case's voxel spacing. MONAI and torch are imported lazily
inside :func:`case_metrics`, so importing this module (and ``medtune.evaluate``) stays torch-free.

Edge cases, per case and foreground class (the ``flag`` column):

======================  ==========================  =======  =============  =====================================
flag                    situation                   Dice     HD95 / MSD     in summaries
======================  ==========================  =======  =============  =====================================
``""``                  class in label and pred     value    value          counted
``empty_both``          class in neither            NaN      NaN            excluded from every mean (nnU-Net)
``empty_prediction``    in label, missed by pred    0.0      NaN            Dice counted; distances excluded
``empty_label``         only in pred (false pos.)   0.0      NaN            Dice counted; distances excluded
``distance_undefined``  MONAI returned inf/NaN      value    NaN            Dice counted; distances excluded
======================  ==========================  =======  =============  =====================================

Distances are undefined when either surface is missing (MONAI returns ``inf``); they are reported as NaN (``None``
in JSON, an empty cell in CSV) and the number of excluded cases is recorded next to every summary.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from medtune.atomic import write_bytes_atomic
from medtune.evaluate.metrics import MetricsInputError

METRICS = ("dice", "hd95", "msd")
FLAGS = ("", "empty_both", "empty_prediction", "empty_label", "distance_undefined")
CSV_COLUMNS = (
    "case", "class", "class_value", "dice", "hd95", "msd", "flag", "label_voxels", "pred_voxels", "voxel_size",
)  # fmt: skip
_INT_COLUMNS = ("class_value", "label_voxels", "pred_voxels")
_FLOAT_COLUMNS = ("dice", "hd95", "msd", "voxel_size")
_DIGITS = {"dice": 6, "hd95": 4, "msd": 4}  # per-case values are rounded (MONAI computes distances in float32)
_MAX_CELLS_PER_CHUNK = 4_000_000  # bootstrap index-matrix cells per chunk


# ----------------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------------


def case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    class_values: list[int],
    spacing: tuple[float, ...] | None = None,
) -> dict[int, dict[str, Any]]:
    """Dice, HD95 and mean symmetric surface distance (MSD) per foreground class of one case.

    ``pred`` and ``label`` are integer label maps of the same 2-D or 3-D shape; ``spacing`` is the voxel size per
    axis in mm (``None``: 1 per axis, distances then in voxels). Returns ``{class_value: {"dice", "hd95", "msd",
    "flag", "label_voxels", "pred_voxels"}}`` with NaN where a value is undefined (see the module docstring).
    HD95 is the larger of the two directed 95th-percentile surface distances; MSD is the mean over the distances
    from both surfaces to each other. Raises ``ValueError`` (one line) on invalid input.
    """
    p, y = _as_label_map(pred, "pred"), _as_label_map(label, "label")
    if p.shape != y.shape:
        _fail(f"pred shape {p.shape} differs from label shape {y.shape}")
    if p.ndim not in (2, 3):
        _fail(f"label maps must be 2-D or 3-D, got {p.ndim}-D shape {p.shape}")
    values = _check_class_values(class_values)
    sp = _check_spacing(spacing, p.ndim)

    p, y = _crop_to_foreground(p, y, values)  # MONAI crops the same way (margin 1): results are unchanged
    onehot_p = np.stack([p == v for v in values])[None]  # (1, C, *spatial)
    onehot_y = np.stack([y == v for v in values])[None]
    n_pred = onehot_p.reshape(len(values), -1).sum(axis=1)
    n_label = onehot_y.reshape(len(values), -1).sum(axis=1)
    dice = class_dice(p, y, values)
    hd95, msd = np.full(len(values), np.nan), np.full(len(values), np.nan)
    both = np.flatnonzero((n_pred > 0) & (n_label > 0))
    if both.size:  # distances only where both surfaces exist (MONAI would warn and return inf otherwise)
        import torch  # lazily: keeps medtune.evaluate importable without torch
        from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

        tp, ty = torch.from_numpy(onehot_p.astype(np.float32)), torch.from_numpy(onehot_y.astype(np.float32))
        sub_p, sub_y = tp[:, both], ty[:, both]
        kwargs: dict[str, Any] = {"include_background": True, "spacing": list(sp)}
        with warnings.catch_warnings():  # MONAI's own internal call of a deprecated argument (MONAI 1.5-1.6)
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd95[both] = compute_hausdorff_distance(sub_p, sub_y, percentile=95, **kwargs)[0].double().numpy()
            msd[both] = compute_average_surface_distance(sub_p, sub_y, symmetric=True, **kwargs)[0].double().numpy()

    out: dict[int, dict[str, Any]] = {}
    for i, v in enumerate(values):
        flag = _flag(int(n_label[i]), int(n_pred[i]))
        d = math.nan if flag == "empty_both" else (0.0 if flag else float(dice[i]))
        h, m = (float(hd95[i]), float(msd[i])) if not flag else (math.nan, math.nan)
        if not flag and not (math.isfinite(h) and math.isfinite(m)):
            flag = "distance_undefined"  # not expected with both surfaces present; kept visible if MONAI says so
        out[v] = {
            "dice": d,
            "hd95": h if math.isfinite(h) else math.nan,
            "msd": m if math.isfinite(m) else math.nan,
            "flag": flag,
            "label_voxels": int(n_label[i]),
            "pred_voxels": int(n_pred[i]),
        }
    return out


def class_dice(pred: np.ndarray, label: np.ndarray, class_values: Sequence[int]) -> np.ndarray:
    """Dice ``2|P∩L| / (|P|+|L|)`` of each class value; NaN where the class is in neither map (left out of means).

    The one Dice of MedTune (numpy, torch-free): the report's per-case values (:func:`case_metrics`) and the export's
    metric gate (:func:`case_mean_dice`) both come from here; equal to MONAI's ``compute_dice`` (tested)."""
    out = np.full(len(class_values), np.nan)
    for i, v in enumerate(class_values):
        p, t = pred == v, label == v
        total = int(p.sum()) + int(t.sum())
        if total:
            out[i] = 2.0 * int((p & t).sum()) / total
    return out


def case_mean_dice(pred: np.ndarray, label: np.ndarray, class_values: Sequence[int]) -> float:
    """A case's Dice as the report's headline averages it: the mean over the classes present in ``pred`` or
    ``label`` (NaN if none is); the headline is then the mean over the cases where it is defined."""
    dice = class_dice(pred, label, class_values)
    return float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan


def _crop_to_foreground(p: np.ndarray, y: np.ndarray, values: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Both maps cropped to the bounding box of any listed class in either, plus one voxel (within the image)."""
    fg = np.isin(p, values) | np.isin(y, values)
    if not fg.any():
        return p[tuple(slice(0, 1) for _ in p.shape)], y[tuple(slice(0, 1) for _ in y.shape)]
    box = []
    for axis in range(fg.ndim):
        hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(fg.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    return p[tuple(box)], y[tuple(box)]


def _flag(n_label: int, n_pred: int) -> str:
    if n_label == 0 and n_pred == 0:
        return "empty_both"
    if n_pred == 0:
        return "empty_prediction"
    if n_label == 0:
        return "empty_label"
    return ""


# ----------------------------------------------------------------------------------------------------------------
# many cases
# ----------------------------------------------------------------------------------------------------------------


def evaluate_cases(
    cases: list[dict[str, Any]],
    class_names: dict[int, str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Per-case rows and per-class summaries with percentile-bootstrap CIs over cases; a JSON-serializable dict.

    Each case is ``{"case": id, "pred": array, "label": array, "spacing": tuple}`` (``"image"`` is ignored here;
    it is used for overlays). ``class_names`` maps foreground label values to names. Each summary statistic is
    ``{"value", "ci_low", "ci_high", "median", "std", "n", "n_excluded"}`` over the cases where it is defined.
    ``mean_over_classes`` averages each case's defined classes first, then summarises over cases; its Dice is the
    headline. All statistics share the same case resamples. Undefined values are ``None``; per-case values are
    rounded (Dice to 6 decimals, distances to 1e-4 mm) so that the CSV reproduces the summaries exactly.
    """
    names = _check_class_names(class_names)
    if not cases:
        _fail("no cases to evaluate")
    if n_bootstrap < 0:
        _fail(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < ci < 1.0:
        _fail(f"ci must be in (0, 1), got {ci}")
    values = list(names)
    rows: list[dict[str, Any]] = []
    case_info: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, case in enumerate(cases):
        cid = _case_id(case, i)
        if cid in seen:
            _fail(f"duplicate case id {cid!r}")
        seen.add(cid)
        for key in ("pred", "label"):
            if key not in case or case[key] is None:
                _fail(f"case {cid!r} has no {key!r} array")
        try:
            per_class = case_metrics(case["pred"], case["label"], values, case.get("spacing"))
        except MetricsInputError as err:
            _fail(f"case {cid!r}: {err}")
        shape = tuple(int(s) for s in np.shape(case["label"]))
        spacing = _check_spacing(case.get("spacing"), len(shape))
        voxel = float(np.prod(spacing))
        for v in values:
            m = per_class[v]
            rows.append(
                {
                    "case": cid,
                    "class": names[v],
                    "class_value": v,
                    **{k: _num(m[k], _DIGITS[k]) for k in METRICS},
                    "flag": m["flag"],
                    "label_voxels": m["label_voxels"],
                    "pred_voxels": m["pred_voxels"],
                    "voxel_size": voxel,
                }
            )
        dices = [per_class[v]["dice"] for v in values]
        case_info.append(
            {
                "case": cid,
                "mean_dice": _num(_nanmean([_num(d, _DIGITS["dice"]) for d in dices])),
                "dice": {names[v]: _num(per_class[v]["dice"], _DIGITS["dice"]) for v in values},
                "flags": {names[v]: per_class[v]["flag"] for v in values if per_class[v]["flag"]},
                "shape": list(shape),
                "spacing": [float(s) for s in spacing],
                "spacing_given": case.get("spacing") is not None,
            }
        )

    table = {  # metric -> (n_cases, n_classes), NaN where undefined; rows are ordered case by case, class by class
        k: np.array([np.nan if r[k] is None else r[k] for r in rows], dtype=np.float64).reshape(len(cases), -1)
        for k in METRICS
    }
    per_case_mean = {k: _nanmean_rows(table[k]) for k in METRICS}
    columns = {f"{k}/{v}": table[k][:, j] for k in METRICS for j, v in enumerate(values)}
    columns.update({f"{k}/mean": per_case_mean[k] for k in METRICS})
    summaries = _summaries(columns, n_bootstrap, seed, ci)

    per_class_summary: dict[str, dict[str, Any]] = {}
    for j, v in enumerate(values):
        flags = [r["flag"] for r in rows[j :: len(values)]]
        per_class_summary[names[v]] = {
            "class_value": v,
            **{k: summaries[f"{k}/{v}"] for k in METRICS},
            **{f"n_{f}": int(sum(x == f for x in flags)) for f in FLAGS[1:]},
        }
    return {
        "task": "segmentation",
        "n": len(cases),
        "class_names": {str(v): names[v] for v in values},
        "units": "mm" if all(c["spacing_given"] for c in case_info) else "mm (1 per voxel where spacing was missing)",
        "spacing_missing": [c["case"] for c in case_info if not c["spacing_given"]],
        "ci_level": float(ci),
        "bootstrap": {"method": "percentile", "n_resamples": int(n_bootstrap), "seed": int(seed), "unit": "case"},
        "definitions": {
            "dice": "2|P∩L| / (|P|+|L|) per class; NaN when the class is absent in both (excluded from means)",
            "hd95": "max of the two directed 95th-percentile surface distances (MONAI), mm",
            "msd": "mean symmetric surface distance: mean over distances of both surfaces to each other (MONAI), mm",
            "mean_over_classes": "per case the mean over defined classes, then summarised over cases",
        },
        "mean_dice": summaries["dice/mean"],
        "mean_over_classes": {k: summaries[f"{k}/mean"] for k in METRICS},
        "per_class": per_class_summary,
        "cases": case_info,
        "rows": rows,
    }


def summarise_case_dice(
    cases: list[dict[str, Any]], n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict[str, Any]:
    """Pool the ``cases`` rows of several :func:`evaluate_cases` results (e.g. out-of-fold): mean Dice over cases
    and per class, with the same percentile bootstrap over cases. Case ids must be unique."""
    ids = [c["case"] for c in cases]
    if len(set(ids)) != len(ids):
        _fail("duplicate case ids in pooled cases")
    if not cases:
        _fail("no cases to pool")
    names = sorted({k for c in cases for k in c["dice"]})
    columns = {"dice/mean": np.array([np.nan if c["mean_dice"] is None else c["mean_dice"] for c in cases])}
    for name in names:
        columns[f"dice/{name}"] = np.array([np.nan if c["dice"].get(name) is None else c["dice"][name] for c in cases])
    summaries = _summaries(columns, n_bootstrap, seed, ci)
    return {
        "task": "segmentation",
        "n": len(cases),
        "ci_level": float(ci),
        "bootstrap": {"method": "percentile", "n_resamples": int(n_bootstrap), "seed": int(seed), "unit": "case"},
        "mean_dice": summaries["dice/mean"],
        "per_class_dice": {name: summaries[f"dice/{name}"] for name in names},
        "cases": [{"case": c["case"], "mean_dice": c["mean_dice"], "dice": c["dice"]} for c in cases],
    }


def _summaries(columns: dict[str, np.ndarray], n_bootstrap: int, seed: int, ci: float) -> dict[str, dict]:
    """Mean (with bootstrap CI), median, std and counts of each column over its finite entries."""
    keys = list(columns)
    x = np.stack([columns[k] for k in keys], axis=1)  # (N, K)
    n = x.shape[0]
    ok = np.isfinite(x)
    filled = np.where(ok, x, 0.0)
    reps = np.empty((n_bootstrap, len(keys)))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_bootstrap, _MAX_CELLS_PER_CHUNK // max(n, 1)))
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        w = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)  # draw counts per case
        den = w @ ok
        reps[start : start + b] = np.divide(w @ filled, den, out=np.full(den.shape, np.nan), where=den > 0)
    alpha = (1.0 - ci) / 2.0
    out = {}
    for j, key in enumerate(keys):
        vals = x[ok[:, j], j]
        finite = reps[:, j][np.isfinite(reps[:, j])]
        low = high = None
        if finite.size and vals.size:
            low, high = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
        out[key] = {
            "value": _num(vals.mean()) if vals.size else None,
            "ci_low": _num(low),
            "ci_high": _num(high),
            "median": _num(np.median(vals)) if vals.size else None,
            "std": _num(vals.std(ddof=1)) if vals.size > 1 else None,
            "n": int(vals.size),
            "n_excluded": int(n - vals.size),
        }
    return out


# ----------------------------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------------------------


def write_case_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write the per-case, per-class rows to CSV atomically (undefined values are empty cells); return the path.

    Columns: ``case, class, class_value, dice, hd95, msd, flag, label_voxels, pred_voxels, voxel_size`` (voxel
    size in mm³ for 3-D, mm² for 2-D), then any extra keys of the rows in first-seen order.
    """
    extra = [k for r in rows for k in r if k not in CSV_COLUMNS]
    fields = list(CSV_COLUMNS) + list(dict.fromkeys(extra))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in fields})
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))
    return Path(path)


def read_case_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read a CSV written by :func:`write_case_csv` back into rows (numbers parsed, empty cells ``None``)."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key in _INT_COLUMNS:
            if key in row:
                row[key] = int(row[key]) if row[key] not in ("", None) else None
        for key in _FLOAT_COLUMNS:
            if key in row:
                row[key] = float(row[key]) if row[key] not in ("", None) else None
    return rows


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that round-trips exactly
    return value


# ----------------------------------------------------------------------------------------------------------------
# validation and small helpers
# ----------------------------------------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise MetricsInputError(message)


def _as_label_map(a: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception:  # anything unconvertible is bad input
        _fail(f"{name} must be an integer label map")
    if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            _fail(f"{name} contains {int(np.sum(~np.isfinite(arr)))} non-finite values")
        if np.all(arr == np.round(arr)):
            return arr.astype(np.int64)
        _fail(f"{name} must hold integer label values (got fractional values); argmax/threshold first")
    _fail(f"{name} must be an integer label map, got dtype {arr.dtype}")


def _check_class_values(class_values: Sequence[int]) -> list[int]:
    values = [int(v) for v in class_values]
    if not values:
        _fail("class_values is empty")
    if len(set(values)) != len(values):
        _fail(f"class_values has duplicates: {values}")
    if 0 in values:
        _fail("class value 0 is background; pass foreground classes only")
    return values


def _check_class_names(class_names: dict[int, str]) -> dict[int, str]:
    if not isinstance(class_names, dict) or not class_names:
        _fail("class_names must be a non-empty dict {label value: name}")
    names = {int(k): str(v) for k, v in class_names.items()}
    _check_class_values(list(names))
    if len(set(names.values())) != len(names):
        _fail(f"class names must be unique, got {list(names.values())}")
    return dict(sorted(names.items()))


def _check_spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    try:
        sp = tuple(float(s) for s in np.ravel(np.asarray(spacing, dtype=np.float64)))
    except (TypeError, ValueError):
        _fail(f"spacing must be {ndim} positive numbers, got {spacing!r}")
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        _fail(f"spacing must be {ndim} positive numbers for {ndim}-D label maps, got {spacing!r}")
    return sp


def _case_id(case: Any, index: int) -> str:
    if not isinstance(case, dict):
        _fail(f"case {index} must be a dict with 'case', 'pred', 'label', 'spacing'")
    cid = case.get("case")
    return f"case_{index:04d}" if cid is None else str(cid)


def _nanmean(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    ok = np.isfinite(a)
    count = ok.sum(axis=1)
    return np.divide(np.where(ok, a, 0.0).sum(axis=1), count, out=np.full(len(a), np.nan), where=count > 0)


def _num(x: Any, digits: int | None = None) -> float | None:
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return x if digits is None else round(x, digits)
