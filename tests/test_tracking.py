"""Experiment tracking: `medtune finetune --tracking mlflow|tensorboard` and the stock
`python -m monai.bundle run ... --tracking mlflow`, read back with MLflow's own client / TensorBoard's reader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medtune.finetune.progress import read_progress

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "monai_bundle" / "configs"
TINY = ["--arch", "tiny_cnn", "--pretrained", "none", "--epochs", "2", "--batch-size", "8", "--num-workers", "0",
        "--set", "image_size=[32,32]"]  # fmt: skip

pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow  # child-process training runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from medtune.data import make_synthetic_classification

    out = tmp_path_factory.mktemp("trk") / "tiny"
    make_synthetic_classification(out, n_train=24, n_val=12, size=32, seed=1)
    return out


def _medtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "medtune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _client(run: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{run / 'mlruns.db'}")


def test_finetune_mlflow_records_params_epochs_and_artifacts(dataset, tmp_path):
    run = tmp_path / "run"
    _medtune("finetune", "--dataset", str(dataset), "--out", str(run), "--tracking", "mlflow", "--quiet", *TINY,
             cwd=tmp_path)  # fmt: skip
    _medtune("evaluate", "--run", str(run), cwd=tmp_path)
    client = _client(run)
    exp = client.get_experiment_by_name("medtune")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    r = runs[0]
    assert r.info.run_name == "run" and r.info.status == "FINISHED"
    params = r.data.params
    assert params["preset"] == "2d_classification" and params["arch"] == "tiny_cnn"
    assert params["pretrained"] == "none" and params["strategy"] == "full"
    assert float(params["label_fraction"]) == 1.0 and params["seed"] == "0" and params["epochs"] == "2"
    # every epoch's loss and validation metric, as in the progress stream
    epochs = [e for e in read_progress(run / "progress.jsonl") if e["event"] == "epoch"]
    auc = client.get_metric_history(r.info.run_id, "val_auc")
    loss = client.get_metric_history(r.info.run_id, "epoch_loss")
    assert [m.step for m in auc] == [1, 2] and [m.step for m in loss] == [1, 2]
    assert [m.value for m in auc] == pytest.approx([e["metric"] for e in epochs], abs=1e-6)
    assert [m.value for m in loss] == pytest.approx([e["loss"] for e in epochs], rel=1e-5)
    assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 2 * 3  # per iteration (MONAI)
    names = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"model.pt", "progress.jsonl", "learning_curve.png"} <= names
    evaluation = {a.path for a in client.list_artifacts(r.info.run_id, "eval")}
    assert {"eval/report.md", "eval/metrics.json", "eval/roc.png"} <= evaluation
    assert client.get_run(r.info.run_id).data.metrics["eval_auc"] == pytest.approx(
        __import__("json").loads((run / "eval" / "metrics.json").read_text())["auc"]["value"]
    )
    assert (run / "mlruns").is_dir()  # artifacts next to the store, inside the run folder


def test_finetune_tensorboard_writes_event_files(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    _medtune("finetune", "--dataset", str(dataset), "--out", str(run), "--tracking", "tensorboard", "--quiet", *TINY,
             cwd=tmp_path)  # fmt: skip
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "val_auc", "epoch_loss"} <= tags, tags
    assert [e.step for e in acc.Scalars("val_auc")] == [1, 2]
    assert len(acc.Scalars("train_loss")) == 6


def test_stock_bundle_cli_tracking_mlflow(dataset, tmp_path):
    out = tmp_path / "stock"
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "2d_classification.json")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), "--tracking", "mlflow",
           "--dataset_dir", str(dataset), "--output_dir", str(out), "--arch", "tiny_cnn", "--pretrained", "none",
           "--epochs", "2", "--batch_size", "8", "--num_workers", "0", "--image_size", "[32, 32]"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = _client(out)
    r = client.search_runs([client.get_experiment_by_name("medtune").experiment_id])[0]
    assert r.data.params["arch"] == "tiny_cnn" and r.data.params["preset"] == "2d_classification"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "val_auc")] == [1, 2]
    assert "model.pt" in {a.path for a in client.list_artifacts(r.info.run_id)}
    # the progress stream is unchanged by tracking
    kinds = [e["event"] for e in read_progress(out / "progress.jsonl")]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("epoch") == 2
