"""Segmentation and 3D presets as real bundle runs on tiny synthetic volumes: 3D/2D segmentation,
3D classification, self-supervised pretraining accepted as a pretrained source, export of the result, and
multi-process (DDP, gloo) training with torchrun."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import CONFIGS, write_volume_classification

from medtune.finetune.progress import read_progress
from medtune.finetune.runner import evaluate_run, finetune

# min_train_steps 0: the pipeline on tiny data, not the few-label step floor (tests/test_min_train_steps.py)
SEG = {"arch": "tiny_unet", "pretrained": "none", "epochs": 2, "num_workers": 0, "patch_size": [16, 16, 16],
       "min_train_steps": 0}  # fmt: skip


@pytest.fixture(scope="module")
def seg3d(tmp_path_factory) -> Path:
    from medtune.data.synthetic import make_synthetic_segmentation

    out = tmp_path_factory.mktemp("seg") / "seg3d"
    make_synthetic_segmentation(out, n_train=6, n_val=3, size=20, seed=2)
    return out


@pytest.fixture(scope="module")
def ssl_run(seg3d, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ssl") / "run"
    rec = finetune(seg3d, "3d_segmentation", out, overrides={**SEG, "epochs": 1}, workflow="pretrain_ssl",
                   progress_bar=False)  # fmt: skip
    assert rec["status"] == "completed" and rec["best_metric"]["name"] == "val_psnr"
    return out


@pytest.mark.slow  # child-process training runs (SSL pre-training; torchrun with 2 ranks)
def test_3d_segmentation_from_ssl_pretraining_then_evaluate_and_export(seg3d, ssl_run, tmp_path):
    run = tmp_path / "run"
    rec = finetune(seg3d, "3d_segmentation", run, overrides={**SEG, "pretrained": f"local:{ssl_run / 'model.pt'}"},
                   progress_bar=False)  # fmt: skip
    report = rec["pretrained"]["load_report"]
    assert report["n_loaded"] > 10 and report["reinitialized_head"]  # encoder from SSL, new segmentation head
    ssl_state = torch.load(ssl_run / "model.pt", weights_only=True)
    first = "model.0.conv.unit0.conv.weight"
    events = read_progress(run / "progress.jsonl")
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert events[-1]["status"] == "completed" and 0.0 <= events[-2]["metric"] <= 1.0
    assert ssl_state[first].shape == torch.load(run / "model.pt", weights_only=True)[first].shape

    ev = evaluate_run(run)
    metrics = ev["metrics"]
    assert metrics["n"] == 3 and set(metrics["per_class"]) == {"inner", "outer"}
    assert (Path(ev["eval_dir"]) / "per_case.csv").is_file() and (Path(ev["eval_dir"]) / "report.md").is_file()

    from medtune.export.from_run import export_run

    exp = export_run(run, tmp_path / "model")
    sidecar = json.loads((tmp_path / "model" / "model.json").read_text())
    assert sidecar["task"] == "segmentation" and sidecar["input"]["dynamic_spatial"] is True
    assert sidecar["sliding_window"]["roi_size"] == [16, 16, 16]
    assert sidecar["preprocessing"][0] == {"op": "orientation", "axcodes": "RAS"}
    sess = ort.InferenceSession(str(exp.onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"image": np.random.default_rng(0).normal(size=(1, 1, 24, 32, 16)).astype(np.float32)})
    assert out[0].shape == (1, 3, 24, 32, 16)  # another spatial size than exported

    # the torch-free runtime segments the dataset's volumes with the exported model, in their own geometry
    import nibabel as nib

    proc = subprocess.run(
        [sys.executable, "-m", "medtune.cli", "infer", "--model", str(exp.onnx_path), "--input",
         str(seg3d / "images"), "--out", str(tmp_path / "pred"), "--provider", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    src, pred = nib.load(seg3d / "images" / "case_0001.nii.gz"), nib.load(tmp_path / "pred" / "case_0001.nii.gz")
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


def test_2d_segmentation_preset(tmp_path):
    from medtune.data.synthetic import make_synthetic_segmentation

    make_synthetic_segmentation(tmp_path / "seg2d", n_train=8, n_val=4, size=32, spatial_dims=2, seed=3)
    rec = finetune(tmp_path / "seg2d", "2d_segmentation", tmp_path / "run",
                   overrides={"arch": "tiny_unet", "pretrained": "none", "epochs": 1, "num_workers": 0,
                              "image_size": [32, 32], "batch_size": 4},
                   progress_bar=False)  # fmt: skip
    assert rec["status"] == "completed" and rec["best_metric"]["name"] == "val_mean_dice"


def test_3d_classification_preset(tmp_path):
    ds = write_volume_classification(tmp_path / "cls3d")
    rec = finetune(ds, "3d_classification", tmp_path / "run",
                   overrides={"arch": "tiny_cnn", "pretrained": "none", "epochs": 2, "num_workers": 0,
                              "image_size": [16, 16, 16], "batch_size": 4},
                   progress_bar=False)  # fmt: skip
    assert rec["status"] == "completed" and rec["best_metric"]["name"] == "val_auc"
    assert evaluate_run(tmp_path / "run")["metrics"]["n"] == 4


def _sha(state: dict) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow  # child-process training runs (SSL pre-training; torchrun with 2 ranks)
def test_multi_gpu_train_overlay_with_torchrun_on_cpu(tiny_dataset, tmp_path):
    """torchrun, 2 processes, gloo backend on CPU: both ranks train on their half of the data, the replicas stay
    identical, and the checkpoint rank 0 saved holds exactly those weights."""
    out = tmp_path / "ddp"
    files = [str(CONFIGS / n) for n in ("train.json", "2d_classification.json", "multi_gpu_train.json")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "monai.bundle", "run", "--config_file", repr(files), "--dataset_dir", str(tiny_dataset),
         "--output_dir", str(out), "--epochs", "2", "--arch", "tiny_cnn", "--pretrained", "none",
         "--num_workers", "0", "--batch_size", "4", "--image_size", "[32, 32]"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 24 training images split over 2 ranks: 12 each, batch 4 -> 3 iterations per epoch, 2 epochs
    assert [r["iterations"] for r in ranks] == [6, 6] and [r["samples_seen"] for r in ranks] == [24, 24]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert _sha(ckpt["network"]) == ranks[0]["weights_sha256"]
    events = read_progress(out / "progress.jsonl")  # written by rank 0 only: one stream, no duplicates
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
