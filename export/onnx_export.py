"""Self-validating torch -> ONNX export: every export is checked against PyTorch on real inputs.

Steps (all inside a temp folder next to ``out_dir``; nothing is moved into ``out_dir`` unless every step
passes): export (TorchScript exporter by default, the dynamo exporter as fallback), ``onnx.checker``
with ``full_check``, a parity gate with onnxruntime on the caller's real samples at two batch sizes,
the sidecar embedded in the ONNX ``metadata_props``, then ``model.onnx`` + ``model.json`` (with the
file's sha256) moved into ``out_dir``; a previous export there is kept under ``out_dir/.versions/``.

Parity metrics (ONNX ``a`` vs PyTorch ``b``, over every sample and both batch sizes):

- ``max_abs_error`` = max |a - b|; the gate fails when it exceeds ``atol + rtol * max_abs_torch``
  (``max_abs_torch`` = max |b| over all outputs), i.e. ``numpy.allclose`` with the tolerance scaled by the
  output's magnitude rather than by each element (near-zero logits would make per-element ratios noise);
- ``max_rel_error`` = max over samples of max |a_s - b_s| / (max |b_s| + 1e-6): the worst error relative
  to that sample's output scale (reported, not gated);
- ``argmax_agreement`` = share of argmax decisions over the channel axis (classes per sample, or labels per
  voxel) that agree; reported (``None`` for single-channel outputs), not gated: a disagreement within
  tolerance is a near tie.

torch is imported lazily so ``medtune.export.sidecar`` stays importable without it.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

import medtune
from medtune.atomic import install_files
from medtune.errors import MedTuneError
from medtune.versions import versions

from .sidecar import FORMAT, METADATA_KEY, ONNX_NAME, SIDECAR_NAME, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger("medtune.export")

EXPORTERS = ("torchscript", "dynamo")
MAX_BATCH = 8
REL_EPS = 1e-6
# Noise from the exporters that says nothing about this model (deprecation; InstanceNorm has no running stats).
_SILENCED = (r".*legacy TorchScript-based ONNX export.*", r".*feature will be removed.*", r".*'instance_norm'.*")


class ExportParityError(MedTuneError):
    """The exported ONNX model does not reproduce PyTorch's outputs within tolerance."""

    def __init__(self, message: str, path: str | Path | None = None, parity: ParityResult | None = None):
        super().__init__(message, path)
        self.parity = parity


@dataclass
class ParityResult:
    """ONNX-vs-PyTorch agreement on the caller's samples (see the module docstring for the definitions)."""

    n_samples: int
    batch_sizes: list[int]
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    max_abs_torch: float
    allowed_abs_error: float
    argmax_agreement: float | None
    atol: float
    rtol: float
    provider: str = "CPUExecutionProvider"

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_error <= self.allowed_abs_error)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        """One line with the numbers and the tolerance."""
        agree = "" if self.argmax_agreement is None else f", argmax agreement {self.argmax_agreement:.2%}"
        sizes = " and ".join(str(b) for b in self.batch_sizes)
        return (
            f"max abs error {self.max_abs_error:.3g} vs allowed {self.allowed_abs_error:.3g} "
            f"(atol {self.atol:g} + rtol {self.rtol:g} x max|torch| {self.max_abs_torch:.3g}), "
            f"max rel error {self.max_rel_error:.3g}{agree}, on {self.n_samples} samples at batch sizes {sizes}"
        )


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well the ONNX model matches PyTorch."""

    onnx_path: Path
    sidecar_path: Path
    previous_version: Path | None
    exporter: str
    exporter_requested: str
    fallback_reason: str | None
    opset: int
    parity: ParityResult
    seconds: float
    export_seconds: float
    file_size_bytes: int
    onnx_sha256: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable view (paths as strings)."""
        out = asdict(self)
        out["parity"] = self.parity.to_dict()
        for key in ("onnx_path", "sidecar_path", "previous_version"):
            out[key] = None if out[key] is None else str(out[key])
        return out

    def summary(self) -> str:
        """One short paragraph for printing."""
        fallback = f" (fallback from {self.exporter_requested}: {self.fallback_reason})" if self.fallback_reason else ""
        kept = f" Previous version kept in {self.previous_version}." if self.previous_version else ""
        return (
            f"Exported {self.onnx_path} ({self.file_size_bytes / 1e6:.2f} MB, opset {self.opset}, "
            f"{self.exporter} exporter{fallback}, {self.seconds:.1f} s). Parity vs PyTorch with onnxruntime "
            f"{self.parity.provider}: {self.parity.describe()}: passed. Sidecar: {self.sidecar_path}.{kept}"
        )


