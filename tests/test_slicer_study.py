"""A label-efficiency study (``medtune study``, issue 11) started from the Slicer module's logic: a real child
process, progress read from the study's own files, cancel that kills the whole process tree, resume by starting
again, and a one-line reason when it cannot run. Only Qt is absent; the processes, bundle runs and files are real."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from helpers import write_volume_classification
from MedTuneLib.child_job import descendant_pids, pid_alive
from MedTuneLib.module_logic import MedTuneSession
from MedTuneLib.study_logic import StudySettings, read_study_state, study_command

from medtune.errors import MedTuneError

TINY = {"arch": "tiny_cnn", "image_size": [16, 16, 16], "batch_size": 4, "num_workers": 0}


def _dataset(ds: Path, n: int = 16) -> Path:
    """A tiny 3D classification dataset as Slicer labels one: training (labeled) cases only."""
    return write_volume_classification(ds, n, n_val=0)


def test_study_command_and_settings_checks(tmp_path):
    ds = _dataset(tmp_path / "ds", n=6)
    s = StudySettings(ds, tmp_path / "study", preset="3d_classification", sources="scratch,ct=astra-ct-resnet152",
                      labels="50%,100%", seeds=2, epochs=1, overrides=dict(TINY))  # fmt: skip
    cmd = study_command(s, python="py")
    assert cmd[:5] == ["py", "-m", "medtune", "study", "--quiet"]
    for opt, value in (("--preset", "3d_classification"), ("--sources", "scratch,ct=astra-ct-resnet152"),
                       ("--labels", "50%,100%"), ("--seeds", "2"), ("--epochs", "1"),
                       ("--out", str(s.out))):  # fmt: skip
        assert cmd[cmd.index(opt) + 1] == value
    assert "image_size=[16, 16, 16]" in cmd and "arch=tiny_cnn" in cmd
    s.check()
    for field, bad, msg in (("preset", "4d", "unknown preset"), ("seeds", 0, "at least 1"), ("epochs", 0, "at least 1"),
                            ("labels", "150%", "must be in"), ("labels", "7", r"number of cases \(1..6\)"),
                            ("sources", "", "source"), ("strategy", "", "unknown strategy")):  # fmt: skip
        bad_settings = StudySettings(ds, tmp_path / "study", preset="3d_classification")
        setattr(bad_settings, field, bad)
        with pytest.raises(MedTuneError, match=msg):
            bad_settings.check()
    with pytest.raises(MedTuneError, match="not a MedTune dataset"):
        StudySettings(tmp_path, tmp_path / "study").check()
    assert "--folds" not in cmd
    # --folds K: on the command line, checked against the dataset's cases and the smallest fold's training pool
    s.folds, s.labels = 2, "3"
    cmd = study_command(s, python="py")
    assert cmd[cmd.index("--folds") + 1] == "2"
    s.check()  # 6 cases in 2 folds: 3 in each fold's training pool
    for folds, labels, msg in ((1, "3", "folds must be 0 .* or at least 2, got 1"), (-2, "3", "at least 2, got -2"),
                               (7, "3", "7 folds need at least 7 labeled cases; this dataset has 6"),
                               (2, "4", r"number of cases \(1..3\)")):  # fmt: skip
        bad_folds = StudySettings(ds, tmp_path / "study", preset="3d_classification", folds=folds, labels=labels)
        with pytest.raises(MedTuneError, match=msg) as err:
            bad_folds.check()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "study").exists()  # checks write nothing


def test_study_state_from_the_study_files(tmp_path):
    """Runs planned (plan.json), finished (results.jsonl, a half-written last line skipped), the run in progress
    (its progress.jsonl) and, at the end, the verdicts (study.json)."""
    study = tmp_path / "study"
    run = study / "runs" / "ct" / "100pct" / "seed0"
    run.mkdir(parents=True)
    plan = {"arms": [{"alias": "scratch"}, {"alias": "ct"}], "budgets": [{"text": "50%"}, {"text": "100%"}],
            "seeds": 1}  # fmt: skip
    (study / "plan.json").write_text(json.dumps(plan))
    done = study / "runs" / "scratch" / "50pct" / "seed0"
    (done / "eval").mkdir(parents=True)
    (done / "progress.jsonl").write_text(json.dumps({"event": "done", "status": "completed"}) + "\n")
    (study / "results.jsonl").write_text(json.dumps({"key": "scratch/50%/0", "eval_dir": str(done / "eval")})
                                         + '\n{"key": "scratch/100')  # fmt: skip
    recs = [{"event": "start", "max_epochs": 2, "steps_per_epoch": 4, "start_epoch": 0, "metric_name": "val_auc"},
            {"event": "step", "epoch": 1, "step": 2, "steps_per_epoch": 4, "loss": 0.7}]  # fmt: skip
    (run / "progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    state = read_study_state(study)
    assert (state.runs_total, state.runs_done, state.current) == (4, 1, "ct/100pct/seed0")
    assert state.fraction == pytest.approx((1 + 0.25) / 4)
    assert state.text().startswith("run 2/4 · ct/100pct/seed0: epoch 1/2 step 2/4 · loss 0.7000")
    assert state.verdicts == []
    lines = [json.dumps({"key": f"k{i}", "eval_dir": str(study / f"r{i}" / "eval")}) for i in range(4)]
    (study / "results.jsonl").write_text("\n".join(lines) + "\n")
    (study / "study.json").write_text(json.dumps({"comparisons": [{"verdict": "pretraining with ct: +0.01 AUC"}]}))
    state = read_study_state(study)
    assert state.runs_done == 4 and state.verdicts == ["pretraining with ct: +0.01 AUC"]


def test_kfold_study_state_counts_fold_runs_and_shows_the_pooled_result(tmp_path):
    """With ``folds`` in plan.json: runs = arms x budgets x seeds x folds, the fold run in progress is found, and
    the end shows each arm's pooled out-of-fold metric with its CI (numbers from study.json only)."""
    study = tmp_path / "study"
    plan = {"arms": [{"alias": "scratch"}, {"alias": "ssl"}], "budgets": [{"text": "8"}], "seeds": 1, "folds": 2}
    (study / "runs" / "ssl" / "8" / "seed0" / "fold1").mkdir(parents=True)
    (study / "plan.json").write_text(json.dumps(plan))
    done = [study / "runs" / a / "8" / "seed0" / f"fold{k}" for a, k in (("scratch", 0), ("scratch", 1), ("ssl", 0))]
    lines = [json.dumps({"key": f"{d.parent.parent.parent.name}/8/seed0/{d.name}", "eval_dir": str(d / "eval_oof")})
             for d in done]  # fmt: skip
    for d in done:
        d.mkdir(parents=True, exist_ok=True)
        (d / "progress.jsonl").write_text(json.dumps({"event": "done", "status": "completed"}) + "\n")
    (study / "results.jsonl").write_text("\n".join(lines) + "\n")
    recs = [{"event": "start", "max_epochs": 4, "steps_per_epoch": 2, "start_epoch": 0, "metric_name": "val_mean_dice"},
            {"event": "step", "epoch": 2, "step": 1, "steps_per_epoch": 2, "loss": 0.5}]  # fmt: skip
    (study / "runs" / "ssl" / "8" / "seed0" / "fold1" / "progress.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs))  # fmt: skip
    state = read_study_state(study)
    assert (state.runs_total, state.runs_done, state.folds, state.current) == (4, 3, 2, "ssl/8/seed0/fold1")
    assert state.fraction == pytest.approx((3 + 3 / 8) / 4)
    assert state.text().startswith("run 4/4 · ssl/8/seed0/fold1: epoch 2/4 step 1/2")
    (study / "results.jsonl").write_text("\n".join([*lines, json.dumps({"key": "ssl/8/seed0/fold1",
                                         "eval_dir": str(study / "x" / "eval_oof")})]) + "\n")  # fmt: skip
    cells = [{"arm": "scratch", "budget": "8", "metric_name": "val_mean_dice", "mean": 0.8301, "ci_low": 0.8172,
              "ci_high": 0.8424, "n_validation": 200},
             {"arm": "ssl", "budget": "8", "metric_name": "val_mean_dice", "mean": "<b>0.9</b>", "n_validation": 200}]
    summary = {"cells": cells, "comparisons": [{"verdict": "pretraining with ssl: +0.002 Dice at 8 labels"}]}
    (study / "study.json").write_text(json.dumps(summary))  # fmt: skip
    state = read_study_state(study)
    state.status = "completed"
    assert state.results == ["scratch at 8 labels: pooled out-of-fold Dice 0.830 (0.817–0.842) over 200 cases",
                             "ssl at 8 labels: pooled out-of-fold Dice ? (?–?) over 200 cases"]  # fmt: skip
    assert state.text() == ("completed: 4 fold run(s), 2-fold cross-validation; " + "; ".join(state.results)
                            + "; pretraining with ssl: +0.002 Dice at 8 labels")  # fmt: skip


def test_a_study_that_cannot_run_says_why_in_one_line(tmp_path, monkeypatch):
    """Without the training packages the child says in one line what to install. (Where torch is installed, a
    `torch` package that fails to import is put first on the child's PYTHONPATH to stand for its absence; the
    py312 CI job runs this with torch really absent.)"""
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        fake = tmp_path / "no_torch" / "torch"
        fake.mkdir(parents=True)
        (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    session = MedTuneSession(python=sys.executable)
    session.open_dataset(_dataset(tmp_path / "ds", n=6))
    job = session.start_study(study=tmp_path / "study", sources="scratch", labels="100%", seeds=1, epochs=1,
                              overrides=dict(TINY))  # fmt: skip
    state = job.wait(timeout=120)
    assert state.status == "failed" and "\n" not in state.error and "medtune[train]" in state.error, state.error
    report = session.poll()
    assert report.errors == [f"Study failed: {state.error}"] and session.poll().errors == []  # reported once
    assert not session.busy()


@pytest.mark.slow  # a real study: a child process whose spawned workers train and evaluate two tiny arms
def test_study_from_the_session_runs_cancels_the_tree_and_resumes(tmp_path):
    """scratch vs a local 'pretrained' checkpoint (linear probe), 1 epoch, 1 seed, 100 % labels: progress from the
    study's files, cancel kills every process the study started, starting again resumes to the report."""
    torch = pytest.importorskip("torch", reason="torch (training extra) not installed: real study runs skipped")
    from medtune.weights import create_model

    ds = _dataset(tmp_path / "ds")
    ckpt = tmp_path / "pre.pt"
    torch.manual_seed(0)
    torch.save(create_model("tiny_cnn", None, 1, 2, spatial_dims=3, verbose=False).state_dict(), ckpt)
    session = MedTuneSession(python=sys.executable)
    session.open_dataset(ds)
    choices = {"study": tmp_path / "study", "preset": "3d_classification", "sources": f"scratch,probe=local:{ckpt}:"
               "linear_probe", "labels": "100%", "seeds": 1, "epochs": 1, "overrides": dict(TINY)}  # fmt: skip
    job = session.start_study(**choices)
    assert json.loads((ds / "datalist.json").read_text())["validation"]  # a Slicer dataset got a validation split
    with pytest.raises(MedTuneError, match="already in progress"):
        session.start_study(**choices)
    tree: set[int] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until a run is under way (its progress stream has started)
        report = session.poll()
        tree.update(descendant_pids(job.process.pid))
        assert report.study is not None and not report.study.finished, job.last_log_line()
        if report.study.current_run is not None and report.study.eta_seconds is not None:
            break  # a run is under way and the study has progressed enough to estimate its end
        time.sleep(0.2)
    else:
        pytest.fail("no study run progressed within 300 s")
    assert report.study.runs_total == 2 and report.busy and tree  # the study's run worker(s)
    text = report.study.text()  # e.g. "run 1/2 · scratch/100pct/seed0: epoch 1/1 · loss 0.69 · ETA 0:00:40"
    assert text.startswith(f"run {report.study.runs_done + 1}/2 · {report.study.current}: epoch "), text
    assert re.search(r" · ETA \d+:\d\d:\d\d$", text), text
    pid = job.process.pid
    session.cancel_study()
    assert job.state.status == "cancelled" and not pid_alive(pid) and not [p for p in tree if pid_alive(p)]
    assert not session.busy()

    job = session.start_study(**choices)  # the same settings in the same folder: resumed
    state = job.wait(timeout=600)
    assert state.status == "completed", job.last_log_line()
    assert (state.runs_total, state.runs_done, state.fraction) == (2, 2, 1.0)
    assert len(state.verdicts) == 1 and state.verdicts[0].startswith("pretraining with probe")
    assert state.text().startswith("completed: 2 run(s); pretraining with probe")
    assert job.report_path.is_file() and "## Verdicts" in job.report_path.read_text()
    rec = json.loads((tmp_path / "study" / "study.json").read_text())
    assert len(rec["runs"]) == 2
