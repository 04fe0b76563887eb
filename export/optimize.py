"""Derived precisions of a validated fp32 ONNX export: graph optimization, FP16 and static INT8 (QDQ).

Every derived model is checked against the fp32 *PyTorch* reference on the same real samples the fp32
export was validated on, and written with the exporter's atomic temp-folder-then-move install (a previous
model is kept under ``.versions/``); on any failure ``out_dir`` is left as it was.

- INT8 (the CPU deployment format): static QDQ, uint8 activations / int8 per-channel weights, MinMax
  calibration on real preprocessed images (``quantize_static`` after ``quant_pre_process``). Measured 2.9x
  faster than fp32 on CPU for resnet18 (S8S8 no faster, ``quantize_dynamic`` slower). The stem stage
  (:func:`stem_nodes`) stays float: on the Lite0 BreastMNIST model quantizing the stem cost 0.03 validation
  AUC, its 1-input-channel int8 kernel was 5x slower than the float one (0.23 vs 0.04 ms), and keeping the
  first block float too raised argmax agreement with fp32 from 95% to 97% and made the model faster.
  Ranges are the moving average of per-batch min/max (plain MinMax over 512 images let outliers widen them).
  Gate: argmax agreement with PyTorch >= 0.9 (max relative error <= 0.1 for single-channel outputs); the
  largest change in the output probability (softmax/sigmoid) is reported.
- FP16 (for GPU / TensorRT; it runs on CPU but slower): float16 weights and activations with float32
  inputs/outputs (``onnxruntime.transformers.float16``, else ``onnxconverter_common``). Gate:
  max |a - b| <= 1e-2 + 1e-2 * max|torch|.
- Metric gate (when a :class:`ValidationSet` is given, as ``medtune export`` does): the task metric on the
  dataset's validation split, fp32 ONNX vs the derived ONNX, both through onnxruntime (AUC of the positive
  class for classifiers, mean foreground Dice for segmentation, 3D volumes by sliding window), computed by the
  report's own functions (``medtune.evaluate.metrics.auc``, ``medtune.evaluate.segmentation.case_mean_dice``), so
  ``export.metric_delta`` and ``eval/report.md`` speak of the same numbers. The derived
  model is refused when the metric drops by more than ``max_metric_drop`` (default :data:`MAX_METRIC_DROP`).

torch is not imported here.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from medtune import names
from medtune.errors import MedTuneError

from .onnx_export import (
    ONNX_NAME,
    ExportParityError,
    ParityResult,
    _batches,
    _one_line,
    _temp_dir_next_to,
    batch_sizes,
    check_onnx_file,
    embed_sidecar,
    install,
    onnx_parity,
)
from .sidecar import SIDECAR_NAME, sha256_file

DERIVED = names.DERIVED_PRECISIONS
#: default gates per precision (see the module docstring)
TOLERANCES: dict[str, dict[str, float]] = {
    "fp16": {"atol": 1e-2, "rtol": 1e-2},
    "int8": {"atol": 0.0, "rtol": 0.0, "min_argmax_agreement": 0.9, "max_rel_error_single_channel": 0.1},
}
#: at most this many images calibrate INT8 (MinMax over a few dozen images varied the BreastMNIST AUC by +-0.02)
MAX_CALIBRATION = 512
#: default largest allowed drop of the validation metric, derived precision vs fp32 (both onnxruntime)
MAX_METRIC_DROP: dict[str, float] = {"auc": 0.005, "dice": 0.01}


class PrecisionParityError(ExportParityError):
    """A derived-precision model (fp16/int8) strays too far from the fp32 PyTorch reference."""


@dataclass
class ValidationSet:
    """A labelled split for the metric gate: preprocessed images ``(C, *spatial)`` and their labels.

    ``labels`` are class indices (classification) or label maps of the image's spatial shape (segmentation,
    values 0..K-1). ``roi_size`` (3D segmentation): images are run by sliding window with that window.
    """

    images: Sequence[np.ndarray]
    labels: Sequence[Any]
    task: str
    positive_class: int = 1
    roi_size: list[int] | None = None
    overlap: float = 0.5
    mode: str = "gaussian"
    split: str = "validation"

    @property
    def metric(self) -> str:
        return "auc" if self.task == "classification" else "dice"


@dataclass
class MetricDelta:
    """The validation metric of the fp32 and the derived ONNX model (both run by onnxruntime)."""

    metric: str
    split: str
    n: int
    fp32: float
    derived: float
    precision: str
    max_drop: float

    @property
    def delta(self) -> float:
        return self.derived - self.fp32

    @property
    def passed(self) -> bool:
        return bool(self.fp32 - self.derived <= self.max_drop + 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "split": self.split,
            "n": self.n,
            "fp32": self.fp32,
            self.precision: self.derived,
            "delta": self.delta,
            "max_drop": self.max_drop,
            "passed": self.passed,
            "engine": "onnxruntime CPU",
        }

    def describe(self) -> str:
        return (
            f"{self.split} {self.metric.upper()} fp32 {self.fp32:.4f} -> {self.precision} {self.derived:.4f} "
            f"(delta {self.delta:+.4f}, allowed drop {self.max_drop:g}, n={self.n})"
        )


@dataclass
class PrecisionReport:
    """What :func:`derive_precision` wrote and how well it matches the fp32 PyTorch reference."""

    onnx_path: Path
    sidecar_path: Path
    previous_version: Path | None
    precision: str
    parity: ParityResult
    max_prob_change: float | None
    tolerance: dict[str, float]
    n_calibration: int | None
    converter: str
    file_size_bytes: int
    fp32_size_bytes: int
    onnx_sha256: str
    seconds: float
    fp32: Any = None  # the fp32 ExportReport when made by export_run
    metric: MetricDelta | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable view (paths as strings)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("parity", "fp32", "metric")}
        out["parity"] = _parity_dict(self.parity, self.max_prob_change, self.tolerance)
        out["fp32"] = None if self.fp32 is None else self.fp32.to_dict()
        out["metric_delta"] = None if self.metric is None else self.metric.to_dict()
        for key in ("onnx_path", "sidecar_path", "previous_version"):
            out[key] = None if out[key] is None else str(out[key])
        return out

    def summary(self) -> str:
        """One short paragraph for printing."""
        calib = f", calibrated on {self.n_calibration} real images" if self.n_calibration else ""
        kept = f" Previous version kept in {self.previous_version}." if self.previous_version else ""
        fp32 = f" fp32 export validated first: {self.fp32.parity.describe()}." if self.fp32 is not None else ""
        metric = f" Metric: {self.metric.describe()}: passed." if self.metric is not None else ""
        return (
            f"Exported {self.precision} {self.onnx_path} ({self.file_size_bytes / 1e6:.2f} MB vs fp32 "
            f"{self.fp32_size_bytes / 1e6:.2f} MB, {self.converter}{calib}, {self.seconds:.1f} s). Parity vs fp32 "
            f"PyTorch with onnxruntime CPU: {describe(self.precision, self.parity, self.max_prob_change)}: passed."
            f"{metric}{fp32} "
            f"Sidecar: {self.sidecar_path}.{kept}"
        )


# ---------------------------------------------------------------------------------------------- transforms


def optimize_graph(src: str | Path, dst: str | Path, level: str = "basic") -> None:
    """Offline onnxruntime graph optimization of ``src`` into ``dst``.

    ``basic`` (default) only applies semantics-preserving rewrites with standard ONNX ops (constant folding,
    Conv+BN/Add/Mul fusion, redundant node removal), so the result stays portable to any runtime/EP.
    ``extended`` also fuses into ``com.microsoft`` ops (FusedConv, ...) assigned to the CPU EP: faster with
    onnxruntime CPU, not portable. ``all`` (layout / hardware-specific nodes) is deliberately not offered.
    """
    import onnxruntime as ort

    level_of = ort.GraphOptimizationLevel
    levels = {"basic": level_of.ORT_ENABLE_BASIC, "extended": level_of.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise MedTuneError(f"unknown optimization level {level!r}; choose one of {', '.join(levels)}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = levels[level]
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    if not Path(dst).is_file():
        raise MedTuneError("onnxruntime wrote no optimized model", dst)


def _fp16_converter() -> tuple[Any, str]:
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16, "onnxruntime.transformers.float16"
    except ImportError:  # pragma: no cover - depends on the onnxruntime build
        pass
    try:  # pragma: no cover
        from onnxconverter_common.float16 import convert_float_to_float16

        return convert_float_to_float16, "onnxconverter_common.float16"
    except ImportError as err:  # pragma: no cover
        raise MedTuneError(
            "FP16 conversion needs onnxruntime.transformers or onnxconverter-common (pip install onnxconverter-common)"
        ) from err


def to_fp16(src: str | Path, dst: str | Path) -> str:
    """Convert weights/activations to float16, keeping float32 inputs/outputs; returns the converter used.

    The graph is first optimized (``basic``: folds BatchNorm into Conv) so fewer Casts are needed.
    """
    convert, name = _fp16_converter()
    with tempfile.TemporaryDirectory(prefix="medtune-fp16-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        optimize_graph(src, optimized)
        model = onnx.load(str(optimized))
        model16 = convert(model, keep_io_types=True)
        onnx.save(_topologically_sorted(model16), str(dst))
    return name


def _topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converters append the input Casts last; onnx.checker (and other runtimes) need nodes in order:
    onnxruntime's own ``ONNXModel.topological_sort`` puts them in order (in place)."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    ONNXModel(model).topological_sort()
    return model


class _Calibration:
    """onnxruntime ``CalibrationDataReader`` over real preprocessed images (batches of up to 8)."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self.images = images
        self.input_name = input_name
        self._it: Iterator[np.ndarray] | None = None

    def _batches(self) -> Iterator[np.ndarray]:
        for idx in _batches(len(self.images), batch_sizes(len(self.images))[0]):
            yield self.images[idx]

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = None


