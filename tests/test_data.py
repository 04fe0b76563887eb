"""Dataset folder contract, MedMNIST import and synthetic data (medtune.data)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED_DATA
from PIL import Image

from medtune.data import (
    add_case,
    create_dataset,
    import_medmnist,
    load_datalist,
    make_synthetic_classification,
    new_case_id,
    read_dataset_json,
    validate_dataset,
    write_datalist,
)
from medtune.errors import MedTuneError
from medtune.runtime.readers import read_image

needs_medmnist = pytest.mark.skipif(
    importlib.util.find_spec("medmnist") is None, reason="medmnist (training extra) not installed: importer untested"
)
SHARED_MEDMNIST = SHARED_DATA / "medmnist"


def one_line_error(excinfo: pytest.ExceptionInfo[MedTuneError], path: Path) -> str:
    """The error's message, after checking it is one line starting with ``path``."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    return msg


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_npz(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """An npz in MedMNIST's layout: ``<split>_images`` (uint8) and ``<split>_labels`` of shape (N, 1)."""
    arrays = {}
    for split, (imgs, labels) in splits.items():
        arrays[f"{split}_images"] = imgs.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    np.savez_compressed(path, **arrays)


def small_dataset(root: Path, n: int = 4) -> Path:
    """A 2-class grey PNG dataset with ``n`` training and 2 validation cases, built with add_case."""
    create_dataset(root, name="tiny", task="classification", spatial_dims=2, labels={0: "neg", 1: "pos"}, modality="XR")
    rng = np.random.default_rng(0)
    for i in range(n):
        add_case(root, rng.integers(0, 256, (16, 20), dtype=np.uint8), label=i % 2)
    for i in range(2):
        add_case(root, rng.integers(0, 256, (16, 20), dtype=np.uint8), label=i % 2, split="validation")
    return root


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    summary = make_synthetic_classification(out, n_train=40, n_val=20, size=32, seed=1)
    assert summary["out"] == str(out)
    assert summary["splits"] == {
        "training": {"n": 40, "class_counts": {0: 20, 1: 20}},
        "validation": {"n": 20, "class_counts": {0: 10, 1: 10}},
    }
    assert validate_dataset(out) == summary["splits"]
    meta = read_dataset_json(out)
    assert meta["synthetic"] is True and "SYNTHETIC" in meta["description"]
    assert meta["labels"] == {0: "no lesion", 1: "lesion"} and meta["task"] == "classification"
    entries = load_datalist(out, "training")
    assert all(Path(e["image"]).is_absolute() for e in entries)
    arr = read_image(entries[0]["image"], 2).array
    assert arr.shape == (1, 32, 32) and arr.std() > 5
    images = [read_image(e["image"], 2).array for e in load_datalist(out, "validation")]
    assert len({a.tobytes() for a in images}) == 20  # all different
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]  # no temp folder left behind
    assert (out.stat().st_mode & 0o777) != 0o700  # the staging folder's mode follows the umask


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = make_synthetic_classification(tmp_path / "a", n_train=6, n_val=2, size=24, seed=3)
    b = make_synthetic_classification(tmp_path / "b", n_train=6, n_val=2, size=24, seed=3)
    make_synthetic_classification(tmp_path / "c", n_train=6, n_val=2, size=24, seed=4)
    assert a["splits"] == b["splits"]
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    assert tree(tmp_path / "a") != tree(tmp_path / "c")


def test_synthetic_lesion_is_visible(tmp_path: Path) -> None:
    """Class 1 images hold a bright round blob: on average their brightest 3x3 patch is brighter."""
    out = tmp_path / "syn"
    make_synthetic_classification(out, n_train=60, n_val=2, size=48, seed=0)
    peaks: dict[int, list[float]] = {0: [], 1: []}
    for e in load_datalist(out):
        a = read_image(e["image"], 2).array[0]
        windows = np.lib.stride_tricks.sliding_window_view(a, (5, 5)).mean(axis=(-1, -2))
        peaks[e["label"]].append(float(windows.max()))
    assert np.mean(peaks[1]) > np.mean(peaks[0])


# -------------------------------------------------------------------------------------------- MedMNIST


