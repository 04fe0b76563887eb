"""Segmentation evaluation: Dice/HD95/MSD per class and case, bootstrap CIs, CSV and the Markdown report."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from medtune.evaluate import (
    case_metrics,
    evaluate_cases,
    read_case_csv,
    segmentation_headline,
    write_case_csv,
    write_segmentation_report,
)
from medtune.evaluate.metrics import MetricsInputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = {1: "anterior", 2: "posterior"}


def ball(shape: tuple[int, ...], center: tuple[float, ...], radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """A voxelised ball (disk in 2-D) of a physical radius; 0/1 int map."""
    axes = [(np.arange(n) - c) * s for n, c, s in zip(shape, center, spacing, strict=True)]
    grids = np.meshgrid(*axes, indexing="ij")
    return (sum(g**2 for g in grids) <= radius_mm**2).astype(np.int64)


def reference_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float, float]:
    """Brute-force HD95, MSD and HD (max) between the face-connected boundary voxels of two masks, in mm."""

    def edge_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        inner = padded.copy()
        for axis in range(mask.ndim):
            inner &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
        edges = (padded & ~inner)[tuple(slice(1, -1) for _ in range(mask.ndim))]
        return np.argwhere(edges) * np.asarray(spacing)

    pa, pb = edge_points(a.astype(bool)), edge_points(b.astype(bool))
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    d_ab, d_ba = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    return float(hd95), float(np.concatenate([d_ab, d_ba]).mean()), float(max(d_ab.max(), d_ba.max()))


def disk_cases(n: int, seed: int = 0, size: int = 32) -> list[dict]:
    """2-D cases: class 1 a disk, class 2 a smaller disk; predictions shifted by random 0-3 pixels."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        sp = (0.8, 0.8)
        label = ball((size, size), (10, 12), 5.0, sp) + 2 * ball((size, size), (22, 20), 3.0, sp)
        dy, dx = rng.integers(0, 4, 2)
        pred = ball((size, size), (10 + dy, 12 + dx), 5.0, sp) + 2 * ball((size, size), (22 - dx, 20 + dy), 3.0, sp)
        image = label * 50.0 + rng.normal(0, 10, label.shape)
        cases.append({"case": f"case_{i:04d}", "pred": pred, "label": label, "spacing": sp, "image": image})
    return cases


# ---------------------------------------------------------------------------------------------------------------
# case_metrics
# ---------------------------------------------------------------------------------------------------------------


def test_identical_maps_give_dice_one_and_zero_distances():
    sp = (1.0, 1.0, 2.0)
    label = ball((24, 24, 12), (8, 8, 6), 5.0, sp) + 2 * ball((24, 24, 12), (16, 16, 6), 4.0, sp)
    out = case_metrics(label, label.copy(), [1, 2], sp)
    for v in (1, 2):
        assert out[v]["dice"] == pytest.approx(1.0)
        assert out[v]["hd95"] == 0.0 and out[v]["msd"] == 0.0
        assert out[v]["flag"] == "" and out[v]["label_voxels"] == out[v]["pred_voxels"] > 0


def test_shifted_sphere_distances_in_mm_with_anisotropic_spacing():
    """A 12 mm ball vs the same ball moved 2 voxels along the 2 mm axis (4 mm).

    Continuous spheres of radius R shifted by d: the distance of a surface point to the other sphere is
    |sqrt(R² + d² + 2Rd·u) − R| with u uniform on [-1, 1], so HD = d = 4 mm exactly, HD95 ≈ 3.8 mm,
    MSD ≈ 2.0 mm and Dice = 1 − 3d/(4R) + d³/(16R³) ≈ 0.752. The voxelised shapes are also checked exactly
    against a brute-force distance computation over their boundary voxels.
    """
    sp = (1.0, 1.0, 2.0)
    shape = (32, 32, 20)
    label = ball(shape, (16, 16, 9), 12.0, sp)
    pred = ball(shape, (16, 16, 11), 12.0, sp)
    m = case_metrics(pred, label, [1], sp)[1]
    hd95_ref, msd_ref, hd_ref = reference_distances(pred, label, sp)
    assert hd_ref == pytest.approx(4.0)  # each boundary voxel has its shifted twin 4 mm away
    assert m["hd95"] == pytest.approx(hd95_ref, abs=1e-4)
    assert m["msd"] == pytest.approx(msd_ref, abs=1e-4)
    u = np.linspace(-1, 1, 100_001)
    analytic = np.abs(np.sqrt(12.0**2 + 4.0**2 + 2 * 12.0 * 4.0 * u) - 12.0)
    assert m["hd95"] <= 4.0 + 1e-6
    assert m["hd95"] == pytest.approx(np.percentile(analytic, 95), abs=0.5)  # 3.8; discrete caps pull it to 4
    assert m["msd"] == pytest.approx(analytic.mean(), abs=0.3)  # 2.0
    assert m["dice"] == pytest.approx(1 - 3 * 4 / (4 * 12) + 4**3 / (16 * 12**3), abs=0.01)
    # the same shift measured in voxels (spacing ignored) would be 2, i.e. the spacing was used
    unit = case_metrics(pred, label, [1], None)[1]
    assert unit["hd95"] == pytest.approx(2.0, abs=0.25) and m["hd95"] > 1.5 * unit["hd95"]


