"""``roi_size: auto`` of the 3D segmentation preset: the patch derived from the dataset's median image shape
(in RAS order, after the preset's resampling), rounded down to the network's size multiple, capped, recorded in
the run so evaluate / export use the size the network was trained with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monai")
pytest.importorskip("nibabel")

from medtune.errors import MedTuneError  # noqa: E402
from medtune.finetune.roi import auto_patch_size, image_shape_ras, median_shape, round_roi  # noqa: E402


def test_round_roi_rounds_down_caps_and_keeps_the_smallest_input():
    assert round_roi([35.0, 50.0, 35.5], 16, 96) == [32, 48, 32]  # MSD Hippocampus' median shape, unet_zoo
    assert round_roi([512, 512, 120], 32, 96) == [96, 96, 96]
    assert round_roi([512, 60, 20], 32, 100) == [96, 32, 32]  # cap rounded down to the multiple; at least one
    assert round_roi([10, 50, 20], 16, 96, smallest=(32, 32, 32)) == [32, 48, 32]


def test_image_shape_follows_orientation_and_spacing_as_monai_resamples(tmp_path):
    import nibabel as nib
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    # voxel axes: 0 runs along S (2 mm), 1 along R (1 mm), 2 along A (0.5 mm)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 2.0, 1.0, 0.5, 1.0
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 20, 30), np.float32), affine), str(path))
    assert image_shape_ras(path) == (20.0, 30.0, 10.0)
    assert image_shape_ras(path, (1.0, 1.0, 1.0)) == (20.0, 15.5, 19.0)  # extent between voxel centres
    seen = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS"),
                    Spacing(pixdim=(1.0, 1.0, 1.0))])(str(path))  # fmt: skip
    assert tuple(seen.shape[1:]) == (20, 16, 19)  # what the preset's transforms give the network
    assert median_shape([path, path], (1.0, 1.0, 1.0)) == [20.0, 15.5, 19.0]
    with pytest.raises(MedTuneError, match="cannot read the image shape"):
        image_shape_ras(tmp_path / "missing.nii.gz")


@pytest.fixture(scope="module")
def seg24(tmp_path_factory) -> Path:
    from medtune.data.synthetic import make_synthetic_segmentation

    out = tmp_path_factory.mktemp("roi") / "seg24"
    make_synthetic_segmentation(out, n_train=3, n_val=2, size=24, seed=3)  # 24^3 voxels of 1 x 1 x 1.5 mm
    return out


def test_auto_patch_size_from_the_dataset(seg24):
    assert auto_patch_size("auto", str(seg24), "unet_zoo") == [16, 16, 16]  # multiple 16
    assert auto_patch_size("auto", str(seg24), "tiny_unet") == [24, 24, 24]  # multiple 4
    assert auto_patch_size("auto", str(seg24), "unet_zoo", spacing=[1.0, 1.0, 1.0]) == [16, 16, 32]  # 35.5 deep
    assert auto_patch_size("auto", str(seg24), "tiny_unet", roi_size_max=18) == [16, 16, 16]
    assert auto_patch_size("auto", str(seg24), "not-registered") == [32, 32, 32]  # unknown arch: multiple 32
    assert auto_patch_size([32, 48, 32], str(seg24), "unet_zoo") == [32, 48, 32]  # a list is used as given
    for bad in ("big", [0, 16, 16], [16, 16], [16.5, 16, 16]):
        with pytest.raises(MedTuneError, match="roi_size must be"):
            auto_patch_size(bad, str(seg24), "unet_zoo")


def test_run_records_the_derived_patch_and_rebuilds_with_it(seg24, tmp_path):
    from medtune.finetune.runner import LEGACY_3D_PATCH, finetune, read_run, run_overrides

    run = tmp_path / "run"
    base = {"arch": "tiny_unet", "pretrained": "none", "epochs": 1, "num_workers": 0, "roi_size_max": 20,
            "min_train_steps": 0}  # fmt: skip
    rec = finetune(seg24, "3d_segmentation", run, overrides=base, progress_bar=False)
    assert rec["status"] == "completed"
    recorded = json.loads((run / "run.json").read_text())["overrides"]
    assert recorded["patch_size"] == [20, 20, 20]  # 24^3 median, multiple 4, capped at 20
    assert run_overrides(run)[1]["patch_size"] == [20, 20, 20]  # what evaluate / export rebuild with
    pytest.importorskip("onnxruntime")
    from medtune.export.from_run import export_run

    export_run(run, tmp_path / "model", n_samples=1)  # real ONNX export, parity-checked by onnxruntime
    sidecar = json.loads((tmp_path / "model" / "model.json").read_text())
    assert sidecar["sliding_window"]["roi_size"] == [20, 20, 20]  # inference uses the same

    # a user's roi_size list is recorded and read back (a list where the config default is "auto")
    run2 = tmp_path / "run2"
    finetune(seg24, "3d_segmentation", run2, overrides={**base, "roi_size": [12, 12, 12]}, progress_bar=False)
    assert read_run(run2)["overrides"]["patch_size"] == [12, 12, 12]

    # a run recorded before roi_size auto (no patch_size): rebuilt at the fixed 64^3 it was trained with
    data = json.loads((run / "run.json").read_text())
    del data["overrides"]["patch_size"]
    (run / "run.json").write_text(json.dumps(data))
    assert run_overrides(run)[1]["patch_size"] == LEGACY_3D_PATCH


def test_hippocampus_gets_the_measured_recipe_patch_by_default():
    """MSD Hippocampus (real MR, shared data): ``auto`` gives 32x48x32 with ``unet_zoo``, the patch of
    ``benchmarks/results/hippocampus_recipe.md``."""
    from helpers import SHARED_DATA

    from medtune.weights import get_architecture

    images = sorted((SHARED_DATA / "hippocampus" / "imagesTr").glob("*.nii.gz"))
    if not images:
        pytest.skip(f"real data not found: {SHARED_DATA / 'hippocampus' / 'imagesTr'}")
    median = median_shape(images)
    assert round_roi(median, get_architecture("unet_zoo").size_multiple, 96) == [32, 48, 32]


def test_run_json_takes_the_documented_values_of_auto_keys(tmp_path):
    """``spacing=None`` (keep the native spacing), ``roi_size`` / ``spacing`` lists and intensity names replace an
    ``"auto"`` default when read back from run.json (a study's CT arm on MR once failed its evaluation here:
    ``spacing=None`` was refused as the wrong type)."""
    from medtune.finetune.runner import check_file_overrides

    good = {"spacing": None, "roi_size": [32, 48, 32], "intensity": "minmax", "ct_window": [-1000, 200]}
    check_file_overrides(good, "3d_segmentation", "train", tmp_path / "run.json")
    check_file_overrides({"spacing": [1.5, 1.5, 3.0]}, "3d_classification", "train", tmp_path / "run.json")
    with pytest.raises(MedTuneError, match="roi_size"):
        check_file_overrides({"roi_size": {"x": 1}}, "3d_segmentation", "train", tmp_path / "run.json")
