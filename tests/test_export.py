"""The validated ONNX exporter: files, checker, parity at two batch sizes, sidecar, versions, failures."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

import medtune.export.onnx_export as onnx_export
from medtune.errors import MedTuneError
from medtune.export import (
    FORMAT,
    ExportParityError,
    export_onnx,
    read_embedded_sidecar,
    read_sidecar,
    sha256_file,
)
from medtune.weights import create_model

SIDECAR = {"task": "classification", "labels": {"0": "normal", "1": "lesion"}, "input": {"channels": 1}}


def phantom(n: int, size: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Smooth structured images (Gaussian blobs on a gradient plus mild noise), z-scored: (n, 1, size, size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        img = 0.3 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
        for _ in range(4):
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            img += rng.uniform(0.5, 1.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += 0.05 * rng.standard_normal((size, size))
        images.append((img - img.mean()) / img.std() + offset)
    return np.stack(images)[:, None].astype(np.float32)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_cnn", None, in_channels=1, num_classes=2, verbose=False)


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def run_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    text = str(err.value)
    assert "\n" not in text and str(path) in text, text


class BranchOnMean(nn.Module):
    """Python-side control flow on the data: the tracer freezes the branch the example input took."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.net(x)
        return 3.0 * self.net(x) + 1.0


def test_classifier_export_files_checker_parity_and_sidecar(tmp_path: Path) -> None:
    model = tiny_cnn().train()
    samples = phantom(6, 28)
    caller = json.loads(json.dumps(SIDECAR))
    report = export_onnx(model, samples, tmp_path / "model", caller)

    assert report.onnx_path.is_file() and report.sidecar_path.is_file()
    assert model.training and caller == SIDECAR  # caller's model mode and dict untouched
    onnx.checker.check_model(str(report.onnx_path), full_check=True)
    assert report.exporter == "torchscript" and report.opset == 18 and report.previous_version is None
    assert report.parity.passed and report.parity.batch_sizes == [6, 1] and report.parity.n_samples == 6
    assert report.parity.argmax_agreement == 1.0
    for batch in (samples, samples[:2]):  # two batch sizes through the dynamic batch axis
        np.testing.assert_allclose(run_ort(report.onnx_path, batch), run_torch(model, batch), atol=1e-4, rtol=1e-3)

    sidecar = read_sidecar(report.onnx_path)
    assert sidecar["onnx_sha256"] == hashlib.sha256(report.onnx_path.read_bytes()).hexdigest() == report.onnx_sha256
    assert sidecar == json.loads(report.sidecar_path.read_text())
    assert read_embedded_sidecar(report.onnx_path) == {k: v for k, v in sidecar.items() if k != "onnx_sha256"}
    assert sidecar["format"] == FORMAT and sidecar["labels"] == SIDECAR["labels"]
    assert sidecar["input"] == {
        "channels": 1,
        "spatial_dims": 2,
        "name": "image",
        "dtype": "float32",
        "shape": [None, 1, 28, 28],
        "dynamic_batch": True,
        "dynamic_spatial": False,
    }
    assert sidecar["output"]["name"] == "logits" and sidecar["output"]["shape"] == [None, 2]
    export = sidecar["export"]
    assert export["opset"] == 18 and export["exporter"] == "torchscript" and export["precision"] == "fp32"
    assert export["torch_version"] == torch.__version__ and export["onnxruntime_version"] == ort.__version__
    assert export["parity"]["passed"] and export["parity"]["n_samples"] == 6 and export["parity"]["atol"] == 1e-4
    meta = {p.key: p.value for p in onnx.load(str(report.onnx_path)).metadata_props}
    assert meta["medtune_producer"].startswith("medtune ")
    assert json.loads(json.dumps(report.to_dict()))["parity"]["max_abs_error"] < 1e-4
    assert "Parity" in report.summary() and "\n" not in report.summary()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder removed


def test_unet_dynamic_spatial_runs_at_another_size(tmp_path: Path) -> None:
    model = tiny_unet()
    report = export_onnx(model, phantom(3, 32), tmp_path / "seg", {"task": "segmentation"}, dynamic_spatial=True)
    sidecar = read_sidecar(report.onnx_path)
    assert sidecar["input"]["shape"] == [None, 1, None, None] and sidecar["output"]["shape"] == [None, 2, None, None]
    other = phantom(2, 48, seed=1)  # another batch size and spatial size than exported with
    got = run_ort(report.onnx_path, other)
    assert got.shape == (2, 2, 48, 48)
    np.testing.assert_allclose(got, run_torch(model, other), atol=1e-4, rtol=1e-3)


