"""Every registered architecture (a walk of the registry, each spatial dims it declares; the presets' default
networks in the fast set, the others marked slow) goes through the real exporter (``export_onnx`` with the options
``medtune export`` chooses from the architecture's declared rules) and runs in onnxruntime: parity gate within
the declared tolerance, named inputs/outputs, dynamic batch, dynamic spatial axes where declared (checked at a
second size against PyTorch), fixed-size exports for the declared ROI only, and SwinUNETR exported per ROI
(sidecar says so; another size fails in one line; the runtime's sliding window tiles any volume into ROI-sized
windows and matches MONAI's torch ``sliding_window_inference``).

Inputs are real images of small synthetic datasets written by ``medtune.data`` (PNG / NIfTI), never zeros.
Networks are built with tiny settings; BatchNorm statistics are set from those images (one train-mode pass)
so every layer carries signal and the outputs are of order one, which makes the parity gate meaningful.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from medtune.errors import MedTuneError
from medtune.export import export_onnx, read_sidecar
from medtune.export.from_run import export_options
from medtune.finetune.runner import PRESETS
from medtune.weights import ARCHITECTURES, create_model
from medtune.weights.architectures import Architecture

N_SAMPLES = 2  # parity at batch sizes 2 (the trace) and 1; a third batch size is run below
LABELS_SEG = {"0": "background", "1": "core", "2": "shell"}


@dataclass(frozen=True)
class Case:
    arch: str
    spatial_dims: int
    task: str
    size: tuple[int, ...]
    other: tuple[int, ...] | None = None  # a second spatial size for fully convolutional nets
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.spatial_dims}d"


def registry_case(arch: Architecture, spatial_dims: int) -> Case:
    """The export case an architecture declares: its small build at its smallest input and, when its export has
    dynamic spatial axes, a second size (longer first axis; 2D: a longer last axis too) to check them."""
    size = arch.smallest_input(spatial_dims)
    other = None
    if arch.dynamic_spatial:
        m = arch.size_multiple
        grown = [size[0] + max(m, 16), *size[1:]]
        if spatial_dims == 2:
            grown[-1] += 2 * max(m, 16)
        other = tuple(grown)
    return Case(arch.name, spatial_dims, arch.task, size, other, dict(arch.small_kwargs))


def _preset_networks() -> set[tuple[str, int]]:
    """(arch, spatial dims) of each preset's default network: the bundle configs' ``arch`` keys."""
    configs = Path(__file__).resolve().parents[1] / "monai_bundle" / "configs"
    default = json.loads((configs / "train.json").read_text())["arch"]
    out = set()
    for spec in PRESETS.values():
        arch = json.loads((configs / spec["file"]).read_text()).get("arch", default)
        out.add((arch if isinstance(arch, str) and not arch.startswith("@") else default, spec["spatial_dims"]))
    return out


#: every registered architecture x spatial dims; the presets' default networks in the fast set, the others slow
PRESET_NETWORKS = _preset_networks()
CASES = [
    pytest.param(c, id=c.id, marks=() if (c.arch, c.spatial_dims) in PRESET_NETWORKS else pytest.mark.slow)
    for c in (registry_case(a, d) for a in ARCHITECTURES.values() for d in a.spatial_dims)
]


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def images_2d(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Validation images of a synthetic 2D segmentation dataset (PNG, 96x96), z-scored: (N, 96, 96)."""
    from medtune.data.synthetic import make_synthetic_segmentation

    out = tmp_path_factory.mktemp("seg2d") / "data"
    make_synthetic_segmentation(out, n_train=1, n_val=4, size=96, spatial_dims=2, seed=3)
    return _load_val(out)