def test_missing_classes_follow_the_documented_convention():
    label = np.zeros((20, 20), dtype=np.int64)
    label[4:10, 4:10] = 1
    label[12:16, 12:16] = 2
    pred = np.zeros_like(label)
    pred[4:10, 5:11] = 1  # class 2 missed, class 3 predicted where the label has none
    pred[1:3, 15:18] = 3
    out = case_metrics(pred, label, [1, 2, 3, 4])
    assert out[1]["flag"] == "" and 0 < out[1]["dice"] < 1 and out[1]["hd95"] == pytest.approx(1.0)
    assert out[2] == {**out[2], "dice": 0.0, "flag": "empty_prediction", "pred_voxels": 0}
    assert out[3]["dice"] == 0.0 and out[3]["flag"] == "empty_label"
    assert math.isnan(out[4]["dice"]) and out[4]["flag"] == "empty_both"
    for v in (2, 3, 4):
        assert math.isnan(out[v]["hd95"]) and math.isnan(out[v]["msd"])

    cases = [{"case": "a", "pred": pred, "label": label, "spacing": (1.0, 1.0)}]
    cases.append({"case": "b", "pred": label.copy(), "label": label.copy(), "spacing": (1.0, 1.0)})
    res = evaluate_cases(cases, {1: "one", 2: "two", 4: "four"}, n_bootstrap=50)
    two, four = res["per_class"]["two"], res["per_class"]["four"]
    assert two["dice"]["value"] == pytest.approx(0.5) and two["dice"]["n"] == 2  # Dice 0 counts
    assert two["hd95"]["n"] == 1 and two["hd95"]["n_excluded"] == 1 and two["n_empty_prediction"] == 1
    assert four["dice"]["value"] is None and four["dice"]["n_excluded"] == 2 and four["n_empty_both"] == 2
    row_a = [r for r in res["rows"] if r["case"] == "a"]
    assert [r["flag"] for r in row_a] == ["", "empty_prediction", "empty_both"]
    assert res["cases"][0]["mean_dice"] == pytest.approx((row_a[0]["dice"] + 0.0) / 2)  # NaN class left out
    json.dumps(res, allow_nan=False)  # strict JSON: undefined values are null


def test_2d_maps_with_spacing():
    sp = (0.5, 0.5)
    label = ball((40, 40), (20, 20), 6.0, sp)
    pred = ball((40, 40), (22, 20), 6.0, sp)  # 2 pixels = 1 mm
    m = case_metrics(pred, label, [1], sp)[1]
    hd95_ref, msd_ref, _ = reference_distances(pred, label, sp)
    assert m["hd95"] == pytest.approx(hd95_ref, abs=1e-4) and m["hd95"] <= 1.0 + 1e-6
    assert m["msd"] == pytest.approx(msd_ref, abs=1e-4) and 0.3 < m["msd"] < 0.8
    assert 0.8 < m["dice"] < 0.95


