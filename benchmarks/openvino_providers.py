"""torch eager vs onnxruntime CPU vs OpenVINO on the shipped 2D and 3D networks, FP32 and INT8, 1 and 2 threads.

One process, one input per model, the backends timed round-robin (``medtune.export.bench._round_robin``) so load
from other users of the machine hits them alike; ratios are computed within the run. Networks: EfficientNet-Lite0
2D (ImageNet weights, 128x128, 2 classes), the Model Zoo spleen UNet (``unet_zoo``) and SegResNet at 96^3 (random
weights: speed does not depend on the values). INT8 = onnxruntime static QDQ (``medtune.export.optimize``, the
exporter's own INT8, calibrated here on the benchmark's random inputs, so only its speed is meaningful); OpenVINO
runs that same QDQ file (its INT8 kernels) and the FP32 file with FP32 inference precision pinned.

    nice -n 10 .venv/bin/python benchmarks/openvino_providers.py [--models lite0_2d,unet_zoo_3d] [--repeats 10]

Writes benchmarks/results/bench_openvino_providers.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "lite0_2d": {"arch": "efficientnet_lite0", "pretrained": "imagenet-efficientnet-lite0", "dims": 2, "size": 128,
                 "task": "classification"},
    "unet_zoo_3d": {"arch": "unet_zoo", "pretrained": None, "dims": 3, "size": 96, "task": "segmentation"},
    "segresnet_3d": {"arch": "segresnet", "pretrained": None, "dims": 3, "size": 96, "task": "segmentation"},
}  # fmt: skip


def _build(name: str, tmp: Path) -> tuple[object, dict[str, Path], np.ndarray]:
    import torch

    from medtune.export import export_onnx
    from medtune.export.onnx_export import torch_outputs
    from medtune.export.optimize import derive_precision
    from medtune.weights import create_model

    spec = MODELS[name]
    torch.manual_seed(0)
    classes = 2 if spec["task"] == "classification" else 3
    net = create_model(spec["arch"], spec["pretrained"], 1, classes, spec["dims"], verbose=False).eval()
    shape = [1] + [spec["size"]] * spec["dims"]
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((4, *shape)).astype(np.float32)
    sidecar = {"task": spec["task"], "spatial_dims": spec["dims"], "channels": 1, "spatial_size": shape[1:],
               "labels": {str(i): f"class{i}" for i in range(classes)}}  # fmt: skip
    report = export_onnx(net, samples[:2], tmp / name / "fp32", sidecar, dynamic_spatial=spec["dims"] == 3)
    full = json.loads(report.sidecar_path.read_text())
    int8 = derive_precision(report.onnx_path, tmp / name / "int8", "int8", samples[:2], torch_outputs(net, samples[:2]),
                            full, tolerance={"atol": 1e9, "rtol": 1e9, "min_argmax_agreement": 0.0,
                                             "max_rel_error_single_channel": 1e9},
                            calibration=samples)  # fmt: skip
    return net, {"fp32": report.onnx_path, "int8": int8.onnx_path}, samples[:1]


def _bench_model(name: str, threads: int, repeats: int, tmp: Path) -> dict:
    import onnxruntime as ort
    import torch

    from medtune.export.bench import _ort_predict, _round_robin, _torch_predict
    from medtune.runtime.openvino_session import OpenVinoSession
    from medtune.runtime.providers import session_options

    net, paths, x = _build(name, tmp)
    torch.set_num_threads(threads)
    fns = {"torch-eager-fp32": _torch_predict(net)}
    for precision, path in paths.items():
        cpu = ort.InferenceSession(str(path), sess_options=session_options(threads),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
        fns[f"onnxruntime-{precision}"] = _ort_predict(cpu)
        ov = OpenVinoSession(path, threads)
        fns[f"openvino-{precision}"] = _ort_predict(ov)
    ref = {k: np.asarray(f(x), dtype=np.float64) for k, f in fns.items()}
    times = _round_robin(fns, x, repeats)
    rows = {}
    for key, t in times.items():
        base = ref["onnxruntime-int8" if key.endswith("int8") else "onnxruntime-fp32"]
        err = float(np.max(np.abs(ref[key] - base)) / max(1e-12, float(np.max(np.abs(base)))))
        rows[key] = {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "n": len(t),
                     "max_rel_diff_vs_onnxruntime_same_precision": err}  # fmt: skip
    fastest = min(rows, key=lambda k: rows[k]["median_ms"])
    ratios = {
        "openvino_fp32_vs_onnxruntime_fp32": rows["onnxruntime-fp32"]["median_ms"] / rows["openvino-fp32"]["median_ms"],
        "openvino_int8_vs_onnxruntime_int8": rows["onnxruntime-int8"]["median_ms"] / rows["openvino-int8"]["median_ms"],
        "onnxruntime_fp32_vs_torch": rows["torch-eager-fp32"]["median_ms"] / rows["onnxruntime-fp32"]["median_ms"],
    }
    return {"model": name, "threads": threads, "input_shape": list(x.shape), "backends": rows,
            "speedups_median": ratios, "fastest": fastest}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    import openvino
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS / "bench_openvino_providers.json"))
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="medtune-ovbench-") as tmp:
        for name in args.models.split(","):
            for threads in [int(t) for t in args.threads.split(",")]:
                start = time.time()
                results.append(_bench_model(name, threads, args.repeats, Path(tmp) / f"t{threads}"))
                print(f"{name} @ {threads} thread(s): {time.time() - start:.0f} s", file=sys.stderr)
    out = {
        "format": "medtune.bench_providers/1",
        "results": results,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "openvino": openvino.__version__},
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
        "note": "batch 1, medians of round-robin timings in one process; INT8 calibrated on random inputs (speed "
        "only); OpenVINO with INFERENCE_PRECISION_HINT=f32 on the FP32 file",
    }
    path = Path(args.out)
    from medtune.atomic import write_json_atomic

    write_json_atomic(path, out)
    head = (
        "| model | threads | torch fp32 ms | ORT fp32 ms | OpenVINO fp32 ms | ORT int8 ms | OpenVINO int8 ms "
        "| fastest |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        b = r["backends"]
        lines.append(f"| {r['model']} | {r['threads']} | {b['torch-eager-fp32']['median_ms']:.1f} | "
                     f"{b['onnxruntime-fp32']['median_ms']:.1f} | {b['openvino-fp32']['median_ms']:.1f} | "
                     f"{b['onnxruntime-int8']['median_ms']:.1f} | {b['openvino-int8']['median_ms']:.1f} | "
                     f"{r['fastest']} |")  # fmt: skip
    load = f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}"
    lines.append(f"\nLoad average before/after: {load} on {os.cpu_count()} CPUs ({out['note']}).")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