@pytest.fixture(scope="module")
def images_3d(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Validation volumes of a synthetic 3D segmentation dataset (NIfTI, 72^3), z-scored: (N, 72, 72, 72)."""
    from medtune.data.synthetic import make_synthetic_segmentation

    out = tmp_path_factory.mktemp("seg3d") / "data"
    make_synthetic_segmentation(out, n_train=1, n_val=4, size=72, spatial_dims=3, seed=4)
    return _load_val(out)


def _load_val(root: Path) -> np.ndarray:
    items = json.loads((root / "datalist.json").read_text())["validation"]
    arrays = []
    for item in items:
        path = root / item["image"]
        arr = np.asarray(Image.open(path), np.float32) if path.suffix == ".png" else nib.load(path).get_fdata()
        arr = np.squeeze(np.asarray(arr, np.float32))
        arrays.append((arr - arr.mean()) / arr.std())
    return np.stack(arrays)


def crops(images: np.ndarray, size: tuple[int, ...], n: int) -> np.ndarray:
    """``n`` crops of ``size`` at different offsets from different images: (n, 1, *size)."""
    out = []
    for i in range(n):
        img = images[i % len(images)]
        start = [(7 * (i + 1) * (d + 1)) % (s - c + 1) for d, (s, c) in enumerate(zip(img.shape, size, strict=True))]
        out.append(img[tuple(slice(a, a + c) for a, c in zip(start, size, strict=True))])
    return np.stack(out)[:, None].astype(np.float32)


def build(case: Case, calibrate_on: np.ndarray) -> torch.nn.Module:
    """The preset's network (``create_model``, as in the bundle's ``network_def``), BN stats from real images."""
    torch.manual_seed(0)
    net = create_model(
        case.arch, None, 1, 3 if case.task == "segmentation" else 2, case.spatial_dims, False, **case.kwargs
    )
    return set_batchnorm_stats(net, calibrate_on)


def set_batchnorm_stats(net: torch.nn.Module, x: np.ndarray) -> torch.nn.Module:
    """BatchNorm running statistics = those of ``x`` (one train-mode pass, cumulative average); eval mode."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(x))
    return net.eval()