@pytest.mark.slow  # the medmnist package import: 9 s at load 6
@needs_medmnist
def test_import_medmnist_tiny_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (6, 28, 28)), np.array([0, 1, 1, 0, 1, 1]))
    val = (rng.integers(0, 256, (4, 28, 28)), np.array([1, 0, 0, 1]))
    root = tmp_path / "medmnist"
    root.mkdir()
    write_npz(root / "breastmnist.npz", {"train": train, "val": val})  # no test split, like the shared copy
    out = tmp_path / "ds"

    summary = import_medmnist("breastmnist", root, out)

    assert "no 'test' split" in capsys.readouterr().err
    assert summary["skipped"] == ["test"]
    assert summary["splits"] == {
        "training": {"n": 6, "class_counts": {0: 2, 1: 4}},
        "validation": {"n": 4, "class_counts": {0: 2, 1: 2}},
    }
    meta = read_dataset_json(out)
    assert meta["labels"] == {0: "malignant", 1: "normal, benign"}
    assert (meta["modality"], meta["source"], meta["license"]) == ("US", "medmnist:breastmnist", "CC BY 4.0")
    assert "MedMNIST v2" in meta["description"] and meta["synthetic"] is False
    datalist = json.loads((out / "datalist.json").read_text())
    assert set(datalist) == {"training", "validation"}
    for split, (imgs, labels) in (("training", train), ("validation", val)):
        entries = load_datalist(out, split)
        assert [e["label"] for e in entries] == labels.tolist()
        for e, img in zip(entries, imgs, strict=True):
            assert Path(e["image"]).name.startswith("case_") and e["image"].endswith(".png")
            np.testing.assert_array_equal(np.asarray(Image.open(e["image"])), img.astype(np.uint8))
    assert validate_dataset(out, splits=("training", "validation", "testing")) == summary["splits"]


@needs_medmnist
def test_import_medmnist_rgb_size_suffix_with_test_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    splits = {
        s: (rng.integers(0, 256, (n, 64, 64, 3)), rng.integers(0, 7, n))
        for s, n in (("train", 5), ("val", 2), ("test", 3))
    }
    write_npz(tmp_path / "dermamnist_64.npz", splits)  # medmnist names sized files <flag>_<size>.npz

    summary = import_medmnist("DermaMNIST", tmp_path, tmp_path / "derma", size=64)

    assert {k: v["n"] for k, v in summary["splits"].items()} == {"training": 5, "validation": 2, "testing": 3}
    meta = read_dataset_json(tmp_path / "derma")
    assert meta["channels"] == 3 and meta["modality"] == "dermoscopy" and len(meta["labels"]) == 7
    assert meta["license"] == "CC BY-NC 4.0"  # taken from medmnist.INFO, not assumed
    testing = load_datalist(tmp_path / "derma", "testing")
    assert [e["label"] for e in testing] == splits["test"][1].tolist()  # test labels kept
    np.testing.assert_array_equal(np.asarray(Image.open(testing[2]["image"])), splits["test"][0][2].astype(np.uint8))
    assert read_image(testing[0]["image"], 2).array.shape == (3, 64, 64)


