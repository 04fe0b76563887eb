"""Classification metrics with percentile-bootstrap confidence intervals (numpy + scikit-learn, no torch).

Point estimates and bootstrap replicates are computed by the same code: each statistic is a function of a
case-weight matrix ``w`` of shape ``(B, N)``. The point estimate uses ``w = 1``; a bootstrap resample uses the
number of times each case was drawn. This keeps estimates and their intervals consistent and lets 1000
resamples run as a few matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np

from medtune.errors import MedTuneError

N_CALIBRATION_BINS = 10
_MAX_CELLS_PER_CHUNK = 4_000_000  # bootstrap weight-matrix cells per chunk (bounds memory for large N)

Stats = dict[str, np.ndarray]


class MetricsInputError(MedTuneError, ValueError):
    """Invalid inputs to a metric function (a ``ValueError`` with a one-line message)."""


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    positive_class: int = 1,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Classification metrics with percentile-bootstrap CIs; a JSON-serializable dict.

    Binary (``C == 2``): the positive class is ``positive_class`` and a case is called positive when its
    probability is ``>= threshold``. Multiclass (``C > 2``): the prediction is the argmax, AUC is macro
    one-vs-rest. Each headline metric is ``{"value", "ci_low", "ci_high"}`` (``None`` where undefined).
    Raises ``ValueError`` (:class:`MetricsInputError`) with a one-line message on invalid input.
    """
    y, p = _validate(y_true, probs, class_names, positive_class, threshold, n_bootstrap, ci)
    if p.shape[1] == 2:
        return _binary_metrics(y, p, list(class_names), positive_class, threshold, n_bootstrap, seed, ci)
    return _multiclass_metrics(y, p, list(class_names), n_bootstrap, seed, ci)


def auc(y_true: np.ndarray, probs: np.ndarray, positive_class: int = 1) -> float:
    """The report's AUC as one number, by the same code as :func:`classification_metrics`' point estimate: of
    ``probs[:, positive_class]`` (two classes) or macro one-vs-rest over the classes present (more); NaN when the
    labels hold one class. The export's metric gate (``medtune.export.optimize``) compares this number too."""
    p = np.asarray(probs)
    n_classes = p.shape[1] if p.ndim == 2 else 0
    y, p = _validate(y_true, p, [str(k) for k in range(n_classes)], positive_class, 0.5, 0, 0.95)
    if p.shape[1] == 2:
        score = p[:, positive_class]
        stats = _binary_stats_fn(y == positive_class, score >= 0.5, score)
    else:
        stats = _multiclass_stats_fn(y, p)
    return float(stats(np.ones((1, len(y))))["auc"][0])


def paired_auc_difference(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    positive_class: int = 1,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, float | None]:
    """AUC(a) - AUC(b) of two binary scores on the SAME cases, with a paired percentile-bootstrap CI: every
    resample draws the cases once and scores both, so case difficulty cancels. ``{"value", "ci_low", "ci_high"}``,
    by the same weighted AUC as :func:`classification_metrics`.

    A score may also be an ``(m, n_cases)`` array of m models' scores: its AUC is then the mean of the m models'
    AUCs on the same resample (e.g. an ensemble against the average single model)."""
    sides = [np.asarray(s, dtype=np.float64) for s in (score_a, score_b)]
    sides = [s[None, :] if s.ndim == 1 else s for s in sides]
    n_cases = np.shape(y_true)[0] if np.ndim(y_true) else 0
    for name, rows, raw in zip(("score_a", "score_b"), sides, (score_a, score_b), strict=True):
        if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] != n_cases:
            _fail(f"{name} has shape {np.shape(raw)}; expected ({n_cases},) or (n_models, {n_cases})")
    first = np.stack([1 - sides[0][0], sides[0][0]], axis=1)
    y, _ = _validate(y_true, first, ["0", "1"], positive_class, 0.5, n_bootstrap, ci)
    for rows in sides:
        for row in rows:
            _validate(y, np.stack([1 - row, row], axis=1), ["0", "1"], positive_class, 0.5, n_bootstrap, ci)
    preps = [[_AucPrep(y == positive_class, row) for row in rows] for rows in sides]

    def stats(w: np.ndarray) -> Stats:
        auc_a, auc_b = (np.mean([p.auc(w) for p in side], axis=0) for side in preps)
        return {"diff": auc_a - auc_b}

    point = float(stats(np.ones((1, len(y))))["diff"][0])
    reps = _bootstrap(stats, len(y), n_bootstrap, seed)["diff"] if n_bootstrap else None
    return _estimate(point, reps, ci)