def graph_io(path: Path) -> tuple[list[str], list[str], list[int | str]]:
    model = onnx.load(str(path), load_external_data=False)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output], dims


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def run_torch(net: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------------------------------------- tests


def test_fast_cases_are_the_presets_networks() -> None:
    fast = {(c.values[0].arch, c.values[0].spatial_dims) for c in CASES if not c.marks}
    assert fast == PRESET_NETWORKS and len(fast) == len(PRESETS)


@pytest.mark.parametrize("case", CASES)
def test_registered_network_exports_as_declared(
    case: Case, images_2d: np.ndarray, images_3d: np.ndarray, tmp_path: Path
) -> None:
    images = images_2d if case.spatial_dims == 2 else images_3d
    samples = crops(images, case.size, N_SAMPLES)
    net = build(case, crops(images, case.size, 4))
    sidecar: dict[str, Any] = {"task": case.task, "spatial_size": list(case.size)}
    options = export_options(case.arch, sidecar)
    arch = ARCHITECTURES[case.arch]
    assert options["dynamic_spatial"] == arch.dynamic_spatial == (case.other is not None)
    assert (options["atol"], options["rtol"]) == (arch.export_atol, arch.export_rtol)

    report = export_onnx(net, samples, tmp_path / "model", sidecar, **options)

    p = report.parity
    assert p.passed and p.max_abs_error <= p.allowed_abs_error and p.n_samples == N_SAMPLES
    assert p.allowed_abs_error == pytest.approx(arch.export_atol + arch.export_rtol * p.max_abs_torch)
    assert p.batch_sizes == [N_SAMPLES, 1] and report.exporter == "torchscript" and report.opset == 18
    assert p.max_abs_torch > 0.05, f"outputs too close to zero for parity to mean anything: {p.max_abs_torch}"
    assert 0 <= p.max_rel_error < 1e-3 and (p.argmax_agreement is None or p.argmax_agreement > 0.999)
    inputs, outputs, dims = graph_io(report.onnx_path)
    assert inputs == ["image"] and outputs == ["logits"]
    assert isinstance(dims[0], str) and dims[1] == 1  # dynamic batch, fixed channels
    side = read_sidecar(report.onnx_path)
    assert side["input"]["name"] == "image" and side["output"]["name"] == "logits"
    assert side["export"]["parity"]["max_abs_error"] == p.max_abs_error and side["export"]["parity"]["passed"]

    batch3 = crops(images, case.size, 3)  # a batch size seen neither at trace time nor by the gate
    np.testing.assert_allclose(run_ort(report.onnx_path, batch3), run_torch(net, batch3), atol=p.allowed_abs_error)
    if case.other is None:
        assert dims[2:] == list(case.size) and side["input"]["dynamic_spatial"] is False
        if arch.export_fixed_size:  # the sidecar tells the runtime to feed ROI-sized windows
            assert side["input"]["fixed_roi"] == list(case.size) and str(list(case.size)) in side["note"]
        return
    assert all(isinstance(d, str) for d in dims[2:]) and side["input"]["shape"] == [None, 1, *[None] * len(case.size)]
    other = crops(images, case.other, 1)
    got, want = run_ort(report.onnx_path, other), run_torch(net, other)
    assert got.shape == want.shape == (1, 3, *case.other)
    np.testing.assert_allclose(got, want, atol=1e-4 + 1e-3 * np.abs(want).max())


SWIN = ARCHITECTURES["swinunetr"]
SWIN_ROI = SWIN.smallest_input(3)  # sides divisible by 32, and a bottleneck (ROI/32) of more than 1 voxel


@pytest.mark.slow  # ~50 s on a loaded 2-core machine (export + two sliding-window passes)
def test_swinunetr_exported_per_roi(images_3d: np.ndarray, tmp_path: Path) -> None:
    """SwinUNETR (feature_size 12): exported for its ROI; the sidecar says so; other sizes fail in one line;
    the runtime's sliding window tiles a larger volume into ROI windows and matches MONAI's torch inferer."""
    from monai.inferers import sliding_window_inference

    from medtune.runtime.segment import load_volume_model, predict_volume

    case = Case("swinunetr", 3, "segmentation", SWIN_ROI, kwargs=dict(SWIN.small_kwargs))  # feature_size 12
    net = build(case, crops(images_3d, SWIN_ROI, 2))
    window = {"roi_size": list(SWIN_ROI), "overlap": 0.25, "mode": "gaussian"}
    sidecar: dict[str, Any] = {
        "task": "segmentation",
        "spatial_dims": 3,
        "channels": 1,
        "spatial_size": list(SWIN_ROI),
        "labels": LABELS_SEG,
        "preprocessing": [],
        "postprocessing": {"activation": "softmax", "argmax": True},
        "sliding_window": window,
    }
    options = export_options("swinunetr", sidecar)
    assert options["dynamic_spatial"] is False
    report = export_onnx(net, crops(images_3d, SWIN_ROI, 2), tmp_path / "swin", sidecar, **options)

    p = report.parity
    assert p.passed and p.batch_sizes == [2, 1] and p.max_abs_torch > 0.05 and p.max_rel_error < 1e-3
    assert report.exporter == "torchscript", report.fallback_reason  # no slow dynamo fallback
    inputs, outputs, dims = graph_io(report.onnx_path)
    assert inputs == ["image"] and outputs == ["logits"] and isinstance(dims[0], str) and dims[1:] == [1, *SWIN_ROI]
    side = read_sidecar(report.onnx_path)
    assert side["input"]["fixed_roi"] == list(SWIN_ROI) and side["input"]["dynamic_spatial"] is False
    assert side["input"]["shape"] == [None, 1, *SWIN_ROI] and str(list(SWIN_ROI)) in side["note"]

    model = load_volume_model(report.onnx_path, provider="cpu")
    with pytest.raises(MedTuneError) as err:
        model.predict_batch(crops(images_3d, (32, 64, 32), 1))
    text = str(err.value)
    assert "\n" not in text and str(report.onnx_path) in text and "(1, 1, 32, 64, 32)" in text, text

    volume = images_3d[0, :70, :28, :32][None].astype(np.float32)  # tiled along x, zero-padded along y
    got = predict_volume(model, volume)
    with torch.no_grad():
        want = sliding_window_inference(torch.from_numpy(volume[None]), SWIN_ROI, 1, net, overlap=0.25, mode="gaussian")
    want = want[0].numpy()
    assert got.shape == want.shape == (3, 70, 28, 32)
    np.testing.assert_allclose(got, want, atol=1e-4 + 1e-3 * np.abs(want).max())


def test_fixed_roi_must_match_the_samples(images_3d: np.ndarray, tmp_path: Path) -> None:
    net = build(Case("resnet10_3d", 3, "classification", (16, 16, 16)), crops(images_3d, (16, 16, 16), 2))
    with pytest.raises(MedTuneError, match="fixed_roi") as err:
        export_onnx(net, crops(images_3d, (16, 16, 16), 2), tmp_path / "m", {"input": {"fixed_roi": [32, 32, 32]}})
    assert "\n" not in str(err.value) and not (tmp_path / "m").exists()
