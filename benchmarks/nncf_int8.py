"""OpenVINO INT8: NNCF post-training quantization vs the exporter's onnxruntime QDQ file, same inputs, same gates.

For each shipped network (EfficientNet-Lite0 2D 128x128 with ImageNet weights
and a linear-probe head fitted on BreastMNIST training images, the Model Zoo spleen UNet
``unet_zoo`` and SegResNet at 96^3, random weights as in ``openvino_providers.py``) the FP32 ONNX export is
quantized two ways on the SAME calibration inputs:

- ``qdq``: ``medtune.export.optimize.quantize_int8`` (the exporter's INT8: onnxruntime static QDQ), run by OpenVINO;
- ``nncf``: ``nncf.quantize`` on the OpenVINO model read from the FP32 ONNX (PERFORMANCE and
  MIXED presets, subset = all inputs).

Both then face the exporter's INT8 gates: the parity gate (``optimize._gate`` with ``TOLERANCES["int8"]``: argmax
agreement with the fp32 PyTorch outputs on held-out inputs >= 0.9) and the metric gate (``MAX_METRIC_DROP``: AUC
drop <= 0.005 / Dice drop <= 0.01 vs fp32, computed with the report's ``auc`` / ``case_mean_dice``), all run by
OpenVINO (NNCF's output is an OpenVINO IR, not ONNX). Real inputs where ../shared/data has them: BreastMNIST
(upsampled to 128^2; calibration = training images, gate = validation split) and MSD Hippocampus (3 labels,
z-scored, zero-padded to 96^3; calibration / gate volumes disjoint). The 3D networks have random weights, so
their metric values are not meaningful in absolute terms -- only the fp32-vs-int8 deltas and the speed are.

Latency: batch 1, OpenVINO FP32 / QDQ / NNCF timed round-robin in one process (``export.bench._round_robin``),
1 and 2 threads, ratios within the run.

    nice -n 10 .venv/bin/python benchmarks/nncf_int8.py [--models lite0_2d,unet_zoo_3d,segresnet_3d] [--repeats 6]

Writes benchmarks/results/bench_nncf_int8.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", "/work/shared/data"))
MODELS = {
    "lite0_2d": {"arch": "efficientnet_lite0", "pretrained": "imagenet-efficientnet-lite0", "dims": 2, "size": 128,
                 "task": "classification", "classes": 2, "n_calib": 256, "n_parity": 16, "n_val": 78},
    "unet_zoo_3d": {"arch": "unet_zoo", "pretrained": None, "dims": 3, "size": 96, "task": "segmentation",
                    "classes": 3, "n_calib": 12, "n_parity": 4, "n_val": 8},
    # 4 calibration volumes: onnxruntime's calibrator keeps every activation of every volume (12 ran out of memory)
    "segresnet_3d": {"arch": "segresnet", "pretrained": None, "dims": 3, "size": 96, "task": "segmentation",
                     "classes": 3, "n_calib": 4, "n_parity": 4, "n_val": 8},
}  # fmt: skip


def _breastmnist(n_calib: int, n_val: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(calibration, val images, val labels, training images, training labels, source)``."""
    from scipy.ndimage import zoom

    npz = DATA / "medmnist" / "breastmnist.npz"
    if not npz.is_file():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n_calib + n_val, 1, 128, 128)).astype(np.float32)
        y = rng.integers(0, 2, n_calib + n_val)
        return x[:n_calib], x[n_calib:], y[n_calib:], x[:n_calib], y[:n_calib], "random inputs (BreastMNIST absent)"
    d = np.load(npz)

    def prep(images: np.ndarray) -> np.ndarray:
        up = np.stack([zoom(im.astype(np.float32) / 255.0, 128 / 28, order=1) for im in images])
        return ((up - 0.5) / 0.5)[:, None].astype(np.float32)

    train, train_y = prep(d["train_images"]), d["train_labels"][:, 0]
    calib = train[np.random.default_rng(0).permutation(len(train))[:n_calib]]
    source = "BreastMNIST train (calibration, linear-probe head) / val (gates)"
    return calib, prep(d["val_images"][:n_val]), d["val_labels"][:n_val, 0], train, train_y, source


