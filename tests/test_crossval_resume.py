"""``medtune finetune --folds K --resume`` (issue 15): resumed by fold. Real tiny runs (tiny_cnn, 32 px, 1 epoch)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")

from medtune.data import make_synthetic_classification  # noqa: E402

TINY = {"arch": "tiny_cnn", "pretrained": "none", "epochs": 1, "batch_size": 8, "num_workers": 0,
        "image_size": [32, 32]}  # fmt: skip
SETS = [f"--set={k}={v!r}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cvres") / "ds"
    make_synthetic_classification(out, n_train=30, n_val=6, size=32, seed=4)
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _oof(cv: Path) -> dict[str, tuple[int, str]]:
    """case -> (fold, P(last class) as written) from the pooled out-of-fold predictions."""
    with open(cv / "oof" / "predictions.csv", newline="") as fh:
        return {r["case"]: (int(r["fold"]), list(r.values())[-1]) for r in csv.DictReader(fh)}


def _interrupt_during_fold1(cv: Path) -> None:
    """What a Ctrl-C in fold 1 of 3 leaves: fold 0 finished, fold 1 with a checkpoint and status interrupted,
    fold 2 not started, crossval.json running with fold 0's member only."""
    rec = json.loads((cv / "crossval.json").read_text())
    rec.update(status="running", members=rec["members"][:1])
    for key in ("pooled", "estimate", "seconds"):
        rec.pop(key, None)
    (cv / "crossval.json").write_text(json.dumps(rec))
    run = json.loads((cv / "fold1" / "run.json").read_text())
    run.update(status="interrupted", resumable=True)
    (cv / "fold1" / "run.json").write_text(json.dumps(run))
    assert (cv / "fold1" / "checkpoint_last.pt").is_file()
    shutil.rmtree(cv / "fold2")
    (cv / "fold2").mkdir()  # started, killed before its first checkpoint
    (cv / "fold2" / "progress.jsonl").write_text('{"event": "start", "max_epochs": 1}\n')
    (cv / "estimate.json").unlink()


@pytest.mark.slow  # 3 fold runs + 2 resumed + export: ~10 s at load 6 (30 s with the first torch import)
def test_resume_by_fold_keeps_finished_folds_and_finishes_the_rest(dataset, tmp_path, cli):
    cv = tmp_path / "cv"
    code, out, err = cli("finetune", "--dataset", dataset, "--out", cv, "--folds", 3, "--quiet", *SETS)
    assert code == 0, err
    before = _oof(cv)
    fold0_model = _sha(cv / "fold0" / "model.pt")
    fold0_mtime = (cv / "fold0" / "model.pt").stat().st_mtime_ns
    _interrupt_during_fold1(cv)

    # no --dataset, --preset or --folds: all three come from crossval.json
    code, out, err = cli("finetune", "--out", cv, "--resume", "--quiet")
    assert code == 0, err
    assert "3-fold cross-validation" in out and "honest (cross-validated, out-of-fold" in out
    rec = json.loads((cv / "crossval.json").read_text())
    assert rec["status"] == "completed" and [m["fold"] for m in rec["members"]] == [0, 1, 2]
    assert len(rec["resumed"]) == 1 and (cv / "estimate.json").is_file()
    # fold 0 was not retrained: same model file, and its held-out predictions are the same numbers
    assert _sha(cv / "fold0" / "model.pt") == fold0_model
    assert (cv / "fold0" / "model.pt").stat().st_mtime_ns == fold0_mtime
    after = _oof(cv)
    assert sorted(after) == sorted(before) and len(after) == 36  # every labelled case predicted once
    assert all(after[c] == before[c] for c in after if before[c][0] == 0)
    # fold 1 was continued from its checkpoint (a second start record, at the checkpoint's epoch)
    starts = [json.loads(line) for line in (cv / "fold1" / "progress.jsonl").read_text().splitlines()
              if '"start"' in line]  # fmt: skip
    assert len(starts) == 2 and starts[1]["start_epoch"] == 1
    assert json.loads((cv / "fold1" / "run.json").read_text())["status"] == "completed"
    # fold 2 (no checkpoint) was retrained; what it had left is kept aside, not deleted
    assert (cv / "fold2" / "model.pt").is_file() and (cv / "fold2.partial" / "progress.jsonl").is_file()
    # the finished ensemble exports as before
    code, _, err = cli("export", "--run", cv, "--out", tmp_path / "ens", "--samples", 4)
    assert code == 0, err
    assert json.loads((tmp_path / "ens" / "model.json").read_text())["ensemble"]["members"] == 3


def test_resume_refuses_other_k_settings_or_data(dataset, tmp_path, cli):
    cv = tmp_path / "cv"
    code, _, err = cli("finetune", "--dataset", dataset, "--out", cv, "--folds", 2, "--quiet", *SETS)
    assert code == 0, err
    rec = json.loads((cv / "crossval.json").read_text())
    (cv / "crossval.json").write_text(json.dumps({**rec, "status": "running", "members": []}))
    snapshot = (cv / "crossval.json").read_bytes()

    def refused(*args: object) -> str:
        code, out, err = cli("finetune", "--out", cv, "--resume", "--quiet", *args)
        assert code == 1 and len(err.strip().splitlines()) == 1, (out, err)
        assert (cv / "crossval.json").read_bytes() == snapshot  # nothing rewritten
        return err

    assert "--folds 3 differs from the interrupted 2-fold" in refused("--folds", 3)
    assert "setting epochs = 2 differs" in refused("--epochs", 2)
    changed = tmp_path / "ds2"
    shutil.copytree(dataset, changed)
    datalist = json.loads((changed / "datalist.json").read_text())
    datalist["training"][0]["label"] = 1 - datalist["training"][0]["label"]
    (changed / "datalist.json").write_text(json.dumps(datalist))
    assert "the dataset changed" in refused("--dataset", changed)
    code, _, err = cli("finetune", "--dataset", dataset, "--preset", "2d_classification", "--out", tmp_path / "none",
                       "--folds", 2, "--resume")  # fmt: skip
    assert code == 1 and "nothing to resume" in err
    # the same K and settings are accepted (values equal to the recorded ones)
    code, _, err = cli("finetune", "--out", cv, "--resume", "--quiet", "--folds", 2, "--epochs", 1)
    assert code == 0, err
    assert json.loads((cv / "crossval.json").read_text())["status"] == "completed"
