"""Torch-free runtime: providers, OnnxModel (sidecar + sha256 + session), folder classification.

The fixture model is a tiny CNN built and exported with torch here; the runtime under test never imports torch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtune.errors import MedTuneError
from medtune.runtime import providers
from medtune.runtime.classify import classify_folder, csv_columns
from medtune.runtime.model import OnnxModel, parse_labels
from medtune.runtime.providers import CPU, CUDA, TRT, create_session, gpu_available, select_providers

LABELS = {"1": "pneumonia", "0": "normal"}  # as dataset.json writes them; deliberately not in value order
NAMES = ["normal", "pneumonia"]
PREPROCESSING = [
    {"op": "channels", "n": 1},
    {"op": "resize", "spatial_size": [32, 32], "mode": "bilinear"},
    {"op": "scale_intensity", "minv": 0.0, "maxv": 1.0},
    {"op": "normalize", "mean": [0.5], "std": [0.25]},
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sidecar(onnx_path: Path, **overrides) -> Path:
    """A hand-written ``medtune.model/1`` sidecar for the fixture model."""
    sidecar = {
        "format": "medtune.model/1",
        "task": "classification",
        "labels": LABELS,
        "channels": 1,
        "spatial_dims": 2,
        "input": {"name": "image"},
        "output": {"name": "logits"},
        "preprocessing": PREPROCESSING,
        "postprocessing": {"activation": "softmax"},
        "onnx_sha256": _sha256(onnx_path),
    }
    sidecar.update(overrides)
    path = onnx_path.with_suffix(".json")
    path.write_text(json.dumps(sidecar, indent=2))
    return path


@pytest.fixture(scope="module")
def torch_net():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 16 * 16, 2)
    ).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, torch_net) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("model")
    onnx_path = folder / "model.onnx"
    torch.onnx.export(
        torch_net,
        torch.zeros(1, 1, 32, 32),
        str(onnx_path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    write_sidecar(onnx_path)
    return folder


@pytest.fixture()
def model_copy(model_dir, tmp_path) -> Path:
    """A private copy of the model folder (for tests that damage it); returns the ONNX path."""
    dest = tmp_path / "model"
    shutil.copytree(model_dir, dest)
    return dest / "model.onnx"


def _png(path: Path, shape: tuple[int, ...], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    _png(folder / "grey_32.png", (32, 32), 1)
    _png(folder / "rgb_40x50.png", (40, 50, 3), 2)
    _png(folder / "sub" / "grey_64x48.png", (64, 48), 3)
    _png(folder / "sub" / "grey_32b.png", (32, 32), 4)
    return folder


# -- (a) no torch in the runtime ------------------------------------------------------------------


def test_runtime_never_imports_torch(model_dir, image_folder, tmp_path):
    out = tmp_path / "out.csv"
    code = textwrap.dedent(
        f"""
        import sys
        import medtune.runtime.readers, medtune.runtime.preprocess, medtune.runtime.providers
        import medtune.runtime.model
        from medtune.runtime.classify import classify_folder
        s = classify_folder({str(model_dir / "model.onnx")!r}, {str(image_folder)!r}, {str(out)!r}, progress=False)
        assert s["n_ok"] == 4 and s["n_failed"] == 0, s
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


# -- (b) ORT == torch -------------------------------------------------------------------------------


def test_onnx_predictions_match_torch(model_dir, image_folder, torch_net):
    import torch

    model = OnnxModel.load(model_dir / "model.onnx", provider="cpu", threads=1)
    assert model.labels == NAMES and model.label_values == [0, 1]
    assert (model.task, model.channels, model.spatial_dims) == ("classification", 1, 2)
    assert (model.input_name, model.output_name, model.provider) == ("image", "logits", CPU)
    paths = sorted(image_folder.rglob("*.png"))
    results = model.classify(paths, batch_size=3)
    for path, res in zip(paths, results, strict=True):
        x = model.preprocess(model.read(path))
        assert x.shape == (1, 32, 32)
        with torch.no_grad():
            ref = torch.softmax(torch_net(torch.from_numpy(x[None])), dim=1)[0].numpy()
        got = np.array([res["probabilities"][n] for n in NAMES])
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert res["predicted_name"] == NAMES[int(np.argmax(ref))]
        assert res["predicted_label"] == int(np.argmax(ref))
        assert res["file"] == str(path)


