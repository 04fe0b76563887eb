"""The OpenVINO runtime behind the small part of onnxruntime's session interface MedTune uses (torch-free).

Used for ``--provider openvino`` when onnxruntime has no OpenVINO execution provider (the ``onnxruntime-openvino``
wheel) but the ``openvino`` package is installed (``pip install "medtune[openvino]"``): it reads the same
``model.onnx``. Inference precision is pinned to FP32 — OpenVINO's CPU plugin otherwise picks bf16 on CPUs that
have it, which is faster but is not the model that passed the export's parity check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtune.errors import one_line

NAME = "OpenVINO"


@dataclass(frozen=True)
class _Port:
    name: str
    shape: list[Any]  # ints, or None for a dynamic dimension (onnxruntime gives a string there)


def available() -> tuple[bool, str]:
    """Is the ``openvino`` package importable (and its CPU plugin present)? With a reason when not."""
    try:
        import openvino as ov
    except ImportError:
        return False, 'the openvino package is not installed (pip install "medtune[openvino]")'
    try:
        devices = ov.Core().available_devices
    except Exception as exc:  # noqa: BLE001 - a broken install: say so, run elsewhere
        return False, f"openvino is installed but unusable ({one_line(exc, 120)})"
    if "CPU" not in devices:
        return False, f"openvino has no CPU device (devices: {', '.join(devices) or 'none'})"
    return True, f"openvino {ov.__version__.split('-')[0]}"


def version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return str(ov.__version__.split("-")[0])


class OpenVinoSession:
    """``get_inputs()``, ``get_outputs()``, ``get_providers()`` and ``run(names, feeds)`` over an OpenVINO model."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(onnx_path))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()
        self._inputs = [_Port(p.get_any_name(), _dims(p.get_partial_shape())) for p in model.inputs]
        self._outputs = [_Port(p.get_any_name(), _dims(p.get_partial_shape())) for p in model.outputs]

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [NAME]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer({name: np.ascontiguousarray(x) for name, x in feeds.items()})
        by_name = {}
        for port, value in results.items():
            for name in port.get_names():
                by_name[name] = value
        names = output_names or [o.name for o in self._outputs]
        return [np.array(by_name[n], copy=True) for n in names]


def _dims(shape: Any) -> list[Any]:
    return [None if d.is_dynamic else int(d.get_length()) for d in shape]
