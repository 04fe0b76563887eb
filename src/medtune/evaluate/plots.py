"""Evaluation plots (matplotlib object API on the Agg canvas; no pyplot global state). PNGs are written atomically."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medtune.atomic import write_with

DPI = 110
_LOSS_KEYS = ("loss", "train_loss", "mean_loss", "avg_loss")
_METRIC_KEYS = ("metric", "val_metric", "key_metric", "val_auc", "val_accuracy", "val_acc", "val_dice")
_METRIC_NAME_KEYS = ("metric_name", "val_metric_name", "key_metric_name")


def _save(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG atomically (temp file, fsync, rename)."""
    FigureCanvasAgg(fig)

    def render(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15)

    write_with(path, render)
    return Path(path)


def _new_figure(width: float = 5.5, height: float = 4.5) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def plot_confusion_matrix(cm: list[list[int]] | np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Confusion matrix heat map (rows = true class, columns = predicted) with counts and row percentages."""
    counts = np.asarray(cm, dtype=np.int64)
    k = len(class_names)
    fig, ax = _new_figure(max(4.5, 1.1 * k + 2.5), max(4.0, 1.0 * k + 2.0))
    row_totals = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(k):
        for j in range(k):
            color = "white" if frac[i, j] > 0.6 else "black"
            ax.text(j, i, f"{counts[i, j]}\n({100 * frac[i, j]:.0f}%)", ha="center", va="center", color=color)
    tilt = k > 3 or max(len(str(n)) for n in class_names) > 10
    ax.set_xticks(range(k), labels=class_names, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(f"Confusion matrix (n = {int(counts.sum())})")
    return _save(fig, path)


def plot_roc(metrics: dict[str, Any], path: str | Path) -> Path:
    """ROC curve of the positive class with AUC and its CI in the legend, and the chance diagonal."""
    roc = metrics.get("roc_curve")
    if not roc:
        raise ValueError("metrics have no ROC curve (binary task with both classes present is required)")
    fig, ax = _new_figure(5.0, 5.0)
    ax.plot(roc["fpr"], roc["tpr"], color="tab:blue", lw=2, label=f"AUC {_estimate_text(metrics, 'auc')}")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="chance (AUC 0.50)")
    _mark_operating_point(ax, metrics)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 − specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(f"ROC — positive class: {metrics.get('positive_class_name', '')}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def _mark_operating_point(ax: Axes, metrics: dict[str, Any]) -> None:
    sens = (metrics.get("sensitivity") or {}).get("value")
    spec = (metrics.get("specificity") or {}).get("value")
    if sens is not None and spec is not None:
        label = f"threshold {metrics.get('threshold', 0.5):g}"
        ax.plot([1 - spec], [sens], "o", color="tab:red", ms=7, label=label)


def _estimate_text(metrics: dict[str, Any], key: str) -> str:
    est = metrics.get(key) or {}
    if est.get("value") is None:
        return "n/a"
    text = f"{est['value']:.3f}"
    if est.get("ci_low") is not None and est.get("ci_high") is not None:
        text += f" ({round(100 * metrics.get('ci_level', 0.95))}% CI {est['ci_low']:.3f}–{est['ci_high']:.3f})"
    return text


def plot_calibration(metrics: dict[str, Any], path: str | Path) -> Path:
    """Reliability diagram (observed frequency vs mean predicted probability per bin) with bin counts and ECE."""
    cal = metrics["calibration"]
    bins = [b for b in cal["bins"] if b["count"] > 0]
    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    ax, ax_hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.plot(
        [b["mean_predicted"] for b in bins],
        [b["observed"] for b in bins],
        "o-",
        color="tab:blue",
        label=f"model (ECE {cal['ece']:.3f})",
    )
    binary = metrics.get("task") == "binary"
    ax.set_ylabel(f"Observed fraction {metrics.get('positive_class_name', '')}" if binary else "Observed accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title("Calibration (reliability diagram)")
    widths = [b["upper"] - b["lower"] for b in cal["bins"]]
    ax_hist.bar(
        [b["lower"] for b in cal["bins"]],
        [b["count"] for b in cal["bins"]],
        width=widths,
        align="edge",
        color="tab:blue",
        alpha=0.5,
        edgecolor="white",
    )
    ax_hist.set_ylabel("cases")
    ax_hist.set_xlabel(f"Predicted probability ({cal.get('method', '')})")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# learning curve from the progress stream
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Curve:
    epochs: list[int] = field(default_factory=list)
    loss: list[float | None] = field(default_factory=list)
    metric: list[float | None] = field(default_factory=list)
    metric_name: str = "validation metric"
    best_epoch: int | None = None


def read_progress_events(path: str | Path, event: str = "epoch") -> list[dict[str, Any]]:
    """The progress records of one kind (read by :func:`medtune.finetune.progress.read_progress`, the one reader)."""
    from medtune.finetune.progress import read_progress

    return [rec for rec in read_progress(path) if rec.get("event") == event]


def _first_number(rec: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, float | None]:
    for key in keys:
        value = rec.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            return key, float(value)
    return None, None


def _curve_from_events(records: list[dict[str, Any]]) -> _Curve:
    by_epoch: dict[int, dict[str, Any]] = {}
    for rec in records:
        if isinstance(rec.get("epoch"), int | float):
            by_epoch[int(rec["epoch"])] = rec  # a resumed run may repeat an epoch: keep the latest record
    curve = _Curve()
    best_flagged = None
    for epoch in sorted(by_epoch):
        rec = by_epoch[epoch]
        curve.epochs.append(epoch)
        curve.loss.append(_first_number(rec, _LOSS_KEYS)[1])
        key, value = _first_number(rec, _METRIC_KEYS)
        curve.metric.append(value)
        if key is not None:
            curve.metric_name = _metric_name(rec, key)
        if rec.get("best") is True or rec.get("is_best") is True:
            best_flagged = epoch
        if isinstance(rec.get("best_epoch"), int) and rec["best_epoch"] >= 1:  # 0 = no best yet
            best_flagged = rec["best_epoch"]
    curve.best_epoch = best_flagged if best_flagged is not None else _argbest(curve)
    return curve


def _metric_name(rec: dict[str, Any], key: str) -> str:
    for name_key in _METRIC_NAME_KEYS:
        if isinstance(rec.get(name_key), str):
            return f"validation {_pretty(rec[name_key])}"
    return "validation " + _pretty(key.removeprefix("val_"))


def _pretty(name: str) -> str:
    name = name.removeprefix("val_").removeprefix("validation_").replace("_", " ")
    return name.upper() if name.lower() in {"auc", "f1", "acc", "roc auc"} else name


def _argbest(curve: _Curve) -> int | None:
    scored = [(m, e) for e, m in zip(curve.epochs, curve.metric, strict=True) if m is not None]
    if not scored:
        return None
    lower_is_better = "loss" in curve.metric_name or "error" in curve.metric_name
    return (min if lower_is_better else max)(scored)[1]


def plot_learning_curve(progress_jsonl_path: str | Path, path: str | Path) -> Path | None:
    """Training loss and validation metric per epoch (two y axes), best epoch marked; ``None`` if no epochs."""
    records = read_progress_events(progress_jsonl_path, "epoch")
    curve = _curve_from_events(records)
    if not curve.epochs:
        return None
    fig, ax = _new_figure(6.5, 4.2)
    handles = _plot_series(ax, curve.epochs, curve.loss, "training loss", "tab:orange", "o-")
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Training loss", color="tab:orange")
    ax.grid(alpha=0.3)
    if any(m is not None for m in curve.metric):
        ax2 = ax.twinx()
        handles += _plot_series(ax2, curve.epochs, curve.metric, curve.metric_name, "tab:blue", "s-")
        ax2.set_ylabel("V" + curve.metric_name[1:], color="tab:blue")
    if curve.best_epoch is not None:
        handles.append(
            ax.axvline(curve.best_epoch, color="tab:green", ls=":", lw=2, label=f"best epoch {curve.best_epoch}")
        )
    if len(curve.epochs) < 15:
        ax.set_xticks(curve.epochs)
    ax.legend(handles=handles, loc="best")
    ax.set_title("Learning curve")
    return _save(fig, path)


def _plot_series(ax: Axes, epochs: list[int], values: list[float | None], label: str, color: str, style: str) -> list:
    pts = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
    if not pts:
        return []
    xs, ys = zip(*pts, strict=True)
    return list(ax.plot(xs, ys, style, color=color, label=label, ms=4))