@pytest.mark.parametrize(
    "pred_shape,kwargs,match",
    [
        ((10, 11), {}, "differs from label shape"),
        ((10, 10), {"spacing": (1.0, 1.0, 1.0)}, "spacing"),
        ((10, 10), {"class_values": [0, 1]}, "background"),
    ],
)
def test_invalid_input_raises_one_line_value_error(pred_shape, kwargs, match):
    args = {"class_values": [1], **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        case_metrics(np.zeros(pred_shape, dtype=int), np.zeros((10, 10), dtype=int), **args)
    assert "\n" not in str(err.value) and isinstance(err.value, MetricsInputError)


def test_evaluate_cases_names_the_case_on_bad_input():
    cases = [{"case": "case_0007", "pred": np.zeros((4, 4)), "label": np.zeros((4, 5)), "spacing": (1, 1)}]
    with pytest.raises(ValueError, match=r"^case 'case_0007': pred shape \(4, 4\) differs") as err:
        evaluate_cases(cases, NAMES, n_bootstrap=0)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="fractional"):
        case_metrics(np.full((4, 4), 0.5), np.zeros((4, 4)), [1])


# ---------------------------------------------------------------------------------------------------------------
# summaries and confidence intervals
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # bootstrap over many MONAI distance cases: 12 s at load 6-7
def test_ci_contains_mean_and_narrows_with_more_cases():
    small = evaluate_cases(disk_cases(8, seed=1), NAMES, n_bootstrap=400, seed=3)
    large = evaluate_cases(disk_cases(64, seed=1), NAMES, n_bootstrap=400, seed=3)
    for res in (small, large):
        for est in [res["mean_dice"], *(res["per_class"][n][k] for n in NAMES.values() for k in ("dice", "msd"))]:
            assert est["ci_low"] <= est["value"] <= est["ci_high"]
        per_case = [c["mean_dice"] for c in res["cases"]]
        assert res["mean_dice"]["value"] == pytest.approx(np.mean(per_case))
        assert res["mean_dice"]["median"] == pytest.approx(np.median(per_case))
        assert res["mean_dice"]["std"] == pytest.approx(np.std(per_case, ddof=1))
    width = {k: r["mean_dice"]["ci_high"] - r["mean_dice"]["ci_low"] for k, r in (("s", small), ("l", large))}
    assert width["l"] < 0.7 * width["s"]
    again = evaluate_cases(disk_cases(8, seed=1), NAMES, n_bootstrap=400, seed=3)
    assert again["mean_dice"] == small["mean_dice"]  # seeded: reproducible


def test_csv_round_trips(tmp_path):
    res = evaluate_cases(disk_cases(3), {**NAMES, 5: "absent"}, n_bootstrap=20)
    path = write_case_csv(res["rows"], tmp_path / "per_case.csv")
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:6] == ["case", "class", "class_value", "dice", "hd95", "msd"]
    assert read_case_csv(path) == res["rows"]
    assert len(res["rows"]) == 3 * 3 and not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # overlay PNGs through matplotlib: 8 s at load 6-7
def test_report_files_headline_banner_and_overlays(tmp_path):
    sp = (1.0, 1.0, 2.5)
    rng = np.random.default_rng(0)
    cases = []
    for i, shift in enumerate([0, 1, 2, 3]):
        label = ball((24, 24, 10), (12, 10, 5), 6.0, sp) + 2 * ball((24, 24, 10), (12, 18, 5), 4.0, sp) * 1
        label[label == 3] = 2
        pred = np.roll(label, shift, axis=0)
        image = label * 40.0 + rng.normal(0, 5, label.shape)
        cases.append({"case": f"case_{i:04d}", "pred": pred, "label": label, "spacing": sp, "image": image[None]})
    res = evaluate_cases(cases, NAMES, n_bootstrap=100)
    progress = tmp_path / "progress.jsonl"
    progress.write_text(
        "\n".join(json.dumps({"event": "epoch", "epoch": e, "loss": 1 / e, "metric": 0.5 + e / 10}) for e in (1, 2, 3))
    )
    warning = "SYNTHETIC DATA: generated shapes, not patients."
    paths = write_segmentation_report(
        tmp_path / "eval",
        res,
        cases_for_overlay=cases,
        progress_path=progress,
        context={"data_warning": warning, "split": "validation", "model": "unet"},
    )
    expected = {"metrics", "per_case", "dice_plot", "report", "learning_curve"}
    assert expected | {"overlay_worst", "overlay_median", "overlay_best"} == set(paths)
    for key, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, key
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    assert json.loads(paths["metrics"].read_text())["mean_dice"] == res["mean_dice"]
    assert len(read_case_csv(paths["per_case"])) == 4 * 2

    text = paths["report"].read_text()
    assert text.startswith(f"> ## ⚠️ {warning}")  # banner first
    head = segmentation_headline(res, "validation")
    mean = f"{res['mean_dice']['value']:.2f}"
    assert head.startswith(f"Mean Dice {mean} (95% CI ") and "over 4 validation cases: anterior " in head
    assert f"**{head}.**" in text
    assert "case_0003" in text.split("## Worst cases")[1].split("##")[0]  # largest shift is the worst case
    for piece in ("HD95", "MSD", "## Caveats", "Small sample", "overlay_worst.png", "learning_curve.png"):
        assert piece in text