def test_sigmoid_postprocessing(model_copy):
    write_sidecar(model_copy, postprocessing={"activation": "sigmoid"})
    model = OnnxModel.load(model_copy, provider="cpu")
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    logits = model.predict_batch(x)
    assert logits.shape == (2, 2)
    np.testing.assert_allclose(model.probabilities(logits), 1 / (1 + np.exp(-logits)), rtol=1e-6)


def test_parse_labels_forms():
    assert parse_labels({"1": "b", "0": "a"}) == [("a", 0), ("b", 1)]  # the one form the export writes
    for legacy in ({"b": 1, "a": 0}, ["a", "b"], [{"name": "b", "value": 2}]):  # forms nothing writes: refused
        with pytest.raises(ValueError, match="labels must map values to names"):
            parse_labels(legacy)


# -- (c) provider selection -------------------------------------------------------------------------


def _no_gpu(monkeypatch):
    monkeypatch.setattr(providers, "gpu_available", lambda: (False, "no NVIDIA GPU found (no /proc/driver/nvidia)"))


def _gpu_build(monkeypatch, names=(TRT, CUDA, CPU)):
    monkeypatch.setattr(providers, "gpu_available", lambda: (True, "NVIDIA GPU found (test)"))
    monkeypatch.setattr(providers.ort, "get_available_providers", lambda: list(names))


def test_auto_without_gpu_uses_cpu(monkeypatch):
    _no_gpu(monkeypatch)
    provs, msg = select_providers("auto")
    assert provs == [CPU]
    assert "no NVIDIA GPU found" in msg and msg.endswith("using CPU") and "\n" not in msg


@pytest.mark.parametrize("requested, name", [("cuda", "CUDA"), ("tensorrt", "TensorRT"), ("TRT", "TensorRT")])
def test_gpu_requested_without_gpu_falls_back(monkeypatch, requested, name):
    _no_gpu(monkeypatch)
    provs, msg = select_providers(requested)
    assert provs == [CPU]
    assert msg == f"{name} requested but no NVIDIA GPU found (no /proc/driver/nvidia); using CPU"


def test_cpu_requested():
    assert select_providers("cpu") == ([CPU], "CPU requested; using CPU")
    with pytest.raises(MedTuneError, match="unknown provider"):
        select_providers("opencl")


def test_auto_with_gpu_prefers_tensorrt_with_engine_cache(monkeypatch, tmp_path):
    """Selection only: creating a GPU session needs a GPU (see test_gpu_session_on_real_gpu)."""
    _gpu_build(monkeypatch)
    provs, msg = select_providers("auto", cache_dir=tmp_path / "trt", device_id=1, fp16=True)
    assert [providers.provider_name(p) for p in provs] == [TRT, CUDA, CPU]
    trt_opts = provs[0][1]
    assert trt_opts["trt_engine_cache_enable"] is True
    assert trt_opts["trt_engine_cache_path"] == str(tmp_path / "trt")
    assert trt_opts["trt_fp16_enable"] is True and trt_opts["device_id"] == 1
    assert provs[1] == (CUDA, {"device_id": 1})
    assert "TensorRT" in msg and str(tmp_path / "trt") in msg
    default = select_providers("tensorrt")[0][0][1]["trt_engine_cache_path"]
    assert default == str(Path.home() / ".cache" / "medtune" / "trt")


