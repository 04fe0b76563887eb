"""Export a training run (``RUN/``: run.json + model.pt) to a validated ONNX model + sidecar.

The network and the preprocessing are rebuilt from the run's bundle config, the parity samples are real
validation images passed through the bundle's evaluation transforms, and the sidecar records labels,
preprocessing, provenance and metrics (docs/formats.md §4).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medtune.errors import MedTuneError
from medtune.weights import get_architecture

from .onnx_export import ExportReport, _eval_cpu_fp32, export_onnx, torch_outputs
from .optimize import MIN_CALIBRATION, PrecisionReport, derive_precision

PRECISIONS = ("fp32", "fp16", "int8")


def _input_size(parser: Any) -> list[int]:
    key = "patch_size" if parser.get("patch_size") is not None else "image_size"
    return [int(s) for s in parser.get_parsed_content(key)]


def parity_samples(parser: Any, n: int = 16) -> np.ndarray:
    """Up to ``n`` real validation images after the bundle's evaluation transforms, ``(N, C, *spatial)``;
    volumes are centre-cropped / padded to the network's patch size (the sliding-window input)."""
    from monai.data import Dataset
    from monai.transforms import ResizeWithPadOrCrop

    items = parser.get_parsed_content("val_datalist")[:n]
    if not items:
        raise MedTuneError("the dataset has no validation images to check the export on")
    ds = Dataset(data=items, transform=parser.get_parsed_content("eval_transforms"))
    fit = ResizeWithPadOrCrop(_input_size(parser))
    return np.stack([np.asarray(fit(ds[i]["image"]), dtype=np.float32) for i in range(len(ds))])


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


def export_run(
    run: str | Path, out: str | Path, precision: str = "fp32", n_samples: int = 16
) -> ExportReport | PrecisionReport:
    """``medtune export``: rebuild the run's network with its best weights and export it, validated.

    ``fp16``/``int8``: the fp32 model is exported and validated in a temp folder first, then converted
    (INT8 calibrated on ``max(n_samples, 32)`` real validation images) and checked again against PyTorch.
    """
    from medtune.finetune.runner import build_network_for_run

    if precision not in PRECISIONS:
        raise MedTuneError(f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}")
    run = Path(run).resolve()
    net, parser, rec = build_network_for_run(run)
    samples = parity_samples(parser, n_samples)
    sidecar = build_sidecar(parser, rec, run)
    arch = get_architecture(parser.get_parsed_content("arch"))
    # fully convolutional nets take any spatial size; SwinUNETR's graph bakes in its window count (export per ROI)
    dynamic = arch.fully_convolutional and not arch.name.startswith("swinunetr")
    if not dynamic and sidecar["task"] == "segmentation":
        sidecar["note"] = "exported for this ROI only: run sliding-window inference with roi_size = spatial_size"
    kwargs: dict[str, Any] = {"input_name": "image", "output_name": "logits", "dynamic_spatial": dynamic}
    if precision == "fp32":
        return export_onnx(net, samples, out, sidecar, **kwargs)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.fp32-", dir=out.parent) as tmp:
        fp32 = export_onnx(net, samples, Path(tmp) / "fp32", sidecar, **kwargs)
        reference = torch_outputs(_eval_cpu_fp32(net)[0], samples)
        calibration = parity_samples(parser, max(n_samples, MIN_CALIBRATION)) if precision == "int8" else None
        full = json.loads(fp32.sidecar_path.read_text(encoding="utf-8"))
        report = derive_precision(fp32.onnx_path, out, precision, samples, reference, full, calibration=calibration)
    report.fp32 = fp32
    return report
