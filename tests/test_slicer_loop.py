"""The Slicer module's whole loop against slicer-core's real MRML scene, without the app:
volumes and segmentations read through storage nodes (NIfTI, ``.seg.nrrd``) -> import -> label -> fine-tune
(child process, 1 epoch, tiny net) -> export (child process, parity gate) -> run on the current volume ->
the segmentation node equals the torch-free runtime's NIfTI output voxel for voxel. Then the labeling queue
is pre-filled by the model and ordered most-uncertain-first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core not installed (pip install slicer-core) - Slicer logic untested")
nib = pytest.importorskip("nibabel")


from MedTuneLib.dataset_logic import volume_to_array  # noqa: E402
from MedTuneLib.finetune_logic import FinetuneSettings  # noqa: E402
from MedTuneLib.labeling_logic import read_uncertainty  # noqa: E402
from MedTuneLib.module_logic import MedTuneSession  # noqa: E402

LABELS = {0: "background", 1: "inner", 2: "outer"}


def _read_volume_node(scene, path: Path, name: str):
    """A scalar volume node filled by Slicer's own NIfTI reader (vtkMRMLVolumeArchetypeStorageNode)."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert isinstance(node, slicer.vtkMRMLScalarVolumeNode)
    return node


def _segmentation_via_seg_nrrd(scene, label_path: Path, volume, tmp: Path):
    """Label NIfTI -> labelmap node -> segmentation -> ``.seg.nrrd`` on disk -> read back (storage nodes)."""
    import slicer

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lm")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(label_path))
    assert storage.ReadData(labelmap)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, seg)
    seg_file = tmp / f"{label_path.name.split('.')[0]}.seg.nrrd"
    writer = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    writer.SetFileName(str(seg_file))
    assert writer.WriteData(seg)
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg from disk")
    reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(seg_file))
    assert reader.ReadData(loaded)
    segmentation = loaded.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):  # imported segments are named by value: "1", "2"
        segment = segmentation.GetNthSegment(i)
        segment.SetName(LABELS[int(segment.GetName().split("_")[-1])])
    return loaded


def _poll(fn, timeout: float = 600.0):
    """Call ``fn`` until it returns something (as the Widget's timer does)."""
    import time

    deadline = time.monotonic() + timeout
    while (result := fn()) is None:
        assert time.monotonic() < deadline, f"{fn} did not finish within {timeout} s"
        time.sleep(0.2)
    return result


