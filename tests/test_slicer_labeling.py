"""Label / Run panel logic with real MRML nodes (slicer-core) and a real exported classifier: the class picker,
pre-fill and most-uncertain-first queue for classification, classification results as a table node, and
the bad inputs of issue 5 (no image data, segmentation on another grid, model that does not fit, dataset
folder that is not writable) each as a one-line error with no labels lost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES

pytest.importorskip("slicer", reason="slicer-core not installed (pip install slicer-core) - Slicer logic untested")
nib = pytest.importorskip("nibabel")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "MedTune"))

from MedTuneLib.dataset_logic import DatasetLogic, volume_to_array  # noqa: E402
from MedTuneLib.headless import init_headless_slicer  # noqa: E402
from MedTuneLib.labeling_logic import check_model_fits, labeling_queue, load_for_labeling, read_uncertainty  # noqa: E402
from MedTuneLib.run_logic import load_model, run_on_volume, table_to_dict  # noqa: E402

from medtune.errors import MedTuneError  # noqa: E402

SEG_LABELS = {0: "background", 1: "liver", 2: "tumor"}


@pytest.fixture(scope="module")
def scene():
    return init_headless_slicer()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> tuple[Path, Path]:
    """(2D PNG classification dataset with 4 unlabeled cases, exported tiny classifier trained on it)."""
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
