"""`--provider openvino` (infer, bench) through the openvino runtime (or onnxruntime's OpenVINO EP), behind a
parity check against onnxruntime CPU; `auto` measures it once per model and caches the choice next to it;
without OpenVINO a one-line fallback to CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medtune.runtime import providers
from medtune.runtime.providers import CPU, OPENVINO, OPENVINO_EP, choice_cache_path, create_session

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from monai.networks.nets import UNet

    from medtune.export import export_onnx

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=1)
    sidecar = {
        "task": "segmentation", "spatial_dims": 3, "channels": 1, "spatial_size": [24, 24, 24],
        "labels": {"0": "background", "1": "structure"},
        "preprocessing": [{"op": "zscore", "nonzero": False, "channel_wise": True}],
        "postprocessing": {"activation": "softmax", "argmax": True},
        "sliding_window": {"roi_size": [24, 24, 24], "overlap": 0.25, "mode": "gaussian"},
    }  # fmt: skip
    x = np.random.default_rng(0).standard_normal((2, 1, 24, 24, 24)).astype(np.float32)
    folder = tmp_path_factory.mktemp("ov") / "seg"
    export_onnx(net, x, folder, sidecar, dynamic_spatial=True)
    return folder / "model.onnx"


def _copy(model: Path, tmp_path: Path) -> Path:
    import shutil

    dest = tmp_path / "m"
    shutil.copytree(model.parent, dest)
    return dest / "model.onnx"


def test_openvino_requested_runs_openvino_and_matches_cpu(seg_model):
    session, used, msg = create_session(seg_model, "openvino", threads=1)
    assert used in (OPENVINO, OPENVINO_EP), msg
    assert msg.startswith("OpenVINO requested; using OpenVINO") and "parity vs onnxruntime CPU" in msg
    assert "\n" not in msg
    cpu, used_cpu, _ = create_session(seg_model, "cpu", threads=1)
    assert used_cpu == CPU
    x = np.random.default_rng(3).standard_normal((1, 1, 32, 24, 40)).astype(np.float32)  # another size
    got, want = session.run(None, {"image": x})[0], cpu.run(None, {"image": x})[0]
    assert got.shape == want.shape == (1, 2, 32, 24, 40)
    np.testing.assert_allclose(got, want, atol=1e-4 + 1e-3 * np.abs(want).max())


def test_infer_cli_with_openvino_gives_the_cpu_labels(seg_model, tmp_path):
    import nibabel as nib

    vol = np.random.default_rng(1).standard_normal((30, 26, 20)).astype(np.float32)
    inp = tmp_path / "in"
    inp.mkdir()
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), str(inp / "case.nii.gz"))
    outs = {}
    for provider in ("openvino", "cpu"):
        out = tmp_path / provider
        proc = subprocess.run([sys.executable, "-m", "medtune.cli", "infer", "--model", str(seg_model), "--input",
                               str(inp), "--out", str(out), "--provider", provider, "--quiet"],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs[provider] = np.asarray(nib.load(str(next(out.rglob("*.nii.gz")))).dataobj)
        if provider == "openvino":
            assert "using OpenVINO" in proc.stderr
    assert np.mean(outs["openvino"] == outs["cpu"]) > 0.999


def test_auto_measures_once_and_caches_next_to_the_model(seg_model, tmp_path, monkeypatch):
    monkeypatch.setattr(providers, "gpu_available", lambda: (False, "no NVIDIA GPU found (test)"))
    model = _copy(seg_model, tmp_path)
    cache = choice_cache_path(model)
    session, used, msg = create_session(model, "auto", threads=1)
    data = json.loads(cache.read_text())
    assert data["format"] == "medtune.provider_choice/1" and data["parity_ok"] is True
    assert data["cpu_ms"] > 0 and data["openvino_ms"] > 0 and data["threads"] == 1
    assert data["choice"] == ("openvino" if data["openvino_ms"] < providers.AUTO_MARGIN * data["cpu_ms"] else "cpu")
    assert used == (CPU if data["choice"] == "cpu" else data["openvino_via"])
    assert cache.name in msg and "\n" not in msg
    # the cached choice is what auto uses next time (no new measurement)
    for forced, expect in (("openvino", {OPENVINO, OPENVINO_EP}), ("cpu", {CPU})):
        cache.write_text(json.dumps({**data, "choice": forced, "openvino_ms": 1.0, "cpu_ms": 2.0}))
        _, used, msg = create_session(model, "auto", threads=1)
        assert used in expect, msg
    # another model file (or threads, versions) invalidates it: measured again
    cache.write_text(json.dumps({**data, "onnx_sha256": "0" * 64, "choice": "openvino"}))
    create_session(model, "auto", threads=1)
    assert json.loads(cache.read_text())["onnx_sha256"] == data["onnx_sha256"]
    create_session(model, "auto", threads=2)
    assert json.loads(cache.read_text())["threads"] == 2


def test_parity_failure_falls_back_to_cpu(seg_model, monkeypatch):
    monkeypatch.setattr(providers, "PARITY_ATOL", -1.0)
    session, used, msg = create_session(seg_model, "openvino", threads=1)
    assert used == CPU and msg.startswith("OpenVINO output differs from onnxruntime CPU") and msg.endswith("CPU")


def test_absent_openvino_is_a_one_line_fallback(seg_model, monkeypatch):
    reason = 'OpenVINO not available: the openvino package is not installed (pip install "medtune[openvino]")'
    monkeypatch.setattr(providers, "openvino_status", lambda: (None, reason))
    session, used, msg = create_session(seg_model, "openvino", threads=1)
    assert used == CPU
    assert msg == 'OpenVINO requested but the openvino package is not installed (pip install "medtune[openvino]"); ' \
        "using CPU"  # fmt: skip
    monkeypatch.setattr(providers, "gpu_available", lambda: (False, "no NVIDIA GPU found (test)"))
    _, used, msg = create_session(seg_model, "auto", threads=1)
    assert used == CPU and msg == "auto: no NVIDIA GPU found (test); using CPU"


def test_bench_includes_openvino(seg_model, tmp_path):
    from medtune.export.bench import run_bench

    res = run_bench(seg_model, threads=1, repeats=3, out=tmp_path / "bench.json", print_table=False)
    by_name = {b["name"]: b for b in res["backends"]}
    ov = by_name["openvino-fp32-CPU"]
    assert ov["status"] == "ok" and ov["engine"] == "openvino" and ov["latency_ms"]["median"] > 0
    assert ov["sliding_window_s"] > 0
    assert res["speedups"]["openvino_fp32_vs_ort_fp32"] > 0
    assert "openvino" in res["versions"]
    assert json.loads((tmp_path / "bench.json").read_text())["backends"] == res["backends"]
    off = run_bench(seg_model, threads=1, repeats=2, out=tmp_path / "b2.json", print_table=False, openvino=False)
    assert {b["name"]: b for b in off["backends"]}["openvino-fp32-CPU"]["status"].startswith("skipped")


def test_int8_model_runs_on_openvino_behind_the_int8_gate(seg_model, tmp_path):
    import torch
    from monai.networks.nets import UNet

    from medtune.export.onnx_export import torch_outputs
    from medtune.export.optimize import derive_precision

    torch.manual_seed(0)  # the fixture's network again (same seed, same weights)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=1).eval()
    x = np.random.default_rng(0).standard_normal((2, 1, 24, 24, 24)).astype(np.float32)
    sidecar = json.loads(seg_model.with_suffix(".json").read_text())
    loose = {"atol": 1e9, "rtol": 1e9, "min_argmax_agreement": 0.0, "max_rel_error_single_channel": 1e9}
    report = derive_precision(seg_model, tmp_path / "int8", "int8", x, torch_outputs(net, x), sidecar,
                              tolerance=loose, calibration=x)  # fmt: skip
    session, used, msg = create_session(report.onnx_path, "openvino", threads=1)
    assert used in (OPENVINO, OPENVINO_EP) and "int8: max abs error" in msg and "argmax agreement" in msg, msg
