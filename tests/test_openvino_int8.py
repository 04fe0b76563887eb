"""NNCF INT8 (OpenVINO IR) from a real FP32 ONNX export: runs for real on a tiny model, agrees with FP32 by the
exporter's INT8 gate, and says in one line what to install when nncf is absent."""

from __future__ import annotations

import builtins
from pathlib import Path

import numpy as np
import pytest

from medtune.errors import MedTuneError
from medtune.export.openvino_int8 import nncf_status, quantize_nncf


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, np.ndarray]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    from monai.networks.nets import UNet

    from medtune.export import export_onnx

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=1)
    sidecar = {"task": "segmentation", "spatial_dims": 3, "channels": 1, "spatial_size": [16, 16, 16],
               "labels": {"0": "background", "1": "structure"}}  # fmt: skip
    x = np.random.default_rng(0).standard_normal((6, 1, 16, 16, 16)).astype(np.float32)
    folder = tmp_path_factory.mktemp("nncf") / "seg"
    export_onnx(net, x[:2], folder, sidecar, dynamic_spatial=True)
    return folder / "model.onnx", x


@pytest.mark.slow  # export + NNCF statistics on a loaded 2-core machine: ~30-60 s
def test_nncf_int8_runs_and_passes_the_int8_gate(tiny_model, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import onnxruntime as ort

    from medtune.export.optimize import TOLERANCES
    from medtune.runtime.openvino_session import OpenVinoSession

    model, x = tiny_model
    how = quantize_nncf(model, tmp_path / "int8.xml", x)
    assert how.startswith("nncf ") and "6 calibration images" in how
    assert (tmp_path / "int8.xml").is_file() and (tmp_path / "int8.bin").stat().st_size > 0
    ov_int8 = OpenVinoSession(tmp_path / "int8.xml", threads=1)
    fp32 = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    got = np.concatenate([ov_int8.run(None, {"image": x[i : i + 1]})[0] for i in range(len(x))])
    ref = fp32.run(None, {"image": x})[0]
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert not np.array_equal(got, ref)  # it is a different (quantized) model, not the fp32 one
    agree = float(np.mean(np.argmax(got, 1) == np.argmax(ref, 1)))
    assert agree >= TOLERANCES["int8"]["min_argmax_agreement"], agree


@pytest.mark.slow
def test_bad_destination_and_inputs_are_one_line_errors(tiny_model, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    model, x = tiny_model
    with pytest.raises(MedTuneError, match="must end in .xml"):
        quantize_nncf(model, tmp_path / "int8.onnx", x)
    with pytest.raises(MedTuneError, match="calibration images"):
        quantize_nncf(model, tmp_path / "int8.xml", np.full((1, 1, 16, 16, 16), np.nan, np.float32))


def test_absent_nncf_says_what_to_install(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_nncf(name, *args, **kwargs):
        if name == "nncf" or name.startswith("nncf."):
            raise ImportError("No module named 'nncf' (test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    ok, why = nncf_status()
    if "openvino" in why:  # openvino itself is absent here: that is the reason given
        assert not ok and "medtune[nncf]" in why
        return
    assert not ok and why == 'the nncf package is not installed (pip install "medtune[nncf]")'
    with pytest.raises(MedTuneError, match=r"NNCF INT8 unavailable: the nncf package is not installed"):
        quantize_nncf(tmp_path / "model.onnx", tmp_path / "int8.xml", np.zeros((1, 1, 8, 8), np.float32))
