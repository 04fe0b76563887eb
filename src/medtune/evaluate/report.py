"""The classification report: metrics.json, PNG plots and a Markdown report for a clinical researcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.atomic import write_bytes_atomic, write_json_atomic
from medtune.evaluate.metrics import format_estimate
from medtune.evaluate.plots import plot_calibration, plot_confusion_matrix, plot_learning_curve, plot_roc

SMALL_N = 100  # below this many cases (or ~30 in the smallest class) intervals are wide
SMALL_CLASS = 30

_BINARY_ROWS = [
    ("auc", "AUC (ROC)", "ranking quality: chance that a random positive case scores above a random negative"),
    ("sensitivity", "Sensitivity (recall)", "share of true positive-class cases called positive"),
    ("specificity", "Specificity", "share of true negative-class cases called negative"),
    ("accuracy", "Accuracy", "share of all cases classified correctly"),
    ("balanced_accuracy", "Balanced accuracy", "mean of sensitivity and specificity"),
    ("f1", "F1 (positive class)", "harmonic mean of precision and sensitivity"),
]
_MULTICLASS_ROWS = [
    ("auc", "Macro AUC (one-vs-rest)", "mean over classes of each class-vs-rest AUC"),
    ("accuracy", "Accuracy", "share of all cases classified correctly"),
    ("balanced_accuracy", "Balanced accuracy", "mean per-class sensitivity"),
    ("f1", "Macro F1", "mean over classes of per-class F1"),
]


def write_classification_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    class_names: list[str],
    progress_path: Path | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, the PNG plots and report.md into ``out_dir`` (each atomically); return their paths.

    Keys of the result: ``metrics``, ``confusion_matrix``, ``calibration``, ``report``, plus ``roc`` (binary)
    and ``learning_curve`` (when ``progress_path`` holds epoch events). ``context`` may hold ``title``,
    ``model``, ``pretrained``, ``dataset``, ``split``, ``data_warning``, ``notes`` and ``extra_sections``.
    """
    if len(class_names) != len(metrics["confusion_matrix"]):
        raise ValueError(f"{len(class_names)} class names for a {len(metrics['confusion_matrix'])}-class result")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "confusion_matrix": plot_confusion_matrix(
            metrics["confusion_matrix"], class_names, out / "confusion_matrix.png"
        )
    }
    if metrics.get("task") == "binary" and metrics.get("roc_curve"):
        paths["roc"] = plot_roc(metrics, out / "roc.png")
    paths["calibration"] = plot_calibration(metrics, out / "calibration.png")
    if progress_path is not None and Path(progress_path).is_file():
        curve = plot_learning_curve(progress_path, out / "learning_curve.png")
        if curve is not None:
            paths["learning_curve"] = curve
    write_json_atomic(out / "metrics.json", metrics)
    paths["metrics"] = out / "metrics.json"
    text = render_report_markdown(metrics, class_names, context or {}, {k: v.name for k, v in paths.items()})
    write_bytes_atomic(out / "report.md", text.encode("utf-8"))  # last: its presence means the set is complete
    paths["report"] = out / "report.md"
    return paths


def headline(metrics: dict[str, Any], split: str | None = None) -> str:
    """One line such as ``AUC 0.91 (95% CI 0.85–0.96) on 78 validation cases``."""
    where = f"on {metrics['n']} {split + ' ' if split else ''}cases"
    ci = metrics.get("ci_level")
    if (metrics.get("auc") or {}).get("value") is not None:
        name = "AUC" if metrics.get("task") == "binary" else "Macro AUC"
        return f"{name} {format_estimate(metrics['auc'], ci=ci)} {where}"
    return f"Accuracy {format_estimate(metrics.get('accuracy'), ci=ci)} {where}"


def render_report_markdown(
    metrics: dict[str, Any], class_names: list[str], context: dict[str, Any], images: dict[str, str]
) -> str:
    """The report.md text; ``images`` maps plot keys to file names relative to the report."""
    split = context.get("split")
    parts = [
        _banner(context.get("data_warning")),
        f"# {context.get('title') or 'Classification report'}",
        f"**{headline(metrics, split)}.**",
        estimates_section(context.get("estimates")),
        _provenance(metrics, context),
        _metric_section(metrics),
        _confusion_section(metrics, class_names, images),
        _figures_section(images),
        _how_to_read(metrics, class_names),
        _caveats(metrics, split),
        _notes(context.get("notes")),
    ]
    return join_sections(parts, context)