# ---------------------------------------------------------------------------------------------- public API


def export_onnx(
    model: torch.nn.Module,
    sample_inputs: np.ndarray,
    out_dir: str | Path,
    sidecar: dict[str, Any],
    *,
    input_name: str = "image",
    output_name: str = "logits",
    dynamic_spatial: bool = False,
    opset: int = 18,
    exporter: str = "torchscript",
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportReport:
    """Export ``model`` to ``out_dir/model.onnx`` + ``model.json``, validated against PyTorch.

    ``sample_inputs`` are real preprocessed images ``(N, C, *spatial)``; every one is run through both
    PyTorch and onnxruntime (at two batch sizes). Raises :class:`ExportParityError` when the outputs differ
    beyond ``atol + rtol * max|torch|`` and :class:`MedTuneError` for bad inputs or a failed export/check;
    on any failure ``out_dir`` is left as it was.
    """
    start = time.perf_counter()
    samples = check_sample_inputs(sample_inputs)
    if exporter not in EXPORTERS:
        raise MedTuneError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    opts = _Options(input_name, output_name, dynamic_spatial, opset, exporter, atol, rtol)
    user_sidecar = caller_sidecar(sidecar, samples)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise MedTuneError("export destination exists and is not a folder", out_dir)
    torch_model, restore_training = _eval_cpu_fp32(model)
    try:
        reference = torch_outputs(torch_model, samples)
        tmp = _temp_dir_next_to(out_dir)
        try:
            report = _export_in(tmp, torch_model, samples, reference, out_dir, user_sidecar, opts)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if restore_training:
            model.train()
    report.seconds = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class _Options:
    input_name: str
    output_name: str
    dynamic_spatial: bool
    opset: int
    exporter: str
    atol: float
    rtol: float


def _export_in(
    tmp: Path,
    torch_model: torch.nn.Module,
    samples: np.ndarray,
    reference: np.ndarray,
    out_dir: Path,
    user_sidecar: dict[str, Any],
    o: _Options,
) -> ExportReport:
    """The export steps inside the temp folder ``tmp``; installs into ``out_dir`` only when all pass."""
    target = out_dir / ONNX_NAME
    t0 = time.perf_counter()
    raw, used, fallback, caught = run_exporter(
        torch_model, samples, tmp, o.input_name, o.output_name, reference.ndim, o.dynamic_spatial, o.opset, o.exporter
    )
    export_seconds = time.perf_counter() - t0
    check_onnx_file(raw, target)
    check_dynamic_input(raw, o.dynamic_spatial, target)
    parity = onnx_parity(raw, samples, reference, o.input_name, o.atol, o.rtol)
    if not parity.passed:
        hint = f"; exporter warned: {caught[0]}" if caught else ""
        raise ExportParityError(f"ONNX parity check failed, nothing written: {parity.describe()}{hint}", target, parity)
    opset_written = written_opset(raw)
    full = build_sidecar(
        user_sidecar,
        input_name=o.input_name,
        output_name=o.output_name,
        dynamic_spatial=o.dynamic_spatial,
        input_shape=samples.shape,
        output_shape=reference.shape,
        export_info=_export_info(opset_written, used, o.exporter, fallback, parity),
    )
    final = tmp / ONNX_NAME
    embed_sidecar(raw, final, full)
    digest = sha256_file(final)
    (tmp / SIDECAR_NAME).write_text(json.dumps({**full, "onnx_sha256": digest}, indent=2) + "\n", encoding="utf-8")
    previous = install(tmp, out_dir)
    return ExportReport(
        onnx_path=target,
        sidecar_path=out_dir / SIDECAR_NAME,
        previous_version=previous,
        exporter=used,
        exporter_requested=o.exporter,
        fallback_reason=fallback,
        opset=opset_written,
        parity=parity,
        seconds=0.0,
        export_seconds=export_seconds,
        file_size_bytes=target.stat().st_size,
        onnx_sha256=digest,
        warnings=caught,
    )


# ---------------------------------------------------------------------------------------------- inputs


def check_sample_inputs(sample_inputs: np.ndarray) -> np.ndarray:
    """Validate real sample inputs ``(N, C, *spatial)``: numeric, finite, not all constant; as float32."""
    arr = np.asarray(sample_inputs)
    if arr.dtype.kind not in "fiub":
        raise MedTuneError(f"sample_inputs must be numeric images, got dtype {arr.dtype}")
    if arr.ndim < 3 or arr.shape[0] == 0:
        raise MedTuneError(f"sample_inputs must be (N, C, *spatial) with N >= 1, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise MedTuneError("sample_inputs contain NaN or inf")
    flat = arr.reshape(arr.shape[0], -1)
    if np.all(flat.max(axis=1) == flat.min(axis=1)):
        raise MedTuneError(
            f"sample_inputs are constant images (every value of each sample equals e.g. {flat[0, 0]:g}): parity "
            "must be shown on real preprocessed images from the dataset"
        )
    return arr


def caller_sidecar(sidecar: dict[str, Any], samples: np.ndarray) -> dict[str, Any]:
    """A JSON-clean copy of the caller's sidecar, checked against the samples before any work is done."""
    if not isinstance(sidecar, dict):
        raise MedTuneError(f"sidecar must be a dict, got {type(sidecar).__name__}")
    try:
        out = json.loads(json.dumps(sidecar))
    except (TypeError, ValueError) as err:
        raise MedTuneError(f"sidecar is not JSON-serializable: {err}") from None
    out.pop("onnx_sha256", None)
    for key in ("input", "output"):
        if not isinstance(out.get(key, {}), dict):
            raise MedTuneError(f"sidecar[{key!r}] must be a JSON object")
    actual = {"channels": samples.shape[1], "spatial_dims": samples.ndim - 2}
    for key, value in actual.items():
        for where in (out, out.get("input", {})):
            if key in where and where[key] != value:
                raise MedTuneError(f"sidecar says {key} = {where[key]!r} but sample_inputs have {value}")
    roi = out.get("input", {}).get("fixed_roi")
    if roi is not None and list(roi) != list(samples.shape[2:]):
        raise MedTuneError(
            f"sidecar input.fixed_roi is {roi} but sample_inputs are {list(samples.shape[2:])}: a per-ROI "
            "export must be traced and checked at its ROI"
        )
    return out


def _eval_cpu_fp32(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """An eval-mode fp32 CPU model to export (a copy if ``model`` lives elsewhere); whether to restore train()."""
    import torch

    was_training = model.training
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32) for t in tensors):
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
        was_training = False  # the caller's model is untouched
    model.eval()
    return model, was_training


def _batches(n: int, size: int) -> Iterator[np.ndarray]:
    """Index arrays of ``size`` samples (the last may be shorter); samples repeat when ``size > n``."""
    if size > n:
        yield np.arange(size) % n
        return
    for lo in range(0, n, size):
        yield np.arange(lo, min(lo + size, n))


def batch_sizes(n: int) -> list[int]:
    """The two batch sizes parity is checked at: ``min(n, 8)`` and 1 (or 2 if the first is 1)."""
    first = min(n, MAX_BATCH)
    return [first, 1 if first > 1 else 2]


def torch_outputs(model: torch.nn.Module, samples: np.ndarray) -> np.ndarray:
    """PyTorch reference outputs for every sample (batches of up to 8), float32 numpy."""
    import torch

    outs = []
    with torch.no_grad():
        for idx in _batches(len(samples), batch_sizes(len(samples))[0]):
            try:
                out = model(torch.from_numpy(samples[idx]))
            except (RuntimeError, ValueError, TypeError, IndexError) as err:
                raise MedTuneError(
                    f"the PyTorch model fails on sample_inputs of shape {tuple(samples[idx].shape)} (is the spatial "
                    f"size valid for this network?): {_one_line(err)}"
                ) from err
            if not isinstance(out, torch.Tensor):
                raise MedTuneError(f"the model's forward returned {type(out).__name__}; export needs one tensor")
            outs.append(out.detach().float().numpy())
    ref = np.concatenate(outs)
    if not np.isfinite(ref).all():
        raise MedTuneError("PyTorch outputs on sample_inputs contain NaN or inf; cannot validate an export")
    return ref


# ---------------------------------------------------------------------------------------------- export


def run_exporter(
    model: torch.nn.Module,
    samples: np.ndarray,
    tmp: Path,
    input_name: str,
    output_name: str,
    output_ndim: int,
    dynamic_spatial: bool,
    opset: int,
    exporter: str,
) -> tuple[Path, str, str | None, list[str]]:
    """Export with ``exporter`` (TorchScript falls back to dynamo).

    Returns (ONNX path, exporter used, fallback reason or None, exporter warnings).
    """
    import torch

    example = torch.from_numpy(samples[next(_batches(len(samples), 2))])  # batch 2: no 0/1 specialization
    spatial = list(range(2, samples.ndim)) if dynamic_spatial else []
    fns = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}
    args = (model, example, input_name, output_name, output_ndim, spatial, opset)
    path = tmp / f"raw-{exporter}.onnx"
    try:
        return path, exporter, None, _with_warnings(fns[exporter], path, *args)
    except Exception as err:  # noqa: BLE001 - any exporter failure is reported or falls back
        reason = _one_line(err)
        if exporter != "torchscript":
            raise MedTuneError(f"{exporter} ONNX export failed: {reason}") from err
    logger.warning("TorchScript ONNX export failed (%s); falling back to the dynamo exporter", reason)
    path = tmp / "raw-dynamo.onnx"
    try:
        return path, "dynamo", reason, _with_warnings(_export_dynamo, path, *args)
    except Exception as err:  # noqa: BLE001
        raise MedTuneError(f"ONNX export failed: torchscript: {reason}; dynamo: {_one_line(err)}") from err


