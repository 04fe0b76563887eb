"""Torch-free 3D runtime: NIfTI volumes, MONAI-equivalent preprocessing, sliding window, segmentation to NIfTI.

MONAI and torch are used here only as the reference; the runtime under test never imports them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtune.runtime.segment import load_volume_model, segment_file, segment_folder
from medtune.runtime.sliding_window import sliding_window
from medtune.runtime.volume import read_volume, to_model_space

ROI = [8, 8, 8]
OPS = [{"op": "orientation", "axcodes": "RAS"}, {"op": "zscore", "nonzero": True, "channel_wise": True}]
# permuted axes, flipped (LPS-ish), spacing 1 x 1 x 2, non-zero origin
AFFINE = np.array([[0.0, -1.0, 0.0, 30.0], [-1.0, 0.0, 0.0, 20.0], [0.0, 0.0, 2.0, -10.0], [0, 0, 0, 1]])


def _nifti(path: Path, shape=(11, 9, 6), seed=0, affine=AFFINE) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(100.0, 30.0, size=shape).astype(np.float32)
    data[:2] = 0.0  # background zeros for the nonzero z-score
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture(scope="module")
def net():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1)).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, net) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("seg_model")
    onnx_path = folder / "model.onnx"
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    torch.onnx.export(
        net,
        torch.zeros(1, 1, *ROI),
        str(onnx_path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": axes, "logits": axes},
    )
    sidecar = {
        "format": "medtune.model/1",
        "task": "segmentation",
        "spatial_dims": 3,
        "input": {"name": "image", "channels": 1, "dynamic_batch": True, "dynamic_spatial": True},
        "output": {"name": "logits"},
        "labels": {"0": "background", "1": "a", "2": "b"},
        "preprocessing": OPS,
        "sliding_window": {"roi_size": ROI, "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {"activation": "softmax", "argmax": True},
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    (folder / "model.json").write_text(json.dumps(sidecar))
    return folder


def _monai_load(path: Path, orientation=None):
    pytest.importorskip("monai", reason="monai (training extra) not installed: MONAI reference comparison skipped")
    from monai.transforms import LoadImage, Orientation

    img = LoadImage(image_only=True, ensure_channel_first=True, reader="NibabelReader")(str(path))
    return (orientation or Orientation(axcodes="RAS"))(img)


@pytest.mark.parametrize(
    "op",
    [
        {"op": "zscore", "nonzero": True, "channel_wise": True},
        {"op": "ct_window", "a_min": 60.0, "a_max": 140.0, "b_min": 0.0, "b_max": 1.0},
        {"op": "scale_intensity", "minv": 0.0, "maxv": 1.0},
    ],
)
def test_preprocessing_matches_monai(tmp_path, op):
    pytest.importorskip("monai", reason="monai (training extra) not installed: MONAI reference comparison skipped")
    from monai.transforms import NormalizeIntensity, ScaleIntensity, ScaleIntensityRange

    path = _nifti(tmp_path / "v.nii.gz")
    ref = _monai_load(path)
    mine, info = to_model_space(read_volume(path), [{"op": "orientation", "axcodes": "RAS"}, op])
    np.testing.assert_allclose(np.asarray(ref.affine), info.model_affine, atol=1e-6)
    monai_op = {
        "zscore": NormalizeIntensity(nonzero=True, channel_wise=True),
        "ct_window": ScaleIntensityRange(a_min=60.0, a_max=140.0, b_min=0.0, b_max=1.0, clip=True),
        "scale_intensity": ScaleIntensity(minv=0.0, maxv=1.0),
    }[op["op"]]
    expected = np.asarray(monai_op(ref))
    assert mine.shape == expected.shape
    assert np.abs(mine - expected).max() < 1e-5
    if op["op"] == "zscore":
        assert np.all(mine[np.asarray(ref) == 0] == 0)


@pytest.mark.parametrize("minv, maxv", [(0.0, 1.0), (0.2, 1.0), (-1.0, 1.0)])
def test_scale_intensity_is_monais_also_on_constant_images(minv, maxv):
    """One ``scale_intensity`` for the 2D and 3D runtimes, equal to MONAI's ``ScaleIntensity`` -- a constant
    image included (MONAI gives ``arr * minv`` there; the 2D copy used to give ``minv``)."""
    pytest.importorskip("monai", reason="monai (training extra) not installed: MONAI reference comparison skipped")
    from monai.transforms import ScaleIntensity

    from medtune.runtime import preprocess, volume

    assert volume.scale_intensity is preprocess.scale_intensity
    rng = np.random.default_rng(0)
    for arr in (np.full((1, 4, 5, 3), 5.0, np.float32), rng.normal(size=(2, 4, 5, 3)).astype(np.float32),
                np.full((1, 6, 6), 7, np.uint8)):  # fmt: skip
        mine = preprocess.scale_intensity(arr, minv, maxv)
        expected = np.asarray(ScaleIntensity(minv=minv, maxv=maxv)(arr))
        assert mine.dtype == np.float32 and mine.shape == arr.shape
        np.testing.assert_allclose(mine, expected, atol=1e-6)
    assert preprocess.scale_intensity(np.full((1, 3, 3), 5.0), 0.2, 1.0).max() == pytest.approx(1.0)  # 5 * 0.2


def test_spacing_matches_monai(tmp_path):
    pytest.importorskip("monai", reason="monai (training extra) not installed: MONAI reference comparison skipped")
    from monai.transforms import Spacing

    path = _nifti(tmp_path / "v.nii.gz", shape=(9, 8, 5))
    ref = Spacing(pixdim=(1.5, 0.8, 1.5), mode="bilinear")(_monai_load(path))
    ops = [{"op": "orientation", "axcodes": "RAS"}, {"op": "spacing", "pixdim": [1.5, 0.8, 1.5], "mode": "bilinear"}]
    mine, info = to_model_space(read_volume(path), ops)
    assert mine.shape == tuple(ref.shape)
    np.testing.assert_allclose(info.model_affine, np.asarray(ref.affine), atol=1e-5)
    assert np.abs(mine - np.asarray(ref)).max() < 1e-4  # float32 grid_sample vs float64 scipy (measured 7.6e-6)


@pytest.mark.parametrize(
    "shape,roi,overlap,mode,batch",
    [((11, 13, 5), (8, 8, 8), 0.5, "gaussian", 1), ((12, 9, 10), (6, 8, 4), 0.25, "constant", 3)],
)
def test_sliding_window_matches_monai(shape, roi, overlap, mode, batch):
    torch = pytest.importorskip("torch")
    from monai.inferers import sliding_window_inference

    def np_pred(x):
        m = x.mean(axis=(1, 2, 3, 4), keepdims=True)
        return np.concatenate([x - m, x * m], axis=1)

    def torch_pred(x):
        m = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        return torch.cat([x - m, x * m], dim=1)

    vol = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    mine = sliding_window(np_pred, vol, roi, overlap=overlap, mode=mode, sw_batch_size=batch)
    ref = sliding_window_inference(torch.from_numpy(vol[None]), roi, batch, torch_pred, overlap=overlap, mode=mode)
    assert mine.shape == (2, *shape)
    assert np.abs(mine - ref[0].numpy()).max() < 1e-5


def test_segment_file_matches_torch_path(model_dir, net, tmp_path):
    torch = pytest.importorskip("torch")
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import NormalizeIntensity, Orientation

    path = _nifti(tmp_path / "case.nii.gz", shape=(11, 9, 6))
    model = load_volume_model(model_dir, provider="cpu")
    out = tmp_path / "out" / "case.nii.gz"
    row = segment_file(model, path, out)
    got = nib.load(str(out))
    src = nib.load(str(path))
    assert got.shape == src.shape and np.array_equal(got.affine, src.affine)
    assert got.get_data_dtype() == np.uint8 and row["shape"] == list(src.shape)

    orient = Orientation(axcodes="RAS")
    oriented = _monai_load(path, orient)
    x = NormalizeIntensity(nonzero=True, channel_wise=True)(oriented)
    with torch.no_grad():
        logits = sliding_window_inference(x.as_tensor()[None], ROI, 1, net, overlap=0.5, mode="gaussian")
    lab = MetaTensor(torch.argmax(logits[0], dim=0, keepdim=True).float())
    lab.copy_meta_from(oriented)
    back = orient.inverse(lab)
    assert np.allclose(np.asarray(back.affine), src.affine)
    expected = np.asarray(back[0]).astype(np.uint8)
    assert expected.shape == got.shape
    assert np.array_equal(np.asarray(got.dataobj), expected)


def test_segment_folder_reports_bad_case(model_dir, tmp_path):
    inp = tmp_path / "in"
    _nifti(inp / "a.nii.gz", seed=1)
    _nifti(inp / "sub" / "b.nii", shape=(7, 8, 9), seed=2)
    (inp / "broken.nii.gz").write_bytes(b"not a nifti")
    summary = segment_folder(model_dir, inp, tmp_path / "out", provider="cpu", progress=False)
    assert summary["n_ok"] == 2 and summary["n_failed"] == 1, summary
    bad = next(r for r in summary["results"] if r["error"])
    assert "broken.nii.gz" in bad["error"] and "\n" not in bad["error"]
    assert nib.load(str(tmp_path / "out" / "sub" / "b.nii")).shape == (7, 8, 9)
    assert not (tmp_path / "out" / "broken.nii.gz").exists()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_segment_never_imports_torch(model_dir, tmp_path):
    path = _nifti(tmp_path / "c.nii.gz", shape=(6, 5, 4))
    code = textwrap.dedent(
        f"""
        import sys
        from medtune.runtime.segment import segment_folder
        s = segment_folder({str(model_dir)!r}, {str(path)!r}, {str(tmp_path / "o")!r}, provider="cpu", progress=False)
        assert s["n_ok"] == 1, s
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "monai"))
        assert not bad, bad
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def test_fixed_roi_model_and_spacing(model_dir, net, tmp_path):
    """A graph fixed at the ROI (dynamic_spatial false, batch 1) gives the same labels; with a spacing op the
    output still has the input's exact shape and affine."""
    import shutil

    import torch

    fixed = tmp_path / "fixed"
    shutil.copytree(model_dir, fixed)
    onnx_path = fixed / "model.onnx"
    torch.onnx.export(
        net, torch.zeros(1, 1, *ROI), str(onnx_path), dynamo=False, input_names=["image"], output_names=["logits"]
    )
    sidecar = json.loads((fixed / "model.json").read_text())
    sidecar["input"].update(dynamic_batch=False, dynamic_spatial=False)
    sidecar["onnx_sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (fixed / "model.json").write_text(json.dumps(sidecar))
    path = _nifti(tmp_path / "case.nii.gz", shape=(13, 5, 7))  # smaller than the ROI along two axes
    segment_file(load_volume_model(model_dir, provider="cpu"), path, tmp_path / "dyn.nii.gz")
    segment_file(load_volume_model(fixed, provider="cpu"), path, tmp_path / "fix.nii.gz")
    a, b = (np.asarray(nib.load(str(tmp_path / n)).dataobj) for n in ("dyn.nii.gz", "fix.nii.gz"))
    assert a.shape == (13, 5, 7) and np.array_equal(a, b)

    sidecar["preprocessing"] = [OPS[0], {"op": "spacing", "pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"}, OPS[1]]
    (fixed / "model.json").write_text(json.dumps(sidecar))
    segment_file(load_volume_model(fixed, provider="cpu"), path, tmp_path / "sp.nii.gz")
    out, src = nib.load(str(tmp_path / "sp.nii.gz")), nib.load(str(path))
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)


def test_label_map_does_not_copy_identifying_header_text(model_dir, tmp_path):
    """The label map is written on the input's grid from its header, but not with the header's free text or
    extensions (they may name the patient); geometry is kept."""
    path = _nifti(tmp_path / "c.nii.gz", shape=(6, 5, 4))
    img = nib.load(str(path))
    header = img.header.copy()
    header["descrip"], header["aux_file"], header["intent_name"] = b"DOE^JOHN MRN12345", b"doe.txt", b"MRN12345"
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=DOE^JOHN"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, header=header), str(path))
    model = load_volume_model(model_dir, provider="cpu")
    out = tmp_path / "out" / "c.nii"  # uncompressed: the bytes are searchable as they are
    segment_file(model, path, out)
    data = out.read_bytes()
    assert b"DOE" not in data and b"MRN12345" not in data and b"doe.txt" not in data
    got = nib.load(str(out))
    assert np.array_equal(got.affine, img.affine) and len(got.header.extensions) == 0
