"""The edge install: a fresh venv with `pip install .` (base dependencies only) has no torch, runs
`medtune infer` on PNG, NIfTI and DICOM input (CSV, NIfTI and DICOM SEG out) with real ONNX models exported
by torch in this session, gives the same predictions as this environment, and every torch-needing command
says in one line what to install.

Slow (builds a venv, ~2 min with a warm pip cache): run by `.ci/edge`, or with MEDTUNE_EDGE_TEST=1.
"""

from __future__ import annotations

import csv
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
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("MEDTUNE_EDGE_TEST") != "1",
        reason="builds a fresh torch-free venv (~2 min): run by .ci/edge, or set MEDTUNE_EDGE_TEST=1",
    ),
]


def _run(cmd: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _site_packages_mb(venv: Path) -> float:
    site = next((venv / "lib").glob("python3*/site-packages"))
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> Path:
    """``pip install .`` of a clean copy of the repository into a new venv: the edge environment."""
    root = tmp_path_factory.mktemp("edge")
    src = root / "src"
    ignore = shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__", "demo_out")
    shutil.copytree(REPO, src, ignore=ignore)
    venv = root / "venv"
    proc = _run([sys.executable, "-m", "venv", str(venv)])
    assert proc.returncode == 0, proc.stderr
    proc = _run([str(venv / "bin" / "pip"), "install", "-q", str(src)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\nedge install: site-packages {_site_packages_mb(venv):.0f} MB")
    return venv


# -- real models, exported with torch in this (training) environment ------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    torch = pytest.importorskip("torch")
    from monai.networks.nets import UNet

    from medtune.export import export_onnx

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cls_net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(), torch.nn.Linear(64, 2),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    cls_sidecar = {
        "task": "classification",
        "spatial_dims": 2,
        "channels": 1,
        "spatial_size": [32, 32],
        "labels": {"0": "normal", "1": "lesion"},
        "preprocessing": [
            {"op": "channels", "n": 1},
            {"op": "resize", "spatial_size": [32, 32], "mode": "bilinear"},
            {"op": "scale_intensity", "minv": 0.0, "maxv": 1.0},
        ],
        "postprocessing": {"activation": "softmax"},
    }
    export_onnx(cls_net, rng.random((4, 1, 32, 32), dtype=np.float32), root / "cls", cls_sidecar)
    seg_net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)
    seg_sidecar = {
        "task": "segmentation",
        "spatial_dims": 3,
        "channels": 1,
        "spatial_size": [16, 16, 16],
        "labels": {"0": "background", "1": "structure"},
        "preprocessing": [{"op": "zscore", "nonzero": False, "channel_wise": True}],
        "postprocessing": {"activation": "softmax", "argmax": True},
        "sliding_window": {"roi_size": [16, 16, 16], "overlap": 0.25, "mode": "gaussian"},
    }
    samples = rng.standard_normal((2, 1, 16, 16, 16)).astype(np.float32)
    export_onnx(seg_net, samples, root / "seg", seg_sidecar, dynamic_spatial=True)
    return {"cls": root / "cls", "seg": root / "seg"}


def _smooth(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    return sum(np.sin(2 * np.pi * rng.uniform(0.5, 2) * g + rng.uniform(0, 6)) for g in grids) + 0.1 * rng.random(shape)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    pngs = root / "png"
    pngs.mkdir()
    for i, shape in enumerate([(32, 32), (40, 28), (32, 32, 3)]):
        arr = _smooth(shape, i)
        Image.fromarray(np.uint8(255 * (arr - arr.min()) / np.ptp(arr))).save(pngs / f"img{i}.png")
    nifti = root / "nifti"
    nifti.mkdir()
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    nib.save(nib.Nifti1Image(_smooth((20, 24, 18), 7).astype(np.float32), affine), str(nifti / "case1.nii.gz"))
    dicom = root / "dicom"
    _write_series(dicom, _smooth((10, 24, 20), 9))
    return {"png": pngs, "nifti": nifti, "dicom": dicom}


def _write_series(folder: Path, vol: np.ndarray) -> None:
    """A synthetic MR series (slices, rows, cols), one file per slice, no real identifiers."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = np.uint16(1000 * (vol - vol.min()) / np.ptp(vol))
    for k, plane in enumerate(pixels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = "MR", "EDGE-TEST", "Edge^Test"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)


def _medtune(python: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([str(python), "-m", "medtune.cli", *args], timeout=300)


# -- the edge environment ---------------------------------------------------------------------------------------


def test_edge_env_has_no_torch(edge):
    code = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: u.find_spec(m) is not None for m in "
        "['torch', 'torchvision', 'monai', 'onnx', 'onnxruntime', 'nibabel', 'pydicom', 'highdicom', 'medtune']}))"
    )
    proc = _run([str(edge / "bin" / "python"), "-c", code])
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found == {
        "torch": False, "torchvision": False, "monai": False, "onnx": False,
        "onnxruntime": True, "nibabel": True, "pydicom": True, "highdicom": True, "medtune": True,
    }  # fmt: skip


def test_png_to_csv_matches_the_training_environment(edge, models, inputs, tmp_path):
    from medtune.runtime.classify import classify_folder

    out = tmp_path / "edge.csv"
    proc = _medtune(edge / "bin" / "python", "infer", "--model", str(models["cls"] / "model.onnx"),
                    "--input", str(inputs["png"]), "--out", str(out), "--provider", "cpu", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 classified, 0 failed" in proc.stdout
    here = tmp_path / "here.csv"
    classify_folder(models["cls"] / "model.onnx", inputs["png"], here, provider="cpu", progress=False)
    rows_edge = list(csv.DictReader(out.open()))
    rows_here = list(csv.DictReader(here.open()))
    assert len(rows_edge) == 3 and [r["file"] for r in rows_edge] == [r["file"] for r in rows_here]
    for a, b in zip(rows_edge, rows_here, strict=True):
        assert a["predicted_label"] == b["predicted_label"] and a["error"] == ""
        for key in ("p_normal", "p_lesion"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6)
        assert float(a["p_normal"]) + float(a["p_lesion"]) == pytest.approx(1.0, abs=1e-5)


def test_nifti_to_nifti_matches_the_training_environment(edge, models, inputs, tmp_path):
    from medtune.runtime.segment import segment_folder

    out = tmp_path / "edge_seg"
    proc = _medtune(edge / "bin" / "python", "infer", "--model", str(models["seg"]), "--input", str(inputs["nifti"]),
                    "--out", str(out), "--provider", "cpu", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    here = tmp_path / "here_seg"
    segment_folder(models["seg"], inputs["nifti"], here, provider="cpu", progress=False)
    a = sorted(p.relative_to(out) for p in out.rglob("*.nii.gz"))
    assert a == sorted(p.relative_to(here) for p in here.rglob("*.nii.gz")) and len(a) == 1
    src = nib.load(str(inputs["nifti"] / "case1.nii.gz"))
    edge_img, here_img = nib.load(str(out / a[0])), nib.load(str(here / a[0]))
    assert edge_img.shape == src.shape
    np.testing.assert_allclose(edge_img.affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(edge_img.dataobj), np.asarray(here_img.dataobj))


def test_dicom_series_to_nifti_and_dicom_seg(edge, models, inputs, tmp_path):
    out = tmp_path / "edge_dcm"
    proc = _medtune(edge / "bin" / "python", "infer", "--model", str(models["seg"]), "--input", str(inputs["dicom"]),
                    "--out", str(out), "--provider", "cpu", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    segs = list(out.rglob("seg.dcm"))
    labels = list(out.rglob("labels.nii.gz"))
    assert len(segs) == 1 and len(labels) == 1
    seg = pydicom.dcmread(segs[0])
    source = pydicom.dcmread(next(inputs["dicom"].glob("*.dcm")), stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert np.asarray(nib.load(str(labels[0])).dataobj).shape == (20, 24, 10)  # (cols, rows, slices)


@pytest.mark.parametrize(
    "args",
    [
        ["finetune", "--dataset", "ds", "--out", "run"],
        ["export", "--run", "run", "--out", "model"],
        ["weights"],
        ["demo", "--out", "demo"],
    ],
)
def test_torch_commands_say_what_to_install_in_one_line(edge, tmp_path, args):
    proc = _run([str(edge / "bin" / "medtune"), *args], cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "medtune[train]" in lines[0] and "pip install" in lines[0], lines[0]
    # names the first training package the command imports (torch, monai or onnx: all absent from the edge install)
    assert any(f"{name} is not installed" in lines[0] for name in ("torch", "monai", "onnx")), lines[0]


def test_openvino_absent_falls_back_in_one_line(edge, models, inputs, tmp_path):
    out = tmp_path / "ov.csv"
    proc = _medtune(edge / "bin" / "python", "infer", "--model", str(models["cls"] / "model.onnx"),
                    "--input", str(inputs["png"]), "--out", str(out), "--provider", "openvino", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        'OpenVINO requested but the openvino package is not installed (pip install "medtune[openvino]"); using CPU'
    )
    assert len(list(csv.DictReader(out.open()))) == 3


def test_bench_runs_without_torch(edge, models, tmp_path):
    out = tmp_path / "bench.json"
    proc = _medtune(edge / "bin" / "python", "bench", "--model", str(models["cls"] / "model.onnx"), "--threads", "1",
                    "--repeats", "3", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    by_name = {b["name"]: b for b in res["backends"]}
    assert by_name["onnxruntime-fp32-CPU"]["status"] == "ok" and by_name["onnxruntime-fp32-CPU"]["latency_ms"]["n"] == 3
    assert by_name["torch-eager"]["status"].startswith("skipped") and "torch" not in res["versions"]