def _with_warnings(fn: Any, path: Path, *args: Any) -> list[str]:
    """Run an exporter, silencing known noise; other warnings are logged and returned (first lines, unique)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for pattern in _SILENCED:
            warnings.filterwarnings("ignore", message=pattern)
        fn(path, *args)
    messages = list(dict.fromkeys(_one_line(w.message) for w in caught))
    for msg in messages:
        logger.warning("ONNX exporter: %s", msg)
    return messages


def _export_torchscript(
    path: Path,
    model: Any,
    example: Any,
    input_name: str,
    output_name: str,
    output_ndim: int,
    spatial: list[int],
    opset: int,
) -> None:
    import torch

    in_axes = {0: "batch", **{a: f"dim{a}" for a in spatial}}
    out_axes = {0: "batch", **({a: f"dim{a}" for a in spatial} if output_ndim == example.ndim else {})}
    with _instance_norm_any_channels(opset):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: in_axes, output_name: out_axes},
            opset_version=opset,
            dynamo=False,
        )


@contextlib.contextmanager
def _instance_norm_any_channels(opset: int) -> Iterator[None]:
    """Let the TorchScript exporter write an affine-free ``instance_norm`` whose channel count it lost.

    torch's symbolic needs the channel count to make the constant scale/bias of ONNX
    ``InstanceNormalization``; after SwinUNETR's window reshapes with a dynamic batch axis it is unknown and the
    export fails ("instance_norm for unknown channel size"). This override builds them from the input's shape
    at run time (``ConstantOfShape(Shape(x)[1:2])``) in that case only; it is removed on exit.
    """
    import torch
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh
    from torch.onnx._internal.torchscript_exporter import symbolic_opset9

    def symbolic(g: Any, x: Any, weight: Any, bias: Any, mean: Any, var: Any, *rest: Any) -> Any:
        use_stats, _momentum, eps, _cudnn = rest
        known = sh._get_tensor_dim_size(x, 1) is not None
        if known or not all(sh._is_none(v) for v in (weight, bias, mean, var)):
            return symbolic_opset9.instance_norm(g, x, weight, bias, mean, var, *rest)
        sh.check_training_mode(sh._maybe_get_const(use_stats, "b"), "instance_norm")
        channels = g.op("Shape", x, start_i=1, end_i=2)
        ones = g.op("ConstantOfShape", channels, value_t=torch.tensor([1.0]))
        zeros = g.op("ConstantOfShape", channels, value_t=torch.tensor([0.0]))
        return g.op("InstanceNormalization", x, ones, zeros, epsilon_f=sh._get_const(eps, "f", "eps"))

    torch.onnx.register_custom_op_symbolic("::instance_norm", symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("::instance_norm", opset)


def _export_dynamo(
    path: Path,
    model: Any,
    example: Any,
    input_name: str,
    output_name: str,
    output_ndim: int,
    spatial: list[int],
    opset: int,
) -> None:
    import torch

    dims = {a: torch.export.Dim.DYNAMIC for a in [0, *spatial]}
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=[output_name],
        dynamic_shapes=(dims,),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )


def _one_line(obj: object, limit: int = 300) -> str:
    text = " ".join(str(obj).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------- checks


def check_onnx_file(path: Path, name_as: Path) -> None:
    """``onnx.checker.check_model`` with ``full_check`` (shape inference too); one-line error on failure."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise MedTuneError(f"onnx.checker rejected the export, nothing written: {_one_line(err)}", name_as) from err


