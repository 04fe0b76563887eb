"""Label / Run panel logic with real MRML nodes (slicer-core) and a real exported classifier: the class picker,
pre-fill and most-uncertain-first queue for classification, classification results as a table node, and
the bad inputs of issue 5 (no image data, segmentation on another grid, model that does not fit, dataset
folder that is not writable) each as a one-line error with no labels lost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_OVERRIDES

pytest.importorskip("slicer", reason="slicer-core not installed (pip install slicer-core) - Slicer logic untested")
nib = pytest.importorskip("nibabel")


from MedTuneLib.dataset_logic import DatasetLogic, volume_to_array  # noqa: E402
from MedTuneLib.labeling_logic import check_model_fits, labeling_queue, load_for_labeling, read_uncertainty  # noqa: E402
from MedTuneLib.run_logic import load_model, run_on_volume, table_to_dict  # noqa: E402

from medtune.errors import MedTuneError  # noqa: E402

SEG_LABELS = {0: "background", 1: "liver", 2: "tumor"}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[Path, Path]:
    """(2D PNG classification dataset with 4 unlabeled cases, exported tiny classifier trained on it)."""
    pytest.importorskip("torch", reason="torch (training extra) not installed: the classifier fixture is trained")
    from medtune.data import make_synthetic_classification
    from medtune.export.from_run import export_run
    from medtune.finetune.runner import finetune

    base = tmp_path_factory.mktemp("slicer_cls")
    ds = base / "ds"
    make_synthetic_classification(ds, n_train=16, n_val=8, size=32, seed=4, n_test=4)
    finetune(ds, "2d_classification", base / "run", overrides={**TINY_OVERRIDES, "epochs": 1}, progress_bar=False)
    export_run(base / "run", base / "model", n_samples=4)
    data = json.loads((ds / "datalist.json").read_text())
    data["testing"] = [{"image": e["image"]} for e in data["testing"]]  # the test cases are still to label
    (ds / "datalist.json").write_text(json.dumps(data))
    return ds, base / "model"


def _volume(scene, kji: np.ndarray, name: str, spacing=(1.0, 1.0, 1.0)):
    import slicer.util

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, kji)
    node.SetSpacing(*spacing)
    return node


def test_class_picker_prefill_queue_and_table(scene, classifier):
    ds_root, model_dir = classifier
    ds = DatasetLogic.create_or_open(ds_root, "classification")
    assert ds.class_choices() == sorted(ds.labels.items()) and len(ds.class_choices()) == 2
    todo = [c for c in ds.list_cases() if c["status"] == "unlabeled"]
    assert len(todo) == 4 and {c["split"] for c in todo} == {"testing"}

    model = load_model(model_dir)
    queue = labeling_queue(ds, model)
    entropies = [q["entropy"] for q in queue]
    assert [q["id"] for q in queue] and entropies == sorted(entropies, reverse=True)
    assert all(0.0 <= e <= 1.0 for e in entropies) and len(set(entropies)) > 1
    cache = read_uncertainty(ds)
    assert cache["model_sha256"] == model.sidecar["onnx_sha256"] and set(cache["cases"]) == {q["id"] for q in queue}

    # the most uncertain case first; its prediction agrees with the runtime's classify() of the PNG file
    first = queue[0]["id"]
    volume, predicted = load_for_labeling(ds, first, scene, model)
    png = ds.root / "images" / f"{first}.png"
    runtime = model.classify([png])[0]
    assert predicted == runtime["predicted_label"]
    saved = json.loads((ds.root / "predictions" / f"{first}.json").read_text())
    for name, p in runtime["probabilities"].items():
        assert saved["probabilities"][name] == pytest.approx(p, abs=1e-6)

    # the loaded single-slice volume holds the PNG's pixels; running the model on it gives a probability table
    from PIL import Image

    pixels = np.asarray(Image.open(png))
    arr, _ = volume_to_array(volume)
    np.testing.assert_array_equal(arr[:, :, 0].T, pixels)
    result = run_on_volume(volume, model_dir)
    assert result.task == "classification" and result.node.GetClassName() == "vtkMRMLTableNode"
    table = table_to_dict(result.node)
    assert list(table) == model.labels
    for name, p in runtime["probabilities"].items():
        assert table[name] == pytest.approx(p, abs=1e-5)

    # class picker: labeling moves the case to training, the previous datalist is kept
    versions_before = len(list((ds.root / ".versions").glob("datalist.json.*")))
    ds.set_class(first, 1)
    assert ds.get_class(first) == 1
    assert {c["id"]: (c["status"], c["split"]) for c in ds.list_cases()}[first] == ("labeled", "training")
    assert len(list((ds.root / ".versions").glob("datalist.json.*"))) == versions_before + 1
    with pytest.raises(MedTuneError, match="class 7 is not one of"):
        ds.set_class(first, 7)
    assert [q["id"] for q in labeling_queue(ds, model)] == [q["id"] for q in queue[1:]]  # cached: no re-run

    # import a single-slice volume from the scene with a class; a 2D model refuses a multi-slice volume
    kji = np.random.default_rng(0).integers(0, 255, size=(1, 32, 32)).astype(np.uint8)
    case = ds.import_image(_volume(scene, kji, "new slice"), class_value=0)
    np.testing.assert_array_equal(np.asarray(Image.open(ds.root / "images" / f"{case}.png")), kji[0])
    with pytest.raises(MedTuneError, match="model is 2D but the volume has 5 slices"):
        run_on_volume(_volume(scene, np.zeros((5, 32, 32), np.uint8), "stack"), model_dir)
    with pytest.raises(MedTuneError, match="single-slice"):
        ds.import_image(_volume(scene, np.zeros((5, 32, 32), np.uint8), "stack"))


def test_model_must_fit_the_dataset(tmp_path, classifier):
    from medtune.data.contract import create_dataset

    model = load_model(classifier[1])
    seg = DatasetLogic.create_or_open(tmp_path / "seg", "segmentation", SEG_LABELS)
    with pytest.raises(MedTuneError, match="model task is 'classification' but the dataset is 'segmentation'"):
        check_model_fits(seg, model)
    vol = DatasetLogic.create_or_open(tmp_path / "cls3d", "classification", {0: "a", 1: "b"}, spatial_dims=3)
    with pytest.raises(MedTuneError, match="model is 2D but the dataset is 3D"):
        labeling_queue(vol, model)
    create_dataset(tmp_path / "rgb", name="rgb", task="classification", spatial_dims=2, labels={0: "a", 1: "b"},
                   modality="photo", channels=3)  # fmt: skip
    with pytest.raises(MedTuneError, match="model expects 1 channel"):
        check_model_fits(DatasetLogic(tmp_path / "rgb"), model)


def test_bad_inputs_give_one_line_errors_and_lose_nothing(scene, tmp_path):
    import slicer.util

    ds = DatasetLogic.create_or_open(tmp_path / "ds", "segmentation", SEG_LABELS)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(MedTuneError, match="'empty' has no image data"):
        ds.import_volume(empty)
    with pytest.raises(MedTuneError, match="no image data"):
        run_on_volume(empty, tmp_path / "nomodel")

    kji = np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10)
    volume = _volume(scene, kji, "ct", spacing=(0.8, 0.8, 2.0))
    other = _volume(scene, kji, "other grid", spacing=(1.0, 1.0, 2.0))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn on other grid")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(other)
    mask = np.zeros(kji.shape, np.uint8)
    mask[2:4, 2:5, 3:7] = 1
    seg_id = seg.GetSegmentation().AddEmptySegment("liver", "liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, seg_id, other)
    datalist_before = (ds.root / "datalist.json").read_bytes()
    with pytest.raises(MedTuneError, match="'drawn on other grid' is on another grid") as err:
        ds.import_volume(volume, seg)
    assert "\n" not in str(err.value)
    assert (ds.root / "datalist.json").read_bytes() == datalist_before and not list((ds.root / "images").glob("*"))

    # a volume under a (non-hardened) transform would be stored without it: refused
    moved = _volume(scene, kji, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    moved.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(MedTuneError, match="'moved' is under a transform; harden"):
        ds.import_volume(moved)

    # a segmentation on the volume's own grid is accepted
    good = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "good")
    good.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    gid = good.GetSegmentation().AddEmptySegment("liver", "liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, good, gid, volume)
    case = ds.import_volume(volume, good)
    label_file = ds.root / "labels" / f"{case}.nii.gz"
    before = label_file.read_bytes()

    # labels folder not writable (here: a file stands where the folder must be): clear error, labels kept
    _, loaded = ds.load_case(case, scene)
    (ds.root / "labels").rename(ds.root / "labels_moved")
    (ds.root / "labels").write_text("not a folder")
    with pytest.raises(MedTuneError, match="not writable"):
        ds.save_labels(case, loaded)
    assert loaded.GetScene() is scene and loaded.GetSegmentation().GetNumberOfSegments() == 2  # edits still there
    (ds.root / "labels").unlink()
    (ds.root / "labels_moved").rename(ds.root / "labels")
    assert label_file.read_bytes() == before

    with pytest.raises(MedTuneError, match="not writable"):
        DatasetLogic.create_or_open("/proc/medtune-dataset", "segmentation", SEG_LABELS)


@pytest.mark.slow  # a child-process export
def test_export_failure_is_one_line(tmp_path):
    from MedTuneLib.run_logic import ExportJob

    with pytest.raises(MedTuneError, match="no model.pt"):
        ExportJob(tmp_path, tmp_path / "model")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_bytes(b"not a checkpoint")
    job = ExportJob(run, tmp_path / "model").start()
    with pytest.raises(MedTuneError) as err:
        job.wait(timeout=300)
    assert str(err.value).startswith(str(run)) and "\n" not in str(err.value)
    assert not (tmp_path / "model" / "model.onnx").exists()


def _poll_until(fn, timeout: float = 300.0):
    import time

    deadline = time.monotonic() + timeout
    while True:
        report = fn()
        if report is not None:
            return report
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow  # child-process fine-tune and export jobs
def test_session_background_work_and_errors_reported_once(scene, classifier, tmp_path):
    """The Widget's timer renders ``session.poll()``: pre-fill in a worker thread, a run in a worker thread,
    and a failed fine-tune reported exactly once while the other work goes on."""
    from MedTuneLib.finetune_logic import FinetuneSettings
    from MedTuneLib.module_logic import MedTuneSession

    ds_root, model_dir = classifier
    session = MedTuneSession()
    ds = session.open_dataset(ds_root, "segmentation")  # an existing dataset keeps its own task
    assert ds.is_classification and session.default_preset() == "2d_classification"
    session.set_model(model_dir / "model.onnx")
    (ds.root / "predictions" / "uncertainty.json").unlink(missing_ok=True)
    listed = session.cases()  # no inference on the UI thread: nothing cached yet
    assert [c["entropy"] for c in listed] == [None] * len(listed)
    missing = session.start_prefill()
    assert missing and session.busy()
    report = _poll_until(lambda: r if (r := session.poll()).prefilled is not None else None)
    assert report.prefilled == len(missing) and not report.errors
    queue = [c for c in session.cases() if c["status"] != "labeled"]
    assert [c["entropy"] for c in queue] == sorted((c["entropy"] for c in queue), reverse=True)

    bad = FinetuneSettings(ds.root, session.new_run_dir(), preset="2d_classification", pretrained="none",
                           epochs=1, device="cpu", arch="tiny_cnn", overrides={"image_size": "not-a-size"})  # fmt: skip
    session.start_finetune(bad)
    volume = _volume(scene, np.random.default_rng(1).integers(0, 255, size=(1, 32, 32)).astype(np.uint8), "img")
    session.start_run(volume)
    reports = []
    while session.busy():
        reports.append(session.poll())
    reports.append(session.poll())
    errors = [e for r in reports for e in r.errors]
    assert len(errors) == 1 and errors[0].startswith("Fine-tuning failed: ") and "\n" not in errors[0]
    runs = [r.run_result for r in reports if r.run_result is not None]
    assert len(runs) == 1 and runs[0].task == "classification" and runs[0].volume is volume
    assert not session.poll().errors  # reported once

    # a new start never reuses a folder that holds a run; resume keeps the run's own settings
    assert session.run_dir_for_start(bad.out) != bad.out
    assert session.run_dir_for_start(tmp_path / "fresh") == tmp_path / "fresh"
    assert session.run_dir_for_start("").parent == ds.root / "runs"


def test_labels_for_classification_and_segment_mapping(scene, tmp_path):
    import slicer.util
    from MedTuneLib.dataset_logic import parse_labels
    from MedTuneLib.module_logic import MedTuneSession

    assert parse_labels("0: benign, 1: malignant", background=False) == {0: "benign", 1: "malignant"}
    assert parse_labels("1: cat, 2: dog", background=False) == {1: "cat", 2: "dog"}  # no invented class

    session = MedTuneSession()
    ds = session.open_dataset(tmp_path / "ds", "segmentation", "1: liver, 2: tumor")
    kji = np.zeros((6, 8, 10), np.int16)
    volume = _volume(scene, kji, "ct")
    case = ds.import_volume(volume)
    vol, seg = session.load_case(case, scene, use_model=False)
    assert not session.has_unsaved_labels()
    mask = np.zeros(kji.shape, np.uint8)
    mask[1:3, 2:4, 2:5] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, "label_2", vol)
    assert session.has_unsaved_labels()
    session.save_labels()
    assert not session.has_unsaved_labels()
    saved = np.asarray(nib.load(ds.root / "labels" / f"{case}.nii.gz").dataobj)
    assert set(np.unique(saved)) == {0, 2}  # painted in "tumor": value 2
    session.close_case()
    assert vol.GetScene() is None and seg.GetScene() is None and session.case_id is None

    # a lone "Segment_2" (e.g. imported from a labelmap holding only value 2) is label 2, not the first label
    only2 = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "only 2")
    only2.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    sid = only2.GetSegmentation().AddEmptySegment("Segment_2", "Segment_2")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, only2, sid, volume)
    case2 = ds.import_volume(volume, only2)
    assert set(np.unique(np.asarray(nib.load(ds.root / "labels" / f"{case2}.nii.gz").dataobj))) == {0, 2}
    twice = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "twice")
    for name in ("tumor", "Segment_2"):
        twice.GetSegmentation().AddEmptySegment(name, name)
    with pytest.raises(MedTuneError, match="both map to label 2"):
        ds.import_volume(volume, twice)
    unknown = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "unknown")
    for name in ("liver", "vessel"):
        unknown.GetSegmentation().AddEmptySegment(name, name)
    with pytest.raises(MedTuneError, match="'vessel' matches no label"):
        ds.import_volume(volume, unknown)

    # saving a segmentation drawn on another grid is refused; the label file on disk is kept
    other = _volume(scene, kji, "other", spacing=(2.0, 2.0, 2.0))
    off = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "off grid")
    off.SetReferenceImageGeometryParameterFromVolumeNode(other)
    oid = off.GetSegmentation().AddEmptySegment("liver", "liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, off, oid, other)
    before = (ds.root / "labels" / f"{case}.nii.gz").read_bytes()
    with pytest.raises(MedTuneError, match="on another grid"):
        ds.save_labels(case, off)
    assert (ds.root / "labels" / f"{case}.nii.gz").read_bytes() == before
