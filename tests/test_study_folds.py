"""``medtune study --folds K``: grouped K-fold cross-validation inside a study, with real tiny bundle runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import write_volume_classification

from medtune.cli import main


def _grouped_dataset(ds: Path) -> Path:
    """24 tiny volumes (16 training + 8 validation), two cases per patient (one of each class) as ``group``."""
    write_volume_classification(ds, n=24, n_val=8)
    return _pair_cases_as_patients(ds, first_number=0)


def _pair_cases_as_patients(ds: Path, first_number: int) -> Path:
    """Give cases ``first_number + 2k`` and ``first_number + 2k + 1`` (by the number in the file name) one group."""
    from medtune.data import write_datalist
    from medtune.data.contract import read_datalist

    data = read_datalist(ds)
    for split in ("training", "validation"):
        for entry in data[split]:
            entry["group"] = f"g{(int(entry['image'][-11:-7]) - first_number) // 2:03d}"
    write_datalist(ds, data)
    return ds


def _rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))[1:]


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC from its definition (all positive-negative pairs, ties half): the oracle of the pooled metric."""
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


@pytest.mark.slow
def test_grouped_kfold_study_pools_every_case_once_and_resumes_by_fold(tmp_path: Path, capsys):
    ds = _grouped_dataset(tmp_path / "ds")
    study = tmp_path / "study"
    argv = ["study", "--dataset", str(ds), "--preset", "3d_classification", "--folds", "3",
            "--sources", "scratch,fast=scratch", "--arm-set", "fast:learning_rate=0.01", "--labels", "50%",
            "--seeds", "1", "--epochs", "2", "--validations", "1", "--set", "arch=tiny_cnn", "--jobs", "2",
            "--set", "image_size=[16, 16, 16]", "--set", "batch_size=4", "--quiet", "--out", str(study)]  # fmt: skip
    assert main(argv) == 0
    assert "pretraining with fast" in capsys.readouterr().out
    rec = json.loads((study / "study.json").read_text())
    assert rec["folds"] == 3 and rec["group_key"] == "group" and rec["n_cases"] == 24 and rec["n_groups"] == 12
    assert len(rec["fold_runs"]) == 6 and len(rec["runs"]) == 2  # 2 arms x 3 folds -> 2 pooled records
    groups = {}
    labeled: dict[tuple[str, int], list[str]] = {}
    for arm in ("scratch", "fast"):
        for k in range(3):
            run = study / "runs" / arm / "50pct" / "seed0" / f"fold{k}"
            ov = json.loads((run / "run.json").read_text())["overrides"]
            train, held = ov["train_datalist"], ov["val_datalist"]
            assert ov["model_selection"] == "last"
            # no patient is in both this fold's training and held-out cases; the budget comes from the other folds
            assert not {e["group"] for e in train} & {e["group"] for e in held}
            assert len(train) == 8 and len(held) == 8  # 50% of a 16-case pool; 24 cases / 3 folds
            labeled[(arm, k)] = sorted(e["image"] for e in train)
            groups.update({e["image"]: e["group"] for e in held})
            assert len(_rows(run / "eval_oof" / "predictions.csv")) == len(held)
    assert all(labeled[("scratch", k)] == labeled[("fast", k)] for k in range(3))  # same labeled cases per arm
    assert len(groups) == 24  # the held-out folds cover every case
    for pooled in rec["runs"]:
        rows = _rows(Path(pooled["eval_dir"]) / "predictions.csv")
        names = [r[0] for r in rows]
        assert len(names) == len(set(names)) == 24 and all(n.startswith("images/case_") for n in names)
        y, p = np.array([int(r[1]) for r in rows]), np.array([float(r[3]) for r in rows])
        # the pooled metric is the AUC of the stored out-of-fold predictions, not a mean of fold AUCs
        oracle = _auc(y, p)
        cell = next(c for c in rec["cells"] if c["arm"] == pooled["arm"])
        assert pooled["metrics"]["auc"]["value"] == pytest.approx(oracle)
        assert cell["mean"] == pytest.approx(oracle) and cell["n_validation"] == 24
        assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"]
        # the pooled rows are the fold runs' own evaluation rows
        fold_p = []
        for k in range(3):
            fold_p += [float(r[3]) for r in _rows(study / "runs" / pooled["arm"] / "50pct" / "seed0" / f"fold{k}"
                                                  / "eval_oof" / "predictions.csv")]  # fmt: skip
        assert sorted(fold_p) == sorted(p.tolist())
    (comp,) = rec["comparisons"]
    assert comp["difference"] == pytest.approx(comp["per_seed_difference"][0])
    report = (study / "report.md").read_text()
    assert "3-fold cross-validation" in report and "grouped by `group` (12 groups" in report
    assert "pooled out-of-fold" in report and "nothing was chosen on the held-out fold" in report
    assert "images/case_" not in report and "images/case_" not in (study / "study.json").read_text()
    # resume: finished folds are skipped; a fold whose run folder and result line are lost is trained again
    stamps = {k: (study / "runs" / "fast" / "50pct" / "seed0" / f"fold{k}" / "model.pt").stat().st_mtime_ns
              for k in range(3)}  # fmt: skip
    shutil.rmtree(study / "runs" / "fast" / "50pct" / "seed0" / "fold1")
    lines = (study / "results.jsonl").read_text().splitlines()
    (study / "results.jsonl").write_text("\n".join(x for x in lines if "fast/50pct/seed0/fold1" not in x) + "\n")
    before = json.loads((study / "study.json").read_text())
    assert main(argv) == 0
    after = json.loads((study / "study.json").read_text())
    for k in (0, 2):
        path = study / "runs" / "fast" / "50pct" / "seed0" / f"fold{k}" / "model.pt"
        assert path.stat().st_mtime_ns == stamps[k]
    assert (study / "runs" / "fast" / "50pct" / "seed0" / "fold1" / "model.pt").is_file()
    assert len(after["fold_runs"]) == 6 and len((study / "results.jsonl").read_text().splitlines()) == 6
    scratch = [c for c in after["cells"] if c["arm"] == "scratch"]
    assert scratch[0]["mean"] == next(c for c in before["cells"] if c["arm"] == "scratch")["mean"]
    # another fold count in the same folder is refused (the folds would differ)
    at = argv.index("--folds") + 1
    assert main([*argv[:at], "4", *argv[at + 1 :]]) == 1
    assert "planned with another" in capsys.readouterr().err


