"""``medtune bench``: onnxruntime and OpenVINO (FP32, and FP16/INT8 derived on the fly) vs torch eager on one model.

OpenVINO (where installed; else its rows say why not in one line) runs the same FP32 file and the exporter's
FP16/INT8 (QDQ) files, each behind the OpenVINO parity check against onnxruntime CPU; with ``--run`` and nncf
installed (extra ``nncf``) also NNCF's INT8 IR (``openvino-int8-nncf-CPU``, same calibration images, same INT8
parity gate vs torch), which was 2.0-3.9x faster than the QDQ file for the 3D networks.

Measured, never asserted: batch-1 latency (median / p90 after warm-up), batch-8 throughput for classifiers,
one sliding-window volume (2x the ROI along each axis) for 3D segmentation, FLOPs of one forward pass
(``torch.utils.flop_counter.FlopCounterMode``, conv + matmul), achieved GFLOP/s and the fraction of the CPU
FLOP floor (:data:`GFLOPS_PER_CORE` x threads), the process's peak RSS, and speed-up ratios computed within
the run. Backends are timed round-robin (blocks of calls per backend, interleaved over up to 5 rounds; the
sliding-window volumes likewise) so a noisy, shared machine affects them alike; speed-ups are given from median
and from minimum latencies, and the load average before/after is recorded.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medtune.atomic import write_json_atomic
from medtune.errors import MedTuneError, one_line
from medtune.versions import versions

#: per-core FP32 FLOP floor used in ../shared/notes/onnx-facts.md (measured on this machine class)
GFLOPS_PER_CORE = 115.0
THROUGHPUT_BATCH = 8
FORMAT = "medtune.bench/1"

Predict = Callable[[np.ndarray], Any]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _timed(fn: Predict, x: np.ndarray) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def _round_robin(fns: dict[str, Predict], x: np.ndarray, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call for every backend, ``repeats`` each, interleaved in blocks.

    Backends take turns in up to 5 rounds; at each turn a short pause and ``warmup`` untimed calls let the
    previous backend's spinning worker threads (OpenMP, onnxruntime) go idle, so they do not steal the cores.
    """
    rounds = min(repeats, 5)
    blocks = [repeats // rounds + (i < repeats % rounds) for i in range(rounds)]
    times: dict[str, list[float]] = {name: [] for name in fns}
    for block in blocks:
        for name, fn in fns.items():
            time.sleep(0.02)
            for _ in range(warmup):
                fn(x)
            times[name] += [_timed(fn, x) for _ in range(block)]
    return times


def _ort_predict(session: Any) -> Predict:
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return predict


def _torch_predict(net: Any) -> Predict:
    import torch

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    return predict


def count_flops(net: Any, x: np.ndarray) -> float:
    """FLOPs of one forward pass of ``net`` on ``x`` (FlopCounterMode: conv + matmul, 2 per MAC)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(torch.from_numpy(x))
    return float(counter.get_total_flops())


def _providers_to_try(openvino: bool = True) -> list[tuple[str, str | None]]:
    """``(provider, None)`` to benchmark or ``(provider, reason)`` to skip: CPU always, GPU ones when usable,
    OpenVINO (onnxruntime's execution provider or the openvino runtime) where installed."""
    import onnxruntime as ort

    from medtune.runtime.providers import CPU, CUDA, OPENVINO, TRT, gpu_available, openvino_status

    has_gpu, why = gpu_available()
    built = set(ort.get_available_providers())
    out: list[tuple[str, str | None]] = [(CPU, None)]
    for prov in (CUDA, TRT):
        reason = None if has_gpu else why
        if reason is None and prov not in built:
            reason = f"this onnxruntime has no {prov}"
        out.append((prov, reason))
    how, ov_why = openvino_status()
    out.append((how or OPENVINO, None if how and openvino else (ov_why if openvino else "left out (--no-openvino)")))
    return out


def _open_session(path: Path, provider: str, threads: int) -> tuple[Any | None, str | None]:
    """A session on exactly ``provider`` or ``(None, reason)`` when it does not start there (OpenVINO also when
    it fails its parity check against onnxruntime CPU)."""
    from medtune.runtime.providers import CPU, CUDA, OPENVINO, OPENVINO_EP, create_session

    choice = {CPU: "cpu", CUDA: "cuda", OPENVINO: "openvino", OPENVINO_EP: "openvino"}.get(provider, "tensorrt")
    session, used, message = create_session(path, choice, threads)
    if used != provider:
        return None, message
    return session, None


def _backend_name(precision: str, provider: str) -> tuple[str, str]:
    """``(name, engine)`` of a benchmarked backend: ``onnxruntime-fp32-CPU``, ``openvino-fp32-CPU``, ..."""
    from medtune.runtime.providers import _SHORT, OPENVINO

    if provider == OPENVINO:
        return f"openvino-{precision}-CPU", "openvino"
    return f"onnxruntime-{precision}-{_SHORT[provider]}", "onnxruntime"


def _derive(model: Path, run: Path, tmp: Path, net: Any, parser: Any) -> tuple[dict[str, Path], dict[str, str]]:
    """FP16 and INT8 models derived from ``model`` into ``tmp`` (gated vs torch); reasons for those that failed."""
    from medtune.export.from_run import parity_samples
    from medtune.export.onnx_export import torch_outputs
    from medtune.export.optimize import DERIVED, MAX_CALIBRATION, derive_precision
    from medtune.runtime.model import sidecar_path

    samples = parity_samples(parser, 16)
    reference = torch_outputs(net, samples)
    calibration = parity_samples(parser, MAX_CALIBRATION, "training")  # as `medtune export` does
    sidecar = json.loads(sidecar_path(model).read_text(encoding="utf-8"))
    paths: dict[str, Path] = {}
    errors: dict[str, str] = {}
    for precision in DERIVED:
        try:
            report = derive_precision(
                model,
                tmp / precision,
                precision,
                samples,
                reference,
                sidecar,
                calibration=calibration if precision == "int8" else None,
            )
            paths[precision] = report.onnx_path
        except MedTuneError as err:
            errors[precision] = f"skipped: {precision} derivation failed ({one_line(err)})"
    from medtune.runtime.providers import openvino_status

    how, ov_why = openvino_status()
    nncf_path: Path | None = None
    nncf_error: str | None = f"skipped: {ov_why}"
    if how is not None:
        nncf_path, nncf_error = _derive_nncf(model, tmp, samples, reference, calibration)
    if nncf_path is not None:
        paths[NNCF_INT8] = nncf_path
    else:
        errors[NNCF_INT8] = nncf_error or "skipped"
    return paths, errors


#: OpenVINO INT8 through NNCF (OpenVINO IR; run by OpenVINO only): measured 2.0-3.9x faster than the QDQ file in
#: OpenVINO for the 3D networks, slower for Lite0 2D (benchmarks/results/bench_nncf_int8.md)
NNCF_INT8 = "int8-nncf"


def _derive_nncf(
    model: Path, tmp: Path, samples: np.ndarray, reference: np.ndarray, calibration: np.ndarray
) -> tuple[Path | None, str | None]:
    """NNCF INT8 IR on the same calibration images as the QDQ file, behind the same INT8 parity gate vs torch."""
    from medtune.export.openvino_int8 import nncf_status, quantize_nncf
    from medtune.export.optimize import TOLERANCES
    from medtune.runtime.openvino_session import OpenVinoSession

    ok, why = nncf_status()
    if not ok:
        return None, f"skipped: {why}"
    try:
        path = tmp / NNCF_INT8 / "model.xml"
        quantize_nncf(model, path, calibration)
    except MedTuneError as err:
        return None, f"skipped: {one_line(err)}"
    session = OpenVinoSession(path)
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: samples[i : i + 1]})[0] for i in range(len(samples))])
    if reference.ndim >= 2 and reference.shape[1] > 1:
        agree = float(np.mean(np.argmax(got, axis=1) == np.argmax(reference, axis=1)))
        need = TOLERANCES["int8"]["min_argmax_agreement"]
        if agree < need:
            return None, f"skipped: NNCF int8 parity check failed (argmax agreement {agree:.2%} < {need:.0%})"
    else:
        rel = float(np.max(np.abs(got - reference)) / max(1e-12, float(np.max(np.abs(reference)))))
        limit = TOLERANCES["int8"]["max_rel_error_single_channel"]
        if rel > limit:
            return None, f"skipped: NNCF int8 parity check failed (max rel error {rel:.3g} > {limit:g})"
    return path, None


