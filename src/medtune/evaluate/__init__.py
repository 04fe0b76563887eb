"""Classification evaluation: metrics with bootstrap confidence intervals, plots and a Markdown report (no torch)."""

from medtune.evaluate.metrics import MetricsInputError, calibration_data, classification_metrics, format_estimate
from medtune.evaluate.plots import (
    plot_calibration,
    plot_confusion_matrix,
    plot_learning_curve,
    plot_roc,
    read_progress_events,
)
from medtune.evaluate.report import headline, render_report_markdown, write_classification_report

__all__ = [
    "MetricsInputError",
    "calibration_data",
    "classification_metrics",
    "format_estimate",
    "headline",
    "plot_calibration",
    "plot_confusion_matrix",
    "plot_learning_curve",
    "plot_roc",
    "read_progress_events",
    "render_report_markdown",
    "write_classification_report",
]

# segmentation evaluation (MONAI/torch are imported lazily, only when metrics are computed)
from medtune.evaluate.seg_report import (  # noqa: E402
    plot_dice_per_class,
    plot_overlay,
    render_segmentation_markdown,
    segmentation_headline,
    write_segmentation_report,
)
from medtune.evaluate.segmentation import case_metrics, evaluate_cases, read_case_csv, write_case_csv  # noqa: E402

__all__ += [
    "case_metrics",
    "evaluate_cases",
    "plot_dice_per_class",
    "plot_overlay",
    "read_case_csv",
    "render_segmentation_markdown",
    "segmentation_headline",
    "write_case_csv",
    "write_segmentation_report",
]