def _hippocampus(n: int, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    import nibabel as nib

    images = sorted((DATA / "hippocampus" / "imagesTr").glob("*.nii.gz"))[:n]
    if len(images) < n:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, 1, size, size, size)).astype(np.float32)
        return x, rng.integers(0, 3, (n, size, size, size)), "random inputs (Hippocampus absent)"
    vols, labs = [], []
    for path in images:
        img = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        lab = np.asarray(nib.load(path.parent.parent / "labelsTr" / path.name).dataobj).astype(np.int64)
        img = (img - img.mean()) / max(float(img.std()), 1e-6)
        pad = [((size - s) // 2, size - s - (size - s) // 2) for s in img.shape]
        vols.append(np.pad(img, pad)[None])
        labs.append(np.pad(lab, pad))
    return np.stack(vols).astype(np.float32), np.stack(labs), "MSD Hippocampus (z-scored, padded to 96^3)"


def _linear_probe(net: Any, calib: np.ndarray, labels: np.ndarray) -> None:
    """Fit the classifier head (logistic regression on the frozen ImageNet features) so the AUC gate means something."""
    import torch
    from sklearn.linear_model import LogisticRegression

    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    feats: list[np.ndarray] = []
    hook = head.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach().numpy()))
    with torch.inference_mode():
        for i in range(0, len(calib), 32):
            net(torch.from_numpy(calib[i : i + 32]))
    hook.remove()
    clf = LogisticRegression(max_iter=2000, C=0.1).fit(np.concatenate(feats), labels)
    w, b = torch.from_numpy(clf.coef_[0]).float(), float(clf.intercept_[0])
    with torch.no_grad():  # softmax of [-z/2, z/2] == sigmoid(z)
        head.weight.copy_(torch.stack([-w / 2, w / 2]))
        head.bias.copy_(torch.tensor([-b / 2, b / 2]))


#: NNCF variants tried: the default (PERFORMANCE preset: symmetric activations) and MIXED (asymmetric activations,
#: like the QDQ file's uint8 ones)
NNCF_VARIANTS = ("nncf", "nncf_mixed")


def _nncf_quantize(fp32: Path, calib: np.ndarray, dst: Path, variant: str) -> tuple[Path, float]:
    import nncf
    import openvino as ov

    start = time.perf_counter()
    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset(list(calib), lambda x: x[None])
    preset = nncf.QuantizationPreset.MIXED if variant == "nncf_mixed" else nncf.QuantizationPreset.PERFORMANCE
    quantized = nncf.quantize(model, dataset, preset=preset, subset_size=len(calib))
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return dst, time.perf_counter() - start


def _gates(spec: dict[str, Any], predict: Any, parity_x: np.ndarray, reference: np.ndarray,
           val_x: np.ndarray, val_y: np.ndarray, fp32_metric: float | None) -> dict[str, Any]:  # fmt: skip
    from medtune.evaluate.metrics import auc
    from medtune.evaluate.segmentation import case_mean_dice
    from medtune.export.optimize import MAX_METRIC_DROP, TOLERANCES

    out = np.concatenate([predict(parity_x[i : i + 1]) for i in range(len(parity_x))])
    agree = float(np.mean(np.argmax(out, axis=1) == np.argmax(reference, axis=1)))
    need = TOLERANCES["int8"]["min_argmax_agreement"]
    rel = float(np.max(np.abs(out - reference)) / max(1e-12, float(np.max(np.abs(reference)))))
    if spec["task"] == "classification":
        logits = np.concatenate([predict(val_x[i : i + 8]) for i in range(0, len(val_x), 8)])
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        metric_name, value = "auc", float(auc(np.asarray(val_y), e / e.sum(axis=1, keepdims=True), 1))
    else:
        scores = [case_mean_dice(np.argmax(predict(v[None])[0], axis=0), y, range(1, spec["classes"]))
                  for v, y in zip(val_x, val_y, strict=True)]  # fmt: skip
        metric_name, value = "dice", float(np.nanmean(scores))
    result: dict[str, Any] = {
        "argmax_agreement_vs_torch": agree,
        "max_rel_error_vs_torch": rel,
        "parity_gate_passed": agree >= need,
        "metric": metric_name,
        "metric_value": value,
    }
    if fp32_metric is not None:
        drop = MAX_METRIC_DROP[metric_name]
        result.update(metric_delta=value - fp32_metric, max_drop=drop, metric_gate_passed=fp32_metric - value <= drop)
        result["passed"] = bool(result["parity_gate_passed"] and result["metric_gate_passed"])
    return result