def _input_dims(path: Path) -> list[int | str]:
    graph_input = onnx.load(str(path), load_external_data=False).graph.input[0]
    return [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]


def check_dynamic_input(path: Path, dynamic_spatial: bool, name_as: Path) -> None:
    """Fail unless the written input has a symbolic batch axis (and symbolic spatial axes if asked)."""
    dims = _input_dims(path)
    wanted = range(len(dims)) if dynamic_spatial else range(1)
    fixed = [i for i in wanted if i != 1 and not isinstance(dims[i], str)]
    if fixed:
        raise MedTuneError(
            f"the exporter fixed input axes {fixed} (input shape {dims}); they should be dynamic "
            "(spatial axes need a fully convolutional network)",
            name_as,
        )


def written_opset(path: Path) -> int:
    """The default-domain opset the ONNX file declares."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def onnx_parity(
    path: Path, samples: np.ndarray, reference: np.ndarray, input_name: str, atol: float, rtol: float
) -> ParityResult:
    """Run the ONNX model with onnxruntime (CPU) on every sample at two batch sizes and compare with ``reference``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n = len(samples)
    abs_err, rel_err, err_sum, n_values, agree, n_decisions = 0.0, 0.0, 0.0, 0, 0, 0
    for size in batch_sizes(n):
        for idx in _batches(n, size):
            try:
                got = session.run(None, {input_name: samples[idx]})[0]
            except Exception as err:  # noqa: BLE001 - e.g. a size the trace baked in: one line, nothing written
                raise ExportParityError(
                    f"the exported model fails in onnxruntime at batch size {len(idx)} ({_one_line(err)})", path
                ) from err
            want = reference[idx]
            if got.shape != want.shape:
                raise MedTuneError(f"onnxruntime output shape {got.shape} != PyTorch {want.shape}", path)
            diff = np.abs(got.astype(np.float64) - want)
            diff[~np.isfinite(diff)] = np.inf
            per_sample = diff.reshape(len(idx), -1).max(axis=1)
            scale = np.abs(want).reshape(len(idx), -1).max(axis=1)
            abs_err = max(abs_err, float(per_sample.max()))
            rel_err = max(rel_err, float((per_sample / (scale + REL_EPS)).max()))
            err_sum, n_values = err_sum + float(diff.sum()), n_values + diff.size
            if want.ndim >= 2 and want.shape[1] > 1:
                same = np.argmax(got, axis=1) == np.argmax(want, axis=1)
                agree, n_decisions = agree + int(same.sum()), n_decisions + same.size
    max_torch = float(np.abs(reference).max())
    return ParityResult(
        n_samples=n,
        batch_sizes=batch_sizes(n),
        max_abs_error=abs_err,
        mean_abs_error=err_sum / n_values,
        max_rel_error=rel_err,
        max_abs_torch=max_torch,
        allowed_abs_error=atol + rtol * max_torch,
        argmax_agreement=agree / n_decisions if n_decisions else None,
        atol=atol,
        rtol=rtol,
    )


