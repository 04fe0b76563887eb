"""Study statistics and report: per-arm metric with CIs, paired differences against scratch, curves, verdicts.

Classification: the per-case validation scores (``eval/predictions.csv``) of every run are paired by case.
An arm's value at a label budget is the mean over seeds of the validation AUC; its CI is a percentile bootstrap
over validation cases (the same resampled cases for every seed). The paired difference against scratch
resamples the cases once per replicate and compares seed ``s`` of the arm with seed ``s`` of scratch (trained on
the very same labeled cases), averaged over seeds. Segmentation: the same with each validation case's Dice
(mean over its foreground classes, ``eval/per_case.csv``) and the mean over cases in place of the AUC.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from medtune.atomic import write_bytes_atomic, write_json_atomic
from medtune.finetune.progress import read_progress
from medtune.study.plan import SCRATCH

N_BOOT = 2000
CI = 0.95


def auc_score(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties counted half); NaN when one class is absent."""
    from scipy.stats import rankdata

    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def read_predictions(eval_dir: str | Path, positive: int = 1) -> dict[str, tuple[int, float]]:
    """``{case: (label, P(positive))}`` from a run's ``eval/predictions.csv``; cases are the file names, or the row
    positions when the files are not named (the validation loader does not shuffle: every run lists the cases in
    the datalist's order)."""
    with open(Path(eval_dir) / "predictions.csv", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    if header[0] != "file":
        raise ValueError(f"{eval_dir}/predictions.csv: unexpected header {header}")
    names = [r[0] for r in rows]
    if len(set(names)) != len(names) or not all(names):
        names = [f"#{i:05d}" for i in range(len(rows))]
    return {n: (int(r[1]), float(r[2 + positive])) for n, r in zip(names, rows, strict=True)}


def _matrix(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """Labels ``(n,)`` and scores ``(seeds, n)`` of one arm x budget, cases in a fixed order."""
    recs = sorted(records, key=lambda r: r["seed"])
    if not all((Path(r["eval_dir"]) / "predictions.csv").is_file() for r in recs):
        return None
    preds = [read_predictions(r["eval_dir"]) for r in recs]
    cases = sorted(preds[0])
    if any(sorted(p) != cases for p in preds):
        return None
    y = np.array([preds[0][c][0] for c in cases])
    scores = np.array([[p[c][1] for c in cases] for p in preds])
    return y, scores, [r["seed"] for r in recs]


def read_case_dice(eval_dir: str | Path) -> dict[str, float]:
    """``{case: mean Dice over its foreground classes}`` from a segmentation run's ``eval/per_case.csv``."""
    per: dict[str, list[float]] = {}
    with open(Path(eval_dir) / "per_case.csv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                value = float(row["dice"])
            except (KeyError, TypeError, ValueError):
                value = float("nan")
            per.setdefault(row.get("case") or "", []).append(value)
    return {c: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for c, v in per.items()}


def _dice_matrix(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """Case ids ``(n,)`` and per-case mean Dice ``(seeds, n)`` of one arm x budget, cases in a fixed order."""
    recs = sorted(records, key=lambda r: r["seed"])
    if not all((Path(r["eval_dir"]) / "per_case.csv").is_file() for r in recs):
        return None
    dice = [read_case_dice(r["eval_dir"]) for r in recs]
    cases = sorted(dice[0])
    if not cases or any(sorted(d) != cases for d in dice):
        return None
    return np.array(cases), np.array([[d[c] for c in cases] for d in dice]), [r["seed"] for r in recs]


def _mean_dice(_: np.ndarray, scores: np.ndarray, idx: np.ndarray | None = None) -> float:
    """Mean over seeds of the mean per-case Dice (of the resampled cases ``idx``)."""
    return float(np.nanmean(scores if idx is None else scores[:, idx]))


def _boot_indices(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(N_BOOT, n))


def _mean_auc(y: np.ndarray, scores: np.ndarray, idx: np.ndarray | None = None) -> float:
    if idx is not None:
        y, scores = y[idx], scores[:, idx]
    aucs = np.array([auc_score(y, s) for s in scores], dtype=float)
    # a bootstrap resample holding one class has no AUC: NaN (dropped by _ci), without numpy's empty-slice warning
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def _ci(values: np.ndarray) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if not len(values):
        return None, None
    a = (1 - CI) / 2
    return float(np.quantile(values, a)), float(np.quantile(values, 1 - a))


def _run_curve(run: Path) -> list[float | None]:
    return [e.get("metric") for e in read_progress(run / "progress.jsonl") if e.get("event") == "epoch"]


def _curve(rec: dict[str, Any]) -> list[float | None]:
    """Validation metric per epoch of one run (from its progress stream); a pooled K-fold record (``run_dirs``):
    the mean over its folds of each fold's curve on its held-out fold (a monitor: nothing is chosen on it)."""
    if not rec.get("run_dirs"):
        return _run_curve(Path(rec["eval_dir"]).parent)
    curves = [c for c in (_run_curve(Path(d)) for d in rec["run_dirs"]) if c]
    if len(curves) != len(rec["run_dirs"]):
        return []
    n = min(len(c) for c in curves)
    out: list[float | None] = []
    for i in range(n):
        values = [c[i] for c in curves]
        known = [float(v) for v in values if v is not None]
        out.append(float(np.mean(known)) if len(known) == len(values) else None)  # an unvalidated epoch: None
    return out


def _mean_curve(records: list[dict[str, Any]]) -> list[float]:
    curves = [c for c in (_curve(r) for r in records) if c]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [float(np.mean([c[i] if c[i] is not None else np.nan for c in curves])) for i in range(n)]


def summarize(plan: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The numbers of ``study.json``: per arm x budget, and paired comparisons with scratch."""
    classification = plan["task"] == "classification"
    budgets = [b["text"] for b in plan["budgets"]]
    arms = [a["alias"] for a in plan["arms"]]
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in results:
        by.setdefault((rec["arm"], rec["budget"]), []).append(rec)
    cells: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    scratch_alias = next((a["alias"] for a in plan["arms"] if a["source"] == SCRATCH), None)
    stat = _mean_auc if classification else _mean_dice
    metric = "val_auc" if classification else "val_mean_dice"
    for b in budgets:
        mats: dict[str, Any] = {}
        scratch_best = None
        if scratch_alias and (scratch_alias, b) in by:
            sc = _mean_curve(by[(scratch_alias, b)])
            scratch_best = max((v for v in sc if np.isfinite(v)), default=None)
        for a in arms:
            recs = by.get((a, b), [])
            if not recs:
                continue
            values = [_metric_value(r) for r in recs]
            cell: dict[str, Any] = {
                "arm": a,
                "budget": b,
                "n_seeds": len(recs),
                "n_labels": int(np.mean([r["n_labels"] for r in recs])),
                "metric_name": "val_auc" if classification else "val_mean_dice",
                "per_seed": values,
                "mean": float(np.nanmean(values)) if values else None,
                "seed_min": float(np.nanmin(values)),
                "seed_max": float(np.nanmax(values)),
                "best_epoch": [r.get("best_epoch") for r in recs],
                "train_seconds_mean": float(np.mean([r.get("train_seconds") or 0 for r in recs])),
                "wall_seconds_total": float(np.sum([r.get("wall_seconds") or 0 for r in recs])),
                "peak_rss_mb_max": max((r.get("peak_rss_mb") or 0) for r in recs),
                "learning_curve": _mean_curve(recs),
            }
            curve = cell["learning_curve"]
            cell["epochs_to_scratch_best"] = (
                next((i + 1 for i, v in enumerate(curve) if scratch_best is not None and v >= scratch_best), None)
                if scratch_best is not None
                else None
            )
            m = _matrix(recs) if classification else _dice_matrix(recs)
            if m is not None:
                y, scores, _ = m
                idx = _boot_indices(len(y))
                cell["mean"] = stat(y, scores)
                boots = np.array([stat(y, scores, i) for i in idx])
                cell["ci_low"], cell["ci_high"] = _ci(boots)
                cell["n_validation"] = int(len(y))
                mats[a] = (y, scores, [r["seed"] for r in sorted(recs, key=lambda r: r["seed"])])
            cells.append(cell)
        if scratch_alias in mats:
            ys, ss, seeds_s = mats[scratch_alias]
            for a, (ya, sa, seeds_a) in mats.items():
                if a == scratch_alias or not np.array_equal(ya, ys):
                    continue
                common = [s for s in seeds_a if s in seeds_s]
                sa_ = sa[[seeds_a.index(s) for s in common]]
                ss_ = ss[[seeds_s.index(s) for s in common]]
                idx = _boot_indices(len(ys), seed=1)
                diff = stat(ys, sa_) - stat(ys, ss_)
                boots = np.array([stat(ys, sa_, i) - stat(ys, ss_, i) for i in idx])
                lo, hi = _ci(boots)
                per_seed = [stat(ys, sa_[k : k + 1]) - stat(ys, ss_[k : k + 1]) for k in range(len(common))]
                comparisons.append(
                    {
                        "arm": a,
                        "versus": scratch_alias,
                        "budget": b,
                        "metric": metric,
                        "n_seeds": len(common),
                        "difference": diff,
                        "ci_low": lo,
                        "ci_high": hi,
                        "per_seed_difference": per_seed,
                        "verdict": verdict(a, b, diff, lo, hi, "AUC" if classification else "Dice"),
                    }
                )
    return {"cells": cells, "comparisons": comparisons}


def _metric_value(rec: dict[str, Any]) -> float:
    m = rec.get("metrics") or {}
    for key in ("auc", "mean_dice"):
        v = m.get(key)
        if isinstance(v, dict):
            v = v.get("value")
        if isinstance(v, (int, float)):
            return float(v)
    return float("nan")


def verdict(arm: str, budget: str, diff: float, lo: float | None, hi: float | None, metric: str = "AUC") -> str:
    """One plain-language sentence for a paired comparison."""
    ci = f"CI [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "CI n/a"
    head = f"pretraining with {arm}: {diff:+.3f} {metric} at {budget} labels, {ci}"
    if lo is not None and lo > 0:
        return f"{head}: a measurable gain"
    if hi is not None and hi < 0:
        return f"{head}: measurably worse than scratch"
    return f"{head}: no measurable difference"


def _plots(study: Path, plan: dict[str, Any], summary: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, str] = {}
    arms = [a["alias"] for a in plan["arms"]]
    budgets = [b["text"] for b in plan["budgets"]]
    metric = "validation AUC" if plan["task"] == "classification" else "validation mean Dice"
    fig, ax = plt.subplots(figsize=(6, 4))
    for a in arms:
        cells = [c for c in summary["cells"] if c["arm"] == a]
        if not cells:
            continue
        x = [c["n_labels"] for c in cells]
        (line,) = ax.plot(x, [c["mean"] for c in cells], marker="o", label=a)
        ax.fill_between(x, [c["seed_min"] for c in cells], [c["seed_max"] for c in cells], alpha=0.2,
                        color=line.get_color())  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("labeled training cases (log scale)")
    ax.set_ylabel(f"{metric} (mean of seeds; band: seed min-max)")
    ax.set_title("Label efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study / "label_efficiency.png", dpi=110)
    plt.close(fig)
    images["label_efficiency"] = "label_efficiency.png"

    fig, axes = plt.subplots(1, len(budgets), figsize=(4 * len(budgets), 3.4), squeeze=False)
    for ax, b in zip(axes[0], budgets, strict=True):
        for a in arms:
            cell = next((c for c in summary["cells"] if c["arm"] == a and c["budget"] == b), None)
            if cell and cell["learning_curve"]:
                ax.plot(range(1, len(cell["learning_curve"]) + 1), cell["learning_curve"], label=a)
        ax.set_title(f"{b} labels")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=8)
    else:
        axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study / "learning_curves.png", dpi=110)
    plt.close(fig)
    images["learning_curves"] = "learning_curves.png"
    return images


def _fmt(v: Any, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def render_markdown(plan: dict[str, Any], summary: dict[str, Any], images: dict[str, str]) -> str:
    stat = "AUC" if plan["task"] == "classification" else "per-case mean Dice (foreground classes)"
    if plan.get("validations") == 1:
        selection = ("- Each run is validated once, after its last step: the reported model is the final one, "
                     "nothing was chosen on the validation split.")  # fmt: skip
    else:
        selection = ("- Each run's reported model is its best validation epoch, chosen on the same validation split "
                     "that is reported (there is no separate test split): every arm gets the same optimistic "
                     "selection.")  # fmt: skip
    folds = plan.get("folds")
    title = f"# MedTune study: {plan.get('dataset_name') or 'dataset'} ({plan['preset']})"
    lines = [title + (f", {folds}-fold cross-validation" if folds else ""), ""]
    if folds:
        grouped = (f"grouped by `{plan.get('group_key')}` ({plan.get('n_groups')} groups: no group is in both a "
                   "fold's training and held-out cases)" if plan.get("group_key") else
                   "not grouped (the datalist names no patient/group: each case is its own group)")  # fmt: skip
        lines.append(
            f"Validation: **{folds}-fold cross-validation**, "
            + ("stratified by class and " if plan["task"] == "classification" else "")
            + f"{grouped}, over all "
            f"{plan.get('n_cases')} labelled cases (training + validation splits; fold sizes "
            f"{plan.get('fold_sizes')}). Each run trains on a label budget drawn with its seed from the other "
            f"{folds - 1} folds (the same cases for every arm) and its final model predicts the held-out fold once; "
            "an arm's metric is the **pooled out-of-fold** value over all cases, each predicted exactly once per "
            "arm, budget and seed."
        )
        lines.append("")
        selection = ("- Each fold run's reported model is its final one (`model_selection=last`): nothing was chosen "
                     "on the held-out fold" + (" (validated once, after the last step)." if plan.get("validations") == 1
                     else "; its per-epoch validation on that fold is a monitor only (learning curves)."))  # fmt: skip
    lines.append(
        ("Validation: " if not folds else "")
        + (
            f"the dataset's `validation` split ({plan.get('n_validation')} cases; grouped by patient when the "
            "dataset was imported with a group column). "
            if not folds
            else ""
        )
        + f"{plan['seeds']} seed(s) per arm; every arm has the same "
        f"preset, epochs, optimizer and overrides ({_overrides_text(plan['common_overrides'])}); arms of one label "
        "budget and seed train on the same labeled cases."
        + (f" Every run: {plan['steps']} optimizer steps, whatever its label budget." if plan.get("steps") else "")
    )
    if folds and plan.get("pooled_finished", 0) < plan.get("pooled_planned", 0):
        lines += ["", f"**Partial study: {plan['pooled_finished']} of {plan['pooled_planned']} arm x budget x seed "
                  f"cross-validations finished ({plan['runs_finished']} of {plan['runs_planned']} fold runs).** Cells "
                  "below average the seeds that finished (see `n seeds`)."]  # fmt: skip
    elif plan.get("runs_finished") is not None and plan["runs_finished"] < plan.get("runs_planned", 0):
        lines += ["", f"**Partial study: {plan['runs_finished']} of {plan['runs_planned']} runs finished.** Cells "
                  "below average the seeds that finished (see `n seeds`)."]  # fmt: skip
    lines += ["", "## Arms", "", "| arm | source | strategy | arm overrides |", "|---|---|---|---|"]
    for a in plan["arms"]:
        lines.append(f"| {a['alias']} | {a['source']} | {a['strategy']} | {_overrides_text(a['overrides'])} |")
    lines += ["", "## Verdicts (paired, vs scratch)", ""]
    comps = summary["comparisons"]
    lines += [f"- {c['verdict']}" for c in comps] or [
        "- no paired comparison (needs a scratch arm, another arm, and their per-case scores)"
    ]
    lines += ["", "## Results", ""]
    lines.append(
        "| labels | arm | n labeled | n seeds | metric, mean of seeds (95% CI over cases) | seeds min–max | best epoch "
        "| epochs to scratch best | train s (mean) | peak RSS MB |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for c in summary["cells"]:
        ci = f" ({_fmt(c.get('ci_low'))}–{_fmt(c.get('ci_high'))})" if c.get("ci_low") is not None else ""
        lines.append(
            f"| {c['budget']} | {c['arm']} | {c['n_labels']} | {c['n_seeds']} | {_fmt(c['mean'])}{ci} | "
            f"{_fmt(c['seed_min'])}–{_fmt(c['seed_max'])} | {c['best_epoch']} | {c['epochs_to_scratch_best']} | "
            f"{c['train_seconds_mean']:.0f} | {c['peak_rss_mb_max']:.0f} |"
        )
    if comps:
        lines += ["", "| labels | arm − scratch | difference | 95% CI | per seed |", "|---|---|---|---|---|"]
        for c in comps:
            per = ", ".join(f"{d:+.3f}" for d in c["per_seed_difference"])
            lines.append(
                f"| {c['budget']} | {c['arm']} | {c['difference']:+.3f} | [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] "
                f"| {per} |"
            )
    lines += ["", "## Figures", ""]
    lines += [f"![{k}]({v})" for k, v in images.items()]
    lines += [
        "",
        "## How to read this",
        "",
        "- The CI of an arm is a percentile bootstrap over "
        + ("all pooled out-of-fold" if folds else "validation")
        + f" cases of the mean-over-seeds {stat}; the "
        "paired CI resamples cases once per replicate for both arms, so case difficulty cancels. Seed-to-seed "
        "spread is shown separately (min–max); with few seeds it is not part of the CI.",
        selection,
        "- 'Epochs to scratch best': first epoch at which the arm's mean validation curve reaches scratch's best "
        "mean value at the same label budget (– never).",
        "- 'Train s': a run's training time over all its segments (a resumed run trains in several; "
        "`train_segments` in study.json), its data loading included"
        + (f"; summed over the {folds} fold runs of a cross-validation." if folds else "."),
    ]
    return "\n".join(lines) + "\n"


def _overrides_text(ov: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in ov.items()) or "none"


def write_report(
    study: Path, plan: dict[str, Any], results: list[dict[str, Any]], fold_runs: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Write ``study.json``, ``report.md`` and the PNG curves; returns the study record. ``fold_runs`` (``--folds``):
    the fold runs behind the pooled ``results``, kept in ``study.json``."""
    summary = summarize(plan, results)
    images = _plots(study, plan, summary) if summary["cells"] else {}
    record = {**plan, "runs": results, **({"fold_runs": fold_runs} if fold_runs is not None else {}), **summary,
              "images": images}  # fmt: skip
    write_json_atomic(study / "study.json", record)
    write_bytes_atomic(study / "report.md", render_markdown(plan, summary, images).encode())
    return record
