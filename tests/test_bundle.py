"""The MONAI bundle with the stock CLI: verify_metadata, verify_net_in_out, train/evaluate/inference runs,
resume after an interruption, early stopping and the progress stream."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIGS, TINY_OVERRIDES

from medtune.finetune.progress import read_progress
from medtune.runtime.preprocess import apply_preprocessing


def _bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _cli_overrides(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        out += [f"--{k}", repr(v) if not isinstance(v, str) else v]
    return out


@pytest.mark.slow  # a `python -m monai.bundle verify_*` child process
def test_verify_metadata_offline_against_schema_in_repo(tmp_path):
    _bundle(
        "verify_metadata",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--filepath",
        str(CONFIGS.parent / "docs" / "meta_schema.json"),
        cwd=tmp_path,
    )


@pytest.mark.slow  # a `python -m monai.bundle verify_*` child process
def test_verify_metadata_rejects_broken_metadata(tmp_path):
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(bad), "--filepath",
         str(CONFIGS.parent / "docs" / "meta_schema.json")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "num_channels" in proc.stderr


@pytest.mark.slow  # a `python -m monai.bundle verify_*` child process
def test_verify_net_in_out(tmp_path):
    files = [str(CONFIGS / "inference.json"), str(CONFIGS / "2d_classification.json")]
    _bundle(
        "verify_net_in_out",
        "--net_id",
        "network_def",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--config_file",
        repr(files),
        cwd=tmp_path,
    )


@pytest.fixture(scope="module")
def stock_run(tiny_dataset, tmp_path_factory):
    """A real 2-epoch training run through the stock MONAI CLI, from an unrelated working directory."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    out = cwd / "run"
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "2d_classification.json")]
    ov = {**TINY_OVERRIDES, "dataset_dir": str(tiny_dataset), "output_dir": str(out)}
    _bundle("run", "--config_file", repr(files), *_cli_overrides(ov), cwd=cwd)
    return out


