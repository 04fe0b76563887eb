"""Export a training run (``RUN/``: run.json + model.pt) to a validated ONNX model + sidecar.

The network and the preprocessing are rebuilt from the run's bundle config, the parity samples are real
validation images passed through the bundle's evaluation transforms, and the sidecar records labels,
preprocessing, provenance and metrics (docs/formats.md §4).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtune import names
from medtune.errors import MedTuneError
from medtune.weights import get_architecture

from .onnx_export import ExportReport, _eval_cpu_fp32, export_onnx, torch_outputs
from .optimize import MAX_CALIBRATION, PrecisionReport, ValidationSet, derive_precision

PRECISIONS = names.PRECISIONS  # the names' one owner


def _input_size(parser: Any) -> list[int]:
    key = "patch_size" if parser.get("patch_size") is not None else "image_size"
    return [int(s) for s in parser.get_parsed_content(key)]


def parity_samples(parser: Any, n: int = 16, split: str = "validation") -> np.ndarray:
    """Up to ``n`` real images of ``split`` after the bundle's evaluation transforms, ``(N, C, *spatial)``;
    volumes are centre-cropped / padded to the network's patch size (the sliding-window input).

    ``validation``: the first ``n`` (parity). ``training``: a fixed random subset of ``n`` (INT8 calibration,
    kept apart from the validation split the metric gate measures on).
    """
    from monai.data import Dataset
    from monai.transforms import ResizeWithPadOrCrop

    if split == "training":
        items = parser.get_parsed_content("train_datalist")
        pick = np.random.default_rng(0).permutation(len(items))[:n]
        items = [items[i] for i in sorted(pick)]
    else:
        items = parser.get_parsed_content("val_datalist")[:n]
    if not items:
        raise MedTuneError(f"the dataset has no {split} images to check the export on")
    ds = Dataset(data=items, transform=parser.get_parsed_content("eval_transforms"))
    fit = ResizeWithPadOrCrop(_input_size(parser))
    return np.stack([np.asarray(fit(ds[i]["image"]), dtype=np.float32) for i in range(len(ds))])


def validation_set(parser: Any) -> ValidationSet:
    """Every labelled validation image after the bundle's evaluation transforms, for the metric gate.

    Classification: images at the network's input size and class indices (AUC of ``positive_label``).
    Segmentation: whole images and label maps; 3D volumes are run by sliding window at the patch size.
    """
    from monai.data import Dataset

    items = [item for item in parser.get_parsed_content("val_datalist") if "label" in item]
    if not items:
        raise MedTuneError("the dataset has no labelled validation images for the metric gate")
    task = parser.get_parsed_content("task")
    ds = Dataset(data=items, transform=parser.get_parsed_content("eval_transforms"))
    images: Sequence[np.ndarray]
    labels: Sequence[Any]
    if task == "classification":
        cases = [ds[i] for i in range(len(ds))]
        images = [np.asarray(d["image"], dtype=np.float32) for d in cases]
        labels = [int(np.asarray(d["label"]).ravel()[0]) for d in cases]
    else:  # whole volumes: loaded one case at a time while the metric is computed
        cases_lazy = _Cases(ds)
        images, labels = _Field(cases_lazy, "image", np.float32), _Field(cases_lazy, "label", None)
    info = parser.get_parsed_content("dataset_info")
    volume = task == "segmentation" and int(parser.get_parsed_content("spatial_dims")) == 3
    return ValidationSet(
        images=images,
        labels=labels,
        task=task,
        positive_class=int(info.get("positive_label", 1)),
        roi_size=_input_size(parser) if volume else None,
        overlap=float(parser.get("sw_overlap", 0.5)) if volume else 0.5,
    )


class _Cases:
    """Transformed dataset items, loaded on access; the last one is kept so image and label load once."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self._last: tuple[int, dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.ds)

    def item(self, i: int) -> dict[str, Any]:
        if self._last is None or self._last[0] != i:
            self._last = (i, self.ds[i])
        return self._last[1]