def format_estimate(metric: dict[str, Any] | None, digits: int = 2, ci: float | None = None) -> str:
    """``0.91 (95% CI 0.85–0.96)`` for a ``{"value", "ci_low", "ci_high"}`` dict; ``n/a`` if undefined."""
    if not metric or metric.get("value") is None:
        return "n/a"
    text = f"{metric['value']:.{digits}f}"
    if metric.get("ci_low") is not None and metric.get("ci_high") is not None:
        level = f"{round(100 * ci)}% " if ci else ""
        text += f" ({level}CI {metric['ci_low']:.{digits}f}–{metric['ci_high']:.{digits}f})"
    return text


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise MetricsInputError(message)


def _validate(
    y_true: Any, probs: Any, class_names: list[str], positive_class: int, threshold: float, n_bootstrap: int, ci: float
) -> tuple[np.ndarray, np.ndarray]:
    p = _as_prob_matrix(probs)
    y = _as_int_labels(np.asarray(y_true))
    if p.shape[0] != len(y):
        _fail(f"probs has {p.shape[0]} rows but y_true has {len(y)} labels")
    if len(class_names) != p.shape[1]:
        _fail(f"{len(class_names)} class names for {p.shape[1]} probability columns")
    if y.min() < 0 or y.max() >= p.shape[1]:
        _fail(f"labels must be in 0..{p.shape[1] - 1}, got range {y.min()}..{y.max()}")
    if p.shape[1] == 2 and positive_class not in (0, 1):
        _fail(f"positive_class must be 0 or 1 for binary tasks, got {positive_class}")
    if not 0.0 <= threshold <= 1.0:
        _fail(f"threshold must be in [0, 1], got {threshold}")
    if n_bootstrap < 0:
        _fail(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    if not 0.0 < ci < 1.0:
        _fail(f"ci must be in (0, 1), got {ci}")
    return y, p


def _as_prob_matrix(probs: Any) -> np.ndarray:
    try:
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError):
        _fail("probs must be a numeric (N, C) array")
    if p.ndim != 2:
        _fail(f"probs must be 2-D (N, C), got shape {p.shape}; for binary pass np.stack([1 - p, p], axis=1)")
    if p.shape[1] < 2:
        _fail(f"probs must have at least 2 columns (classes), got {p.shape[1]}")
    if not np.all(np.isfinite(p)):
        _fail(f"probs contain {int(np.sum(~np.isfinite(p)))} non-finite values (NaN/inf)")
    if p.size and (p.min() < -1e-6 or p.max() > 1 + 1e-6):
        _fail(f"probs must lie in [0, 1] (got range {p.min():.3g}..{p.max():.3g}); apply softmax/sigmoid to logits")
    return np.clip(p, 0.0, 1.0)


