"""The `medtune` CLI end to end on a tiny real dataset: import → finetune → evaluate → export → infer,
plus the demo on the synthetic set, --help everywhere, and one-line errors with exit code != 0."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medtune.cli import main


def medtune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medtune.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


@pytest.mark.parametrize(
    "cmd", [[], ["demo"], ["dataset", "import"], ["finetune"], ["evaluate"], ["export"], ["infer"]]
)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*cmd, "--help"])
    assert exit_.value.code == 0 and "usage: medtune" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cli_run(tiny_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    proc = medtune(
        "finetune", "--dataset", str(tiny_dataset), "--preset", "2d_classification", "--arch", "tiny_cnn",
        "--pretrained", "none", "--epochs", "2", "--batch-size", "8", "--num-workers", "0",
        "--set", "image_size=[32, 32]", "--device", "cpu", "--quiet", "--out", str(work / "run"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best val_auc" in proc.stdout
    return work


@pytest.mark.slow  # child-process CLI run (imports torch): 10-53 s at load 6-7
def test_finetune_records_the_run(cli_run):
    rec = json.loads((cli_run / "run" / "run.json").read_text())
    assert rec["status"] == "completed" and rec["preset"] == "2d_classification"
    assert rec["overrides"]["arch"] == "tiny_cnn" and rec["overrides"]["image_size"] == [32, 32]
    assert rec["dataset"]["summary"]["training"]["n"] == 24


@pytest.mark.slow  # child-process CLI run (imports torch): 10-53 s at load 6-7
def test_finetune_refuses_to_overwrite_a_run(cli_run, tiny_dataset):
    before = (cli_run / "run" / "checkpoint_last.pt").read_bytes()
    proc = medtune("finetune", "--dataset", str(tiny_dataset), "--out", str(cli_run / "run"), "--epochs", "1")
    assert proc.returncode == 1 and "--resume" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (cli_run / "run" / "checkpoint_last.pt").read_bytes() == before


@pytest.mark.slow  # child-process CLI run (imports torch): 10-53 s at load 6-7
def test_evaluate_export_infer(cli_run, tiny_dataset):
    run, model_dir = cli_run / "run", cli_run / "model"
    proc = medtune("evaluate", "--run", str(run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AUC" in proc.stdout and (run / "eval" / "report.md").is_file()

    proc = medtune("export", "--run", str(run), "--out", str(model_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    sidecar = json.loads((model_dir / "model.json").read_text())
    assert sidecar["labels"] == {"0": "no lesion", "1": "lesion"}
    assert sidecar["preprocessing"][1] == {"op": "resize", "spatial_size": [32, 32], "mode": "bilinear"}
    assert sidecar["provenance"]["backbone"] == "tiny_cnn" and sidecar["provenance"]["data"]["synthetic"] is True
    assert sidecar["export"]["parity"]["max_abs_error"] <= sidecar["export"]["parity"]["allowed_abs_error"]

    proc = medtune("infer", "--model", str(model_dir / "model.onnx"), "--input", str(tiny_dataset / "images"),
                   "--out", str(cli_run / "preds.csv"), "--provider", "cpu", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(cli_run / "preds.csv")))
    assert len(rows) == 36 and all(not r["error"] for r in rows)
    # ONNX runtime probabilities equal the PyTorch evaluation's on the validation images
    torch_rows = {r["file"]: r for r in csv.DictReader(open(run / "eval" / "predictions.csv"))}
    for r in rows:
        name = Path(r["file"]).name
        if name in torch_rows:
            assert abs(float(r["p_lesion"]) - float(torch_rows[name]["p_lesion"])) < 1e-4


def test_infer_bad_model_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    proc = medtune("infer", "--model", str(bad), "--input", str(tmp_path), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and not (tmp_path / "p.csv").exists()


@pytest.mark.slow  # child-process CLI run (imports torch): 10-53 s at load 6-7
def test_dataset_import_medmnist_from_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "breastmnist.npz",
        train_images=rng.integers(0, 255, (10, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (10, 1)),
        val_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        val_labels=np.array([[0], [1], [0], [1]]),
    )
    proc = medtune("dataset", "import", "--from", "medmnist:breastmnist", "--root", str(tmp_path),
                   "--out", str(tmp_path / "ds"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["task"] == "classification" and info["source"] == "medmnist:breastmnist"
    datalist = json.loads((tmp_path / "ds" / "datalist.json").read_text())
    assert len(datalist["training"]) == 10 and len(datalist["validation"]) == 4


@pytest.mark.slow  # child-process CLI run (imports torch): 10-53 s at load 6-7
def test_dataset_with_bad_label_stops_before_training(tiny_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    dl = json.loads((ds / "datalist.json").read_text())
    dl["training"][3]["label"] = 7
    (ds / "datalist.json").write_text(json.dumps(dl))
    proc = medtune("finetune", "--dataset", str(ds), "--out", str(tmp_path / "run"), "--epochs", "1")
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "datalist.json" in err[0] and "7" in err[0]
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


@pytest.mark.slow  # child-process CLI run (imports torch): 10-53 s at load 6-7
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--arch", "nonet"], "unknown architecture 'nonet'"),
        (["--pretrained", "imagenet-nothing"], "unknown pretrained source"),
        (["--set", "strategy='half'"], "unknown fine-tuning strategy"),
    ],
)
def test_finetune_bad_options_are_one_line_errors(tiny_dataset, tmp_path, args, expected):
    proc = medtune("finetune", "--dataset", str(tiny_dataset), "--out", str(tmp_path / "run"), "--quiet", *args)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and expected in err[0], proc.stderr[-1500:]


@pytest.mark.slow  # child-process CLI run (imports torch): 10-53 s at load 6-7
def test_non_contiguous_class_labels_are_refused(tiny_dataset, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    info = json.loads((ds / "dataset.json").read_text())
    info["labels"] = {"1": "no lesion", "2": "lesion"}
    (ds / "dataset.json").write_text(json.dumps(info))
    proc = medtune("finetune", "--dataset", str(ds), "--out", str(tmp_path / "run"))
    assert proc.returncode == 1 and "dataset.json" in proc.stderr and "0..1" in proc.stderr


@pytest.mark.slow  # the whole demo (EfficientNet-Lite0 fine-tune + export) in a child process
def test_demo_on_synthetic_data(tmp_path):
    """The main job end to end, with real ImageNet Lite0 weights, on the project's synthetic set (1 epoch)."""
    out = tmp_path / "demo"
    proc = medtune("demo", "--out", str(out), "--epochs", "1", "--no-download", "--data-root", str(tmp_path / "none"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "USING SYNTHETIC DATA" in proc.stdout
    report = (out / "REPORT.md").read_text()
    assert report.startswith("> **SYNTHETIC DATA.**") and "cross-validated AUC" in report
    assert "optimistic figure" in report and "do not quote it" in report  # the honest figure next to the other
    assert (out / "model" / "model.onnx").is_file() and (out / "predictions.csv").is_file()
    side = json.loads((out / "model" / "model.json").read_text())
    assert side["ensemble"]["members"] == 3 and side["export"]["parity"]["passed"]  # the shipped fold ensemble
    assert "SYNTHETIC DATA" in (out / "run" / "oof" / "report.md").read_text()[:400]
    assert "cross-validated" in proc.stdout and "optimistic" in proc.stdout
    # demo refuses to write into a non-empty folder
    again = medtune("demo", "--out", str(out), "--epochs", "1", "--no-download")
    assert again.returncode == 1 and "not empty" in again.stderr
