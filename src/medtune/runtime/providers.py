"""Execution-provider choice (auto | cpu | cuda | tensorrt | openvino) with CPU fallback (torch-free).

The provider names (:data:`CHOICES`) are :data:`medtune.names.PROVIDERS` (their owner: the CLI, the Slicer Run
panel and the docs use that list).
``onnxruntime-gpu`` lists the CUDA and TensorRT providers even on machines without a GPU, so
:func:`gpu_available` also checks for an NVIDIA device. OpenVINO runs through onnxruntime's OpenVINO execution
provider when this onnxruntime has it (the ``onnxruntime-openvino`` build), else through the ``openvino`` package
(:mod:`medtune.runtime.openvino_session`), always behind a parity check against onnxruntime's CPU provider on
the same file. Without a GPU, ``auto`` measures OpenVINO against onnxruntime CPU once per model (where OpenVINO is
installed) and caches the choice next to the model (``<model>.provider-choice.json``). Every choice comes with
a one-line message saying which provider is used and why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import onnxruntime as ort

from medtune import names
from medtune.errors import MedTuneError, one_line

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
OPENVINO_EP = "OpenVINOExecutionProvider"
OPENVINO = "OpenVINO"  # the openvino runtime package itself (medtune.runtime.openvino_session)
CHOICES = names.PROVIDERS
_ALIASES = {"trt": "tensorrt", "gpu": "cuda", "ov": "openvino", TRT.lower(): "tensorrt", CUDA.lower(): "cuda",
            CPU.lower(): "cpu", OPENVINO_EP.lower(): "openvino"}  # fmt: skip
_SHORT = {TRT: "TensorRT", CUDA: "CUDA", CPU: "CPU", OPENVINO_EP: "OpenVINO", OPENVINO: "OpenVINO"}
CHOICE_FORMAT = "medtune.provider_choice/1"
#: OpenVINO must beat onnxruntime CPU by this factor for ``auto`` to pick it (noise on a shared machine)
AUTO_MARGIN = 0.9
#: parity of OpenVINO vs onnxruntime CPU on the same file: |a - b| <= atol + rtol * max|b| (the export's defaults)
PARITY_ATOL, PARITY_RTOL = 1e-4, 1e-3
#: INT8 models (OpenVINO's and onnxruntime's INT8 kernels round differently): the export's INT8 gate
INT8_PARITY = {"max_rel_error": 0.1, "min_argmax_agreement": 0.9}
DEFAULT_TRT_CACHE = Path.home() / ".cache" / "medtune" / "trt"

ProviderList = list[Any]  # provider names or (name, options) tuples, as InferenceSession takes them


@lru_cache(maxsize=1)
def gpu_available() -> tuple[bool, str]:
    """Is an NVIDIA GPU usable? Cheap and torch-free: the driver's /proc entry, else libcuda's device count."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True, f"NVIDIA GPU found ({len(list(gpus.iterdir()))} in /proc/driver/nvidia/gpus)"
    n, why = _cuda_device_count()
    if n > 0:
        return True, f"NVIDIA GPU found ({n} CUDA device(s) via the driver library)"
    where = "no /proc/driver/nvidia, " if sys.platform.startswith("linux") else ""
    return False, f"no NVIDIA GPU found ({where}{why})"


def _cuda_device_count() -> tuple[int, str]:
    """Number of CUDA devices from the driver library (libcuda / nvcuda), and a reason when it is 0."""
    names = ["nvcuda.dll"] if os.name == "nt" else ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
    lib = None
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "CUDA driver library not loadable"
    try:
        if lib.cuInit(0) != 0:
            return 0, "CUDA driver found but cuInit failed"
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0, "CUDA driver found but cuDeviceGetCount failed"
    except (AttributeError, OSError):
        return 0, "CUDA driver library is unusable"
    return count.value, "CUDA driver reports no devices"


def normalize_choice(requested: str) -> str:
    """``auto|cpu|cuda|tensorrt`` (case-insensitive; also ``trt``, ``gpu`` and full provider names)."""
    choice = str(requested).strip().lower()
    choice = _ALIASES.get(choice, choice)
    if choice not in CHOICES:
        raise MedTuneError(f"unknown provider {requested!r} (choose one of: {', '.join(CHOICES)})")
    return choice