def join_sections(parts: list[str], context: dict[str, Any]) -> str:
    """A report's Markdown: the non-empty ``parts``, then the context's ``extra_sections`` (title -> body)."""
    extra = [f"## {title}\n\n{str(body).strip()}" for title, body in (context.get("extra_sections") or {}).items()]
    return "\n\n".join(p for p in [*parts, *extra] if p) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _banner(warning: str | None) -> str:
    if not warning:
        return ""
    line = " ".join(str(warning).split())
    return f"> ## ⚠️ {_cell(line)}\n>\n> **These numbers do not describe performance on real patients.**"


def _num_text(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def estimates_section(estimates: dict[str, Any] | None) -> str:
    """The "which number to quote" section: the selection metric next to the honest one (``RUN/estimate.json``).

    Shared by the classification and segmentation reports; only numbers and the known labels are rendered.
    """
    if not isinstance(estimates, dict) or not isinstance(estimates.get("honest"), dict):
        return ""
    lines = ["## Which number to quote", "", "| Estimate | Metric | Value | 95% CI | Cases |"]
    lines.append("|---|---|---:|:---:|---:|")
    for role in ("selection", "honest"):
        row = estimates.get(role)
        if not isinstance(row, dict):
            continue
        raw = row.get("estimate")
        est: dict[str, Any] = raw if isinstance(raw, dict) else {}
        ci = (
            f"{_num_text(est.get('ci_low'))} – {_num_text(est.get('ci_high'))}"
            if est.get("ci_low") is not None and est.get("ci_high") is not None
            else "—"
        )
        n = row.get("n") if isinstance(row.get("n"), int) else "—"
        label = _cell(row.get("label", role))
        lines.append(f"| {label} | {_cell(row.get('name', ''))} | {_num_text(est.get('value'))} | {ci} | {n} |")
    lines += ["", f"**{_cell(estimates.get('quote', ''))}**"]
    return "\n".join(lines)


def _provenance(metrics: dict[str, Any], context: dict[str, Any]) -> str:
    fields = [
        ("Model", context.get("model")),
        ("Pretrained weights", context.get("pretrained")),
        ("Dataset", context.get("dataset")),
        ("Split", context.get("split")),
        ("Classes", ", ".join(f"{k} ({v})" for k, v in metrics["class_counts"].items())),
        ("Decision rule", metrics.get("decision_rule")),
    ]
    return "\n".join(f"- **{name}:** {_cell(value)}" for name, value in fields if value not in (None, ""))


def _ci_text(est: dict[str, Any] | None) -> str:
    if not est or est.get("ci_low") is None or est.get("ci_high") is None:
        return "—"
    return f"{est['ci_low']:.3f} – {est['ci_high']:.3f}"


def _value_text(est: dict[str, Any] | None) -> str:
    return "n/a" if not est or est.get("value") is None else f"{est['value']:.3f}"


def _metric_section(metrics: dict[str, Any]) -> str:
    level = round(100 * metrics.get("ci_level", 0.95))
    rows = _BINARY_ROWS if metrics.get("task") == "binary" else _MULTICLASS_ROWS
    lines = ["## Metrics", "", f"| Metric | Value | {level}% CI | Meaning |", "|---|---:|:---:|---|"]
    for key, label, meaning in rows:
        lines.append(f"| {label} | {_value_text(metrics.get(key))} | {_ci_text(metrics.get(key))} | {meaning} |")
    cal = metrics.get("calibration")
    if cal:
        lines.append(f"| Expected calibration error | {cal['ece']:.3f} | — | {cal['n_bins']}-bin, {cal['method']} |")
    boot = metrics.get("bootstrap", {})
    if boot.get("n_resamples"):
        lines += [
            "",
            f"CIs: {boot['method']} bootstrap over {boot['n_resamples']} case resamples (seed {boot['seed']}).",
        ]
    if metrics.get("per_class"):
        lines += ["", _per_class_table(metrics, level)]
    return "\n".join(lines)


def _per_class_table(metrics: dict[str, Any], level: int) -> str:
    lines = [
        f"Per class (one-vs-rest; {level}% CI in parentheses):",
        "",
        "| Class | n | Sensitivity | Specificity | AUC |",
        "|---|---:|---|---|---|",
    ]
    for name, m in metrics["per_class"].items():
        cells = [format_estimate(m.get(k), digits=3).replace("CI ", "") for k in ("sensitivity", "specificity", "auc")]
        lines.append(f"| {_cell(name)} | {metrics['class_counts'].get(name, '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _confusion_section(metrics: dict[str, Any], class_names: list[str], images: dict[str, str]) -> str:
    names = [_cell(n) for n in class_names]
    lines = [
        "## Confusion matrix",
        "",
        "Rows are the true class, columns the predicted class.",
        "",
        "| true \\ predicted | " + " | ".join(names) + " | total |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for name, row in zip(names, metrics["confusion_matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + f" | {sum(row)} |")
    if "confusion_matrix" in images:
        lines += ["", f"![Confusion matrix]({images['confusion_matrix']})"]
    return "\n".join(lines)


def _figures_section(images: dict[str, str]) -> str:
    blocks = []
    if "roc" in images:
        blocks.append(f"### ROC curve\n\n![ROC curve]({images['roc']})")
    if "calibration" in images:
        blocks.append(
            "### Calibration\n\nPoints on the diagonal mean predicted probabilities match observed frequencies."
            f"\n\n![Calibration]({images['calibration']})"
        )
    if "learning_curve" in images:
        blocks.append(f"### Learning curve\n\n![Learning curve]({images['learning_curve']})")
    return "## Figures\n\n" + "\n\n".join(blocks) if blocks else ""


def _how_to_read(metrics: dict[str, Any], class_names: list[str]) -> str:
    if metrics.get("task") != "binary":
        return (
            "## How to read this\n\n"
            "- **Sensitivity of a class**: of the cases truly in that class, the share the model assigned to it.\n"
            "- **Specificity of a class**: of the cases not in that class, the share the model did not assign to it.\n"
            "- Each case is assigned the class with the highest predicted probability.\n"
            "- The confidence interval is the range of values compatible with this sample; "
            "a wide interval means the estimate is uncertain."
        )
    pos = metrics["positive_class"]
    pos_name, neg_name = _cell(class_names[pos]), _cell(class_names[1 - pos])
    cm = metrics["confusion_matrix"]
    tp, fn, fp, tn = cm[pos][pos], cm[pos][1 - pos], cm[1 - pos][pos], cm[1 - pos][1 - pos]
    sens, spec = _value_text(metrics.get("sensitivity")), _value_text(metrics.get("specificity"))
    return (
        f"## How to read this\n\nThe positive class is **{pos_name}**; a case is called {pos_name} when the model's "
        f"probability for it is at least {metrics['threshold']:g}.\n\n"
        f"- **Sensitivity {sens}**: of the {tp + fn} truly {pos_name} cases, the model called {tp} {pos_name} and "
        f"missed {fn} (false negatives).\n"
        f"- **Specificity {spec}**: of the {tn + fp} truly {neg_name} cases, the model called {tn} {neg_name} and "
        f"flagged {fp} as {pos_name} (false positives).\n"
        "- **AUC** does not depend on the threshold: 0.5 is chance, 1.0 is perfect ranking.\n"
        "- Moving the threshold trades sensitivity against specificity (see the ROC curve); "
        "the confidence interval is the range of values compatible with this sample."
    )


def model_selection_caveat(split: str | None) -> list[str]:
    """The warning that validation numbers are optimistic when the split chose the model (shared by reports)."""
    if split is None or "val" in str(split).lower():
        return [
            "If this validation set was used to choose the epoch or settings (model selection), these numbers are "
            "**optimistic**; confirm on a held-out test set or external data before drawing conclusions."
        ]
    return []


def _caveats(metrics: dict[str, Any], split: str | None) -> str:
    items = []
    n, smallest = metrics["n"], min(metrics["class_counts"].values())
    auc = metrics.get("auc") or {}
    width = None if auc.get("ci_low") is None else auc["ci_high"] - auc["ci_low"]
    if n < SMALL_N or smallest < SMALL_CLASS:
        items.append(
            f"**Small sample** ({n} cases, smallest class {smallest}): confidence intervals are wide"
            + (f" (AUC interval spans {width:.2f})" if width is not None else "")
            + "; treat point estimates as rough."
        )
    else:
        items.append(f"Intervals reflect sampling variation over {n} cases only, not differences between sites.")
    items += model_selection_caveat(split)
    boot = metrics.get("bootstrap", {})
    if boot.get("n_resamples") and boot.get("auc_resamples_used", 0) < boot["n_resamples"] and auc.get("value"):
        items.append(
            f"Only {boot['auc_resamples_used']} of {boot['n_resamples']} bootstrap resamples contained every class; "
            "the AUC interval rests on those."
        )
    if metrics.get("auc_excluded_classes"):
        excluded = ", ".join(metrics["auc_excluded_classes"])
        items.append(f"Macro AUC leaves out {excluded}: every case is (or no case is) in that class.")
    if metrics.get("task") == "binary" and metrics.get("threshold") == 0.5:
        items.append("The 0.5 threshold was not tuned; a clinical operating point should be chosen deliberately.")
    items.append("Retrospective performance does not establish clinical benefit; this is not a validated device.")
    return "## Caveats\n\n" + "\n".join(f"- {item}" for item in items)


def _notes(notes: list[str] | None) -> str:
    if not notes:
        return ""
    return "## Notes\n\n" + "\n".join(f"- {note}" for note in notes)
