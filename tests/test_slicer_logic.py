"""Slicer extension logic (MedTuneLib) against real MRML nodes from slicer-core, without the Slicer app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core not installed (pip install slicer-core) - Slicer logic untested")
nib = pytest.importorskip("nibabel")


from MedTuneLib.dataset_logic import DatasetLogic, ijk_to_ras, volume_to_array  # noqa: E402

LABELS = {0: "background", 1: "liver", 2: "tumor"}


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    return rz @ rx


def _make_volume(scene, name: str = "CT"):
    """An int16 volume (k, j, i) = (6, 7, 9) with spacing (0.7, 0.8, 2.5), an origin and an oblique direction."""
    import slicer.util
    import vtk

    rng = np.random.default_rng(0)
    kji = rng.integers(-1000, 2000, size=(6, 7, 9)).astype(np.int16)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, kji)
    node.SetSpacing(0.7, 0.8, 2.5)
    node.SetOrigin(-12.5, 30.25, 101.0)
    direction = vtk.vtkMatrix4x4()
    rot = _rotation(30)
    for r in range(3):
        for c in range(3):
            direction.SetElement(r, c, rot[r, c])
    node.SetIJKToRASDirectionMatrix(direction)
    return node, kji


def _make_segmentation(scene, volume, names=("liver", "tumor")):
    """Two segments on the volume grid: a box (``names[0]``) and a smaller box inside it (``names[1]``)."""
    import slicer.util

    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    shape = slicer.util.arrayFromVolume(volume).shape
    a = np.zeros(shape, np.uint8)
    a[1:5, 1:6, 2:8] = 1
    b = np.zeros(shape, np.uint8)
    b[2:4, 3:5, 4:6] = 1
    expected = np.zeros(shape, np.uint8)  # (k, j, i) with dataset label values
    expected[a > 0] = 1
    expected[b > 0] = 2
    for name, arr in zip(names, (a, b), strict=True):
        seg_id = seg.GetSegmentation().AddEmptySegment(name, name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(arr, seg, seg_id, volume)
    return seg, expected


def test_import_reload_save_roundtrip(scene, tmp_path):
    import slicer

    root = tmp_path / "ds"
    logic = DatasetLogic.create_or_open(root, "segmentation", LABELS, modality="CT")
    volume, kji = _make_volume(scene)
    seg, expected_kji = _make_segmentation(scene, volume)
    affine = ijk_to_ras(volume)
    assert not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))  # really oblique

    case_id = logic.import_volume(volume, seg)
    unlabeled_id = logic.import_volume(volume)
    assert case_id != unlabeled_id and case_id.startswith("case_")
    assert "CT" not in case_id

    # NIfTI on disk: values (i, j, k) and affine == node IJKToRAS (RAS, float32-exact in the header)
    img = nib.load(root / "images" / f"{case_id}.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), kji.transpose(2, 1, 0))
    assert np.asarray(img.dataobj).dtype == np.int16
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(img.affine, affine.astype(np.float32))
    lab = nib.load(root / "labels" / f"{case_id}.nii.gz")
    np.testing.assert_array_equal(np.asarray(lab.dataobj), expected_kji.transpose(2, 1, 0))
    np.testing.assert_array_equal(lab.affine, img.affine)

    datalist = json.loads((root / "datalist.json").read_text())
    assert datalist["training"] == [{"image": f"images/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz"}]
    assert datalist["testing"] == [{"image": f"images/{unlabeled_id}.nii.gz"}]
    assert logic.list_cases() == [
        {"id": case_id, "status": "labeled", "split": "training"},
        {"id": unlabeled_id, "status": "unlabeled", "split": "testing"},
    ]

    # load back into a fresh scene: identical voxels and geometry
    fresh = slicer.vtkMRMLScene()
    vol2, seg2 = DatasetLogic(root).load_case(case_id, scene=fresh)
    arr2, affine2 = volume_to_array(vol2)
    np.testing.assert_array_equal(arr2, kji.transpose(2, 1, 0))
    np.testing.assert_allclose(affine2, img.affine, rtol=0, atol=1e-12)
    np.testing.assert_allclose(affine2, affine, atol=1e-5)
    segmentation = seg2.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["liver", "tumor"]
    for value, seg_id in ((1, "label_1"), (2, "label_2")):
        got = slicer.util.arrayFromSegmentBinaryLabelmap(seg2, seg_id, vol2)
        np.testing.assert_array_equal(got > 0, expected_kji == value)
    vol3, seg3 = DatasetLogic(root).load_case(unlabeled_id, scene=fresh)
    assert seg3 is None and vol3 is not None

    # save labels twice: the first label file is kept in .versions/
    label_path = root / "labels" / f"{case_id}.nii.gz"
    first = label_path.read_bytes()
    seg2.GetSegmentation().RemoveSegment("label_2")  # edit: drop the tumor
    logic.save_labels(case_id, seg2)
    np.testing.assert_array_equal(np.asarray(nib.load(label_path).dataobj), (expected_kji == 1).T.astype(np.uint8))
    kept = sorted((root / ".versions").glob(f"{case_id}.nii.gz.*"))
    assert len(kept) == 1 and kept[0].read_bytes() == first
    second = label_path.read_bytes()
    logic.save_labels(case_id, seg)  # back to both segments
    kept = sorted((root / ".versions").glob(f"{case_id}.nii.gz.*"))
    assert len(kept) == 2 and {k.read_bytes() for k in kept} == {first, second}
    restored = nib.load(label_path)
    np.testing.assert_array_equal(np.asarray(restored.dataobj), expected_kji.transpose(2, 1, 0))
    np.testing.assert_array_equal(restored.affine, img.affine)

    # labeling the unlabeled case moves it to training; a prediction marks a case "predicted"
    vol4, _ = logic.load_case(unlabeled_id, scene=fresh)
    seg4, _ = _make_segmentation(fresh, vol4, names=("Segment_1", "tumor"))  # by position, then by name
    logic.save_labels(unlabeled_id, seg4)
    np.testing.assert_array_equal(
        np.asarray(nib.load(root / "labels" / f"{unlabeled_id}.nii.gz").dataobj), expected_kji.transpose(2, 1, 0)
    )
    third_id = logic.import_volume(volume)
    (root / "predictions").mkdir()
    (root / "predictions" / f"{third_id}.nii.gz").write_bytes(first)
    assert [(c["id"], c["status"]) for c in logic.list_cases()] == [
        (case_id, "labeled"),
        (unlabeled_id, "labeled"),
        (third_id, "predicted"),
    ]
    _, pred_seg = logic.load_case(third_id, scene=fresh)
    assert pred_seg is not None and pred_seg.GetSegmentation().GetNumberOfSegments() == 2

    from medtune.data.contract import validate_dataset

    assert validate_dataset(root)["training"]["n"] == 2


def test_create_or_open_refuses_other_task(scene, tmp_path):
    from medtune.errors import MedTuneError

    DatasetLogic.create_or_open(tmp_path / "ds", "segmentation", LABELS)
    assert DatasetLogic.create_or_open(tmp_path / "ds", "segmentation").labels == LABELS
    with pytest.raises(MedTuneError, match="task"):
        DatasetLogic.create_or_open(tmp_path / "ds", "classification")


def test_parse_labels():
    from MedTuneLib.dataset_logic import parse_labels

    from medtune.errors import MedTuneError

    assert parse_labels("1: liver, 2 : tumor") == LABELS
    assert parse_labels("0: bg, 1: x") == {0: "bg", 1: "x"}
    assert parse_labels("  ") == {}
    for bad in ("liver", "1:", "a: b", "1: a, 1: b"):
        with pytest.raises(MedTuneError):
            parse_labels(bad)


def test_module_files_are_consistent():
    """The scripted module lists every MedTuneLib file, the UI has the five panels and every widget the Widget
    uses, the module compiles, ``Testing/`` exists, the icon is a PNG."""
    import ast
    import re
    import xml.etree.ElementTree as ET

    module = Path(__file__).resolve().parents[1] / "slicer_extension" / "MedTune"
    cmake = (module / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "MedTune")
    for path in sorted((module / "MedTuneLib").glob("*.py")):
        assert f"MedTuneLib/{path.name}" in cmake, f"{path.name} missing from CMakeLists.txt"
    assert "add_subdirectory(Testing)" in cmake and (module / "Testing" / "CMakeLists.txt").is_file()
    ui = ET.parse(module / "Resources" / "UI" / "MedTune.ui").getroot()
    panels = [
        w.find("property[@name='text']/string").text
        for w in ui.iter("widget")
        if w.get("class") == "ctkCollapsibleButton"
    ]
    assert panels == ["Dataset", "Label", "Fine-tune", "Export", "Run"]
    source = (module / "MedTune.py").read_text()
    ast.parse(source)
    names = {w.get("name") for w in ui.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used and used <= names, f"widgets used but not in the UI: {sorted(used - names)}"
    assert (module / "Resources" / "Icons" / "MedTune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_import_dicom_series_keeps_geometry_and_no_identifiers(scene, tmp_path):
    from helpers import write_syn_series

    from medtune.runtime.dicom import read_dicom_series

    folder = tmp_path / "dicom"
    write_syn_series(folder)
    logic = DatasetLogic.create_or_open(tmp_path / "ds", "segmentation", LABELS, modality="MR")
    case_id = logic.import_dicom_series(folder)
    series = read_dicom_series(folder)
    img = nib.load(tmp_path / "ds" / "images" / f"{case_id}.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj), series.array)
    assert np.asarray(img.dataobj).dtype == np.int16
    np.testing.assert_allclose(img.affine, series.affine, atol=1e-5)
    assert logic.list_cases() == [{"id": case_id, "status": "unlabeled", "split": "testing"}]
    import gzip

    files = [p for p in (tmp_path / "ds").rglob("*") if p.is_file()]
    stored = b"".join(gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes() for p in files)
    assert b"SYN-001" not in stored and b"Synthetic" not in stored  # no patient identifiers copied
    volume, _ = logic.load_case(case_id, scene)
    np.testing.assert_allclose(volume_to_array(volume)[1], series.affine, atol=1e-5)