class _Field(Sequence):
    """One key of :class:`_Cases` as a lazy sequence of numpy arrays."""

    def __init__(self, cases: _Cases, key: str, dtype: Any) -> None:
        self.cases, self.key, self.dtype = cases, key, dtype

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: Any) -> Any:
        if not isinstance(i, int):
            raise TypeError("lazy validation cases are indexed one at a time")
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return np.asarray(self.cases.item(i % len(self))[self.key], dtype=self.dtype)


def _run_metrics(run: Path) -> dict[str, Any]:
    path = run / "eval" / "metrics.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    keep = ("auc", "accuracy", "f1", "sensitivity", "specificity", "balanced_accuracy")
    return {k: metrics[k] for k in keep if k in metrics} | {"n": metrics.get("n"), "split": "validation"}


def build_sidecar(parser: Any, rec: dict[str, Any], run: Path) -> dict[str, Any]:
    """The caller part of ``model.json`` for a run (the exporter adds input/output/export/sha)."""
    info = parser.get_parsed_content("dataset_info")
    labels = {str(k): str(v) for k, v in sorted(info["labels"].items(), key=lambda kv: int(kv[0]))}
    spec = parser.get_parsed_content("preprocessing_spec")
    task = parser.get_parsed_content("task")
    window = None
    if isinstance(spec, dict):  # volumes: ops + sliding-window settings
        spec, window = spec["ops"], spec["sliding_window"]
    pretrained = rec.get("pretrained") or {}
    report = pretrained.get("load_report") or {}
    return {
        "task": task,
        "spatial_dims": int(parser.get_parsed_content("spatial_dims")),
        "channels": int(parser.get_parsed_content("in_channels")),
        "spatial_size": _input_size(parser),
        "labels": labels,
        "preprocessing": spec,
        "postprocessing": {"activation": "softmax", "argmax": task == "segmentation"},
        **({"sliding_window": window} if window else {}),
        **tta_field(parser.get("tta_flips")),
        "modality": info.get("modality"),
        "provenance": {
            "preset": rec.get("preset"),
            "backbone": parser.get_parsed_content("arch"),
            "pretrained": pretrained.get("metadata") or {"name": str(pretrained.get("source", "none"))},
            "pretrained_tensors_loaded": report.get("n_loaded"),
            "strategy": rec.get("strategy"),
            "data": {
                "name": info.get("name"),
                "synthetic": bool(info.get("synthetic")),
                "splits": (rec.get("dataset") or {}).get("summary"),
            },
            "best_validation": rec.get("best_metric"),
            "metrics": _run_metrics(run),
            "versions": rec.get("versions"),
        },
    }


def tta_field(flips: Any) -> dict[str, Any]:
    """The sidecar's ``tta`` entry for the bundle key ``tta_flips`` (``{}`` when empty or unset)."""
    if not flips:
        return {}
    if not isinstance(flips, list) or not all(isinstance(f, list) for f in flips):
        raise MedTuneError(f"tta_flips must be a list of spatial-axis lists such as [[1]], got {flips!r}"[:200])
    return {"tta": {"flips": [[int(a) for a in f] for f in flips]}}


def with_flipped_views(samples: np.ndarray, sidecar: dict[str, Any]) -> np.ndarray:
    """Parity samples plus each test-time flip of them, so the gate checks every input the runtime will feed."""
    from medtune.runtime.tta import flip, tta_flips

    flips = tta_flips(sidecar, samples.ndim - 2)
    return np.concatenate([samples, *[flip(samples, axes, 2) for axes in flips]]) if flips else samples


