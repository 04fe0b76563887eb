"""``medtune bench`` on a tiny exported run: the JSON has every field, ratios match latencies, GPUs are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TINY_OVERRIDES

from medtune.cli import main
from medtune.export.bench import run_bench
from medtune.runtime.providers import gpu_available


@pytest.fixture(scope="module")
def exported(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from medtune.export.from_run import export_run
    from medtune.finetune.runner import finetune

    root = tmp_path_factory.mktemp("bench")
    finetune(tiny_dataset, "2d_classification", root / "run", overrides=dict(TINY_OVERRIDES), progress_bar=False)
    report = export_run(root / "run", root / "model", precision="fp32", n_samples=8)
    return report.onnx_path, root / "run"


def test_run_bench_results(exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, run = exported
    result = run_bench(model, run=run, threads=1, repeats=3)
    written = json.loads((model.parent / "bench.json").read_text())
    assert written["format"] == "medtune.bench/1" and written["backends"] == result["backends"]
    for key in (
        "model",
        "threads",
        "repeats",
        "input_shape",
        "flops_per_forward",
        "flop_floor_gflops_per_s",
        "providers",
        "backends",
        "speedups",
        "peak_rss_mb",
        "versions",
    ):
        assert key in written, key
    assert written["flops_per_forward"] > 0 and written["peak_rss_mb"] > 0 and written["threads"] == 1
    load = written["load_average"]
    assert len(load["before"]) == len(load["after"]) == 3 and all(v >= 0 for v in load["before"] + load["after"])

    by_name = {b["name"]: b for b in written["backends"]}
    providers = {b["provider"] for b in written["backends"]}
    assert {"CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"} <= providers
    assert "CPUExecutionProvider" in written["providers"]["benchmarked"]
    if not gpu_available()[0]:
        for b in written["backends"]:
            if b["provider"] != "CPUExecutionProvider" and b["engine"] == "onnxruntime":
                assert b["status"].startswith("skipped: ") and len(b["status"]) > len("skipped: ")
    ok = [b for b in written["backends"] if b["status"] == "ok"]
    assert {"onnxruntime-fp32-CPU", "torch-eager"} <= {b["name"] for b in ok}
    for b in ok:
        lat = b["latency_ms"]
        assert lat["n"] == 3 and 0 < lat["min"] <= lat["median"] <= lat["p90"]
        assert b["throughput_batch8_images_per_s"] > 0 and b["gflops_per_s"] > 0 and b["floor_fraction"] > 0
    for b in written["backends"]:
        assert b["status"] == "ok" or b["status"].startswith("skipped: ")

    med = {name: b["latency_ms"]["median"] for name, b in by_name.items() if "latency_ms" in b}
    speed = written["speedups"]
    assert speed["ort_fp32_vs_torch"] == pytest.approx(med["torch-eager"] / med["onnxruntime-fp32-CPU"])
    fastest = {name: b["latency_ms"]["min"] for name, b in by_name.items() if "latency_ms" in b}
    ratio_min = written["speedups_min_latency"]["ort_fp32_vs_torch"]
    assert ratio_min == pytest.approx(fastest["torch-eager"] / fastest["onnxruntime-fp32-CPU"])
    for precision in ("int8", "fp16"):
        key, name = f"{precision}_vs_fp32", f"onnxruntime-{precision}-CPU"
        if name in med:
            assert speed[key] == pytest.approx(med["onnxruntime-fp32-CPU"] / med[name])
        else:
            assert speed[key] is None and by_name[name]["status"].startswith("skipped: ")
    printed = capsys.readouterr().out
    assert "| onnxruntime-fp32-CPU | ok |" in printed and "load average" in printed


def test_run_bench_without_run_skips_torch(exported: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = exported
    result = run_bench(model, threads=1, repeats=2, out=tmp_path / "r.json", print_table=False)
    by_name = {b["name"]: b for b in result["backends"]}
    assert by_name["torch-eager"]["status"].startswith("skipped: needs --run")
    assert by_name["onnxruntime-int8-CPU"]["status"].startswith("skipped: ")
    assert by_name["onnxruntime-fp32-CPU"]["latency_ms"]["median"] > 0
    assert result["speedups"]["ort_fp32_vs_torch"] is None and (tmp_path / "r.json").is_file()


def test_cli_bench_writes_json(exported: tuple[Path, Path], tmp_path: Path) -> None:
    model, run = exported
    out = tmp_path / "X.json"
    code = main(
        ["bench", "--model", str(model), "--run", str(run), "--threads", "1", "--repeats", "3", "--out", str(out)]
    )
    assert code == 0 and json.loads(out.read_text())["threads"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".X.json")]  # atomic write left no temp file


def test_bench_run_includes_openvino_int8_or_says_why_not(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`medtune bench --run`: OpenVINO runs the exporter's INT8 (QDQ) model next to onnxruntime's, behind the
    OpenVINO parity check; without OpenVINO both OpenVINO rows are skipped with the one-line reason."""
    from medtune.runtime import providers

    model, run = exported
    if providers.openvino_status()[0] is not None:
        result = run_bench(model, run=run, threads=1, repeats=2, out=tmp_path / "ov.json", print_table=False)
        by_name = {b["name"]: b for b in result["backends"]}
        assert by_name["onnxruntime-int8-CPU"]["status"] == "ok"
        ov = by_name["openvino-int8-CPU"]
        assert ov["status"] == "ok" and ov["engine"] == "openvino" and ov["latency_ms"]["median"] > 0
        med = {n: b["latency_ms"]["median"] for n, b in by_name.items() if "latency_ms" in b}
        want = med["onnxruntime-int8-CPU"] / med["openvino-int8-CPU"]
        assert result["speedups"]["openvino_int8_vs_ort_int8"] == pytest.approx(want)
        nncf_row = by_name["openvino-int8-nncf-CPU"]  # NNCF's IR on the same calibration images
        try:
            import nncf  # noqa: F401
        except ImportError:
            assert nncf_row["status"] == 'skipped: the nncf package is not installed (pip install "medtune[nncf]")'
        else:
            assert nncf_row["status"] == "ok" and nncf_row["latency_ms"]["median"] > 0, nncf_row["status"]
            want = med["openvino-int8-CPU"] / med["openvino-int8-nncf-CPU"]
            assert result["speedups"]["openvino_int8_nncf_vs_qdq"] == pytest.approx(want)
    reason = 'OpenVINO not available: the openvino package is not installed (pip install "medtune[openvino]")'
    monkeypatch.setattr(providers, "openvino_status", lambda: (None, reason))
    result = run_bench(model, run=run, threads=1, repeats=2, out=tmp_path / "no.json", print_table=False)
    by_name = {b["name"]: b for b in result["backends"]}
    for name in ("openvino-fp32-CPU", "openvino-int8-CPU", "openvino-int8-nncf-CPU"):
        assert by_name[name]["status"] == f"skipped: {reason}"
    assert by_name["onnxruntime-int8-CPU"]["status"] == "ok" and result["speedups"]["openvino_int8_vs_ort_int8"] is None
