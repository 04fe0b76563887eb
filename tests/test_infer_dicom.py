"""``medtune infer`` on DICOM series (NIfTI + DICOM SEG out, no identifiers in names/output) and on bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import REPO, SHARED_DATA

REAL_MR = SHARED_DATA / "dicom" / "tcia_brain_tumor_progression_mr"  # shared data only through helpers
T1POST = "Study3/11-T1post-18670"
ROI = [16, 16, 8]


def _write_model(folder: Path, spatial_dims: int = 3, task: str = "segmentation") -> Path:
    """A 1x1 conv ONNX model: logits ``(0, x, -x)`` -> class 1 where the z-scored input > 0, 2 where < 0."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    sp = ["x", "y", "z"][:spatial_dims]
    k = 3 if task == "segmentation" else 2
    weight = np.zeros((k, 1, *([1] * spatial_dims)), dtype=np.float32)
    weight[1], weight[2 % k] = 1.0, -1.0 if k == 3 else 1.0
    nodes = [helper.make_node("Conv", ["image", "W"], ["conv"], kernel_shape=[1] * spatial_dims)]
    out_shape: list[int | str] = ["batch", k, *sp]
    if task != "segmentation":
        nodes.append(helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]))
        nodes.append(helper.make_node("Flatten", ["pooled"], ["logits"], axis=1))
        out_shape = ["batch", k]
    else:
        nodes[0].output[0] = "logits"
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, *sp])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_path = folder / "model.onnx"
    onnx.save(model, str(onnx_path))
    sidecar: dict = {
        "format": "medtune.model/1",
        "task": task,
        "spatial_dims": spatial_dims,
        "input": {"name": "image", "channels": 1, "dynamic_batch": True, "dynamic_spatial": True},
        "output": {"name": "logits"},
        "postprocessing": {"activation": "softmax", "argmax": True},
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    if task == "segmentation":
        sidecar["labels"] = {"0": "background", "1": "bright", "2": "dark"}
        sidecar["preprocessing"] = [{"op": "zscore", "nonzero": True, "channel_wise": True}]
        sidecar["sliding_window"] = {"roi_size": ROI, "overlap": 0.25, "mode": "constant"}
    else:
        sidecar["labels"] = {"0": "a", "1": "b"}
        sidecar["input"]["spatial_size"] = [8, 8]
        sidecar["preprocessing"] = [
            {"op": "channels", "n": 1},
            {"op": "resize", "spatial_size": [8, 8], "mode": "bilinear"},
            {"op": "scale_intensity", "minv": 0.0, "maxv": 1.0},
        ]
    (folder / "model.json").write_text(json.dumps(sidecar))
    return folder


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    return _write_model(tmp_path_factory.mktemp("seg3d"))


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory) -> Path:
    pytest.importorskip("onnx")
    return _write_model(tmp_path_factory.mktemp("cls2d"), spatial_dims=2, task="classification")


def _real(sub: str = T1POST) -> Path:
    folder = REAL_MR / sub
    if not folder.is_dir():
        pytest.skip(f"real MR DICOM series not present at {folder} (shared data is optional)")
    return folder