def export_options(arch_name: str, sidecar: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`export_onnx` for ``arch_name``; notes a fixed-ROI export in ``sidecar``.

    The rules are the architecture's data (:class:`~medtune.weights.architectures.Architecture`): fully
    convolutional nets get dynamic spatial axes unless their graph fixes its size (``export_fixed_size``, e.g.
    SwinUNETR's window count), which are exported for their ROI only (``sidecar["spatial_size"]``):
    ``input.fixed_roi`` and ``note`` say so, and the runtime's sliding window feeds it ROI-sized windows of any
    volume. The parity tolerance is the architecture's ``export_atol`` / ``export_rtol``.
    """
    arch = get_architecture(arch_name)
    dynamic = arch.dynamic_spatial
    if not dynamic and sidecar.get("task") == "segmentation":
        roi = [int(s) for s in sidecar["spatial_size"]]
        sidecar.setdefault("input", {})["fixed_roi"] = roi
        sidecar["note"] = (
            f"exported for ROI {roi} only (the graph fixes its spatial size): run sliding-window inference "
            f"with roi_size = {roi}"
        )
    return {
        "input_name": "image",
        "output_name": "logits",
        "dynamic_spatial": dynamic,
        "atol": arch.export_atol,
        "rtol": arch.export_rtol,
    }


def export_run(
    run: str | Path,
    out: str | Path,
    precision: str = "fp32",
    n_samples: int = 16,
    max_metric_drop: float | None = None,
    tta_flips: list[list[int]] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ExportReport | PrecisionReport:
    """``medtune export``: rebuild the run's network with its best weights and export it, validated.

    ``fp16``/``int8``: the fp32 model is exported and validated in a temp folder first, then converted
    (INT8 calibrated on up to 512 training images) and checked again against PyTorch;
    then the validation metric (AUC / Dice) of fp32 and derived ONNX is compared over the whole validation
    split and the export refused if it drops by more than ``max_metric_drop`` (default: AUC 0.005, Dice 0.01).

    Test-time flips (bundle key ``tta_flips`` or ``tta_flips=``) go into the sidecar's ``tta``; the parity gate
    then also runs every flipped copy of the samples. ``overrides``: the user's own ``--set`` values on top of the
    run's (:func:`medtune.finetune.runner.run_overrides`).
    """
    from medtune.finetune.runner import build_network_for_run

    if precision not in PRECISIONS:
        raise MedTuneError(f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}")
    run = Path(run).resolve()
    net, parser, rec = build_network_for_run(run, overrides)
    sidecar = build_sidecar(parser, rec, run)
    if tta_flips is not None:  # `medtune export --tta-flips`: overrides the run's bundle key
        sidecar.pop("tta", None)
        sidecar.update(tta_field(tta_flips))
    return export_network(net, parser, sidecar, out, precision, n_samples, max_metric_drop)


def export_network(
    net: Any,
    parser: Any,
    sidecar: dict[str, Any],
    out: str | Path,
    precision: str = "fp32",
    n_samples: int = 16,
    max_metric_drop: float | None = None,
) -> ExportReport | PrecisionReport:
    """Export ``net`` (one run's network, or an ensemble of runs) with ``sidecar``, validated against PyTorch on real
    images of ``parser``'s dataset; fp16/int8 derived from the fp32 model and checked again (:func:`export_run`)."""
    if precision not in PRECISIONS:
        raise MedTuneError(f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}")
    samples = with_flipped_views(parity_samples(parser, n_samples), sidecar)
    kwargs = export_options(parser.get_parsed_content("arch"), sidecar)
    if precision == "fp32":
        return export_onnx(net, samples, out, sidecar, **kwargs)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.parent) as tmp:
        fp32 = export_onnx(net, samples, Path(tmp) / "fp32", sidecar, **kwargs)
        reference = torch_outputs(_eval_cpu_fp32(net)[0], samples)
        calibration = parity_samples(parser, MAX_CALIBRATION, "training") if precision == "int8" else None
        full = json.loads(fp32.sidecar_path.read_text(encoding="utf-8"))
        report = derive_precision(
            fp32.onnx_path,
            out,
            precision,
            samples,
            reference,
            full,
            calibration=calibration,
            validation=validation_set(parser),
            max_metric_drop=max_metric_drop,
            calibration_source="training images",
        )
    report.fp32 = fp32
    return report