def test_parity_failure_raises_and_writes_nothing(tmp_path: Path) -> None:
    # The first two samples (the trace example) have a positive mean, the batch as a whole a negative one:
    # PyTorch takes the other branch than the one frozen into the ONNX graph.
    samples = np.concatenate([phantom(2, 28, offset=1.0), phantom(4, 28, seed=2, offset=-2.0)])
    fresh = tmp_path / "fresh"
    with pytest.raises(ExportParityError) as err:
        export_onnx(BranchOnMean(), samples, fresh, SIDECAR)
    assert isinstance(err.value, MedTuneError) and "\n" not in str(err.value)
    assert "max abs error" in str(err.value) and "allowed" in str(err.value) and "trace" in str(err.value)
    assert err.value.parity is not None and not err.value.parity.passed
    assert not fresh.exists() and list(tmp_path.iterdir()) == []

    kept = tmp_path / "kept"
    good = export_onnx(tiny_cnn(), phantom(3, 28), kept, SIDECAR)
    before = sha256_file(good.onnx_path)
    with pytest.raises(ExportParityError):
        export_onnx(BranchOnMean(), samples, kept, SIDECAR)
    assert sha256_file(kept / "model.onnx") == before and read_sidecar(kept / "model.onnx")["onnx_sha256"] == before
    assert sorted(p.name for p in kept.iterdir()) == ["model.json", "model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


@pytest.mark.parametrize("bad", [np.zeros((4, 1, 28, 28), np.float32), np.full((2, 1, 8, 8), 0.5, np.float32)])
def test_constant_sample_inputs_are_rejected(tmp_path: Path, bad: np.ndarray) -> None:
    with pytest.raises(MedTuneError, match="constant") as err:
        export_onnx(tiny_cnn(), bad, tmp_path / "out", SIDECAR)
    assert "real preprocessed images" in str(err.value) and not (tmp_path / "out").exists()


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(MedTuneError, match="unknown exporter"):
        export_onnx(tiny_cnn(), phantom(2, 16), tmp_path / "out", SIDECAR, exporter="tensorrt")
    with pytest.raises(MedTuneError, match="JSON-serializable"):
        export_onnx(tiny_cnn(), phantom(2, 16), tmp_path / "out", {"when": object()})
    with pytest.raises(MedTuneError, match="channels = 3"):
        export_onnx(tiny_cnn(), phantom(2, 16), tmp_path / "out", {"input": {"channels": 3}})
    with pytest.raises(MedTuneError, match=r"\(N, C, \*spatial\)"):
        export_onnx(tiny_cnn(), np.ones((16, 16), np.float32), tmp_path / "out", SIDECAR)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedTuneError, match="not a folder"):
        export_onnx(tiny_cnn(), phantom(2, 16), tmp_path / "file", SIDECAR)


def test_exporting_twice_keeps_the_previous_version(tmp_path: Path) -> None:
    out = tmp_path / "model"
    first = export_onnx(tiny_cnn(), phantom(2, 28), out, SIDECAR)
    first_json = json.loads(first.sidecar_path.read_text())
    second = export_onnx(tiny_unet(), phantom(2, 32), out, {"task": "segmentation"}, dynamic_spatial=True)
    assert second.previous_version is not None and second.previous_version.parent == out / ".versions"
    assert sha256_file(second.previous_version / "model.onnx") == first.onnx_sha256 != second.onnx_sha256
    assert json.loads((second.previous_version / "model.json").read_text()) == first_json
    assert read_sidecar(second.previous_version / "model.onnx")["task"] == "classification"
    assert read_sidecar(out / "model.onnx")["task"] == "segmentation"


def test_sidecar_readers_detect_tampering_truncation_and_missing_files(tmp_path: Path) -> None:
    report = export_onnx(tiny_cnn(), phantom(2, 28), tmp_path / "m", SIDECAR)
    path, data = report.onnx_path, report.onnx_path.read_bytes()

    weights = onnx.load(str(path)).graph.initializer[0].raw_data  # flip one weight byte: still a valid ONNX file
    at = data.index(weights) + 3
    path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    assert read_embedded_sidecar(path)["task"] == "classification"
    with pytest.raises(MedTuneError, match="sha256") as err:
        read_sidecar(path)
    assert_one_line_naming(err, path)

    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedTuneError, match="sha256") as err:
        read_sidecar(path)
    assert_one_line_naming(err, path)
    with pytest.raises(MedTuneError, match="truncated") as err:
        read_embedded_sidecar(path)
    assert_one_line_naming(err, path)

    path.write_bytes(data)
    assert read_sidecar(path)["onnx_sha256"] == report.onnx_sha256
    report.sidecar_path.write_text("{not json")
    with pytest.raises(MedTuneError, match="not valid JSON") as err:
        read_sidecar(path)
    assert_one_line_naming(err, report.sidecar_path)
    report.sidecar_path.unlink()
    with pytest.raises(MedTuneError, match="not found") as err:
        read_sidecar(path)
    assert_one_line_naming(err, report.sidecar_path)


@pytest.mark.slow  # the dynamo exporter: 9.5 s at load 6-7
def test_torchscript_failure_falls_back_to_dynamo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Exporting the operator 'aten::made_up' to ONNX opset version 18 is not supported")

    monkeypatch.setattr(onnx_export, "_export_torchscript", broken)
    model = tiny_cnn()
    report = export_onnx(model, phantom(3, 28), tmp_path / "m", SIDECAR)
    assert report.exporter == "dynamo" and report.exporter_requested == "torchscript"
    assert "aten::made_up" in report.fallback_reason and report.parity.passed
    export = read_sidecar(report.onnx_path)["export"]
    assert export["exporter"] == "dynamo" and export["fallback"]["requested"] == "torchscript"
    assert export["opset"] == report.opset == 18
    np.testing.assert_allclose(
        run_ort(report.onnx_path, phantom(5, 28, seed=3)),
        run_torch(model, phantom(5, 28, seed=3)),
        atol=1e-4,
        rtol=1e-3,
    )


def test_sidecar_readers_do_not_import_torch() -> None:
    code = "import sys, medtune.export, medtune.export.sidecar; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