def _as_int_labels(y: np.ndarray) -> np.ndarray:
    if y.ndim != 1:
        _fail(f"y_true must be 1-D (N,), got shape {y.shape}")
    if len(y) == 0:
        _fail("y_true is empty")
    if y.dtype == bool or np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    _fail(f"y_true must hold integer class indices, got dtype {y.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# weighted statistics (rows of w are cases weights: ones for the point estimate, draw counts for a resample)
# ----------------------------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray, empty: float = np.nan) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


class _AucPrep:
    """Cases sorted by score with tied scores grouped, so a weighted AUC is one cumulative sum."""

    def __init__(self, is_pos: np.ndarray, score: np.ndarray):
        order = np.argsort(score, kind="mergesort")
        sorted_score = score[order]
        self.order = order
        self.starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
        self.pos = is_pos[order].astype(np.float64)

    def auc(self, w: np.ndarray) -> np.ndarray:
        """Weighted Mann–Whitney AUC per row of ``w`` (ties count 1/2); NaN where a class has zero weight."""
        ws = w[:, self.order]
        w_pos = np.add.reduceat(ws * self.pos, self.starts, axis=1)
        w_neg = np.add.reduceat(ws * (1.0 - self.pos), self.starts, axis=1)
        neg_below = np.cumsum(w_neg, axis=1) - w_neg
        num = np.sum(w_pos * (neg_below + 0.5 * w_neg), axis=1)
        return _ratio(num, w_pos.sum(axis=1) * w_neg.sum(axis=1))


def _binary_stats_fn(is_pos: np.ndarray, pred_pos: np.ndarray, score: np.ndarray) -> Callable[[np.ndarray], Stats]:
    t, q = is_pos.astype(np.float64), pred_pos.astype(np.float64)
    cells = np.stack([t * q, t * (1 - q), (1 - t) * q, (1 - t) * (1 - q)], axis=1)  # tp, fn, fp, tn
    prep = _AucPrep(is_pos, score)

    def stats(w: np.ndarray) -> Stats:
        tp, fn, fp, tn = (w @ cells).T
        sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        return {
            "auc": prep.auc(w),
            "accuracy": _ratio(tp + tn, tp + fn + fp + tn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty=0.0),  # sklearn's zero_division=0
            "sensitivity": sens,
            "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2,
        }

    return stats


def _multiclass_stats_fn(y: np.ndarray, p: np.ndarray) -> Callable[[np.ndarray], Stats]:
    n_classes = p.shape[1]
    t = np.eye(n_classes)[y]
    q = np.eye(n_classes)[np.argmax(p, axis=1)]
    tp_m, fn_m, fp_m = t * q, t * (1 - q), (1 - t) * q
    preps = [_AucPrep(y == k, p[:, k]) for k in range(n_classes)]
    auc_classes = [k for k in range(n_classes) if 0 < np.sum(y == k) < len(y)]  # defined on the full data

    def stats(w: np.ndarray) -> Stats:
        total = w.sum(axis=1, keepdims=True)
        tp, fn, fp = w @ tp_m, w @ fn_m, w @ fp_m
        tn = total - tp - fn - fp
        sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        f1 = np.where(2 * tp + fp + fn > 0, _ratio(2 * tp, 2 * tp + fp + fn, empty=0.0), np.nan)
        aucs = np.stack([prep.auc(w) for prep in preps], axis=1)
        out: Stats = {
            "auc": aucs[:, auc_classes].mean(axis=1) if auc_classes else np.full(len(w), np.nan),
            "accuracy": tp.sum(axis=1) / total[:, 0],
            "f1": _nanmean_rows(f1),  # macro over classes present in truth or prediction (as sklearn)
            "balanced_accuracy": _nanmean_rows(sens),  # mean recall over classes present in truth
        }
        for k in range(n_classes):
            out[f"auc/{k}"], out[f"sensitivity/{k}"], out[f"specificity/{k}"] = aucs[:, k], sens[:, k], spec[:, k]
            out[f"f1/{k}"] = f1[:, k]
        return out

    return stats


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    ok = np.isfinite(a)
    return _ratio(np.where(ok, a, 0.0).sum(axis=1), ok.sum(axis=1).astype(np.float64))


# ----------------------------------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------------------------------


def _bootstrap(stats: Callable[[np.ndarray], Stats], n: int, n_bootstrap: int, seed: int) -> Stats:
    """Replicates of every statistic over ``n_bootstrap`` case resamples (with replacement), chunked for memory."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_bootstrap, _MAX_CELLS_PER_CHUNK // max(n, 1)))
    parts: list[Stats] = []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        w = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        parts.append(stats(w))
    if not parts:
        return {}
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _estimate(value: float, replicates: np.ndarray | None, ci: float) -> dict[str, float | None]:
    out: dict[str, float | None] = {"value": _num(value), "ci_low": None, "ci_high": None}
    if out["value"] is None or replicates is None:
        return out
    finite = replicates[np.isfinite(replicates)]  # e.g. skips resamples holding a single class for AUC
    if finite.size:
        alpha = (1.0 - ci) / 2.0
        low, high = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
        out["ci_low"], out["ci_high"] = _num(low), _num(high)
    return out


def _estimates(stats: Callable[[np.ndarray], Stats], n: int, n_bootstrap: int, seed: int, ci: float) -> dict:
    point = {k: float(v[0]) for k, v in stats(np.ones((1, n))).items()}
    reps = _bootstrap(stats, n, n_bootstrap, seed) if n_bootstrap else {}
    est = {k: _estimate(v, reps.get(k), ci) for k, v in point.items()}
    valid_auc = int(np.sum(np.isfinite(reps["auc"]))) if reps else 0
    return {"estimates": est, "auc_resamples_used": valid_auc}


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# ----------------------------------------------------------------------------------------------------------------
# assembling the result
# ----------------------------------------------------------------------------------------------------------------


def _common(y: np.ndarray, class_names: list[str], n_bootstrap: int, seed: int, ci: float, auc_used: int) -> dict:
    counts = np.bincount(y, minlength=len(class_names))
    return {
        "class_names": list(map(str, class_names)),
        "n": int(len(y)),
        "class_counts": {str(name): int(c) for name, c in zip(class_names, counts, strict=True)},
        "ci_level": float(ci),
        "bootstrap": {
            "method": "percentile",
            "n_resamples": int(n_bootstrap),
            "seed": int(seed),
            "auc_resamples_used": auc_used,
        },
    }


def _confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> list[list[int]]:
    cm = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return [[int(v) for v in row] for row in cm]


def _binary_metrics(
    y: np.ndarray,
    p: np.ndarray,
    class_names: list[str],
    positive_class: int,
    threshold: float,
    n_bootstrap: int,
    seed: int,
    ci: float,
) -> dict[str, Any]:
    score = p[:, positive_class]
    is_pos, pred_pos = y == positive_class, score >= threshold
    res = _estimates(_binary_stats_fn(is_pos, pred_pos, score), len(y), n_bootstrap, seed, ci)
    pred = np.where(pred_pos, positive_class, 1 - positive_class)
    out = {"task": "binary", **_common(y, class_names, n_bootstrap, seed, ci, res["auc_resamples_used"])}
    out.update(
        positive_class=int(positive_class),
        positive_class_name=str(class_names[positive_class]),
        threshold=float(threshold),
        decision_rule=f"P({class_names[positive_class]}) >= {threshold:g}",
        **res["estimates"],
        confusion_matrix=_confusion(y, pred, 2),
        roc_curve=_roc_points(is_pos, score),
        calibration=calibration_data(is_pos.astype(np.float64), score, "probability of positive class"),
    )
    return out


def _multiclass_metrics(
    y: np.ndarray, p: np.ndarray, class_names: list[str], n_bootstrap: int, seed: int, ci: float
) -> dict[str, Any]:
    res = _estimates(_multiclass_stats_fn(y, p), len(y), n_bootstrap, seed, ci)
    est = res["estimates"]
    pred = np.argmax(p, axis=1)
    per_class = {
        str(name): {m: est[f"{m}/{k}"] for m in ("sensitivity", "specificity", "auc", "f1")}
        for k, name in enumerate(class_names)
    }
    out = {"task": "multiclass", **_common(y, class_names, n_bootstrap, seed, ci, res["auc_resamples_used"])}
    out.update(
        threshold=None,
        decision_rule="argmax",
        auc_average="macro one-vs-rest",
        auc_excluded_classes=[name for name, pc in per_class.items() if pc["auc"]["value"] is None],
        f1_average="macro",
        **{k: v for k, v in est.items() if "/" not in k},
        per_class=per_class,
        confusion_matrix=_confusion(y, pred, p.shape[1]),
        calibration=calibration_data((pred == y).astype(np.float64), p.max(axis=1), "top-label confidence"),
    )
    return out


def _roc_points(is_pos: np.ndarray, score: np.ndarray) -> dict[str, list] | None:
    if is_pos.all() or not is_pos.any():
        return None
    from sklearn.metrics import roc_curve  # imported lazily: sklearn (scipy, pandas) takes ~1 s to import

    fpr, tpr, thr = roc_curve(is_pos.astype(int), score)
    return {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "thresholds": [_num(v) for v in thr],  # sklearn's first threshold is +inf -> null
    }


def calibration_data(
    outcome: np.ndarray, confidence: np.ndarray, method: str, n_bins: int = N_CALIBRATION_BINS
) -> dict:
    """Expected calibration error and reliability-curve bins for predicted ``confidence`` vs observed ``outcome``.

    Bins are equal-width on [0, 1] (the last includes 1.0); ECE is the count-weighted mean |observed − predicted|.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    sum_conf = np.bincount(which, weights=confidence, minlength=n_bins)
    sum_out = np.bincount(which, weights=outcome, minlength=n_bins)
    mean_conf, observed = _ratio(sum_conf, count), _ratio(sum_out, count)
    gap = np.where(count > 0, np.abs(observed - mean_conf), 0.0)
    bins = [
        {
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": int(count[b]),
            "mean_predicted": _num(mean_conf[b]),
            "observed": _num(observed[b]),
        }
        for b in range(n_bins)
    ]
    return {"ece": float(np.sum(gap * count) / max(len(outcome), 1)), "n_bins": n_bins, "method": method, "bins": bins}