@needs_medmnist
def test_import_medmnist_3d_writes_nifti(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    vols = rng.integers(0, 256, (3, 28, 28, 28))
    write_npz(tmp_path / "nodulemnist3d.npz", {"train": (vols, np.array([0, 1, 0]))})
    summary = import_medmnist("nodulemnist3d", tmp_path, tmp_path / "nod", splits=("train",))
    assert summary["splits"]["training"]["class_counts"] == {0: 2, 1: 1}
    assert read_dataset_json(tmp_path / "nod")["spatial_dims"] == 3
    e = load_datalist(tmp_path / "nod")[1]
    assert e["image"].endswith(".nii.gz")
    np.testing.assert_array_equal(read_image(e["image"], 3).array[0], vols[1])


@needs_medmnist
def test_import_medmnist_missing_npz_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(MedTuneError) as excinfo:
        import_medmnist("pneumoniamnist", tmp_path, tmp_path / "out", size=128)
    msg = one_line_error(excinfo, tmp_path / "pneumoniamnist_128.npz")
    assert f"looked in {tmp_path}" in msg and "download=True" in msg and "zenodo" in msg
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@needs_medmnist
def test_import_medmnist_refuses_multilabel_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(MedTuneError, match="multi-label"):
        import_medmnist("chestmnist", tmp_path, tmp_path / "out")
    with pytest.raises(MedTuneError, match="unknown MedMNIST dataset 'nosuchmnist'"):
        import_medmnist("nosuchmnist", tmp_path, tmp_path / "out")
    with pytest.raises(MedTuneError, match="no size 100"):
        import_medmnist("breastmnist", tmp_path, tmp_path / "out", size=100)


@needs_medmnist
@pytest.mark.skipif(
    not (SHARED_MEDMNIST / "breastmnist.npz").is_file(),
    reason=f"real BreastMNIST copy not found at {SHARED_MEDMNIST / 'breastmnist.npz'}",
)
def test_import_real_breastmnist(tmp_path: Path) -> None:
    out = tmp_path / "breast"
    summary = import_medmnist("breastmnist", SHARED_MEDMNIST, out)
    with np.load(SHARED_MEDMNIST / "breastmnist.npz") as npz:
        train_labels = npz["train_labels"][:, 0]
        first = npz["train_images"][0]
    assert summary["splits"]["training"]["n"] == 546 and summary["splits"]["validation"]["n"] == 78
    assert summary["splits"]["training"]["class_counts"] == {
        0: int((train_labels == 0).sum()),
        1: int((train_labels == 1).sum()),
    }
    assert summary["skipped"] == ["test"]
    assert validate_dataset(out) == summary["splits"]  # every PNG readable as a 1-channel 2D image
    np.testing.assert_array_equal(np.asarray(Image.open(load_datalist(out)[0]["image"])), first)


# -------------------------------------------------------------------------------------- contract basics


def test_add_case_new_case_id_and_formats(tmp_path: Path) -> None:
    root = small_dataset(tmp_path / "ds", n=3)
    assert new_case_id(root) == "case_0006"
    e16 = add_case(root, np.full((8, 8), 4000, dtype=np.uint16), label=1)
    ef = add_case(root, np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), label=0, split="testing")
    e_none = add_case(root, np.zeros((8, 8), np.uint8), split="testing")
    assert e16 == {"image": "images/case_0006.png", "label": 1}
    assert ef["image"] == "images/case_0007.nii.gz" and "label" not in e_none
    assert read_image(root / e16["image"], 2).array.max() == 4000
    np.testing.assert_allclose(read_image(root / ef["image"], 2).array[0], np.linspace(0, 1, 64).reshape(8, 8))
    summary = validate_dataset(root, splits=("training", "validation", "testing"))
    assert summary["training"] == {"n": 4, "class_counts": {0: 2, 1: 2}}
    assert summary["testing"]["n"] == 2
    with pytest.raises(MedTuneError, match="label 5 not in declared classes"):
        add_case(root, np.zeros((8, 8), np.uint8), label=5)
    with pytest.raises(MedTuneError, match="needs a label"):
        add_case(root, np.zeros((8, 8), np.uint8))
    assert new_case_id(root) == "case_0009"  # refused cases left no files


def test_segmentation_dataset(tmp_path: Path) -> None:
    root = create_dataset(
        tmp_path / "seg",
        name="seg",
        task="segmentation",
        spatial_dims=3,
        labels={0: "background", 1: "organ"},
        modality="CT",
    )
    vol = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    mask = (vol > 1).astype(np.uint8)
    entry = add_case(root, vol, label=mask)
    assert entry == {"image": "images/case_0001.nii.gz", "label": "labels/case_0001.nii.gz"}
    assert load_datalist(root)[0]["label"] == str(root / "labels/case_0001.nii.gz")
    assert validate_dataset(root) == {"training": {"n": 1, "class_counts": {}}}
    with pytest.raises(MedTuneError, match="mask shape"):
        add_case(root, vol, label=mask[:-1])
    with pytest.raises(MedTuneError, match=r"mask values \[2\]"):
        add_case(root, vol, label=mask * 2)
    (root / "labels/case_0001.nii.gz").unlink()
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(root)
    assert "label file not found" in one_line_error(excinfo, root / "labels/case_0001.nii.gz")