def test_report_without_overlays_or_distances(tmp_path):
    label = np.zeros((16, 16), dtype=int)
    label[4:8, 4:8] = 1
    cases = [{"case": "x", "pred": np.zeros_like(label), "label": label, "spacing": None}]
    res = evaluate_cases(cases, {1: "lesion"}, n_bootstrap=10)
    paths = write_segmentation_report(tmp_path, res)
    assert not any(k.startswith("overlay") for k in paths)
    text = paths["report"].read_text()
    assert "Mean Dice 0.00" in text and "missed it entirely" in text and "not given for 1 case:" in text


def test_cropping_matches_monai_on_the_full_image_even_at_the_border():
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(5)
    label = (rng.random((30, 26)) < 0.3).astype(np.int64) * 2  # speckle touching every border
    label[0:8, 0:10] = 1
    pred = np.roll(label, 2, axis=1)
    sp = (0.7, 1.3)
    out = case_metrics(pred, label, [1, 2], sp)
    onehot = [torch.from_numpy(np.stack([m == v for v in (1, 2)])[None].astype(np.float32)) for m in (pred, label)]
    hd = compute_hausdorff_distance(*onehot, include_background=True, percentile=95, spacing=list(sp))[0]
    msd = compute_average_surface_distance(*onehot, include_background=True, symmetric=True, spacing=list(sp))[0]
    for i, v in enumerate((1, 2)):
        assert out[v]["hd95"] == pytest.approx(float(hd[i]), abs=1e-5)
        assert out[v]["msd"] == pytest.approx(float(msd[i]), abs=1e-5)


def test_the_one_dice_equals_monais_and_is_the_reports():
    """``class_dice`` (numpy, also the export gate's) equals MONAI's ``compute_dice``; a case's mean over the classes
    present is what ``evaluate_cases`` puts in its rows, and the headline is the mean of those."""
    import torch
    from monai.metrics import compute_dice

    from medtune.evaluate.segmentation import case_mean_dice, class_dice

    rng = np.random.default_rng(8)
    cases = []
    for i in range(3):
        label = rng.integers(0, 3, (12, 10, 8))
        pred = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, 3, label.shape))
        if i == 2:
            label[label == 2], pred[pred == 2] = 0, 0  # class 2 absent in both: NaN, left out of the mean
        cases.append({"case": str(i), "pred": pred, "label": label})
    for case in cases[:2]:
        maps = (case["pred"], case["label"])
        onehot = [torch.from_numpy(np.stack([m == v for v in (1, 2)])[None]).double() for m in maps]
        want = compute_dice(*onehot, include_background=True, ignore_empty=False)[0].numpy()
        np.testing.assert_allclose(class_dice(case["pred"], case["label"], [1, 2]), want, rtol=0, atol=1e-12)
    assert math.isnan(class_dice(cases[2]["pred"], cases[2]["label"], [1, 2])[1])
    per_case = [case_mean_dice(c["pred"], c["label"], [1, 2]) for c in cases]
    res = evaluate_cases(cases, {1: "a", 2: "b"}, n_bootstrap=0)
    assert [c["mean_dice"] for c in res["cases"]] == pytest.approx(per_case, abs=1e-6)
    assert res["mean_dice"]["value"] == pytest.approx(np.mean(per_case), abs=1e-6)
    assert math.isnan(case_mean_dice(np.zeros((4, 4), int), np.zeros((4, 4), int), [1, 2]))
