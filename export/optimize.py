"""Derived precisions of a validated fp32 ONNX export: graph optimization, FP16 and static INT8 (QDQ).

Every derived model is checked against the fp32 *PyTorch* reference on the same real samples the fp32
export was validated on, and written with the exporter's atomic temp-folder-then-move install (a previous
model is kept under ``.versions/``); on any failure ``out_dir`` is left as it was.

- INT8 (the CPU deployment format): static QDQ, uint8 activations / int8 per-channel weights, MinMax
  calibration on real preprocessed images (``quantize_static`` after ``quant_pre_process``). Measured 2.9x
  faster than fp32 on CPU for resnet18 (S8S8 no faster, ``quantize_dynamic`` slower). Gate: argmax
  agreement with PyTorch >= 0.9 (max relative error <= 0.1 for single-channel outputs); the largest
  change in the output probability (softmax/sigmoid) is reported.
- FP16 (for GPU / TensorRT; it runs on CPU but slower): float16 weights and activations with float32
  inputs/outputs (``onnxruntime.transformers.float16``, else ``onnxconverter_common``). Gate:
  max |a - b| <= 1e-2 + 1e-2 * max|torch|.

torch is not imported here.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

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

DERIVED = ("fp16", "int8")
#: default gates per precision (see the module docstring)
TOLERANCES: dict[str, dict[str, float]] = {
    "fp16": {"atol": 1e-2, "rtol": 1e-2},
    "int8": {"atol": 0.0, "rtol": 0.0, "min_argmax_agreement": 0.9, "max_rel_error_single_channel": 0.1},
}
MIN_CALIBRATION = 32


class PrecisionParityError(ExportParityError):
    """A derived-precision model (fp16/int8) strays too far from the fp32 PyTorch reference."""


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable view (paths as strings)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("parity", "fp32")}
        out["parity"] = _parity_dict(self.parity, self.max_prob_change, self.tolerance)
        out["fp32"] = None if self.fp32 is None else self.fp32.to_dict()
        for key in ("onnx_path", "sidecar_path", "previous_version"):
            out[key] = None if out[key] is None else str(out[key])
        return out

    def summary(self) -> str:
        """One short paragraph for printing."""
        calib = f", calibrated on {self.n_calibration} real images" if self.n_calibration else ""
        kept = f" Previous version kept in {self.previous_version}." if self.previous_version else ""
        fp32 = f" fp32 export validated first: {self.fp32.parity.describe()}." if self.fp32 is not None else ""
        return (
            f"Exported {self.precision} {self.onnx_path} ({self.file_size_bytes / 1e6:.2f} MB vs fp32 "
            f"{self.fp32_size_bytes / 1e6:.2f} MB, {self.converter}{calib}, {self.seconds:.1f} s). Parity vs fp32 "
            f"PyTorch with onnxruntime CPU: {describe(self.precision, self.parity, self.max_prob_change)}: passed."
            f"{fp32} "
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
    """The converters append the input Casts last; onnx.checker (and other runtimes) need nodes in order."""
    produced = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:  # subgraph captures or a cycle: leave the rest as they were
            ordered += pending
            break
        for node in ready:
            ordered.append(node)
            produced.update(node.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    del model.graph.node[:]
    model.graph.node.extend(ordered)
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


def quantize_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, input_name: str) -> str:
    """Static QDQ INT8 (uint8 activations, int8 per-channel weights, MinMax) calibrated on real images.

    Runs onnxruntime's ``quant_pre_process`` (basic optimization + onnx shape inference) first, as
    onnxruntime recommends; falls back to onnx shape inference alone if that fails. Returns a description.
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
            )
        except Exception as err:  # noqa: BLE001 - report any quantizer failure as one line
            raise MedTuneError(f"INT8 quantization failed: {_one_line(err)}", dst) from err
    return "onnxruntime.quantization.quantize_static (QDQ, U8 activations, S8 per-channel weights, MinMax)"


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
) -> PrecisionReport:
    """Build the ``precision`` (fp16/int8) model from a validated fp32 export and install it in ``out_dir``.

    ``samples`` are the real parity images and ``reference`` the fp32 PyTorch outputs on them; INT8 is
    calibrated on ``calibration`` (default: ``samples``). ``sidecar`` is the fp32 model's full sidecar; the new
    one gets ``export.precision``, ``export.parity`` (vs PyTorch), ``export.fp32_parity`` and, for INT8,
    ``export.calibration``. Raises :class:`PrecisionParityError` (one line, with the numbers) beyond
    ``tolerance`` (defaults: :data:`TOLERANCES`); ``out_dir`` is then left untouched.
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
        full = _derived_sidecar(sidecar, precision, parity, prob_change, tol, converter, len(calib), src)
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
    )


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
    x = x.astype(np.float64)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


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
        export["calibration"] = {"n_samples": n_calibration, "method": "minmax", "source": "validation images"}
    export["derived_from"] = {"precision": "fp32", "onnx_sha256": sha256_file(src)}
    out["export"] = export
    return out