# ---------------------------------------------------------------------------------------------- sidecar


def _versions() -> dict[str, str]:
    return versions(("torch", "onnx", "onnxruntime", "medtune"), suffix="_version")


def _export_info(opset: int, used: str, requested: str, fallback: str | None, parity: ParityResult) -> dict[str, Any]:
    info: dict[str, Any] = {"opset": opset, "exporter": used, "precision": "fp32", **_versions()}
    if fallback:
        info["fallback"] = {"requested": requested, "reason": fallback}
    info["created_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    info["parity"] = parity.to_dict()
    return info


def build_sidecar(
    user: dict[str, Any],
    *,
    input_name: str,
    output_name: str,
    dynamic_spatial: bool,
    input_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    export_info: dict[str, Any],
) -> dict[str, Any]:
    """The caller's sidecar with the export-owned fields filled in (``null`` in a shape = dynamic axis)."""
    out: dict[str, Any] = {"format": FORMAT, **{k: v for k, v in user.items() if k != "format"}}
    in_shape = [None, input_shape[1], *(None if dynamic_spatial else s for s in input_shape[2:])]
    spatial_out = dynamic_spatial and len(output_shape) == len(input_shape)
    out_shape = [None, *output_shape[1:2], *(None if spatial_out else s for s in output_shape[2:])]
    out["input"] = {
        **out.get("input", {}),
        "name": input_name,
        "dtype": "float32",
        "shape": in_shape,
        "channels": input_shape[1],
        "spatial_dims": len(input_shape) - 2,
        "dynamic_batch": True,
        "dynamic_spatial": dynamic_spatial,
    }
    out["output"] = {**out.get("output", {}), "name": output_name, "dtype": "float32", "shape": out_shape}
    out["export"] = export_info
    return out


def embed_sidecar(src: Path, dst: Path, sidecar: dict[str, Any]) -> None:
    """Copy ``src`` to ``dst`` with ``sidecar`` as JSON in ``metadata_props["medtune"]`` plus producer info."""
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps(sidecar, sort_keys=True)
    props["medtune_producer"] = f"medtune {medtune.__version__}"
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))


# ---------------------------------------------------------------------------------------------- install


def _temp_dir_next_to(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))


def install(tmp: Path, out_dir: Path) -> Path | None:
    """Move ``model.onnx`` then ``model.json`` from ``tmp`` into ``out_dir``; returns the kept previous version.

    The old files are linked into ``.versions`` first and then replaced atomically (:func:`medtune.atomic.
    install_files`), so ``out_dir`` never lacks a model; between the two renames a reader sees a sha256
    mismatch (detected), never a silent mix.
    """
    return install_files(tmp, (ONNX_NAME, SIDECAR_NAME), out_dir, keep_if=ONNX_NAME)