def _prepare(name: str, tmp: Path) -> dict[str, Any]:
    import torch

    from medtune.export import export_onnx
    from medtune.export.onnx_export import torch_outputs
    from medtune.export.optimize import quantize_int8
    from medtune.weights import create_model

    spec = MODELS[name]
    torch.manual_seed(0)
    net = create_model(spec["arch"], spec["pretrained"], 1, spec["classes"], spec["dims"], verbose=False).eval()
    if spec["dims"] == 2:
        calib, held_out, val_y, train, train_y, source = _breastmnist(spec["n_calib"], spec["n_val"])
        _linear_probe(net, train, train_y)
        parity_x, val_x = held_out[: spec["n_parity"]], held_out
    else:
        n = spec["n_calib"] + spec["n_val"]
        vols, labs, source = _hippocampus(n, spec["size"])
        calib, val_x, val_y = vols[: spec["n_calib"]], vols[spec["n_calib"] :], labs[spec["n_calib"] :]
        parity_x = val_x[: spec["n_parity"]]
    shape = [1] + [spec["size"]] * spec["dims"]
    sidecar = {"task": spec["task"], "spatial_dims": spec["dims"], "channels": 1, "spatial_size": shape[1:],
               "labels": {str(i): f"class{i}" for i in range(spec["classes"])}}  # fmt: skip
    report = export_onnx(net, calib[:2], tmp / "fp32", sidecar, dynamic_spatial=spec["dims"] == 3)
    reference = torch_outputs(net, parity_x)
    start = time.perf_counter()
    qdq = tmp / "qdq.onnx"
    quantize_int8(report.onnx_path, qdq, calib, "image")
    qdq_s = time.perf_counter() - start
    paths, seconds = {"fp32": report.onnx_path, "qdq": qdq}, {"qdq": qdq_s}
    for variant in NNCF_VARIANTS:
        paths[variant], seconds[variant] = _nncf_quantize(report.onnx_path, calib, tmp / f"{variant}.xml", variant)
    return {"paths": paths, "reference": reference, "parity_x": parity_x, "val_x": val_x, "val_y": val_y,
            "x": parity_x[:1], "source": source, "quantize_s": seconds, "n_calib": len(calib)}  # fmt: skip