def _grouped_segmentation(ds: Path) -> Path:
    """8 tiny 3D segmentation cases (6 training + 2 validation), two cases per patient as ``group``."""
    from medtune.data.synthetic import make_synthetic_segmentation

    make_synthetic_segmentation(ds, n_train=6, n_val=2, size=16, seed=3)
    return _pair_cases_as_patients(ds, first_number=1)


def _case_dice(eval_dir: Path) -> dict[str, float]:
    """Oracle per-case Dice: the mean of a case's defined foreground-class Dice, read from a fold's per_case.csv."""
    per: dict[str, list[float]] = {}
    with open(eval_dir / "per_case.csv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["dice"] != "":
                per.setdefault(row["case"], []).append(float(row["dice"]))
    return {c: float(np.mean(v)) for c, v in per.items()}


@pytest.mark.slow  # 5 tiny 3D runs, each in a spawned process: ~40 s idle, ~110 s at load 6-7
def test_grouped_kfold_segmentation_study_pools_per_case_dice_and_resumes_by_fold(tmp_path: Path, capsys):
    ds = _grouped_segmentation(tmp_path / "ds")
    study = tmp_path / "study"
    argv = ["study", "--dataset", str(ds), "--preset", "3d_segmentation", "--folds", "2",
            "--sources", "scratch,fast=scratch", "--arm-set", "fast:learning_rate=0.01", "--labels", "3",
            "--seeds", "1", "--epochs", "2", "--validations", "1", "--set", "arch=tiny_unet",
            "--set", "patch_size=[16, 16, 16]", "--set", "min_train_steps=0", "--jobs", "2", "--quiet",
            "--out", str(study)]  # fmt: skip
    assert main(argv) == 0
    assert "pretraining with fast" in capsys.readouterr().out
    rec = json.loads((study / "study.json").read_text())
    assert rec["folds"] == 2 and rec["group_key"] == "group" and rec["n_cases"] == 8 and rec["n_groups"] == 4
    assert len(rec["fold_runs"]) == 4 and len(rec["runs"]) == 2
    fold_dirs = {arm: [study / "runs" / arm / "3" / "seed0" / f"fold{k}" for k in range(2)]
                 for arm in ("scratch", "fast")}  # fmt: skip
    labeled: dict[tuple[str, int], list[str]] = {}
    held_all: list[str] = []
    for arm, runs in fold_dirs.items():
        for k, run in enumerate(runs):
            ov = json.loads((run / "run.json").read_text())["overrides"]
            train, held = ov["train_datalist"], ov["val_datalist"]
            assert ov["model_selection"] == "last" and len(train) == 3 and len(held) == 4  # 3 of a 4-case pool
            assert not {e["group"] for e in train} & {e["group"] for e in held}  # no patient on both sides
            labeled[(arm, k)] = sorted(e["image"] for e in train)
            held_all += [e["image"] for e in held] if arm == "scratch" else []
            assert len(_case_dice(run / "eval_oof")) == 4  # the final model predicted its held-out fold once
    assert all(labeled[("scratch", k)] == labeled[("fast", k)] for k in range(2))  # same labeled cases per arm
    assert len(set(held_all)) == 8
    oracle: dict[str, dict[str, float]] = {}
    for pooled in rec["runs"]:
        arm = pooled["arm"]
        folder = Path(pooled["eval_dir"])
        pooled_dice = _case_dice(folder)  # the pooled per_case.csv, cases named by their dataset path
        assert len(pooled_dice) == 8 and all(c.startswith("images/case_") for c in pooled_dice)
        fold_values = [v for run in fold_dirs[arm] for v in _case_dice(run / "eval_oof").values()]
        assert sorted(pooled_dice.values()) == pytest.approx(sorted(fold_values))
        oracle[arm] = pooled_dice
        mean = float(np.mean(fold_values))  # the mean per-case Dice over every out-of-fold case
        assert pooled["metric_name"] == "val_mean_dice"
        assert pooled["metrics"]["mean_dice"]["value"] == pytest.approx(mean, abs=1e-6)
        cell = next(c for c in rec["cells"] if c["arm"] == arm)
        assert cell["mean"] == pytest.approx(mean, abs=1e-6) and cell["n_validation"] == 8
        assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"] and cell["ci_low"] < cell["ci_high"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["n"] == 8 and metrics["mean_dice"]["value"] == pytest.approx(mean, abs=1e-6)
        pooled_report = (folder / "report.md").read_text()
        assert "over 8 cases" in pooled_report
        assert f"`runs/{arm}/3/seed0/fold<k>/eval_oof/`" in pooled_report  # where the per-fold reports are
    (comp,) = rec["comparisons"]
    paired = np.mean([oracle["fast"][c] - oracle["scratch"][c] for c in oracle["scratch"]])  # paired by case
    assert comp["metric"] == "val_mean_dice" and comp["difference"] == pytest.approx(paired, abs=1e-6)
    assert comp["ci_low"] <= comp["difference"] <= comp["ci_high"]
    report = (study / "report.md").read_text()
    assert "2-fold cross-validation" in report and "grouped by `group` (4 groups" in report
    assert "stratified by class" not in report and "Dice at 3 labels" in report
    assert "images/case_" not in report and "images/case_" not in (study / "study.json").read_text()
    # resume: a fold whose run folder and result line are lost is trained again, the others are kept
    stamp = (fold_dirs["fast"][0] / "model.pt").stat().st_mtime_ns
    shutil.rmtree(fold_dirs["fast"][1])
    lines = (study / "results.jsonl").read_text().splitlines()
    (study / "results.jsonl").write_text("\n".join(x for x in lines if "fast/3/seed0/fold1" not in x) + "\n")
    assert main(argv) == 0
    after = json.loads((study / "study.json").read_text())
    assert (fold_dirs["fast"][0] / "model.pt").stat().st_mtime_ns == stamp
    assert (fold_dirs["fast"][1] / "eval_oof" / "per_case.csv").is_file() and len(after["fold_runs"]) == 4
    assert next(c for c in after["cells"] if c["arm"] == "scratch")["mean"] == pytest.approx(
        next(c for c in rec["cells"] if c["arm"] == "scratch")["mean"]
    )
    # another fold count in the same folder is refused with one line
    at = argv.index("--folds") + 1
    capsys.readouterr()
    assert main([*argv[:at], "3", *argv[at + 1 :]]) == 1
    err = capsys.readouterr().err
    assert "planned with another fold count (--folds 2)" in err and "plan.json" in err
