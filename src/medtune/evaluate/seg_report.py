"""The segmentation report: metrics.json, per_case.csv, overlay and Dice PNGs and a Markdown report (no torch).

Takes the result of :func:`medtune.evaluate.segmentation.evaluate_cases`; written in the style of the
classification report (:mod:`medtune.evaluate.report`), each file atomically, report.md last.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medtune.atomic import write_bytes_atomic, write_json_atomic
from medtune.evaluate.metrics import format_estimate
from medtune.evaluate.plots import _save, plot_learning_curve
from medtune.evaluate.report import _banner, _cell, _notes, estimates_section, join_sections, model_selection_caveat
from medtune.evaluate.segmentation import write_case_csv

SMALL_N_CASES = 30  # below this many cases intervals over cases are wide
N_WORST = 5
_COLORS = ("tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:pink", "tab:olive", "tab:brown")
_ROLES = ("worst", "median", "best")


def write_segmentation_report(
    out_dir: str | Path,
    results: dict[str, Any],
    cases_for_overlay: list[dict[str, Any]] | None = None,
    progress_path: str | Path | None = None,
    context: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, per_case.csv, the PNG figures and report.md into ``out_dir``; return their paths.

    Keys: ``metrics``, ``per_case``, ``dice_plot``, ``report``, plus ``overlay_worst`` / ``overlay_median`` /
    ``overlay_best`` (cases ranked by mean Dice among ``cases_for_overlay``, which hold ``case``, ``label``,
    ``pred`` and optionally ``image`` and ``spacing``) and ``learning_curve`` (when ``progress_path`` holds epoch
    events). ``context`` may hold ``title``, ``model``, ``pretrained``, ``dataset``, ``split``, ``data_warning``,
    ``notes`` and ``extra_sections``.
    """
    if results.get("task") != "segmentation":
        raise ValueError("results are not a segmentation result (use evaluate_cases)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"dice_plot": plot_dice_per_class(results, out / "dice_per_class.png")}
    captions: dict[str, str] = {}
    for role, case in select_overlay_cases(results, cases_for_overlay or []):
        key = f"overlay_{role}"
        paths[key], captions[key] = plot_overlay(case, results, out / f"{key}.png", role=role)
    if progress_path is not None and Path(progress_path).is_file():
        curve = plot_learning_curve(progress_path, out / "learning_curve.png")
        if curve is not None:
            paths["learning_curve"] = curve
    paths["per_case"] = write_case_csv(results["rows"], out / "per_case.csv")
    write_json_atomic(out / "metrics.json", results)
    paths["metrics"] = out / "metrics.json"
    images = {k: v.name for k, v in paths.items()}
    text = render_segmentation_markdown(results, context or {}, images, captions)
    write_bytes_atomic(out / "report.md", text.encode("utf-8"))  # last: its presence means the set is complete
    paths["report"] = out / "report.md"
    return paths


def segmentation_headline(results: dict[str, Any], split: str | None = None) -> str:
    """One line such as ``Mean Dice 0.87 (95% CI 0.85–0.89) over 40 validation cases: anterior 0.88, ...``."""
    where = f"over {results['n']} {split + ' ' if split else ''}cases"
    text = f"Mean Dice {format_estimate(results.get('mean_dice'), ci=results.get('ci_level'))} {where}"
    per_class = [f"{name} {_fmt((m.get('dice') or {}).get('value'))}" for name, m in results["per_class"].items()]
    return f"{text}: {', '.join(per_class)}" if len(per_class) > 1 else text


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------


def plot_dice_per_class(results: dict[str, Any], path: str | Path) -> Path:
    """Box plot with every case as a point: Dice per class and the per-case mean over classes."""
    names = list(results["per_class"])
    groups = [[r["dice"] for r in results["rows"] if r["class"] == name and r["dice"] is not None] for name in names]
    groups.append([c["mean_dice"] for c in results["cases"] if c["mean_dice"] is not None])
    labels = [f"{n}\n(n={len(g)})" for n, g in zip([*names, "mean over classes"], groups, strict=True)]
    fig = Figure(figsize=(max(4.5, 1.4 * len(groups) + 2.0), 4.5), layout="constrained")
    ax = fig.add_subplot()
    positions = list(range(1, len(groups) + 1))
    kept = [(p, g) for p, g in zip(positions, groups, strict=True) if g]
    if kept:
        ax.boxplot([g for _, g in kept], positions=[p for p, _ in kept], widths=0.55, showfliers=False)
    rng = np.random.default_rng(0)  # fixed jitter: the same plot for the same results
    labelled = False
    for i, (pos, g) in enumerate(zip(positions, groups, strict=True)):
        color = "tab:grey" if i == len(groups) - 1 else _COLORS[i % len(_COLORS)]
        ax.plot(pos + rng.uniform(-0.15, 0.15, len(g)), g, "o", color=color, alpha=0.6, ms=4)
        if g:
            ax.plot([pos], [float(np.mean(g))], "D", color="black", ms=6, label=None if labelled else "mean")
            labelled = True
    ax.set_xticks(positions, labels=labels)
    ax.set_xlim(0.4, len(groups) + 0.6)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("Dice per case")
    ax.grid(axis="y", alpha=0.3)
    if labelled:
        ax.legend(loc="lower left")
    ax.set_title(f"Dice per case (n = {results['n']} cases)")
    return _save(fig, path)


def select_overlay_cases(results: dict[str, Any], cases: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The worst, median and best case by mean Dice among ``cases`` (fewer if fewer distinct cases are ranked)."""
    by_id = {str(c.get("case")): c for c in cases if isinstance(c, dict) and c.get("label") is not None}
    ranked = sorted(
        (c["mean_dice"], c["case"]) for c in results["cases"] if c["mean_dice"] is not None and c["case"] in by_id
    )
    if not ranked:
        return []
    picks = dict(zip(_ROLES, (ranked[0][1], ranked[(len(ranked) - 1) // 2][1], ranked[-1][1]), strict=True))
    chosen: list[tuple[str, dict[str, Any]]] = []
    for role, cid in picks.items():
        if cid not in [c["case"] for _, c in chosen]:
            chosen.append((role, {**by_id[cid], "case": cid}))
    return chosen


def plot_overlay(case: dict[str, Any], results: dict[str, Any], path: str | Path, role: str = "") -> tuple[Path, str]:
    """Image slice beside the same slice with reference contours (solid) and prediction (dashed, shaded).

    A 3-D case is shown at the slice along the last array axis with the most foreground (label or prediction),
    in array orientation with the in-plane spacing as aspect ratio. Returns the path and a one-line caption.
    """
    label, pred = np.asarray(case["label"]), np.asarray(case["pred"])
    image = _image_like(case.get("image"), label.shape)
    values = [int(v) for v in results["class_names"]]
    names = results["class_names"]
    spacing = _spacing(case.get("spacing"), label.ndim)
    where = ""
    if label.ndim == 3:
        fg = np.isin(label, values) | np.isin(pred, values)
        k = int(np.argmax(fg.reshape(-1, fg.shape[-1]).sum(axis=0)))
        label, pred = label[..., k], pred[..., k]
        image = None if image is None else image[..., k]
        where = f", slice {k} of {fg.shape[-1]} (last axis)"
    aspect = spacing[0] / spacing[1]
    shown = image if image is not None else np.zeros(label.shape)
    lo, hi = np.percentile(shown, [1, 99]) if shown.size and np.ptp(shown) > 0 else (0.0, 1.0)

    fig = Figure(figsize=(8.5, 4.8), layout="constrained")
    ax_img, ax_seg = fig.subplots(1, 2)
    for ax in (ax_img, ax_seg):
        ax.imshow(shown, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-9), aspect=aspect, interpolation="nearest")
        ax.set_axis_off()
    ax_img.set_title("image" if image is not None else "no image given")
    handles = []
    shade = np.zeros((*label.shape, 4))
    for i, v in enumerate(values):
        color = _COLORS[i % len(_COLORS)]
        name = names[str(v)]
        shade[pred == v] = to_rgba(color, 0.3)
        for mask, style in ((label == v, "solid"), (pred == v, "dashed")):
            if mask.any() and not mask.all():
                ax_seg.contour(mask.astype(float), levels=[0.5], colors=[color], linestyles=style, linewidths=1.5)
        handles += [
            Line2D([], [], color=color, ls="-", lw=1.5, label=f"{name}: reference"),
            Line2D([], [], color=color, ls="--", lw=1.5, label=f"{name}: prediction"),
        ]
    ax_seg.imshow(shade, aspect=aspect, interpolation="nearest")
    ax_seg.set_title("reference (solid) vs prediction (dashed, shaded)")
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), fontsize="small")
    info = next((c for c in results["cases"] if c["case"] == str(case["case"])), None)
    dice = "" if info is None else ", ".join(f"{n} {_fmt(d)}" for n, d in info["dice"].items())
    mean = "" if info is None else f"mean Dice {_fmt(info['mean_dice'])}"
    fig.suptitle(f"{role + ': ' if role else ''}{case['case']} — {mean}{where}\n{dice}", fontsize="medium")
    caption = f"**{role.capitalize() or 'Case'}:** {case['case']}, {mean} ({dice}){where}"
    return _save(fig, path), caption


def _image_like(image: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if image is None:
        return None
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == len(shape) + 1 and img.shape[1:] == shape:  # channel-first: show the first channel
        img = img[0]
    if img.shape != shape:
        return None
    return np.nan_to_num(img)


def _spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in np.ravel(spacing))
    return sp if len(sp) == ndim and all(s > 0 for s in sp) else (1.0,) * ndim


# ----------------------------------------------------------------------------------------------------------------
# report.md
# ----------------------------------------------------------------------------------------------------------------


def render_segmentation_markdown(
    results: dict[str, Any],
    context: dict[str, Any],
    images: dict[str, str],
    captions: dict[str, str] | None = None,
) -> str:
    """The report.md text; ``images`` maps figure keys to file names relative to the report."""
    split = context.get("split")
    parts = [
        _banner(context.get("data_warning")),
        f"# {context.get('title') or 'Segmentation report'}",
        f"**{segmentation_headline(results, split)}.**",
        estimates_section(context.get("estimates")),
        _provenance(results, context),
        _metric_section(results),
        _worst_cases(results, images.get("per_case")),
        _figures_section(images, captions or {}),
        _how_to_read(results),
        _caveats(results, split),
        _notes(context.get("notes")),
    ]
    return join_sections(parts, context)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _est(est: dict[str, Any] | None, digits: int = 3) -> str:
    """``0.881 (0.850–0.905)``; ``n/a`` if undefined."""
    return format_estimate(est, digits=digits).replace("CI ", "")


def _provenance(results: dict[str, Any], context: dict[str, Any]) -> str:
    spacings = {tuple(c["spacing"]) for c in results["cases"]}
    spacing = (
        " × ".join(f"{s:g}" for s in next(iter(spacings))) + " mm"
        if len(spacings) == 1
        else f"{len(spacings)} different voxel spacings"
    )
    if results.get("spacing_missing"):
        spacing += f" (not given for {_count(len(results['spacing_missing']), 'case')}: 1 mm per voxel assumed)"
    fields = [
        ("Model", context.get("model")),
        ("Pretrained weights", context.get("pretrained")),
        ("Dataset", context.get("dataset")),
        ("Split", context.get("split")),
        ("Classes", ", ".join(f"{name} ({v})" for v, name in results["class_names"].items())),
        ("Cases", results["n"]),
        ("Voxel spacing", spacing),
    ]
    return "\n".join(f"- **{name}:** {_cell(value)}" for name, value in fields if value not in (None, ""))


def _metric_section(results: dict[str, Any]) -> str:
    level = round(100 * results.get("ci_level", 0.95))
    lines = [
        "## Metrics",
        "",
        f"Mean over cases with its {level}% CI in parentheses; distances in mm (lower is better).",
        "",
        "| Class | Dice | Dice median | HD95 (mm) | MSD (mm) | Cases (Dice / distances) |",
        "|---|---|---:|---|---|---:|",
    ]
    rows = [(name, m) for name, m in results["per_class"].items()]
    rows.append(("**Mean over classes**", results["mean_over_classes"]))
    for name, m in rows:
        dice, hd, msd = m["dice"], m["hd95"], m["msd"]
        lines.append(
            f"| {_cell(name)} | {_est(dice)} | {_fmt(dice.get('median'), 3)} | {_est(hd, 2)} | {_est(msd, 2)} "
            f"| {dice['n']} / {hd['n']} |"
        )
    boot = results.get("bootstrap", {})
    if boot.get("n_resamples"):
        lines += [
            "",
            f"CIs: {boot['method']} bootstrap over {boot['n_resamples']} case resamples (seed {boot['seed']}); "
            "the mean over classes averages each case's classes first.",
        ]
    excluded = _exclusions(results)
    if excluded:
        lines += ["", "Cases left out of a summary:", "", *excluded]
    return "\n".join(lines)


def _exclusions(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, m in results["per_class"].items():
        parts = []
        if m.get("n_empty_both"):
            parts.append(f"{m['n_empty_both']} with the class in neither label nor prediction (Dice undefined)")
        if m.get("n_empty_prediction"):
            parts.append(f"{m['n_empty_prediction']} where the prediction missed it entirely (Dice 0, no distances)")
        if m.get("n_empty_label"):
            parts.append(f"{m['n_empty_label']} predicted where the label has none (Dice 0, no distances)")
        if parts:
            lines.append(f"- **{_cell(name)}:** " + "; ".join(parts) + ".")
    return lines


def _worst_cases(results: dict[str, Any], csv_name: str | None) -> str:
    ranked = sorted(
        (c for c in results["cases"] if c["mean_dice"] is not None), key=lambda c: (c["mean_dice"], c["case"])
    )[:N_WORST]
    if not ranked:
        return ""
    names = list(results["per_class"])
    lines = [
        "## Worst cases",
        "",
        f"The {len(ranked)} cases with the lowest mean Dice (review these images first):",
        "",
        "| Case | Mean Dice | " + " | ".join(_cell(n) for n in names) + " | Notes |",
        "|---|---:|" + "---:|" * len(names) + "---|",
    ]
    for c in ranked:
        notes = "; ".join(f"{_cell(n)}: {f.replace('_', ' ')}" for n, f in c["flags"].items())
        dice = " | ".join(_fmt(c["dice"].get(n), 3) for n in names)
        lines.append(f"| {_cell(c['case'])} | {_fmt(c['mean_dice'], 3)} | {dice} | {notes} |")
    if csv_name:
        lines += ["", f"Every case and class: [{csv_name}]({csv_name})."]
    return "\n".join(lines)


def _figures_section(images: dict[str, str], captions: dict[str, str]) -> str:
    blocks = []
    if "dice_plot" in images:
        blocks.append(
            "### Dice per case\n\nEach point is one case; boxes show the median and quartiles, diamonds the mean."
            f"\n\n![Dice per case]({images['dice_plot']})"
        )
    overlays = [f"overlay_{role}" for role in _ROLES if f"overlay_{role}" in images]
    if overlays:
        text = [
            "### Example cases",
            "",
            "Solid lines are the reference label, dashed lines and shading the prediction. A 3-D case is shown at "
            "the slice with the most foreground, in array orientation (not necessarily radiological).",
        ]
        for key in overlays:
            text += ["", captions.get(key, key), "", f"![{key.replace('_', ' ')}]({images[key]})"]
        blocks.append("\n".join(text))
    if "learning_curve" in images:
        blocks.append(f"### Learning curve\n\n![Learning curve]({images['learning_curve']})")
    return "## Figures\n\n" + "\n\n".join(blocks) if blocks else ""


def _how_to_read(results: dict[str, Any]) -> str:
    finest = min((min(c["spacing"]) for c in results["cases"]), default=1.0)
    return (
        "## How to read this\n\n"
        "- **Dice** is the overlap of prediction and reference: 2 × shared volume / (predicted + reference volume), "
        "from 0 (no overlap) to 1 (identical). The same boundary error costs small structures much more Dice than "
        "large ones, so compare Dice between similar structures only.\n"
        "- **HD95** (95th-percentile Hausdorff distance, mm): 95% of boundary points of each outline lie within this "
        "distance of the other outline. It reflects the largest errors, e.g. a stray blob far from the organ.\n"
        "- **MSD** (mean symmetric surface distance, mm): the average distance between the two outlines, the "
        "typical boundary error.\n"
        f"- Distances are in mm; errors below the voxel size (here {finest:g} mm at the finest) are at the limit of "
        "what the image resolves.\n"
        "- The confidence interval is the range of mean values compatible with these cases; "
        "a wide interval means the estimate is uncertain."
    )


def _caveats(results: dict[str, Any], split: str | None) -> str:
    items = []
    n = results["n"]
    dice = results.get("mean_dice") or {}
    if n < SMALL_N_CASES:
        width = None if dice.get("ci_low") is None else dice["ci_high"] - dice["ci_low"]
        items.append(
            f"**Small sample** ({n} cases): confidence intervals are wide"
            + (f" (the mean Dice interval spans {width:.2f})" if width is not None else "")
            + "; treat point estimates as rough."
        )
    else:
        items.append(f"Intervals reflect sampling variation over {n} cases only, not differences between sites.")
    items += model_selection_caveat(split)
    missed = sum(m.get("n_empty_prediction", 0) + m.get("n_empty_label", 0) for m in results["per_class"].values())
    if missed:
        items.append(
            f"HD95 and MSD leave out {missed} case–class pair{'s' if missed != 1 else ''} where the structure was "
            "missed or predicted where "
            "there is none (distance undefined); those count as Dice 0 but make the distance summaries look better."
        )
    if any(m.get("n_empty_both") for m in results["per_class"].values()):
        items.append(
            "A class absent from both label and prediction has undefined Dice (nnU-Net convention) and is left out "
            "rather than counted as a perfect 1."
        )
    if results.get("spacing_missing"):
        items.append(
            f"Voxel spacing was not given for {_count(len(results['spacing_missing']), 'case')}; their distances are "
            "in voxels, not mm."
        )
    items.append("Retrospective performance does not establish clinical benefit; this is not a validated device.")
    return "## Caveats\n\n" + "\n".join(f"- {item}" for item in items)