def _input_spec(sidecar: dict[str, Any]) -> tuple[int, list[int], bool, list[int] | None]:
    """``(channels, spatial_size, is_3d_segmentation, roi_size)`` from a model sidecar."""
    inp = sidecar.get("input") or {}
    channels = int(sidecar.get("channels") or inp.get("channels") or 1)
    spatial = sidecar.get("spatial_size") or inp.get("spatial_size")
    if not spatial:
        raise MedTuneError("model sidecar has no spatial_size; cannot make a benchmark input")
    seg3d = sidecar.get("task") == "segmentation" and int(sidecar.get("spatial_dims") or 2) == 3
    roi = (sidecar.get("sliding_window") or {}).get("roi_size") or spatial
    return channels, [int(s) for s in spatial], seg3d, [int(r) for r in roi] if seg3d else None


def _sliding_window_times(
    ort_fns: dict[str, Any],
    torch_net: Any | None,
    sidecar: dict[str, Any],
    channels: int,
    roi: list[int],
    rounds: int = 3,
) -> dict[str, list[float]]:
    """Seconds per ``(C, 2*roi)`` volume: numpy runtime sliding window per ORT session, MONAI's for torch.

    The backends take turns for ``rounds`` rounds (one volume each per round), like the latency timing.
    """
    from medtune.runtime.sliding_window import sliding_window

    sw = sidecar.get("sliding_window") or {}
    overlap, mode = float(sw.get("overlap", 0.5)), str(sw.get("mode", "gaussian"))
    volume = np.random.default_rng(0).standard_normal((channels, *[2 * r for r in roi])).astype(np.float32)
    runs: dict[str, Callable[[], Any]] = {
        name: functools.partial(sliding_window, predict, volume, roi, overlap=overlap, mode=mode, sw_batch_size=1)
        for name, predict in ort_fns.items()
    }
    if torch_net is not None:
        import torch
        from monai.inferers import sliding_window_inference

        def monai_sw() -> Any:
            with torch.inference_mode():
                x = torch.from_numpy(volume[None])
                return sliding_window_inference(x, roi, 1, torch_net, overlap=overlap, mode=mode)

        runs["torch-eager"] = monai_sw
    out: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(0.02)
            start = time.perf_counter()
            run()
            out[name].append(time.perf_counter() - start)
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (``ru_maxrss``: KB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if not num or not den else float(num) / float(den)


def _nncf_entry(
    models: dict[str, Path], errors: dict[str, str], threads: int, openvino: bool, fns: dict[str, Predict]
) -> dict[str, Any]:
    """The ``openvino-int8-nncf-CPU`` backend (NNCF's IR run by the openvino runtime), or why it is skipped."""
    from medtune.runtime.openvino_session import OpenVinoSession

    name = "openvino-int8-nncf-CPU"
    entry: dict[str, Any] = {"name": name, "engine": "openvino", "precision": "int8", "provider": "OpenVINO"}
    if not openvino:
        entry["status"] = "skipped: left out (--no-openvino)"
    elif NNCF_INT8 not in models:
        entry["status"] = errors.get(NNCF_INT8, "skipped")
    else:
        fns[name] = _ort_predict(OpenVinoSession(models[NNCF_INT8], threads))
        entry["status"] = "ok"
    return entry


def run_bench(
    model_path: str | Path,
    run: str | Path | None = None,
    threads: int = 2,
    repeats: int = 20,
    out: str | Path | None = None,
    print_table: bool = True,
    openvino: bool = True,
) -> dict[str, Any]:
    """Benchmark ``model_path`` (an exported ``model.onnx`` or its folder) and write the results as JSON.

    With ``run`` (the training run it came from) the torch eager network, FLOPs and the FP16/INT8 derivations
    are included. Returns the results dict (format ``medtune.bench/1``), also written atomically to ``out``
    (default ``bench.json`` next to the model); a Markdown table is printed unless ``print_table`` is false.
    """
    from medtune.runtime.model import read_model_sidecar

    model = Path(model_path)
    model = model / "model.onnx" if model.is_dir() else model
    sidecar = read_model_sidecar(model)
    if int(threads) < 1 or int(repeats) < 1:
        raise MedTuneError(f"threads and repeats must be >= 1 (got {threads}, {repeats})")
    threads, repeats = int(threads), int(repeats)
    load_before = os.getloadavg()  # 1/5/15-minute run-queue averages: other work competing for the cores
    channels, spatial, seg3d, roi = _input_spec(sidecar)
    shape = [channels, *(roi or spatial)]
    x1 = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)

    backends: list[dict[str, Any]] = []
    fns: dict[str, Predict] = {}
    net = parser = None
    flops: float | None = None
    old_threads = None
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp_dir:
        models = {"fp32": model}
        derive_errors: dict[str, str] = {}
        if run is not None:
            import torch

            from medtune.finetune.runner import build_network_for_run

            net, parser, _ = build_network_for_run(run)
            old_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            derived, derive_errors = _derive(model, Path(run), Path(tmp_dir), net, parser)
            models.update(derived)
            flops = count_flops(net, x1)
        for precision in ("fp32", "fp16", "int8"):
            for provider, reason in _providers_to_try(openvino):
                name, engine = _backend_name(precision, provider)
                entry: dict[str, Any] = {
                    "name": name,
                    "engine": engine,
                    "precision": precision,
                    "provider": provider,
                }
                if precision not in models:
                    entry["status"] = derive_errors.get(precision, "skipped: needs --run to derive it")
                elif reason is not None:
                    entry["status"] = f"skipped: {reason}"
                else:
                    session, why = _open_session(models[precision], provider, threads)
                    entry["status"] = "ok" if session is not None else f"skipped: {why}"
                    if session is not None:
                        fns[name] = _ort_predict(session)
                backends.append(entry)
        if run is not None:
            backends.append(_nncf_entry(models, derive_errors, threads, openvino, fns))
        torch_entry: dict[str, Any] = {
            "name": "torch-eager",
            "engine": "torch",
            "precision": "fp32",
            "provider": "cpu",
            "status": "ok"
            if net is not None
            else "skipped: needs --run (the training run) to rebuild the torch network",
        }
        backends.append(torch_entry)
        if net is not None:
            fns["torch-eager"] = _torch_predict(net)

        try:
            lat = _round_robin(fns, x1, repeats)
            thr: dict[str, list[float]] = {}
            batch_dynamic = (sidecar.get("input") or {}).get("dynamic_batch", True) is not False
            if not seg3d and batch_dynamic:
                x8 = np.repeat(x1, THROUGHPUT_BATCH, axis=0)
                thr = _round_robin(fns, x8, max(3, repeats // 4), warmup=1)
            sw_runs: dict[str, list[float]] = {}
            if seg3d and roi is not None:
                ort_cpu = {k: v for k, v in fns.items() if k.endswith("-CPU")}
                sw_runs = _sliding_window_times(ort_cpu, net, sidecar, channels, roi)
            sw_times = {name: statistics.median(times) for name, times in sw_runs.items()}
        finally:
            if old_threads is not None:
                import torch

                torch.set_num_threads(old_threads)

    floor = GFLOPS_PER_CORE * threads
    for entry in backends:
        times = lat.get(entry["name"])
        if not times:
            continue
        median = statistics.median(times)
        entry["latency_ms"] = {
            "median": 1e3 * median,
            "p90": 1e3 * _percentile(times, 90),
            "min": 1e3 * min(times),
            "n": len(times),
        }
        if entry["name"] in thr:
            entry["throughput_batch8_images_per_s"] = THROUGHPUT_BATCH / statistics.median(thr[entry["name"]])
        if entry["name"] in sw_times:
            entry["sliding_window_s"] = sw_times[entry["name"]]
            entry["sliding_window_runs_s"] = sw_runs[entry["name"]]
        if flops:
            gflops = flops / median / 1e9
            entry["gflops_per_s"] = gflops
            cpu = entry["provider"] in ("cpu", "CPUExecutionProvider", "OpenVINO", "OpenVINOExecutionProvider")
            entry["floor_fraction"] = gflops / floor if cpu else None

    def latency(name: str, stat: str = "median") -> float | None:
        entry = next((b for b in backends if b["name"] == name), {})
        return (entry.get("latency_ms") or {}).get(stat)

    pairs = {
        "ort_fp32_vs_torch": ("torch-eager", "onnxruntime-fp32-CPU"),
        "int8_vs_fp32": ("onnxruntime-fp32-CPU", "onnxruntime-int8-CPU"),
        "fp16_vs_fp32": ("onnxruntime-fp32-CPU", "onnxruntime-fp16-CPU"),
        "openvino_fp32_vs_ort_fp32": ("onnxruntime-fp32-CPU", "openvino-fp32-CPU"),
        "openvino_int8_vs_ort_int8": ("onnxruntime-int8-CPU", "openvino-int8-CPU"),
        "openvino_int8_nncf_vs_qdq": ("openvino-int8-CPU", "openvino-int8-nncf-CPU"),
    }
    ratios = {key: _ratio(latency(slow), latency(fast)) for key, (slow, fast) in pairs.items()}
    ratios_min = {key: _ratio(latency(slow, "min"), latency(fast, "min")) for key, (slow, fast) in pairs.items()}
    sw_t, sw_o = sw_times.get("torch-eager"), sw_times.get("onnxruntime-fp32-CPU")
    if seg3d:
        ratios["sliding_window_ort_fp32_vs_torch"] = _ratio(sw_t, sw_o)
        ratios["sliding_window_openvino_fp32_vs_ort_fp32"] = _ratio(sw_o, sw_times.get("openvino-fp32-CPU"))
    import onnxruntime as ort

    from medtune.runtime.providers import gpu_available

    result: dict[str, Any] = {
        "format": FORMAT,
        "model": str(model.resolve()),
        "run": None if run is None else str(Path(run).resolve()),
        "task": sidecar.get("task"),
        "spatial_dims": sidecar.get("spatial_dims"),
        "input_shape": list(x1.shape),
        "sliding_window_volume": [channels, *[2 * r for r in roi]] if seg3d and roi else None,
        "threads": threads,
        "repeats": repeats,
        "flops_per_forward": flops,
        "flop_floor_gflops_per_s": floor,
        "providers": {
            "onnxruntime_built": ort.get_available_providers(),
            "gpu": gpu_available()[1],
            "benchmarked": sorted({b["provider"] for b in backends if b["status"] == "ok"}),
        },
        "backends": backends,
        "speedups": ratios,
        "speedups_min_latency": ratios_min,
        "speedup_definition": "ratio of median batch-1 latencies: denominator backend's time / numerator's "
        "(e.g. ort_fp32_vs_torch = torch ms / ORT fp32 ms; > 1 means faster); speedups_min_latency: the same "
        "with the fastest call of each backend (less sensitive to other processes on a shared machine)",
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "peak_rss_mb": peak_rss_mb(),
        "versions": _versions(),
    }
    out_path = Path(out) if out else model.parent / "bench.json"
    write_json_atomic(out_path, result)
    result["out"] = str(out_path)
    if print_table:
        print(markdown_table(result))
    return result


def _versions() -> dict[str, str]:
    from medtune.runtime.openvino_session import version

    found = versions(("onnxruntime", "numpy"))
    if version():
        found["openvino"] = str(version())
    if "torch" in sys.modules:  # torch only when this process used it (a torch-free edge bench does not)
        found.update(versions(("torch",)))
    return found


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """A short Markdown summary of :func:`run_bench` results."""
    flops = result.get("flops_per_forward")
    head = (
        f"Benchmark of {result['model']} ({result['threads']} thread(s), input {result['input_shape']}, "
        f"{_fmt(flops and flops / 1e9, '.4g') or '?'} GFLOP/forward, peak RSS {result['peak_rss_mb']:.0f} MB)"
    )
    rows = [
        "| backend | status | median ms | p90 ms | img/s @8 | GFLOP/s | % floor | sliding window s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in result["backends"]:
        lat = b.get("latency_ms") or {}
        frac = b.get("floor_fraction")
        rows.append(
            f"| {b['name']} | {b['status'][:60]} | {_fmt(lat.get('median'), '.3f')} | {_fmt(lat.get('p90'), '.3f')} "
            f"| {_fmt(b.get('throughput_batch8_images_per_s'), '.0f')} | {_fmt(b.get('gflops_per_s'), '.2f')} "
            f"| {_fmt(frac and 100 * frac, '.1f')} | {_fmt(b.get('sliding_window_s'), '.2f')} |"
        )
    speed = ", ".join(f"{k} {v:.2f}x" for k, v in result["speedups"].items() if v is not None) or "none"
    fastest = result.get("speedups_min_latency") or {}
    best = ", ".join(f"{k} {v:.2f}x" for k, v in fastest.items() if v is not None) or "none"
    load = result.get("load_average") or {}
    loads = " -> ".join(f"{b[0]:.2f}" for b in (load.get("before"), load.get("after")) if b)
    lines = [f"Speed-ups (median): {speed}", f"Speed-ups (fastest call): {best}"]
    if loads:
        lines.append(f"1-min load average before -> after: {loads} (on {os.cpu_count()} CPUs)")
    return "\n".join([head, "", *rows, "", *lines, f"Written to {result.get('out', '')}"])