def test_write_datalist_keeps_previous_version(tmp_path: Path) -> None:
    root = small_dataset(tmp_path / "ds", n=2)
    for kept in (root / ".versions").iterdir():
        kept.unlink()
    before = (root / "datalist.json").read_text()
    new = {
        "training": load_datalist(root, absolute=False)[:1],
        "validation": load_datalist(root, "validation", absolute=False),
    }
    write_datalist(root, new)
    kept = list((root / ".versions").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("datalist.json.")
    assert kept[0].read_text() == before
    assert json.loads((root / "datalist.json").read_text()) == new


def test_create_dataset_refuses_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(MedTuneError) as excinfo:
        create_dataset(foreign, name="x", task="classification", spatial_dims=2, labels={0: "a"}, modality="XR")
    assert "not empty" in one_line_error(excinfo, foreign)
    assert tree(foreign) == {"notes.txt": b"keep me"}
    with pytest.raises(MedTuneError, match="unknown task 'detection'"):
        create_dataset(tmp_path / "new", name="x", task="detection", spatial_dims=2, labels={0: "a"}, modality="XR")


# ------------------------------------------------------------------------------------------ bad inputs


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    root = small_dataset(tmp_path / "ds")
    (root / "images/case_0003.png").unlink()
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(root)
    msg = one_line_error(excinfo, root / "images/case_0003.png")
    assert "image file not found" in msg and "training[2]" in msg


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = small_dataset(tmp_path / "ds")
    (root / "images/case_0002.png").write_bytes(b"\x00garbage, not a png" * 10)
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(root)
    assert "unreadable png image" in one_line_error(excinfo, root / "images/case_0002.png")
    assert validate_dataset(root, check_images=False)["training"]["n"] == 4  # existence-only check passes


def test_wrong_channel_count_names_the_file(tmp_path: Path) -> None:
    root = small_dataset(tmp_path / "ds")
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(root / "images/case_0001.png")
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(root)
    assert "3 channel(s), dataset.json declares 1" in one_line_error(excinfo, root / "images/case_0001.png")


def test_label_outside_declared_classes(tmp_path: Path) -> None:
    root = small_dataset(tmp_path / "ds")
    data = json.loads((root / "datalist.json").read_text())
    data["training"][3]["label"] = 7
    data["validation"][0]["label"] = "pos"
    write_datalist(root, data)
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(root)
    msg = one_line_error(excinfo, root / "datalist.json")
    assert "training[3] (images/case_0004.png): label 7 not in declared classes [0, 1]" in msg
    assert msg.endswith("(and 1 more problems)")


def test_duplicate_image_across_splits(tmp_path: Path) -> None:
    root = small_dataset(tmp_path / "ds")
    data = json.loads((root / "datalist.json").read_text())
    data["validation"].append(dict(data["training"][0]))
    write_datalist(root, data)
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(root)
    assert "image also listed as training[0]" in one_line_error(excinfo, root / "datalist.json")


def test_empty_or_missing_split(tmp_path: Path) -> None:
    root = small_dataset(tmp_path / "ds")
    data = json.loads((root / "datalist.json").read_text())
    write_datalist(root, {"training": data["training"], "validation": []})
    for split, words in (("validation", "'validation' is empty"), ("testing", "'testing' not found")):
        with pytest.raises(MedTuneError) as excinfo:
            load_datalist(root, split)
        assert words in one_line_error(excinfo, root / "datalist.json")
    with pytest.raises(MedTuneError, match="'validation' is empty"):
        validate_dataset(root)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "invalid JSON"),
        (
            '{"format": "medtune.dataset/1", "name": "x", "task": "regression", "spatial_dims": 2, "channels": 1, '
            '"labels": {"0": "a"}, "modality": "XR"}',
            "unknown task 'regression'",
        ),
        (
            '{"format": "medtune.dataset/1", "name": "x", "task": "classification", "spatial_dims": 2, "channels": 1,'
            ' "labels": {"zero": "a"}, "modality": "XR"}',
            "'labels' key 'zero' is not an integer",
        ),
        (
            '{"format": "medtune.dataset/1", "name": "x", "task": "classification", "spatial_dims": 4, "channels": 1,'
            ' "labels": {"0": "a"}, "modality": "XR"}',
            "spatial_dims must be 2 or 3",
        ),
        ('["a list"]', "must hold a JSON object"),
    ],
)
def test_invalid_dataset_json(tmp_path: Path, content: str, words: str) -> None:
    root = small_dataset(tmp_path / "ds")
    (root / "dataset.json").write_text(content)
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(root)
    assert words in one_line_error(excinfo, root / "dataset.json")


def test_missing_dataset_json(tmp_path: Path) -> None:
    with pytest.raises(MedTuneError) as excinfo:
        read_dataset_json(tmp_path)
    assert "not found" in one_line_error(excinfo, tmp_path / "dataset.json")


@needs_medmnist
def test_existing_non_empty_out_is_refused_and_untouched(tmp_path: Path) -> None:
    write_npz(tmp_path / "breastmnist.npz", {"train": (np.zeros((2, 28, 28)), np.array([0, 1]))})
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.nii.gz").write_bytes(b"user data")
    for build in (
        lambda: import_medmnist("breastmnist", tmp_path, out),
        lambda: make_synthetic_classification(out, n_train=2, n_val=2),
    ):
        with pytest.raises(MedTuneError) as excinfo:
            build()
        assert "not empty" in one_line_error(excinfo, out)
        assert tree(out) == {"precious.nii.gz": b"user data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["breastmnist.npz", "out"]  # no temp folders


@needs_medmnist
def test_failed_import_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "breastmnist.npz").write_bytes(b"not a zip file")
    out = tmp_path / "empty_out"
    out.mkdir()  # an existing empty folder is fine to fill, and survives a failure
    with pytest.raises(MedTuneError) as excinfo:
        import_medmnist("breastmnist", tmp_path, out)
    assert "cannot read MedMNIST file" in one_line_error(excinfo, tmp_path / "breastmnist.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["breastmnist.npz", "empty_out"]
    assert list(out.iterdir()) == []