def select_providers(
    requested: str = "auto",
    *,
    cache_dir: str | Path | None = None,
    device_id: int = 0,
    fp16: bool = False,
) -> tuple[ProviderList, str]:
    """Providers (with options) for ``InferenceSession`` and a one-line message explaining the choice.

    ``auto`` prefers TensorRT > CUDA > CPU, GPU providers only when :func:`gpu_available` says so.
    A GPU provider that cannot be used falls back to CPU (or TensorRT to CUDA) with the reason.
    """
    choice = normalize_choice(requested)
    if choice == "cpu":
        return [CPU], "CPU requested; using CPU"
    if choice == "openvino":  # create_session opens it (it needs the model for the parity check)
        return [CPU], "OpenVINO requested; onnxruntime CPU is its fallback"
    built = set(ort.get_available_providers())
    has_gpu, gpu_why = gpu_available()
    label = "auto" if choice == "auto" else f"{_SHORT[TRT if choice == 'tensorrt' else CUDA]} requested but"
    if not has_gpu:
        prefix = "auto: " if choice == "auto" else f"{label} "
        return [CPU], f"{prefix}{gpu_why}; using CPU"
    if CUDA not in built:
        prefix = "auto: GPU found but" if choice == "auto" else label
        return [CPU], f"{prefix} this onnxruntime has no CUDA provider (install onnxruntime-gpu); using CPU"
    cuda = (CUDA, {"device_id": int(device_id)})
    if choice == "cuda" or (choice == "auto" and TRT not in built):
        return [cuda, CPU], f"{'auto' if choice == 'auto' else 'CUDA requested'}: {gpu_why}; using CUDA"
    if TRT not in built:
        return [cuda, CPU], f"{label} this onnxruntime has no TensorRT provider; using CUDA"
    trt = (TRT, _trt_options(cache_dir, device_id, fp16))
    head = "auto" if choice == "auto" else "TensorRT requested"
    return [trt, cuda, CPU], f"{head}: {gpu_why}; using TensorRT (engine cache {trt[1]['trt_engine_cache_path']})"


def _trt_options(cache_dir: str | Path | None, device_id: int, fp16: bool) -> dict[str, Any]:
    path = Path(cache_dir).expanduser() if cache_dir else DEFAULT_TRT_CACHE
    return {
        "device_id": int(device_id),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(path),
        "trt_fp16_enable": bool(fp16),
    }


def provider_name(entry: Any) -> str:
    """The provider name of a providers-list entry (a name or a ``(name, options)`` tuple)."""
    return entry[0] if isinstance(entry, tuple) else str(entry)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options: full graph optimization, ``threads`` intra-op threads (``None``: onnxruntime's default)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        if int(threads) < 1:
            raise MedTuneError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
    return opts


def create_session(
    onnx_path: str | Path,
    provider: str = "auto",
    threads: int | None = None,
    cache_dir: str | Path | None = None,
    *,
    device_id: int = 0,
    fp16: bool = False,
) -> tuple[ort.InferenceSession, str, str]:
    """Open an ONNX file: ``(session, provider actually used, one-line message)``.

    A GPU session that fails to open is retried on CPU (the message says why). A file onnxruntime
    cannot load raises a one-line :class:`MedTuneError` naming it.
    """
    onnx_path = Path(onnx_path)
    choice = normalize_choice(provider)
    if choice == "openvino":
        return _openvino_or_cpu(onnx_path, threads)
    providers, message = select_providers(provider, cache_dir=cache_dir, device_id=device_id, fp16=fp16)
    if choice == "auto" and providers == [CPU]:  # no usable GPU: OpenVINO where installed and faster
        return _auto_cpu(onnx_path, threads, message)
    wanted = provider_name(providers[0])
    if wanted != CPU:
        _prepare_gpu(providers)
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=session_options(threads), providers=providers)
        except Exception as exc:  # noqa: BLE001 - any GPU failure: retry on CPU
            message = f"{_SHORT[wanted]} session failed ({one_line(exc)}); using CPU"
        else:
            used = session.get_providers()[0]
            if used != wanted:
                message = f"{message}; but onnxruntime could not start {_SHORT[wanted]} and runs on {_SHORT[used]}"
            return session, used, message
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=session_options(threads), providers=[CPU])
    except Exception as exc:  # noqa: BLE001 - a corrupt/unsupported model becomes a one-line error
        raise MedTuneError(f"onnxruntime cannot load this model ({one_line(exc)})", onnx_path) from exc
    return session, session.get_providers()[0], message


