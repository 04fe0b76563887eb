"""The module session keeps slow work off the UI thread, honours the chosen provider, and has one writer for
``uncertainty.json``. Runs without torch (the Python-3.12 job): the model is a real ONNX file built with the
``onnx`` helpers (a 1x1x1 Conv3d, see ``_model``) run by onnxruntime through MedTune's runtime; the scene is
slicer-core's real MRML scene."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core not installed (pip install slicer-core) - Slicer logic untested")
onnx = pytest.importorskip("onnx", reason="onnx not installed: the tiny test model cannot be built")


from MedTuneLib import module_logic  # noqa: E402
from MedTuneLib.dataset_logic import DatasetLogic, array_to_volume  # noqa: E402
from MedTuneLib.labeling_logic import prefill, read_uncertainty  # noqa: E402
from MedTuneLib.module_logic import LABEL_WORKER, MedTuneSession  # noqa: E402
from MedTuneLib.run_logic import load_model  # noqa: E402

from medtune.errors import MedTuneError  # noqa: E402

LABELS = {0: "background", 1: "liver", 2: "tumor"}
SHAPE = (12, 10, 8)


def _model(folder: Path) -> Path:
    """A real 3-class 3D segmentation ONNX model + sidecar, no torch: logits = (-4x, 0, 4x) + (0, 0, -2)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.array([-4.0, 0.0, 4.0], np.float32).reshape(3, 1, 1, 1, 1), "w")
    bias = numpy_helper.from_array(np.array([0.0, 0.0, -2.0], np.float32), "b")
    dims = ["batch", 1, "x", "y", "z"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], kernel_shape=[1, 1, 1])],
        "tiny_seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, "x", "y", "z"])],
        [weight, bias],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    sidecar = {
        "format": "medtune.model/1",
        "task": "segmentation",
        "spatial_dims": 3,
        "input": {"name": "image", "channels": 1, "dynamic_batch": True, "dynamic_spatial": True},
        "output": {"name": "logits"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "preprocessing": [],
        "sliding_window": {"roi_size": [8, 8, 8], "overlap": 0.25, "mode": "constant"},
        "postprocessing": {"activation": "softmax", "argmax": True},
        "onnx_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    (folder / "model.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return path


@pytest.fixture()
def dataset(scene, tmp_path) -> tuple[Path, Path, list[str]]:
    """A segmentation dataset with three unlabeled cases of different contrast (so their entropies differ)."""
    ds = DatasetLogic.create_or_open(tmp_path / "ds", "segmentation", LABELS)
    rng = np.random.default_rng(0)
    ids = []
    for n, scale in enumerate((0.05, 0.6, 2.0)):
        arr = (scale * rng.standard_normal(SHAPE)).astype(np.float32)
        affine = np.diag([1.0, 1.2, 2.0, 1.0])
        affine[:3, 3] = (5.0 * n, -3.0, 7.0)
        volume = array_to_volume(scene, arr, affine, f"source {n}")
        ids.append(ds.import_volume(volume))
        scene.RemoveNode(volume)
    return ds.root, _model(tmp_path / "model"), ids


def _poll(session: MedTuneSession, what: str, limit: int = 3000):
    for _ in range(limit):  # a bound on polls (0.05 s apart), not a timing assertion
        report = session.poll()
        assert not report.errors, report.errors
        if getattr(report, what):
            return report
        time.sleep(0.05)
    raise AssertionError(f"{what} never reported")


def test_ui_calls_return_while_the_model_loads_and_predicts(scene, dataset, monkeypatch):
    """Inference is held inside the labeling worker (a gate the test opens later). Meanwhile every UI-facing call
    returns: had any of them loaded the model or predicted on this thread, it would wait on the closed gate and
    the test would fail. Afterwards: which threads loaded and ran the model, with which provider."""
    from medtune.runtime import segment

    root, model_path, ids = dataset
    gate, entered = threading.Event(), threading.Event()
    calls: list[tuple[str, str, str]] = []
    real_load, real_segment = module_logic.load_model, segment.segment_volume

    def recording_load(path, provider="auto", threads=None):
        calls.append(("load", threading.current_thread().name, provider))
        return real_load(path, provider, threads)

    def gated_segment(model, volume, path=None):
        calls.append(("predict", threading.current_thread().name, model.provider))
        entered.set()
        assert gate.wait(120), "inference gate never opened: a UI-facing call must have blocked the test thread"
        return real_segment(model, volume, path)

    monkeypatch.setattr(module_logic, "load_model", recording_load)
    monkeypatch.setattr(segment, "segment_volume", gated_segment)

    session = MedTuneSession()
    session.open_dataset(root)
    session.set_model(model_path)
    session.set_provider("cpu")
    with pytest.raises(MedTuneError, match="unknown provider 'warp'"):
        session.set_provider("warp")

    future = session.start_next_case(use_model=True)  # returns: the ranking runs in the worker
    assert entered.wait(120) and not future.done()
    # --- the UI keeps working while the worker is inside inference ---
    report = session.poll()
    assert report.busy and report.case_ready is None and not report.errors
    listed = session.cases()  # ranks from the cache only
    assert {c["id"] for c in listed} == set(ids) and all(c["entropy"] is None for c in listed)
    assert session.model_sha() == json.loads((model_path.parent / "model.json").read_text())["onnx_sha256"]
    assert not session.has_unsaved_labels() and session.busy()
    with pytest.raises(MedTuneError, match="still preparing"):
        session.start_load_case(ids[0])
    assert session.start_prefill() == ids  # queued behind the running item, on the same worker
    assert all(name.startswith(LABEL_WORKER) for _, name, _ in calls)  # nothing ran here so far
    gate.set()

    ready = _poll(session, "case_ready")
    cache = read_uncertainty(DatasetLogic(root))
    entropies = {k: v["entropy"] for k, v in cache["cases"].items()}
    assert set(entropies) == set(ids) and ready.case_ready == max(entropies, key=entropies.get)
    if session.busy():
        _poll(session, "prefilled")

    main = threading.current_thread().name
    assert calls and {name for _, name, _ in calls} == {f"{LABEL_WORKER}_0"} and main not in {n for _, n, _ in calls}
    assert [p for kind, _, p in calls if kind == "load"] == ["cpu"]  # opened once, on the chosen provider
    assert {p for kind, _, p in calls if kind == "predict"} == {"CPUExecutionProvider"}

    # loading the chosen case is scene work only: the prediction pre-fills it, segments named from the dataset
    n_predict = sum(kind == "predict" for kind, _, _ in calls)
    volume, segmentation = session.load_case(ready.case_ready, scene)
    assert sum(kind == "predict" for kind, _, _ in calls) == n_predict
    assert volume.GetDisplayNode() is not None and segmentation.GetDisplayNode() is not None
    seg = segmentation.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    colors = [tuple(round(c, 3) for c in seg.GetNthSegment(i).GetColor()) for i in range(seg.GetNumberOfSegments())]
    assert names == ["liver", "tumor"] and len(set(colors)) == 2
    predicted = DatasetLogic(root).segmentation_mask(segmentation, volume)
    assert set(np.unique(predicted)) <= {0, 1, 2} and predicted.any()
    session.cancel_all()


def test_run_uses_the_chosen_provider_in_a_worker(scene, dataset, monkeypatch):
    root, model_path, ids = dataset
    threads: list[tuple[str, str]] = []
    from MedTuneLib import run_logic

    real = run_logic.load_model

    def recording(path, provider="auto", threads_=None):
        threads.append((threading.current_thread().name, provider))
        return real(path, provider, threads_)

    monkeypatch.setattr(run_logic, "load_model", recording)
    session = MedTuneSession()
    ds = session.open_dataset(root)
    session.set_model(model_path)
    session.set_provider("cpu")
    volume, _ = ds.load_case(ids[2], scene)
    session.start_run(volume)
    result = _poll(session, "run_result").run_result
    assert threads == [(threads[0][0], "cpu")] and threads[0][0].startswith("medtune-run")
    assert result.provider == "CPUExecutionProvider" and result.node.GetDisplayNode() is not None
    seg = result.node.GetSegmentation()
    assert [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())] == ["liver", "tumor"]


def test_uncertainty_json_has_one_consistent_writer(dataset):
    """Two pre-fills of different cases at once (as a second session could) both end up in the cache."""
    root, model_path, ids = dataset
    ds = DatasetLogic(root)
    model = load_model(model_path, "cpu")
    workers = [threading.Thread(target=prefill, args=(ds, [case], model)) for case in ids]
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    cache = read_uncertainty(ds)
    assert cache["model_sha256"] == model.sidecar["onnx_sha256"] and set(cache["cases"]) == set(ids)
    assert not list((root / "predictions").glob("*.tmp*"))  # atomic writes leave no temp files