def _bench(name: str, prep: dict[str, Any], threads: int, repeats: int) -> dict[str, Any]:
    from medtune.export.bench import _ort_predict, _round_robin
    from medtune.runtime.openvino_session import OpenVinoSession

    spec = MODELS[name]
    fns = {f"openvino-{k}": _ort_predict(OpenVinoSession(p, threads)) for k, p in prep["paths"].items()}
    gates: dict[str, Any] = {}
    fp32 = _gates(spec, fns["openvino-fp32"], prep["parity_x"], prep["reference"], prep["val_x"], prep["val_y"], None)
    gates["fp32"] = fp32
    for key in ("qdq", *NNCF_VARIANTS):
        fn = fns[f"openvino-{key}"]
        gates[key] = _gates(spec, fn, prep["parity_x"], prep["reference"], prep["val_x"], prep["val_y"],
                            fp32["metric_value"])  # fmt: skip
    times = _round_robin(fns, prep["x"], repeats)
    lat = {k: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "n": len(t)} for k, t in times.items()}
    med = {k: v["median_ms"] for k, v in lat.items()}
    ratios = {"qdq_vs_fp32": med["openvino-fp32"] / med["openvino-qdq"]}
    for v in NNCF_VARIANTS:
        ratios[f"{v}_vs_qdq"] = med["openvino-qdq"] / med[f"openvino-{v}"]
        ratios[f"{v}_vs_fp32"] = med["openvino-fp32"] / med[f"openvino-{v}"]
        ratios[f"{v}_vs_qdq_min_latency"] = lat["openvino-qdq"]["min_ms"] / lat[f"openvino-{v}"]["min_ms"]
    passing = [k for k in ("qdq", *NNCF_VARIANTS) if gates[k]["passed"]]
    winner = min(passing, key=lambda k: med[f"openvino-{k}"]) if passing else None
    return {"model": name, "threads": threads, "input_shape": list(prep["x"].shape), "latency": lat,
            "gates": gates, "speedups_median": ratios, "faster_int8_passing_gates": winner}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import nncf
    import onnxruntime as ort
    import openvino
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", default=str(RESULTS / "bench_nncf_int8.json"))
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    results, prepared = [], {}
    with tempfile.TemporaryDirectory(prefix="medtune-nncf-") as tmp:
        for name in args.models.split(","):
            torch.set_num_threads(2)
            start = time.time()
            prep = _prepare(name, Path(tmp) / name)
            prepared[name] = {"inputs": prep["source"], "n_calibration": prep["n_calib"],
                              "quantize_seconds": prep["quantize_s"]}  # fmt: skip
            for threads in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(threads)
                results.append(_bench(name, prep, threads, args.repeats))
            print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr)
    versions = {"torch": torch.__version__, "onnxruntime": ort.__version__, "openvino": openvino.__version__,
                "nncf": nncf.__version__}  # fmt: skip
    out = {
        "format": "medtune.bench_nncf_int8/1",
        "command": "nice -n 10 .venv/bin/python benchmarks/nncf_int8.py " + " ".join(argv or sys.argv[1:]),
        "models": prepared,
        "results": results,
        "versions": versions,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "cpu_count": os.cpu_count(),
        "note": "batch 1, OpenVINO CPU (INFERENCE_PRECISION_HINT=f32, LATENCY), medians of round-robin timings in "
        "one process; both INT8 models calibrated on the same inputs; gates = the exporter's INT8 parity gate "
        "(argmax agreement vs fp32 torch >= 0.9) and metric gate (MAX_METRIC_DROP), all through OpenVINO; 3D "
        "networks have random weights (metric values meaningless in absolute terms, deltas and speed are not)",
    }
    from medtune.atomic import write_json_atomic

    path = Path(args.out)
    write_json_atomic(path, out)
    lines = [
        "| model | threads | OV fp32 ms | OV QDQ int8 ms | OV NNCF int8 ms | OV NNCF-mixed int8 ms "
        "| NNCF / mixed vs QDQ | QDQ gate (agree, Δmetric) | NNCF gate | NNCF-mixed gate | faster passing INT8 |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in results:
        lat, g = r["latency"], r["gates"]

        def gate(k: str, g: dict[str, Any] = g) -> str:
            ok = "pass" if g[k]["passed"] else "FAIL"
            return f"{ok} ({g[k]['argmax_agreement_vs_torch']:.1%}, {g[k]['metric']} {g[k]['metric_delta']:+.4f})"

        lines.append(f"| {r['model']} | {r['threads']} | {lat['openvino-fp32']['median_ms']:.1f} | "
                     f"{lat['openvino-qdq']['median_ms']:.1f} | {lat['openvino-nncf']['median_ms']:.1f} | "
                     f"{lat['openvino-nncf_mixed']['median_ms']:.1f} | {r['speedups_median']['nncf_vs_qdq']:.2f}x / "
                     f"{r['speedups_median']['nncf_mixed_vs_qdq']:.2f}x | {gate('qdq')} | {gate('nncf')} | "
                     f"{gate('nncf_mixed')} | {r['faster_int8_passing_gates']} |")  # fmt: skip
    load = f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}"
    lines.append(f"\nLoad average before/after: {load} on {os.cpu_count()} CPUs. Inputs: "
                 + "; ".join(f"{k}: {v['inputs']}, {v['n_calibration']} calibration" for k, v in prepared.items())
                 + f". Versions: {versions}. {out['note']}.")  # fmt: skip
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