def test_gpu_without_gpu_build_or_trt(monkeypatch):
    _gpu_build(monkeypatch, names=(CUDA, CPU))
    assert select_providers("auto")[0] == [(CUDA, {"device_id": 0}), CPU]
    provs, msg = select_providers("tensorrt")
    assert provs[0][0] == CUDA and "no TensorRT provider" in msg
    _gpu_build(monkeypatch, names=(CPU,))
    provs, msg = select_providers("cuda")
    assert provs == [CPU] and "no CUDA provider" in msg and msg.endswith("using CPU")


def test_gpu_available_reports_reason():
    ok, why = gpu_available()
    assert isinstance(ok, bool) and why and "\n" not in why


def test_gpu_session_failure_retries_on_cpu(monkeypatch, model_dir):
    _gpu_build(monkeypatch)
    real = providers.ort.InferenceSession

    def fake_session(path, sess_options=None, providers=None):
        if providers != [CPU]:
            raise RuntimeError("CUDA driver version is insufficient\nmore detail")
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(providers.ort, "InferenceSession", fake_session)
    monkeypatch.setattr(providers, "_prepare_gpu", lambda provs: None)
    session, used, msg = create_session(model_dir / "model.onnx", "cuda", threads=1)
    assert used == CPU
    assert msg == "CUDA session failed (CUDA driver version is insufficient); using CPU"


@pytest.mark.skipif(gpu_available()[0], reason="checks the CPU fallback on a machine without an NVIDIA GPU")
def test_cuda_session_without_gpu_runs_on_cpu(model_dir):
    session, used, msg = create_session(model_dir / "model.onnx", "cuda", threads=1)
    assert used == CPU and msg.startswith("CUDA requested but no NVIDIA GPU found")


@pytest.mark.skipif(not gpu_available()[0], reason="needs an NVIDIA GPU (none found on this machine)")
def test_gpu_session_on_real_gpu(model_dir, tmp_path):
    session, used, msg = create_session(model_dir / "model.onnx", "cuda")
    assert used == CUDA, msg
    session, used, msg = create_session(model_dir / "model.onnx", "auto", cache_dir=tmp_path / "trt")
    assert used in (TRT, CUDA), msg


# -- (d) folder mode --------------------------------------------------------------------------------