@pytest.mark.slow  # child-process fine-tune and export
def test_full_loop_import_label_finetune_export_run(scene, tmp_path):
    """Every step through the module's session object (what the Widget calls), with the files checked."""
    pytest.importorskip("torch", reason="torch (training extra) not installed: the fine-tune/export loop is skipped")
    import slicer.util

    from medtune.data.synthetic import make_synthetic_segmentation
    from medtune.runtime.segment import load_volume_model, segment_file

    source = tmp_path / "source"
    make_synthetic_segmentation(source, n_train=7, n_val=1, size=16, seed=5)
    src_list = json.loads((source / "datalist.json").read_text())
    cases = src_list["training"] + src_list["validation"]

    # 1. import: 6 cases with segmentations (through .seg.nrrd), 2 without
    session = MedTuneSession()
    ds = session.open_dataset(tmp_path / "ds", "segmentation", "1: inner, 2: outer")
    assert ds.labels == LABELS and session.default_preset() == "3d_segmentation"
    ids = []
    for n, entry in enumerate(cases):
        volume = _read_volume_node(scene, source / entry["image"], f"vol{n}")
        seg = _segmentation_via_seg_nrrd(scene, source / entry["label"], volume, tmp_path) if n < 6 else None
        ids.append(session.import_volume(volume, seg))
    assert [c["status"] for c in ds.list_cases()] == ["labeled"] * 6 + ["unlabeled"] * 2
    ref_label = np.asarray(nib.load(source / cases[0]["label"]).dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(ds.root / "labels" / f"{ids[0]}.nii.gz").dataobj), ref_label)

    # 2. label the next case (no model yet: datalist order) in the Segment Editor's place: paint, save
    assert session.next_case(scene) == ids[6]
    volume, seg = session.case_nodes
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["inner", "outer"]
    truth = np.asarray(nib.load(source / cases[6]["label"]).dataobj)  # (i, j, k)
    for value in (1, 2):
        kji = np.ascontiguousarray((truth == value).transpose(2, 1, 0).astype(np.uint8))
        slicer.util.updateSegmentBinaryLabelmapFromArray(kji, seg, f"label_{value}", volume)
    assert "previous version kept" in session.save_labels()
    np.testing.assert_array_equal(np.asarray(nib.load(ds.root / "labels" / f"{ids[6]}.nii.gz").dataobj), truth)
    assert [c["status"] for c in ds.list_cases()].count("unlabeled") == 1

    # 3. fine-tune in a child process (1 epoch, tiny net); the session makes the validation split
    run = session.new_run_dir()
    tiny = {"patch_size": [16, 16, 16], "num_workers": 0, "min_train_steps": 0}
    settings = FinetuneSettings(ds.root, run, preset=session.default_preset(), pretrained="none", epochs=1,
                                device="cpu", arch="tiny_unet", overrides=tiny)  # fmt: skip
    session.start_finetune(settings)
    assert len(json.loads((ds.root / "datalist.json").read_text())["validation"]) == 1
    state = _poll(lambda: s if (s := session.poll_finetune()).finished else None)
    assert state.status == "completed", session.job.last_log_line()
    assert state.epoch == 1 and state.metric_name == "val_mean_dice" and 0.0 <= state.metric <= 1.0
    assert session.resumable_run() is None  # finished runs are not resumable

    # 4. export (child process; parity gate on real validation volumes); the export becomes the current model
    session.start_export(precision="fp32")
    exported = _poll(session.poll_export)
    parity = exported.parity
    assert parity["passed"] and parity["max_abs_error"] <= parity["allowed_abs_error"]
    assert "parity on 1 real inputs" in exported.text()
    assert session.model_path == ds.root / "models" / f"{run.name}_fp32" / "model.onnx"

    # 5. run on the current volume (worker thread) -> segmentation node; 6. equals the runtime's NIfTI output
    current = _read_volume_node(scene, ds.root / "images" / f"{ids[7]}.nii.gz", "current")
    session.start_run(current, provider="auto")
    result = _poll(session.finish_run)
    # auto without a GPU: onnxruntime CPU, or OpenVINO where installed and measured faster for this model
    assert result.task == "segmentation" and result.provider in ("CPUExecutionProvider", "OpenVINO")
    segment_file(load_volume_model(session.model_path), ds.root / "images" / f"{ids[7]}.nii.gz", tmp_path / "o.nii.gz")
    runtime = np.asarray(nib.load(tmp_path / "o.nii.gz").dataobj)
    np.testing.assert_array_equal(result.labels, runtime)
    node = result.node
    assert node.GetSegmentation().GetNumberOfSegments() == 2
    scene_labels = np.zeros(runtime.shape[::-1], np.uint8)  # (k, j, i)
    for value in (1, 2):
        got = slicer.util.arrayFromSegmentBinaryLabelmap(node, f"label_{value}", current)
        scene_labels[got > 0] = value
    np.testing.assert_array_equal(scene_labels.transpose(2, 1, 0), runtime)
    assert np.isin(runtime, [0, 1, 2]).all() and len(np.unique(runtime)) >= 2  # a non-trivial comparison
    assert np.allclose(volume_to_array(current)[1], nib.load(tmp_path / "o.nii.gz").affine, atol=1e-5)

    # 7. labeling queue: the remaining unlabeled case is pre-filled by the model (worker thread), with its entropy
    assert session.cases()[0]["entropy"] is None  # listing runs no inference
    assert session.start_prefill() == [ids[7]]
    assert _poll(lambda: r.prefilled if (r := session.poll()).prefilled is not None else None) == 1
    queue = session.cases()
    assert queue[0]["id"] == ids[7] and 0.0 <= queue[0]["entropy"] <= 1.0
    assert [c["entropy"] for c in queue[1:]] == [None] * 7  # labeled cases follow
    assert read_uncertainty(ds)["model_sha256"] == session.model_sha()
    np.testing.assert_array_equal(np.asarray(nib.load(ds.root / "predictions" / f"{ids[7]}.nii.gz").dataobj), runtime)
    assert {c["id"]: c["status"] for c in ds.list_cases()}[ids[7]] == "predicted"
    assert session.next_case(scene) == ids[7]
    got = slicer.util.arrayFromSegmentBinaryLabelmap(session.case_nodes[1], "label_1", session.case_nodes[0])
    np.testing.assert_array_equal(got > 0, runtime.transpose(2, 1, 0) == 1)