def _shape(model: onnx.ModelProto, name: str) -> list[int | str] | None:
    for info in (*model.graph.value_info, *model.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return [d.dim_value or d.dim_param or "?" for d in info.type.tensor_type.shape.dim]
    return None


def stem_nodes(model: onnx.ModelProto) -> list[str]:
    """The network's stem stage: the Conv nodes reading a graph input, then the Convs that follow them at
    the same (known) resolution without widening the channels (e.g. Lite0's first depthwise + project).

    These full-resolution, few-channel layers are the most sensitive to INT8 and gain least from it.
    Needs the shapes onnx shape inference writes (``quant_pre_process``); unknown shapes stop the walk.
    """
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    stem = [n for n in convs if n.input and n.input[0] in inputs]
    if len(stem) != 1:
        return [n.name for n in stem]
    out = _shape(model, stem[0].output[0])
    names = [stem[0].name]
    for node in convs[convs.index(stem[0]) + 1 :]:
        src, dst = _shape(model, node.input[0]), _shape(model, node.output[0])
        known = out and src and dst and "?" not in out[1:] and len(src) == len(dst) == len(out)
        if not known or dst[2:] != out[2:] or src[2:] != out[2:] or dst[1] > src[1]:  # type: ignore[index,operator]  # `known` checked out/src/dst; channel dims are ints
            break
        names.append(node.name)
    return names


def quantize_int8(
    src: str | Path, dst: str | Path, calibration: np.ndarray, input_name: str, float_stem: bool = True
) -> str:
    """Static QDQ INT8 (uint8 activations, int8 per-channel weights, MinMax) calibrated on real images.

    Runs onnxruntime's ``quant_pre_process`` (basic optimization + onnx shape inference) first, as
    onnxruntime recommends; falls back to onnx shape inference alone if that fails. ``float_stem`` keeps the
    Conv fed by the input in float (see the module docstring). Returns a description.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib = _check_images(calibration, "calibration")
    reader_cls = type("MedTuneCalibration", (_Calibration, CalibrationDataReader), {})
    with tempfile.TemporaryDirectory(prefix="medtune-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # onnx shape inference is enough for CNNs; ORT's symbolic pass (for transformers) leaves
            # sym_shape_infer_temp.onnx in the working directory when it cannot infer every shape
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001 - symbolic shape inference does not cover every graph
            onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(src))), str(prepared))
        excluded = stem_nodes(onnx.load(str(prepared), load_external_data=False)) if float_stem else []
        try:
            quantize_static(
                str(prepared),
                str(dst),
                reader_cls(calib, input_name),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded,
                # ranges = moving average of per-batch min/max: a few outlier images do not stretch them
                extra_options={"CalibMovingAverage": True},
            )
        except Exception as err:  # noqa: BLE001 - report any quantizer failure as one line
            raise MedTuneError(f"INT8 quantization failed: {_one_line(err)}", dst) from err
    stem = f"; float stem: {', '.join(excluded)}" if excluded else ""
    return (
        "onnxruntime.quantization.quantize_static (QDQ, U8 activations, S8 per-channel weights, "
        f"moving-average MinMax{stem})"
    )


# ---------------------------------------------------------------------------------------------- derive


def derive_precision(
    onnx_fp32: str | Path,
    out_dir: str | Path,
    precision: str,
    samples: np.ndarray,
    reference: np.ndarray,
    sidecar: dict[str, Any],
    tolerance: dict[str, float] | None = None,
    calibration: np.ndarray | None = None,
    validation: ValidationSet | None = None,
    max_metric_drop: float | None = None,
    calibration_source: str | None = None,
) -> PrecisionReport:
    """Build the ``precision`` (fp16/int8) model from a validated fp32 export and install it in ``out_dir``.

    ``samples`` are the real parity images and ``reference`` the fp32 PyTorch outputs on them; INT8 is
    calibrated on ``calibration`` (default: ``samples``). ``sidecar`` is the fp32 model's full sidecar; the new
    one gets ``export.precision``, ``export.parity`` (vs PyTorch), ``export.fp32_parity`` and, for INT8,
    ``export.calibration``. Raises :class:`PrecisionParityError` (one line, with the numbers) beyond
    ``tolerance`` (defaults: :data:`TOLERANCES`); ``out_dir`` is then left untouched. With ``validation``, the
    task metric of fp32 and derived ONNX on it is compared too (``export.metric_delta``); a drop beyond
    ``max_metric_drop`` (default :data:`MAX_METRIC_DROP` for the metric) raises the same way.
    """
    start = time.perf_counter()
    if precision not in DERIVED:
        raise MedTuneError(f"unknown derived precision {precision!r}; choose one of {', '.join(DERIVED)}")
    src = Path(onnx_fp32)
    if not src.is_file():
        raise MedTuneError("fp32 ONNX model not found", src)
    samples = _check_images(samples, "samples")
    reference = np.asarray(reference, dtype=np.float32)
    if reference.shape[0] != samples.shape[0]:
        raise MedTuneError(f"reference has {reference.shape[0]} outputs for {samples.shape[0]} samples")
    tol = {**TOLERANCES[precision], **(tolerance or {})}
    calib = samples if calibration is None else calibration
    input_name = str(sidecar.get("input", {}).get("name") or "image")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise MedTuneError("export destination exists and is not a folder", out_dir)
    target = out_dir / ONNX_NAME
    tmp = _temp_dir_next_to(out_dir)
    try:
        built = tmp / f"derived-{precision}.onnx"
        if precision == "int8":
            converter = quantize_int8(src, built, calib, input_name)
        else:
            converter = to_fp16(src, built)
        check_onnx_file(built, target)
        parity = onnx_parity(built, samples, reference, input_name, tol["atol"], tol["rtol"])
        prob_change = _max_prob_change(built, samples, reference, input_name, sidecar)
        ok, why = _gate(precision, parity, tol)
        if not ok:
            numbers = describe(precision, parity, prob_change)
            message = f"{precision} parity check failed ({why}), nothing written: {numbers}"
            raise PrecisionParityError(message, target, parity)
        metric = None
        if validation is not None:
            metric = metric_delta(src, built, precision, validation, input_name, max_metric_drop)
            if not metric.passed:
                message = f"{precision} model loses too much accuracy, nothing written: {metric.describe()}"
                raise PrecisionParityError(message, target, parity)
        source = calibration_source or ("parity images" if calibration is None else "caller's images")
        full = _derived_sidecar(sidecar, precision, parity, prob_change, tol, converter, len(calib), src, source)
        if metric is not None:
            full["export"]["metric_delta"] = metric.to_dict()
        final = tmp / ONNX_NAME
        embed_sidecar(built, final, full)
        digest = sha256_file(final)
        (tmp / SIDECAR_NAME).write_text(json.dumps({**full, "onnx_sha256": digest}, indent=2) + "\n", encoding="utf-8")
        previous = install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PrecisionReport(
        onnx_path=target,
        sidecar_path=out_dir / SIDECAR_NAME,
        previous_version=previous,
        precision=precision,
        parity=parity,
        max_prob_change=prob_change,
        tolerance=tol,
        n_calibration=len(calib) if precision == "int8" else None,
        converter=converter,
        file_size_bytes=target.stat().st_size,
        fp32_size_bytes=src.stat().st_size,
        onnx_sha256=digest,
        seconds=time.perf_counter() - start,
        metric=metric,
    )


# ---------------------------------------------------------------------------------------------- metric gate


def metric_delta(
    fp32_path: Path,
    derived_path: Path,
    precision: str,
    validation: ValidationSet,
    input_name: str = "image",
    max_drop: float | None = None,
) -> MetricDelta:
    """The validation metric (AUC / Dice) of both ONNX models through onnxruntime CPU, and whether it held."""
    if not validation.images or len(validation.images) != len(validation.labels):
        raise MedTuneError(f"the {validation.split} split has no labelled images for the metric gate")
    name = validation.metric
    limit = MAX_METRIC_DROP[name] if max_drop is None else float(max_drop)
    values = [validation_metric(path, validation, input_name) for path in (fp32_path, derived_path)]
    return MetricDelta(name, validation.split, len(validation.images), values[0], values[1], precision, limit)


def validation_metric(path: Path, validation: ValidationSet, input_name: str = "image") -> float:
    """AUC (classification; one-vs-rest macro for > 2 classes) or mean foreground Dice of one ONNX model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    from medtune.evaluate.metrics import auc  # the report's AUC (torch-free)
    from medtune.evaluate.segmentation import case_mean_dice  # the report's Dice (torch-free)

    if validation.task == "classification":
        images = np.stack(validation.images).astype(np.float32)
        logits = np.concatenate([predict(images[idx]) for idx in _batches(len(images), 8)])
        value = auc(np.asarray(validation.labels), _activate(logits, "softmax"), validation.positive_class)
        if not np.isfinite(value):
            raise MedTuneError(f"the {validation.split} split holds one class only; AUC is undefined")
        return value
    scores = []
    for image, label in zip(validation.images, validation.labels, strict=True):
        if validation.roi_size is not None:
            from medtune.runtime.sliding_window import sliding_window

            roi, mode = validation.roi_size, validation.mode
            logits = sliding_window(predict, image, roi, overlap=validation.overlap, mode=mode, sw_batch_size=1)
        else:
            logits = predict(image[None])[0]
        label_map = np.asarray(label).reshape(logits.shape[1:])
        scores.append(case_mean_dice(np.argmax(logits, axis=0), label_map, range(1, logits.shape[0])))
    return float(np.nanmean(scores)) if not np.all(np.isnan(scores)) else float("nan")


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    if arr.ndim < 3 or arr.shape[0] == 0:
        raise MedTuneError(f"{what} must be (N, C, *spatial) with N >= 1, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MedTuneError(f"{what} contain NaN or inf")
    return arr


def _gate(precision: str, parity: ParityResult, tol: dict[str, float]) -> tuple[bool, str]:
    """Whether the derived model passes, and the rule applied (for the error message)."""
    if precision == "fp16":
        return parity.passed, "max abs error beyond allowed"
    if parity.argmax_agreement is not None:
        need = tol["min_argmax_agreement"]
        return parity.argmax_agreement >= need, f"argmax agreement {parity.argmax_agreement:.2%} < {need:.0%}"
    limit = tol["max_rel_error_single_channel"]
    return parity.max_rel_error <= limit, f"max rel error {parity.max_rel_error:.3g} > {limit:g}"


def _max_prob_change(
    path: Path, samples: np.ndarray, reference: np.ndarray, input_name: str, sidecar: dict[str, Any]
) -> float | None:
    """Largest change of the output probability (the sidecar's activation over the channel axis), or None."""
    import onnxruntime as ort

    activation = (sidecar.get("postprocessing") or {}).get("activation", "softmax")
    if activation not in ("softmax", "sigmoid") or reference.ndim < 2:
        return None
    if activation == "softmax" and reference.shape[1] < 2:
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = 0.0
    for idx in _batches(len(samples), batch_sizes(len(samples))[0]):
        got = session.run(None, {input_name: samples[idx]})[0]
        worst = max(worst, float(np.abs(_activate(got, activation) - _activate(reference[idx], activation)).max()))
    return worst


def _activate(x: np.ndarray, activation: str) -> np.ndarray:
    """The runtime's own softmax / sigmoid over the channel axis, in float64."""
    from medtune.runtime.model import sigmoid, softmax

    x = x.astype(np.float64)
    return sigmoid(x) if activation == "sigmoid" else softmax(x, axis=1)


def _parity_dict(parity: ParityResult, prob_change: float | None, tol: dict[str, float]) -> dict[str, Any]:
    """The parity entry of a derived model (``passed`` is the precision's gate, it was written only if passed)."""
    return {
        **parity.to_dict(),
        "passed": True,
        "max_prob_change": prob_change,
        "gate": dict(tol),
        "reference": "fp32 pytorch",
    }


def describe(precision: str, parity: ParityResult, prob_change: float | None) -> str:
    """One line with the numbers that matter for ``precision``."""
    prob = "" if prob_change is None else f", max probability change {prob_change:.3g}"
    if precision == "fp16":
        return parity.describe() + prob
    agree = "" if parity.argmax_agreement is None else f"argmax agreement {parity.argmax_agreement:.2%}, "
    sizes = " and ".join(str(b) for b in parity.batch_sizes)
    return (
        f"{agree}max abs error {parity.max_abs_error:.3g} (max|torch| {parity.max_abs_torch:.3g}), max rel error "
        f"{parity.max_rel_error:.3g}{prob}, on {parity.n_samples} samples at batch sizes {sizes}"
    )


def _derived_sidecar(
    sidecar: dict[str, Any],
    precision: str,
    parity: ParityResult,
    prob_change: float | None,
    tol: dict[str, float],
    converter: str,
    n_calibration: int,
    src: Path,
    calibration_source: str = "validation images",
) -> dict[str, Any]:
    """The fp32 sidecar with the export section updated for the derived precision (no sha: recomputed)."""
    out = copy.deepcopy({k: v for k, v in sidecar.items() if k != "onnx_sha256"})
    export = dict(out.get("export") or {})
    fp32_parity = export.pop("parity", None)
    export["precision"] = precision
    export["converter"] = converter
    export["parity"] = _parity_dict(parity, prob_change, tol)
    if fp32_parity is not None:
        export["fp32_parity"] = fp32_parity
    if precision == "int8":
        export["calibration"] = {
            "n_samples": n_calibration,
            "method": "minmax-moving-average",
            "source": calibration_source,
        }
    export["derived_from"] = {"precision": "fp32", "onnx_sha256": sha256_file(src)}
    out["export"] = export
    return out
