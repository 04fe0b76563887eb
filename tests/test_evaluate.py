"""Classification metrics, bootstrap CIs, plots and the Markdown report (medtune.evaluate)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from medtune.evaluate import (
    MetricsInputError,
    classification_metrics,
    plot_calibration,
    plot_confusion_matrix,
    plot_learning_curve,
    plot_roc,
    write_classification_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["benign", "malignant"]


def binary_fixture(n: int, seed: int = 0, signal: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(signal * y + rng.random(n) * (1 - signal), 0, 1)
    return y, np.stack([1 - p1, p1], axis=1)


def multiclass_fixture(n: int, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.2
    probs = np.exp(logits)
    return y, probs / probs.sum(axis=1, keepdims=True)


def ci_contains(est: dict) -> bool:
    return est["ci_low"] <= est["value"] <= est["ci_high"]


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def test_perfect_separation_gives_auc_one_with_degenerate_ci():
    y = np.array([0] * 20 + [1] * 20)
    p1 = np.r_[np.linspace(0.0, 0.4, 20), np.linspace(0.6, 1.0, 20)]
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), NAMES, n_bootstrap=300)
    assert m["auc"] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    for key in ("accuracy", "sensitivity", "specificity", "f1", "balanced_accuracy"):
        assert m[key]["value"] == 1.0 and m[key]["ci_low"] == 1.0
    assert m["confusion_matrix"] == [[20, 0], [0, 20]]
    assert m["roc_curve"]["thresholds"][0] is None  # sklearn's +inf made JSON-safe


def test_binary_point_estimates_match_sklearn():
    y, probs = binary_fixture(300, seed=3)
    p1 = probs[:, 1]
    pred = (p1 >= 0.5).astype(int)
    m = classification_metrics(y, probs, NAMES)
    assert m["task"] == "binary" and m["n"] == 300
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["f1"]["value"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["class_counts"] == {"benign": int(np.sum(y == 0)), "malignant": int(np.sum(y == 1))}
    for key in ("auc", "accuracy", "f1", "sensitivity", "specificity", "balanced_accuracy"):
        assert ci_contains(m[key]), key
    json.dumps(m, allow_nan=False)  # strictly JSON-serializable


def test_auc_with_tied_scores_matches_sklearn():
    y, probs = binary_fixture(200, seed=5)
    p1 = np.round(probs[:, 1], 1)  # many ties
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), NAMES, n_bootstrap=0)
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, p1), abs=1e-12)
    assert m["auc"]["ci_low"] is None  # no bootstrap requested


def test_known_confusion_matrix_gives_exact_sensitivity_and_specificity():
    # 10 positives: 8 above threshold; 20 negatives: 15 below threshold
    y = np.array([1] * 10 + [0] * 20)
    p1 = np.array([0.9] * 8 + [0.2] * 2 + [0.1] * 15 + [0.7] * 5)
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), NAMES, n_bootstrap=200)
    assert m["confusion_matrix"] == [[15, 5], [2, 8]]  # rows = true (benign, malignant)
    assert m["sensitivity"]["value"] == pytest.approx(8 / 10)
    assert m["specificity"]["value"] == pytest.approx(15 / 20)
    assert m["accuracy"]["value"] == pytest.approx(23 / 30)
    assert m["f1"]["value"] == pytest.approx(2 * 8 / (2 * 8 + 5 + 2))


def test_positive_class_zero_and_threshold():
    y = np.array([0, 0, 0, 1, 1, 1])
    p0 = np.array([0.9, 0.6, 0.4, 0.3, 0.65, 0.1])
    m = classification_metrics(y, np.stack([p0, 1 - p0], 1), NAMES, positive_class=0, threshold=0.5, n_bootstrap=0)
    assert m["positive_class_name"] == "benign"
    assert m["sensitivity"]["value"] == pytest.approx(2 / 3)  # benign cases with P(benign) >= 0.5
    assert m["specificity"]["value"] == pytest.approx(2 / 3)
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y == 0, p0))
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]
    strict = classification_metrics(y, np.stack([p0, 1 - p0], 1), NAMES, positive_class=0, threshold=0.8)
    assert strict["threshold"] == 0.8 and strict["sensitivity"]["value"] == pytest.approx(1 / 3)


def test_bootstrap_is_seeded_and_ci_narrows_with_n():
    small = classification_metrics(*binary_fixture(60, seed=1), NAMES, seed=7)
    again = classification_metrics(*binary_fixture(60, seed=1), NAMES, seed=7)
    large = classification_metrics(*binary_fixture(2000, seed=1), NAMES, seed=7)
    assert small["auc"] == again["auc"]
    for key in ("auc", "accuracy", "sensitivity", "specificity"):
        width_small = small[key]["ci_high"] - small[key]["ci_low"]
        width_large = large[key]["ci_high"] - large[key]["ci_low"]
        assert width_large < 0.5 * width_small, key
        assert ci_contains(large[key])


def test_single_class_resamples_are_skipped_for_auc():
    y = np.array([0] * 18 + [1] * 2)  # many resamples hold no positive case
    p1 = np.r_[np.linspace(0, 0.6, 18), [0.55, 0.9]]
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), NAMES, n_bootstrap=500)
    used = m["bootstrap"]["auc_resamples_used"]
    assert 0 < used < 500
    assert m["auc"]["ci_low"] is not None and ci_contains(m["auc"])


def test_multiclass_matches_sklearn():
    y, probs = multiclass_fixture(300, k=4, seed=4)
    names = ["a", "b", "c", "d"]
    pred = probs.argmax(1)
    m = classification_metrics(y, probs, names)
    assert m["task"] == "multiclass" and m["threshold"] is None
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["f1"]["value"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == 300 and np.trace(cm) == int(np.sum(pred == y))
    for k, name in enumerate(names):
        pc = m["per_class"][name]
        tp = cm[k, k]
        assert pc["sensitivity"]["value"] == pytest.approx(tp / cm[k].sum())
        assert pc["specificity"]["value"] == pytest.approx(
            (300 - cm[k].sum() - cm[:, k].sum() + tp) / (300 - cm[k].sum())
        )
        assert pc["auc"]["value"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
        assert ci_contains(pc["sensitivity"]) and ci_contains(pc["specificity"])
    assert ci_contains(m["auc"]) and ci_contains(m["f1"])
    assert m["auc_excluded_classes"] == []
    json.dumps(m, allow_nan=False)


def test_auc_is_the_reports_point_estimate():
    """``metrics.auc`` (the export gate's AUC) is the report's ``auc.value`` (binary, multiclass); NaN: one class."""
    from medtune.evaluate.metrics import auc

    y, probs = multiclass_fixture(90, k=3, seed=2)
    assert auc(y, probs) == classification_metrics(y, probs, ["a", "b", "c"], n_bootstrap=0)["auc"]["value"]
    yb = (y == 1).astype(int)
    pb = np.stack([1 - probs[:, 1], probs[:, 1]], 1)
    for positive in (0, 1):
        report = classification_metrics(yb, pb, NAMES, positive_class=positive, n_bootstrap=0)
        assert auc(yb, pb, positive) == report["auc"]["value"]
    assert auc(yb, pb) == pytest.approx(roc_auc_score(yb, pb[:, 1]), abs=1e-12)
    assert np.isnan(auc(np.zeros(5, int), np.full((5, 2), 0.5)))


def test_paired_auc_difference_is_the_difference_of_aucs_with_a_paired_ci():
    """Point = AUC(a) - AUC(b) (sklearn); a clearly better score gets a CI above 0 that is narrower than the CIs of
    the two AUCs (pairing cancels case difficulty); identical scores give exactly 0; mismatched shapes fail."""
    from medtune.evaluate.metrics import paired_auc_difference

    y, probs = binary_fixture(300, seed=3, signal=0.2)
    weak = np.clip(0.5 * probs[:, 1] + 0.5 * np.random.default_rng(4).random(300), 0, 1)
    d = paired_auc_difference(y, probs[:, 1], weak, n_bootstrap=500)
    expected = roc_auc_score(y, probs[:, 1]) - roc_auc_score(y, weak)
    assert d["value"] == pytest.approx(expected, abs=1e-12) and expected > 0.05
    assert 0 < d["ci_low"] < d["value"] < d["ci_high"]
    ci_a = classification_metrics(y, probs, NAMES, n_bootstrap=500)["auc"]
    assert d["ci_high"] - d["ci_low"] < ci_a["ci_high"] - ci_a["ci_low"]
    assert paired_auc_difference(y, weak, weak, n_bootstrap=200) == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert paired_auc_difference(y, probs[:, 1], weak, n_bootstrap=500) == d  # seeded
    with pytest.raises(MetricsInputError, match="shape"):
        paired_auc_difference(y, probs[:, 1], weak[:-1])


def test_paired_auc_difference_of_model_sets_is_the_difference_of_mean_aucs():
    """An (m, n) score is m models: its AUC is the mean of their AUCs on every resample. An ensemble (mean
    probability) of noisy copies beats their average AUC with a CI above 0; a 1-row set equals the 1-D call; a set
    whose case count differs from the labels fails naming the shape."""
    from medtune.evaluate.metrics import paired_auc_difference

    y, probs = binary_fixture(300, seed=5, signal=0.2)
    rng = np.random.default_rng(6)
    members = np.clip(probs[:, 1][None, :] + rng.normal(0, 0.25, size=(3, 300)), 0, 1)
    ens = members.mean(axis=0)
    d = paired_auc_difference(y, ens, members, n_bootstrap=500)
    expected = roc_auc_score(y, ens) - np.mean([roc_auc_score(y, m) for m in members])
    assert d["value"] == pytest.approx(expected, abs=1e-12) and expected > 0.01
    assert 0 < d["ci_low"] < d["value"] < d["ci_high"]
    both = paired_auc_difference(y, members, members[::-1], n_bootstrap=200)  # same set, other order: exactly 0
    assert both["value"] == pytest.approx(0.0, abs=1e-12) and both["ci_high"] == pytest.approx(0.0, abs=1e-12)
    assert paired_auc_difference(y, ens, members[:1], n_bootstrap=300) == paired_auc_difference(
        y, ens, members[0], n_bootstrap=300
    )
    with pytest.raises(MetricsInputError, match="shape"):
        paired_auc_difference(y, ens, members[:, :-1])


def test_multiclass_with_an_absent_class_averages_auc_over_defined_classes():
    y, probs = multiclass_fixture(120, k=3, seed=6)
    y = np.where(y == 2, 0, y)  # class "c" never occurs
    m = classification_metrics(y, probs, ["a", "b", "c"], n_bootstrap=100)
    per_class = [roc_auc_score(y == k, probs[:, k]) for k in (0, 1)]
    assert m["auc"]["value"] == pytest.approx(np.mean(per_class))
    assert m["auc_excluded_classes"] == ["c"] and m["per_class"]["c"]["sensitivity"]["value"] is None
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "probs", "names", "match"),
    [
        ([0, 1, 1], [[0.5, 0.5], [0.2, 0.8]], NAMES, "rows"),
        ([0, 1], [0.3, 0.7], NAMES, "2-D"),
        ([0, 1], [[0.5, np.nan], [0.2, 0.8]], NAMES, "non-finite"),
        ([0, 2], [[0.5, 0.5], [0.2, 0.8]], NAMES, "labels must be in 0..1"),
        ([0, -1], [[0.5, 0.5], [0.2, 0.8]], NAMES, "labels must be in"),
        ([0, 1], [[0.5, 0.5], [0.2, 0.8]], ["only-one"], "class names"),
        ([0, 1], [[3.0, -2.0], [0.2, 0.8]], NAMES, r"\[0, 1\]"),
        ([0.5, 1], [[0.5, 0.5], [0.2, 0.8]], NAMES, "integer"),
        ([[0, 1]], [[0.5, 0.5], [0.2, 0.8]], NAMES, "1-D"),
        ([], np.zeros((0, 2)), NAMES, "empty"),
    ],
)
def test_invalid_input_raises_one_line_value_error(y, probs, names, match):
    with pytest.raises(ValueError, match=match) as err:
        classification_metrics(np.asarray(y), np.asarray(probs), names)
    assert isinstance(err.value, MetricsInputError)
    assert "\n" not in str(err.value) and str(err.value)


def test_calibration_bins_and_ece():
    y = np.array([0, 1] * 50)
    p1 = np.full(100, 0.95)  # says 95 % but only half are positive
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), NAMES, n_bootstrap=0)
    cal = m["calibration"]
    assert cal["n_bins"] == 10 and len(cal["bins"]) == 10
    assert cal["ece"] == pytest.approx(0.45)
    top = cal["bins"][-1]
    assert (
        top["count"] == 100 and top["observed"] == pytest.approx(0.5) and top["mean_predicted"] == pytest.approx(0.95)
    )
    assert cal["bins"][0]["observed"] is None
    ones = classification_metrics(np.array([0, 1]), np.array([[0.0, 1.0], [0.0, 1.0]]), NAMES, n_bootstrap=0)
    assert ones["calibration"]["bins"][-1]["count"] == 2  # probability 1.0 falls in the last bin


# ---------------------------------------------------------------------------------------------------------------
# plots and report
# ---------------------------------------------------------------------------------------------------------------


def write_progress(path: Path, truncated: bool = True) -> Path:
    lines = [
        {"event": "start", "max_epochs": 4, "metric_name": "val_auc"},
        {"event": "step", "epoch": 1, "step": 1, "loss": 0.9},
        {"event": "epoch", "epoch": 1, "loss": 0.8, "metric": 0.61, "metric_name": "val_auc", "best_epoch": 1},
        {"event": "epoch", "epoch": 2, "loss": 0.6, "metric": 0.74, "metric_name": "val_auc", "best_epoch": 2, "x": {}},
        {"event": "epoch", "epoch": 3, "loss": 0.5, "metric": 0.70, "metric_name": "val_auc", "best_epoch": 2},
    ]
    text = "".join(json.dumps(rec) + "\n" for rec in lines)
    if truncated:
        text += '{"event": "epoch", "epoch": 4, "loss": 0.4, "met'
    path.write_text(text)
    return path


def test_plot_learning_curve_tolerates_truncated_last_line(tmp_path):
    out = plot_learning_curve(write_progress(tmp_path / "progress.jsonl"), tmp_path / "lc.png")
    assert out == tmp_path / "lc.png" and out.read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob(".*.tmp"))  # temp files were renamed away


def test_plot_learning_curve_without_epochs_returns_none(tmp_path):
    progress = tmp_path / "progress.jsonl"
    progress.write_text('{"event": "start", "max_epochs": 3}\n{"event": "step", "epo')
    assert plot_learning_curve(progress, tmp_path / "lc.png") is None
    assert not (tmp_path / "lc.png").exists()


def test_plots_write_pngs(tmp_path):
    y, probs = binary_fixture(80, seed=9)
    m = classification_metrics(y, probs, NAMES, n_bootstrap=100)
    for fn, name in ((plot_roc, "roc.png"), (plot_calibration, "cal.png")):
        assert fn(m, tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    cm_path = plot_confusion_matrix(m["confusion_matrix"], NAMES, tmp_path / "cm.png")
    assert cm_path.read_bytes().startswith(PNG_MAGIC)


def test_evaluate_imports_neither_torch_nor_pyplot():
    code = "import sys, medtune.evaluate; print('torch' in sys.modules, 'matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_write_classification_report_binary(tmp_path):
    y, probs = binary_fixture(78, seed=11)
    m = classification_metrics(y, probs, NAMES, n_bootstrap=200)
    context = {
        "title": "Malignancy classifier",
        "model": "resnet18",
        "pretrained": "imagenet-torchvision",
        "dataset": "demo",
        "split": "validation",
        "data_warning": "SYNTHETIC DATA: labels are random noise",
        "notes": ["trained for 3 epochs on CPU"],
        "extra_sections": {"Export": "ONNX parity max abs error 1e-6"},
    }
    paths = write_classification_report(tmp_path / "eval", m, NAMES, write_progress(tmp_path / "p.jsonl"), context)
    expected = {"metrics", "confusion_matrix", "roc", "calibration", "learning_curve", "report"}
    assert set(paths) == expected
    for key in expected - {"metrics", "report"}:
        assert paths[key].read_bytes().startswith(PNG_MAGIC), key
    assert json.loads(paths["metrics"].read_text()) == m  # round-trips exactly
    text = paths["report"].read_text()
    first = text.splitlines()[0]
    assert "SYNTHETIC DATA" in first and first.startswith(">")
    auc = m["auc"]
    assert f"AUC {auc['value']:.2f} (95% CI {auc['ci_low']:.2f}–{auc['ci_high']:.2f}) on 78 validation cases" in text
    for fragment in ("![ROC curve](roc.png)", "(confusion_matrix.png)", "(learning_curve.png)", "(calibration.png)"):
        assert fragment in text
    assert "| **malignant** |" in text and "truly malignant" in text
    assert "optimistic" in text and "Small sample" in text
    assert "## Export" in text and "trained for 3 epochs on CPU" in text
    assert not list((tmp_path / "eval").glob(".*.tmp"))


def test_write_classification_report_multiclass_without_progress(tmp_path):
    y, probs = multiclass_fixture(150, k=3, seed=2)
    names = ["normal", "pneumonia", "covid"]
    m = classification_metrics(y, probs, names, n_bootstrap=100)
    paths = write_classification_report(tmp_path, m, names, progress_path=None, context={"split": "test"})
    assert set(paths) == {"metrics", "confusion_matrix", "calibration", "report"}
    text = paths["report"].read_text()
    assert "Macro AUC" in text and "on 150 test cases" in text and "SYNTHETIC" not in text
    assert "| pneumonia |" in text  # per-class table
    with pytest.raises(ValueError):
        write_classification_report(tmp_path, m, names[:2])