def test_folder_with_corrupt_png_and_non_image(model_dir, image_folder, tmp_path, capsys):
    (image_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (image_folder / "notes.txt").write_text("not an image")
    out = tmp_path / "res" / "out.csv"
    summary = classify_folder(model_dir / "model.onnx", image_folder, out, provider="cpu", batch_size=2, progress=False)
    assert (summary["n_ok"], summary["n_failed"], summary["n_skipped"]) == (4, 1, 1)
    assert summary["provider"] == CPU and summary["out"] == str(out)
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["file", "predicted_label", "predicted_name", "p_normal", "p_pneumonia", "error"]
        assert reader.fieldnames == csv_columns(NAMES)
        rows = {r["file"]: r for r in reader}
    assert set(rows) == {"corrupt.png", "grey_32.png", "rgb_40x50.png", "sub/grey_32b.png", "sub/grey_64x48.png"}
    bad = rows.pop("corrupt.png")
    assert "corrupt.png" in bad["error"] and bad["predicted_name"] == "" and bad["p_normal"] == ""
    for r in rows.values():
        assert r["error"] == "" and r["predicted_name"] in NAMES
        assert NAMES[int(r["predicted_label"])] == r["predicted_name"]
        assert float(r["p_normal"]) + float(r["p_pneumonia"]) == pytest.approx(1.0, abs=1e-6)
    err = capsys.readouterr().err
    assert "corrupt.png" in err and "skipped 1 non-image" in err
    assert not [p for p in out.parent.iterdir() if p.name != "out.csv"]  # no temp files left


def test_json_output_and_single_file(model_dir, image_folder, tmp_path):
    out = tmp_path / "out.json"
    summary = classify_folder(model_dir, image_folder / "grey_32.png", out, provider="cpu", progress=False)
    assert summary["n_ok"] == 1
    table = json.loads(out.read_text())
    assert table["format"] == "medtune.classification/1" and table["labels"] == NAMES
    (row,) = table["results"]
    assert row["file"] == str(image_folder / "grey_32.png") and row["error"] is None
    assert set(row["probabilities"]) == set(NAMES)


def test_missing_input_and_empty_folder(model_dir, tmp_path):
    with pytest.raises(MedTuneError, match="input not found"):
        classify_folder(model_dir / "model.onnx", tmp_path / "nope", tmp_path / "o.csv", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedTuneError, match="no image files"):
        classify_folder(model_dir / "model.onnx", tmp_path / "empty", tmp_path / "o.csv", progress=False)


# -- (e) broken model files -------------------------------------------------------------------------


def _load_error(onnx_path: Path) -> str:
    with pytest.raises(MedTuneError) as info:
        OnnxModel.load(onnx_path, provider="cpu")
    text = str(info.value)
    assert "\n" not in text
    return text


def test_sha_mismatch(model_copy):
    write_sidecar(model_copy, onnx_sha256="0" * 64)
    text = _load_error(model_copy)
    assert "sha256 mismatch" in text and str(model_copy) in text


def test_missing_sidecar(model_copy):
    model_copy.with_suffix(".json").unlink()
    text = _load_error(model_copy)
    assert str(model_copy.parent / "model.json") in text
    assert "sidecar not found" in text and "model.json" in text


@pytest.mark.parametrize("content, expected", [("{not json", "not valid JSON"), ('{"format": "x/1"}', "format 'x/1'")])
def test_bad_sidecar(model_copy, content, expected):
    model_copy.with_suffix(".json").write_text(content)
    text = _load_error(model_copy)
    assert expected in text and "model.json" in text


def test_truncated_onnx(model_copy):
    data = model_copy.read_bytes()
    model_copy.write_bytes(data[: len(data) // 2])
    write_sidecar(model_copy)  # sha matches the truncated file: the load itself must fail cleanly
    text = _load_error(model_copy)
    assert "onnxruntime cannot load" in text and str(model_copy) in text


# -- (f) wrong dimensionality -----------------------------------------------------------------------


def test_3d_nifti_for_2d_model(model_dir, image_folder, tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(5)
    vol = tmp_path / "images" / "volume.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 8)).astype(np.float32), np.eye(4)), str(vol))
    flat = tmp_path / "images" / "slice.nii.gz"  # (32, 32, 1) squeezes to a 2D image and is classified
    nib.save(nib.Nifti1Image(rng.normal(size=(32, 32, 1)).astype(np.float32), np.eye(4)), str(flat))
    out = tmp_path / "out.csv"
    summary = classify_folder(model_dir / "model.onnx", image_folder, out, provider="cpu", progress=False)
    assert (summary["n_ok"], summary["n_failed"]) == (5, 1)
    with open(out, newline="") as fh:
        rows = {r["file"]: r for r in csv.DictReader(fh)}
    assert "expected a 2D image" in rows["volume.nii.gz"]["error"] and "volume.nii.gz" in rows["volume.nii.gz"]["error"]
    assert rows["slice.nii.gz"]["error"] == "" and rows["slice.nii.gz"]["predicted_name"] in NAMES


def test_preprocess_rejects_wrong_dims_and_channels(model_dir):
    from medtune.runtime.readers import ImageData

    model = OnnxModel.load(model_dir / "model.onnx", provider="cpu")
    with pytest.raises(MedTuneError, match=r"vol\.nii: model expects a 2D image, got a 3D one"):
        model.preprocess(ImageData(np.zeros((1, 8, 8, 8), np.float32)), "vol.nii")
    rgb_model_sidecar = dict(model.sidecar, channels=3, preprocessing=[])
    model.sidecar, model.channels = rgb_model_sidecar, 3
    with pytest.raises(MedTuneError, match="image has 2 channels; model expects 3"):
        model.preprocess(ImageData(np.zeros((2, 32, 32), np.float32)), "two.png")