@pytest.mark.slow  # stock `python -m monai.bundle run` child processes
def test_stock_cli_train_writes_checkpoints_and_progress(stock_run):
    assert (stock_run / "model.pt").is_file() and (stock_run / "checkpoint_last.pt").is_file()
    ckpt = torch.load(stock_run / "checkpoint_last.pt", weights_only=True)
    assert ckpt["trainer"]["epoch"] == 2 and {"network", "optimizer", "run_state"} <= set(ckpt)
    events = read_progress(stock_run / "progress.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("epoch") == 2
    steps = [e for e in events if e["event"] == "step"]
    assert len(steps) == 2 * 3  # 24 training images, batch 8, 2 epochs
    epoch = [e for e in events if e["event"] == "epoch"][-1]
    assert epoch["metric_name"] == "val_auc" and 0.0 <= epoch["metric"] <= 1.0
    assert {"loss", "eta_seconds", "best_metric", "best_epoch", "lr"} <= set(epoch)
    assert events[-1]["status"] == "completed"


@pytest.mark.slow  # stock `python -m monai.bundle run` child processes
def test_stock_cli_evaluate_writes_report(stock_run, tiny_dataset):
    files = [str(CONFIGS / n) for n in ("train.json", "2d_classification.json", "evaluate.json")]
    ov = {**TINY_OVERRIDES, "dataset_dir": str(tiny_dataset), "output_dir": str(stock_run)}
    _bundle("run", "--config_file", repr(files), *_cli_overrides(ov), cwd=stock_run)
    metrics = json.loads((stock_run / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 12 and 0.0 <= metrics["auc"]["value"] <= 1.0
    report = (stock_run / "eval" / "report.md").read_text()
    assert "SYNTHETIC DATA" in report.splitlines()[0] + report.splitlines()[1]
    for png in ("roc.png", "confusion_matrix.png", "learning_curve.png"):
        assert (stock_run / "eval" / png).stat().st_size > 1000


@pytest.mark.slow  # stock `python -m monai.bundle run` child processes
def test_stock_cli_inference_on_a_folder(stock_run, tiny_dataset, tmp_path):
    files = [str(CONFIGS / "inference.json"), str(CONFIGS / "2d_classification.json")]
    ov = {
        "arch": "tiny_cnn",
        "pretrained": "none",
        "image_size": [32, 32],
        "input_dir": str(tiny_dataset / "images"),
        "checkpoint": str(stock_run / "model.pt"),
        "output_dir": str(tmp_path / "pred"),
    }
    _bundle("run", "--config_file", repr(files), *_cli_overrides(ov), cwd=tmp_path)
    rows = (tmp_path / "pred" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 36  # every image in the folder


@pytest.mark.slow  # stock `python -m monai.bundle run` child processes
def test_resume_continues_from_the_last_epoch(stock_run, tiny_dataset, tmp_path):
    """An interrupted run (2 of 4 epochs done) resumes at epoch 3 with its optimizer and best metric."""
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(stock_run, run)
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "2d_classification.json")]
    ov = {**TINY_OVERRIDES, "epochs": 4, "resume": True, "dataset_dir": str(tiny_dataset), "output_dir": str(run)}
    _bundle("run", "--config_file", repr(files), *_cli_overrides(ov), cwd=tmp_path)
    events = read_progress(run / "progress.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    assert [s["start_epoch"] for s in starts] == [0, 2]
    epochs = [e["epoch"] for e in events if e["event"] == "epoch"]
    assert epochs == [1, 2, 3, 4]
    # the cosine schedule continues with the new length (4 epochs), not from the finished 2-epoch run's lr 0
    lrs = [e["lr"] for e in events if e["event"] == "epoch"]
    base = json.loads((CONFIGS / "2d_classification.json").read_text())["learning_rate"]  # the preset's
    assert lrs[2] == pytest.approx(base * (1 + np.cos(np.pi * 2 / 4)) / 2, rel=1e-6)
    assert lrs[3] == pytest.approx(base * (1 + np.cos(np.pi * 3 / 4)) / 2, rel=1e-6)
    assert [s["epoch"] for s in events if s["event"] == "done"] == [2, 4]
    ckpt = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert ckpt["trainer"]["epoch"] == 4


@pytest.mark.slow  # stock `python -m monai.bundle run` child processes
def test_stock_cli_refuses_to_overwrite_an_existing_run(stock_run, tiny_dataset, tmp_path):
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "2d_classification.json")]
    ov = {**TINY_OVERRIDES, "dataset_dir": str(tiny_dataset), "output_dir": str(stock_run)}
    before = {p.name: p.read_bytes() for p in stock_run.glob("*.pt")}
    progress_before = (stock_run / "progress.jsonl").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), *_cli_overrides(ov)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode != 0 and "already holds a training run" in proc.stderr
    assert {p.name: p.read_bytes() for p in stock_run.glob("*.pt")} == before
    assert (stock_run / "progress.jsonl").read_text() == progress_before


def test_early_stopping_stops_and_says_so(tiny_dataset, tmp_path):
    from medtune.finetune.runner import finetune

    # linear probe at lr 0 (BatchNorm frozen too): the metric can never improve after epoch 1,
    # so patience 2 stops at epoch 3 of 10
    rec = finetune(
        tiny_dataset,
        "2d_classification",
        tmp_path / "run",
        overrides={
            **TINY_OVERRIDES,
            "epochs": 10,
            "learning_rate": 0.0,
            "strategy": "linear_probe",
            "early_stop_patience": 2,
        },
        progress_bar=False,
    )
    assert rec["status"] == "early_stopped" and rec["best_metric"]["epoch"] == 1
    events = read_progress(tmp_path / "run" / "progress.jsonl")
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    assert any(e["event"] == "early_stop" for e in events) and events[-1]["status"] == "early_stopped"


def test_eval_transforms_match_the_runtime_preprocessing(tiny_dataset):
    """Training's MONAI evaluation transforms and the torch-free runtime's numpy ops give the same arrays."""
    from monai.bundle import ConfigParser

    from medtune.runtime.readers import read_image

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "2d_classification.json")])
    parser.update({"dataset_dir": str(tiny_dataset), "image_size": [48, 40], "pretrained": "none"})
    transforms = parser.get_parsed_content("eval_transforms")
    spec = parser.get_parsed_content("preprocessing_spec")
    item = parser.get_parsed_content("val_datalist")[0]
    monai_out = np.asarray(transforms(dict(item))["image"])
    numpy_out = apply_preprocessing(read_image(item["image"], spatial_dims=2).array, spec)
    assert monai_out.shape == numpy_out.shape == (1, 48, 40)
    np.testing.assert_allclose(monai_out, numpy_out, atol=1e-5)
