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
