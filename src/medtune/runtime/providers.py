"""onnxruntime execution-provider choice (auto | cpu | cuda | tensorrt) with CPU fallback (torch-free).

``onnxruntime-gpu`` lists the CUDA and TensorRT providers even on machines without a GPU, so
:func:`gpu_available` also checks for an NVIDIA device. Every choice comes with a one-line message
saying which provider is used and why.
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

from medtune.errors import MedTuneError

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CHOICES = ("auto", "cpu", "cuda", "tensorrt")
_ALIASES = {"trt": "tensorrt", "gpu": "cuda", TRT.lower(): "tensorrt", CUDA.lower(): "cuda", CPU.lower(): "cpu"}
_SHORT = {TRT: "TensorRT", CUDA: "CUDA", CPU: "CPU"}
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
    providers, message = select_providers(provider, cache_dir=cache_dir, device_id=device_id, fp16=fp16)
    wanted = provider_name(providers[0])
    if wanted != CPU:
        _prepare_gpu(providers)
        try:
            session = ort.InferenceSession(str(onnx_path), sess_options=session_options(threads), providers=providers)
        except Exception as exc:  # noqa: BLE001 - any GPU failure: retry on CPU
            message = f"{_SHORT[wanted]} session failed ({_first_line(exc)}); using CPU"
        else:
            used = session.get_providers()[0]
            if used != wanted:
                message = f"{message}; but onnxruntime could not start {_SHORT[wanted]} and runs on {_SHORT[used]}"
            return session, used, message
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=session_options(threads), providers=[CPU])
    except Exception as exc:  # noqa: BLE001 - a corrupt/unsupported model becomes a one-line error
        raise MedTuneError(f"onnxruntime cannot load this model ({_first_line(exc)})", onnx_path) from exc
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line[:200]