def _prepare_gpu(providers: ProviderList) -> None:
    """Create the TensorRT engine cache folder and preload CUDA/cuDNN from pip ``nvidia-*`` wheels (no torch)."""
    for entry in providers:
        if isinstance(entry, tuple) and "trt_engine_cache_path" in entry[1]:
            Path(entry[1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # noqa: BLE001 - best effort; session creation reports what is missing
            pass


# -- OpenVINO ----------------------------------------------------------------------------------------------


def openvino_status() -> tuple[str | None, str]:
    """How OpenVINO can run here: ``(OPENVINO_EP | OPENVINO | None, one-line reason)``."""
    if OPENVINO_EP in ort.get_available_providers():
        return OPENVINO_EP, "onnxruntime's OpenVINO execution provider"
    from medtune.runtime.openvino_session import available

    ok, why = available()
    return (OPENVINO, why) if ok else (None, f"OpenVINO not available: {why}")


def _cpu_session(onnx_path: Path, threads: int | None) -> Any:
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=session_options(threads), providers=[CPU])
    except Exception as exc:  # noqa: BLE001 - a corrupt/unsupported model becomes a one-line error
        raise MedTuneError(f"onnxruntime cannot load this model ({one_line(exc)})", onnx_path) from exc


def _open_openvino(onnx_path: Path, threads: int | None, how: str) -> Any:
    if how == OPENVINO_EP:
        opts: dict[str, Any] = {"device_type": "CPU", "precision": "FP32"}
        if threads is not None:
            opts["num_of_threads"] = int(threads)
        return ort.InferenceSession(str(onnx_path), sess_options=session_options(threads),
                                    providers=[(OPENVINO_EP, opts), CPU])  # fmt: skip
    from medtune.runtime.openvino_session import OpenVinoSession

    return OpenVinoSession(onnx_path, threads)


def _probe_input(session: Any, onnx_path: Path) -> tuple[str, Any]:
    """A seeded input for ``session``'s first input: fixed dims as declared, batch 1, dynamic spatial dims from the
    sidecar (sliding-window ROI, fixed ROI or spatial size), else 32."""
    import json

    import numpy as np

    inp = session.get_inputs()[0]
    spatial: list[int] = []
    sidecar = onnx_path.with_suffix(".json")
    if sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            spatial = [int(v) for v in ((meta.get("sliding_window") or {}).get("roi_size")
                       or (meta.get("input") or {}).get("fixed_roi") or meta.get("spatial_size") or [])]  # fmt: skip
        except (ValueError, TypeError, AttributeError):
            spatial = []
    shape = []
    for i, dim in enumerate(inp.shape):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif i == 0:
            shape.append(1)
        else:
            k = i - 2
            shape.append(spatial[k] if 0 <= k < len(spatial) else (1 if i == 1 else 32))
    return inp.name, np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _parity(ov_session: Any, cpu_session: Any, onnx_path: Path) -> tuple[bool, str, Any, Any]:
    """OpenVINO vs onnxruntime CPU on a probe input: ``(ok, one-line detail, probe name, probe array)``."""
    import numpy as np

    name, x = _probe_input(cpu_session, onnx_path)
    ref = np.asarray(cpu_session.run(None, {name: x})[0], dtype=np.float64)
    got = np.asarray(ov_session.run(None, {name: x})[0], dtype=np.float64)
    if got.shape != ref.shape:
        return False, f"output shape {list(got.shape)} vs {list(ref.shape)}", name, x
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if _precision(onnx_path) == "int8":  # two INT8 kernels round differently: the export's INT8 gate instead
        agree = float(np.mean(got.argmax(1) == ref.argmax(1))) if ref.ndim > 1 and ref.shape[1] > 1 else 1.0
        ok = err <= INT8_PARITY["max_rel_error"] * scale and agree >= INT8_PARITY["min_argmax_agreement"]
        return (
            ok,
            f"int8: max abs error {err:.2e} ({err / max(scale, 1e-12):.1%} of max), argmax agreement {agree:.1%}",
            name,
            x,
        )
    allowed = PARITY_ATOL + PARITY_RTOL * scale
    return err <= allowed, f"max abs error {err:.2e} vs allowed {allowed:.2e}", name, x


def _precision(onnx_path: Path) -> str:
    """``export.precision`` from the model's sidecar (``fp32`` when absent or unreadable)."""
    import json

    try:
        meta = json.loads(onnx_path.with_suffix(".json").read_text(encoding="utf-8"))
        return str((meta.get("export") or {}).get("precision") or "fp32")
    except (OSError, ValueError, AttributeError):
        return "fp32"


def _openvino_or_cpu(onnx_path: Path, threads: int | None) -> tuple[Any, str, str]:
    """``--provider openvino``: OpenVINO if it is installed, opens the model and matches onnxruntime CPU."""
    cpu = _cpu_session(onnx_path, threads)
    how, why = openvino_status()
    if how is None:
        return cpu, CPU, f"OpenVINO requested but {why.removeprefix('OpenVINO not available: ')}; using CPU"
    try:
        session = _open_openvino(onnx_path, threads, how)
        ok, detail, _, _ = _parity(session, cpu, onnx_path)
    except Exception as exc:  # noqa: BLE001 - any OpenVINO failure: CPU, with the reason
        return cpu, CPU, f"OpenVINO session failed ({one_line(exc)}); using CPU"
    if not ok:
        return cpu, CPU, f"OpenVINO output differs from onnxruntime CPU ({detail}); using CPU"
    return (
        session,
        (OPENVINO_EP if how == OPENVINO_EP else OPENVINO),
        f"OpenVINO requested; using OpenVINO ({why}; parity vs onnxruntime CPU: {detail})",
    )


def choice_cache_path(onnx_path: Path) -> Path:
    """Where ``auto`` keeps its measured OpenVINO-vs-CPU choice for a model: next to it."""
    return onnx_path.with_name(f"{onnx_path.stem}.provider-choice.json")


def _choice_key(onnx_path: Path, threads: int | None, how: str) -> dict[str, Any]:
    import hashlib
    import platform

    from medtune.runtime.openvino_session import version

    digest = hashlib.sha256()
    with open(onnx_path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {
        "format": CHOICE_FORMAT,
        "onnx_sha256": digest.hexdigest(),
        "threads": threads,
        "openvino_via": how,
        "onnxruntime": ort.__version__,
        "openvino": version(),
        "machine": f"{platform.machine()} {platform.processor()} x{os.cpu_count()}".strip(),
    }


def _read_choice(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in key.items()):
        return None
    return data if data.get("choice") in ("cpu", "openvino") else None


def _write_choice(path: Path, data: dict[str, Any]) -> str:
    from medtune.atomic import write_json_atomic

    try:
        write_json_atomic(path, data)
        return str(path)
    except OSError:  # a read-only model folder: keep it in the user's cache instead
        alt = Path.home() / ".cache" / "medtune" / "provider-choice" / f"{data['onnx_sha256']}.json"
        try:
            write_json_atomic(alt, data)
            return str(alt)
        except OSError:
            return "not cached (no writable place)"


def _times_ms(fn: Any, n: int) -> list[float]:
    import time

    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def measure_openvino_vs_cpu(onnx_path: Path, threads: int | None, ov_session: Any, cpu: Any) -> dict[str, Any]:
    """Parity and batch-1 latency of OpenVINO vs onnxruntime CPU on this model (interleaved rounds, medians)."""
    import statistics

    ok, detail, name, x = _parity(ov_session, cpu, onnx_path)
    result: dict[str, Any] = {"parity_ok": ok, "parity": detail, "probe_shape": list(x.shape)}
    if not ok:
        return {**result, "choice": "cpu"}
    runs = {"cpu": lambda: cpu.run(None, {name: x}), "openvino": lambda: ov_session.run(None, {name: x})}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(3):  # interleaved so other load on the machine hits both alike
        for key, fn in runs.items():
            fn()
            times[key] += _times_ms(fn, 3)
    cpu_ms, ov_ms = statistics.median(times["cpu"]), statistics.median(times["openvino"])
    result.update(cpu_ms=round(cpu_ms, 3), openvino_ms=round(ov_ms, 3))
    result["choice"] = "openvino" if ov_ms < AUTO_MARGIN * cpu_ms else "cpu"
    return result


def _auto_cpu(onnx_path: Path, threads: int | None, message: str) -> tuple[Any, str, str]:
    """``auto`` without a GPU: onnxruntime CPU, or OpenVINO where installed and measured faster for this model."""
    cpu = _cpu_session(onnx_path, threads)
    how, _why = openvino_status()
    if how is None:
        return cpu, CPU, message
    key = _choice_key(onnx_path, threads, how)
    cache = choice_cache_path(onnx_path)
    cached = _read_choice(cache, key)
    try:
        if cached is not None and cached["choice"] == "cpu":
            return cpu, CPU, f"{message} (OpenVINO measured slower for this model; cached in {cache.name})"
        session = _open_openvino(onnx_path, threads, how)
        if cached is None:
            cached = {**key, **measure_openvino_vs_cpu(onnx_path, threads, session, cpu)}
            where = _write_choice(cache, cached)
        else:
            where = str(cache)
            ok, detail, _, _ = _parity(session, cpu, onnx_path)  # still the same numbers
            if not ok:
                return cpu, CPU, f"{message} (OpenVINO output differs from onnxruntime CPU: {detail})"
    except Exception as exc:  # noqa: BLE001 - OpenVINO is an optimisation: any failure keeps onnxruntime CPU
        return cpu, CPU, f"{message} (OpenVINO failed: {one_line(exc)})"
    if cached["choice"] != "openvino":
        why = cached.get("parity") if not cached.get("parity_ok") else (
            f"{cached.get('openvino_ms')} vs {cached.get('cpu_ms')} ms")  # fmt: skip
        return cpu, CPU, f"{message} (OpenVINO not faster for this model: {why}; choice cached in {Path(where).name})"
    used = OPENVINO_EP if how == OPENVINO_EP else OPENVINO
    prefix = message.removesuffix("; using CPU")
    return (
        session,
        used,
        (
            f"{prefix}; OpenVINO measured faster for this model ({cached['openvino_ms']} vs "
            f"{cached['cpu_ms']} ms onnxruntime CPU, cached in {Path(where).name}); using OpenVINO"
        ),
    )
