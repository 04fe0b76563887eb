"""Fine-tuning from the Slicer module's logic: a real child process (``python -m medtune finetune``), its
progress stream parsed into epoch/loss/metric/ETA, cancel that kills the whole process tree, and resume.
Only Qt is absent; the process, the bundle run and the files are real."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from MedTuneLib.child_job import descendant_pids, pid_alive
from MedTuneLib.finetune_logic import (  # noqa: E402
    FinetuneJob,
    FinetuneSettings,
    ProgressState,
    ProgressTail,
    can_resume,
    ensure_validation_split,
    finetune_command,
    read_state,
)

from medtune.errors import MedTuneError  # noqa: E402

TINY_3D = {"patch_size": [16, 16, 16], "num_workers": 0, "min_train_steps": 0}


@pytest.fixture(scope="module")
def seg3d(tmp_path_factory) -> Path:
    from medtune.data.synthetic import make_synthetic_segmentation

    out = tmp_path_factory.mktemp("slicer_ft") / "seg3d"
    make_synthetic_segmentation(out, n_train=4, n_val=2, size=16, seed=3)
    return out


def _settings(dataset: Path, out: Path, epochs: int, **overrides) -> FinetuneSettings:
    return FinetuneSettings(
        dataset, out, preset="3d_segmentation", pretrained="none", strategy="full", epochs=epochs, device="cpu",
        arch="tiny_unet", overrides={**TINY_3D, **overrides},
    )  # fmt: skip


def test_command_and_settings_checks(seg3d, tmp_path):
    s = _settings(seg3d, tmp_path / "run", 3)
    cmd = finetune_command(s, python="py")
    assert cmd[:4] == ["py", "-m", "medtune", "finetune"] and "--resume" not in cmd
    assert cmd[cmd.index("--preset") + 1] == "3d_segmentation" and cmd[cmd.index("--epochs") + 1] == "3"
    assert "patch_size=[16, 16, 16]" in cmd and "num_workers=0" in cmd
    resume = finetune_command(s, python="py", resume=True)  # the run's own settings, from its run.json
    assert resume == ["py", "-m", "medtune", "finetune", "--quiet", "--out", str(tmp_path / "run"), "--resume"]
    assert finetune_command(s, python="py", resume=True, epochs=7)[-3:] == ["--epochs", "7", "--resume"]
    for field, bad, msg in (("preset", "4d", "unknown preset"), ("strategy", "x", "unknown strategy"),
                            ("device", "tpu", "unknown device"), ("epochs", 0, "at least 1")):  # fmt: skip
        bad_settings = _settings(seg3d, tmp_path / "run", 3)
        setattr(bad_settings, field, bad)
        with pytest.raises(MedTuneError, match=msg):
            bad_settings.check()
    with pytest.raises(MedTuneError, match="not a MedTune dataset"):
        _settings(tmp_path, tmp_path / "run", 1).check()


def test_progress_state_from_records(tmp_path):
    path = tmp_path / "progress.jsonl"
    recs = [
        {"event": "start", "max_epochs": 4, "steps_per_epoch": 10, "start_epoch": 0, "metric_name": "val_dice"},
        {"event": "step", "epoch": 1, "step": 5, "steps_per_epoch": 10, "loss": 0.9, "eta_seconds": 125},
        {
            "event": "epoch",
            "epoch": 1,
            "max_epochs": 4,
            "loss": 0.8,
            "metric": 0.5,
            "metric_name": "val_dice",
            "best_metric": 0.5,
            "best_epoch": 1,
            "eta_seconds": 95,
        },  # fmt: skip
    ]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    path.write_text(text[:-20])  # the last line is still being written
    tail, state = ProgressTail(path), ProgressState()
    for rec in tail.read_new():
        state.update(rec)
    assert state.epoch == 1 and state.step == 5 and state.fraction == pytest.approx(0.125)
    assert state.text() == "epoch 1/4 step 5/10 · loss 0.9000 · ETA 2:05"
    path.write_text(text)
    for rec in tail.read_new():
        state.update(rec)
    assert state.fraction == pytest.approx(0.25) and state.metric == 0.5
    assert state.text() == "epoch 1/4 · loss 0.8000 · val_dice 0.5000 (best 0.5000 @1) · ETA 1:35"
    assert tail.read_new() == []
    state.update({"event": "done", "status": "failed", "error": "MedTuneError: x"})
    assert state.finished and state.text().endswith("failed: MedTuneError: x")


def test_validation_split_is_made_from_labeled_cases(tmp_path):
    from medtune.data.contract import create_dataset, read_datalist, write_datalist

    root = tmp_path / "ds"
    create_dataset(root, name="t", task="segmentation", spatial_dims=3, labels={0: "bg", 1: "a"}, modality="CT")
    write_datalist(root, {"training": [{"image": "images/case_0001.nii.gz", "label": "labels/case_0001.nii.gz"}],
                          "testing": [{"image": "images/case_0002.nii.gz"}]})  # fmt: skip
    with pytest.raises(MedTuneError, match="label at least 2 cases"):
        ensure_validation_split(root)
    entries = [{"image": f"images/case_{i:04d}.nii.gz", "label": f"labels/case_{i:04d}.nii.gz"} for i in range(1, 11)]
    write_datalist(root, {"training": entries, "testing": [{"image": "images/case_0011.nii.gz"}]})
    moved = ensure_validation_split(root)
    data = read_datalist(root)
    assert len(moved) == 2 and len(data["validation"]) == 2 and len(data["training"]) == 8
    assert data["testing"] == [{"image": "images/case_0011.nii.gz"}]
    assert ensure_validation_split(root) == []  # already split: unchanged
    assert list((root / ".versions").glob("datalist.json.*"))


@pytest.mark.slow  # child-process fine-tune runs
def test_run_cancel_kills_process_tree_then_resume(seg3d, tmp_path):
    """A real run with DataLoader worker processes: cancel after the first checkpoint leaves no process
    behind and marks the stream; resume continues from epoch 2 to the end."""
    pytest.importorskip("torch", reason="torch (training extra) not installed: real fine-tuning run skipped")
    run = tmp_path / "run"
    job = FinetuneJob(_settings(seg3d, run, 50, num_workers=2, cache_rate=0.0))
    job.start()
    deadline = time.monotonic() + 240
    tree: set[int] = set()
    while time.monotonic() < deadline:
        state = job.poll()
        tree.update(descendant_pids(job.process.pid))
        assert not state.finished, job.last_log_line()
        if state.epoch >= 1 and state.step == state.steps_per_epoch and (run / "checkpoint_last.pt").is_file():
            break
        time.sleep(0.2)
    else:
        pytest.fail("no epoch finished within 240 s")
    tree.update(descendant_pids(job.process.pid))
    assert tree, "the run started no worker processes (num_workers=2 expected)"
    pid = job.process.pid
    job.cancel(grace=5)
    assert job.state.status == "cancelled"
    assert not pid_alive(pid) and not [p for p in tree if pid_alive(p)]
    assert read_state(run).status == "cancelled" and can_resume(run)

    with pytest.raises(MedTuneError, match="already holds a training run"):
        FinetuneJob(_settings(seg3d, run, 2)).start()
    resumed = FinetuneJob(_settings(seg3d, run, 50))
    resumed.start(resume=True, epochs=2)  # same run settings (num_workers=2 from run.json), shorter
    state = resumed.wait(timeout=300)
    assert state.status == "completed", resumed.last_log_line()
    events = [json.loads(line) for line in (run / "progress.jsonl").read_text().splitlines()]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["start_epoch"] >= 1
    assert [e["epoch"] for e in events if e["event"] == "epoch"][-1] == 2
    assert state.fraction == 1.0 and not can_resume(run) and (run / "model.pt").is_file()


@pytest.mark.slow  # child-process fine-tune runs
def test_failed_run_reports_one_line(tmp_path, seg3d):
    job = FinetuneJob(_settings(seg3d, tmp_path / "run", 1, patch_size="not-a-size"))
    job.start()
    state = job.wait(timeout=180)
    assert state.status == "failed" and state.error and "\n" not in state.error


def test_refit_run_progress_spans_both_runs_and_stops_resumably(tmp_path):
    """refit_on_all writes two progress streams (``RUN/internal_test_run/`` then ``RUN/``): the panel's state covers
    both (the first run's end is not the job's end) and a stop after the first run is resumable. The streams are
    written by the runner's own ProgressWriter; the job is polled with no child process (what the child would be
    doing is in the files; the real two-run flow is tested in test_honest.py)."""
    from medtune.finetune.progress import ProgressWriter
    from medtune.runfolder import ESTIMATE_RUN

    run = tmp_path / "run"
    job = FinetuneJob(FinetuneSettings(tmp_path / "ds", run, preset="2d_classification", epochs=2))

    def epoch(writer: ProgressWriter, e: int) -> None:
        writer.emit("epoch", epoch=e, max_epochs=2, loss=0.5, metric=0.7, metric_name="val_auc", best_metric=0.7,
                    best_epoch=e)  # fmt: skip

    first = ProgressWriter(run / ESTIMATE_RUN / "progress.jsonl")
    first.emit("start", max_epochs=2, steps_per_epoch=4, start_epoch=0, metric_name="val_auc")
    epoch(first, 1)
    state = job.poll()
    assert state.stage == 1 and state.status == "running" and state.fraction == pytest.approx(0.25)
    assert state.text().startswith("run 1/2 (for the internal-test estimate)")
    epoch(first, 2)
    first.emit("done", status="completed", best_metric=0.7, best_epoch=2)
    state = job.poll()
    assert not state.finished and state.fraction == pytest.approx(0.5)
    assert read_state(run).status == "interrupted" and can_resume(run)  # stopped here: --resume starts run 2
    second = ProgressWriter(run / "progress.jsonl")
    second.emit("start", max_epochs=2, steps_per_epoch=4, start_epoch=0, metric_name="val_auc")
    epoch(second, 1)
    state = job.poll()
    assert state.stage == 2 and state.fraction == pytest.approx(0.75) and state.text().startswith("run 2/2")
    epoch(second, 2)
    second.emit("done", status="completed", best_metric=0.7, best_epoch=2)
    state = job.poll()
    assert state.status == "completed" and state.fraction == 1.0 and "run " not in state.text()
    assert read_state(run).status == "completed" and not can_resume(run)


def test_seed_ensemble_run_progress_spans_every_member(tmp_path):
    """seed_ensemble 2 with refit_on_all: three streams (the estimate's run, the other seed in
    ``RUN/seed_members/seed1/``, then ``RUN/``), named by ``RUN/internal_test.json`` (read as data): the state says
    run k/3 and covers all three; stopped in the member it is resumable. Streams written by the runner's own
    ProgressWriter, polled with no child process (the real flow: test_honest.py)."""
    import json

    from MedTuneLib.module_logic import MedTuneSession

    from medtune.data import make_synthetic_classification
    from medtune.finetune.progress import ProgressWriter
    from medtune.runfolder import ESTIMATE_RUN, SEED_MEMBERS

    make_synthetic_classification(tmp_path / "ds", n_train=4, n_val=2, size=16, seed=1)
    session = MedTuneSession()
    session.open_dataset(tmp_path / "ds", "classification", spatial_dims=2)
    run = tmp_path / "ds" / "runs" / "seeds"
    (run / ESTIMATE_RUN).mkdir(parents=True)
    (run / "internal_test.json").write_text(json.dumps({"format": "medtune.split/1", "seed": 0, "seed_ensemble": 2,
                                                        "refit": True, "cases": []}))  # fmt: skip
    job = FinetuneJob(FinetuneSettings(tmp_path / "ds", run, preset="2d_classification", epochs=2))
    streams = [run / ESTIMATE_RUN / "progress.jsonl", run / SEED_MEMBERS / "seed1" / "progress.jsonl",
               run / "progress.jsonl"]  # fmt: skip
    for k, stream in enumerate(streams, start=1):
        w = ProgressWriter(stream)
        w.emit("start", max_epochs=2, steps_per_epoch=4, start_epoch=0, metric_name="val_auc")
        w.emit("epoch", epoch=1, max_epochs=2, loss=0.5, metric=0.7, metric_name="val_auc", best_metric=0.7,
               best_epoch=1)  # fmt: skip
        state = job.poll()
        assert (state.stage, state.stages) == (k, 3) and state.fraction == pytest.approx((k - 0.5) / 3)
        assert state.text().startswith(f"run {k}/3 (" + ["for the internal-test estimate", "seed-ensemble member, on "
                                       "all cases", "the deployed model, on all cases"][k - 1])  # fmt: skip
        w.emit("done", status="completed", best_metric=0.7, best_epoch=2)
        state = job.poll()
        if k < 3:
            assert not state.finished and read_state(run).status == "interrupted" and can_resume(run)
            # the panel's run list shows it (to resume it) before the deployed model's stream exists
            assert [(r["name"], r["kind"], r["status"]) for r in session.list_runs()] == [("seeds", "2-seed ensemble",
                                                                                           "interrupted")]  # fmt: skip
    assert state.status == "completed" and state.fraction == 1.0 and read_state(run).status == "completed"
    assert not can_resume(run)