def _infer(model: Path, inp: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "medtune.cli", "infer", "--model", str(model), "--input", str(inp)]
    cmd += ["--out", str(out), "--provider", "cpu", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _assert_clean_error(proc: subprocess.CompletedProcess, name: str, out: Path) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert errors and any(name in ln for ln in errors), proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(out) == [], _files(out)


# -- real MR series ------------------------------------------------------------------------------------------


def test_real_mr_series_to_nifti_and_dicom_seg(seg_model, tmp_path):
    from medtune.runtime.dicom import read_dicom_series

    src = _real()
    series = read_dicom_series(src)
    ds0 = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    out = tmp_path / "out"
    proc = _infer(seg_model, src, out)
    assert proc.returncode == 0, proc.stderr
    # writing a SEG that carries the source's patient module is announced, once
    assert proc.stderr.count("seg.dcm (DICOM SEG) carries the source series' patient and study identifiers") == 1

    name = "series_" + hashlib.sha1(series.series_instance_uid.encode()).hexdigest()[:8]
    assert sorted(p.relative_to(out).as_posix() for p in _files(out)) == [f"{name}/labels.nii.gz", f"{name}/seg.dcm"]
    identifiers = [str(ds0.PatientID), str(ds0.PatientName), *str(ds0.PatientName).split("^")]
    for ident in filter(None, identifiers):
        for p in _files(out):
            assert ident.lower() not in p.relative_to(tmp_path).as_posix().lower()
        assert ident not in proc.stdout and ident not in proc.stderr

    img = nib.load(str(out / name / "labels.nii.gz"))
    labels = np.asarray(img.dataobj)
    assert labels.shape == series.shape and labels.dtype == np.uint8
    np.testing.assert_allclose(img.affine, series.affine, atol=1e-4)
    assert set(np.unique(labels).tolist()) == {0, 1, 2}

    seg = pydicom.dcmread(out / name / "seg.dcm")
    assert seg.Modality == "SEG"
    ref_uids = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert ref_uids == {series.series_instance_uid}
    # frames: one per (segment, slice with that segment); compare to the NIfTI labels per referenced slice
    sop_to_k = {str(ds.SOPInstanceUID): k for k, ds in enumerate(series.datasets)}
    numbers = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    assert numbers == {1: "bright", 2: "dark"}
    frames = seg.pixel_array
    assert frames.ndim == 3
    seen = set()
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        sop = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = sop_to_k[sop]
        np.testing.assert_array_equal(frames[f].astype(bool), labels[:, :, k].T == number)
        seen.add((number, k))
    expected = {(c, k) for c in (1, 2) for k in range(labels.shape[2]) if np.any(labels[:, :, k] == c)}
    assert seen == expected


def test_folder_of_series_one_truncated_rest_go_on(seg_model, tmp_path):
    src = _real()
    root = tmp_path / "in"
    shutil.copytree(src, root / "good")
    shutil.copytree(src, root / "bad")
    # the copies share a SeriesInstanceUID; give the bad one its own so both get their own output
    new_uid = pydicom.uid.generate_uid()
    for f in sorted((root / "bad").iterdir()):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = new_uid
        ds.save_as(f)
    victim = sorted((root / "bad").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = tmp_path / "out"
    proc = _infer(seg_model, root, out)
    assert proc.returncode == 1
    assert victim.name in proc.stderr and "1 segmented, 1 failed" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert len(_files(out)) == 2  # the good series' labels.nii.gz + seg.dcm only


# -- bad input -------------------------------------------------------------------------------------------------


def _nifti(path: Path, shape: tuple[int, ...]) -> Path:
    data = np.random.default_rng(0).normal(100, 30, size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)
    return path


@pytest.fixture
def volume(tmp_path) -> Path:
    return _nifti(tmp_path / "vol.nii.gz", (20, 18, 10))


def test_truncated_onnx(seg_model, volume, tmp_path):
    model = shutil.copytree(seg_model, tmp_path / "m")
    onnx_path = model / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:40])
    side = json.loads((model / "model.json").read_text())
    side["onnx_sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()  # sha matches the broken file
    (model / "model.json").write_text(json.dumps(side))
    out = tmp_path / "out"
    _assert_clean_error(_infer(model, volume, out), "model.onnx", out)


def test_sidecar_sha256_mismatch(seg_model, volume, tmp_path):
    model = shutil.copytree(seg_model, tmp_path / "m")
    side = json.loads((model / "model.json").read_text())
    side["onnx_sha256"] = "0" * 64
    (model / "model.json").write_text(json.dumps(side))
    out = tmp_path / "out"
    proc = _infer(model, volume, out)
    _assert_clean_error(proc, "model.json", out)
    assert "sha256" in proc.stderr


def test_wrong_channel_count_for_3d_model(seg_model, tmp_path):
    path = _nifti(tmp_path / "two_channels.nii.gz", (20, 18, 10, 2))
    out = tmp_path / "out"
    proc = _infer(seg_model, path, out)
    _assert_clean_error(proc, path.name, out)
    assert "channel" in proc.stderr


def test_png_given_to_3d_model(seg_model, tmp_path):
    path = _png(tmp_path / "slice.png")
    out = tmp_path / "out"
    _assert_clean_error(_infer(seg_model, path, out), path.name, out)


def test_2d_nifti_given_to_3d_model(seg_model, tmp_path):
    path = _nifti(tmp_path / "flat.nii.gz", (20, 18))
    out = tmp_path / "out"
    _assert_clean_error(_infer(seg_model, path, out), path.name, out)


def test_3d_volume_given_to_2d_classifier(cls_model, volume, tmp_path):
    out = tmp_path / "out"
    _assert_clean_error(_infer(cls_model, volume, out / "pred.csv"), volume.name, out)


@pytest.mark.parametrize("which", ["seg", "cls"])
def test_non_image_file_as_input(seg_model, cls_model, tmp_path, which):
    path = tmp_path / "notes.txt"
    path.write_text("not an image\n")
    out = tmp_path / "out"
    target = out if which == "seg" else out / "pred.csv"
    _assert_clean_error(_infer(seg_model if which == "seg" else cls_model, path, target), path.name, out)


def test_truncated_dicom_in_series_folder(seg_model, tmp_path):
    folder = shutil.copytree(_real(), tmp_path / "series")
    victim = sorted(folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size - 1000])
    out = tmp_path / "out"
    _assert_clean_error(_infer(seg_model, folder, out), victim.name, out)
