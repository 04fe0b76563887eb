"""OpenVINO INT8 through NNCF post-training quantization (optional: extra ``nncf``), torch-free.

``nncf.quantize`` on the OpenVINO model read from a validated FP32 ONNX export, calibrated on the same images
as the exporter's QDQ INT8 (:func:`medtune.export.optimize.quantize_int8`), written as OpenVINO IR
(``.xml`` + ``.bin``). Measured against the QDQ file run by OpenVINO in ``benchmarks/nncf_int8.py`` (results in
``benchmarks/results/bench_nncf_int8.md``). NNCF keeps running statistics, so calibrating 3D volumes needs far less
memory than onnxruntime's calibrator (which holds every activation of every image). nncf needs no torch (it only
uses it when present).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medtune.errors import MedTuneError, one_line

INSTALL = 'pip install "medtune[nncf]"'


def nncf_status() -> tuple[bool, str]:
    """Are nncf and openvino importable? With a one-line reason when not."""
    for module in ("openvino", "nncf"):
        try:
            __import__(module)
        except ImportError:
            return False, f"the {module} package is not installed ({INSTALL})"
    import nncf

    return True, f"nncf {nncf.__version__}"


def quantize_nncf(src: str | Path, dst: str | Path, calibration: np.ndarray) -> str:
    """INT8 OpenVINO IR at ``dst`` (``.xml``) from the FP32 ONNX ``src``, calibrated on ``calibration`` (N, C, ...).

    Default NNCF preset (PERFORMANCE: symmetric int8 weights and activations), every image used for the
    statistics. Returns a description; raises :class:`MedTuneError` (one line) when nncf is absent or fails.
    """
    ok, why = nncf_status()
    if not ok:
        raise MedTuneError(f"NNCF INT8 unavailable: {why}")
    import nncf
    import openvino as ov

    calib = np.ascontiguousarray(np.asarray(calibration), dtype=np.float32)
    if calib.ndim < 3 or len(calib) == 0 or not np.isfinite(calib).all():
        raise MedTuneError(f"calibration images must be finite (N, C, *spatial), got shape {calib.shape}")
    dst = Path(dst)
    if dst.suffix != ".xml":
        raise MedTuneError("the NNCF INT8 model is OpenVINO IR: its path must end in .xml", dst)
    start = time.perf_counter()
    try:
        model = ov.Core().read_model(str(src))
        dataset = nncf.Dataset(list(calib), lambda x: x[None])
        quantized = nncf.quantize(model, dataset, subset_size=len(calib))
        dst.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(quantized, str(dst), compress_to_fp16=False)
    except Exception as err:  # noqa: BLE001 - report any quantizer failure as one line
        raise MedTuneError(f"NNCF INT8 quantization failed: {one_line(err)}", dst) from err
    return (
        f"nncf {nncf.__version__} quantize (OpenVINO IR, PERFORMANCE preset, {len(calib)} calibration images, "
        f"{time.perf_counter() - start:.1f} s)"
    )
