"""3D segmentation data: MSD import (medtune.data.import_msd) and the geometry checks (medtune.data.geometry)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import SHARED_DATA, assert_nifti_same_but_text

from medtune.data import (
    add_case,
    check_pair,
    create_dataset,
    import_msd,
    load_datalist,
    read_dataset_json,
    validate_dataset,
)
from medtune.errors import MedTuneError

SHARED_HIPPOCAMPUS = SHARED_DATA / "hippocampus"
SHAPE = (16, 16, 16)
SPACING = (1.0, 1.0, 1.5)
MSD_LABELS = {"0": "background", "1": "left", "2": "right"}


def make_affine(
    spacing: tuple[float, float, float] = SPACING, shift: tuple[float, ...] = (-10.0, 20.0, 5.0)
) -> np.ndarray:
    """A non-identity affine: a rotation about z (30 degrees), a flip of y, ``spacing`` and an origin ``shift``."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = shift
    return affine


AFFINE = make_affine()


def save(arr: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def good_case(seed: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = SHAPE if channels == 1 else (*SHAPE, channels)
    image = rng.normal(100, 20, shape).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[4:8, 4:10, 5:9] = 1
    label[9:12, 3:7, 2:12] = 2
    return image, label


def msd_folder(
    root: Path,
    n: int = 5,
    msd_json: dict | None = None,
    channels: int = 1,
    bad: Callable[[Path, Path], None] | None = None,
) -> tuple[Path, Path]:
    """An MSD-style ``root/imagesTr`` + ``root/labelsTr`` of ``n`` cases ``tiny_001..``, with macOS ``._*`` junk.

    ``bad(image_path, label_path)`` overwrites case ``tiny_003`` after it was written.
    """
    images, labels = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(1, n + 1):
        image, label = good_case(i, channels)
        save(image, images / f"tiny_{i:03d}.nii.gz")
        save(label, labels / f"tiny_{i:03d}.nii.gz")
    for folder in (images, labels):
        (folder / "._tiny_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")
    if msd_json is not None:
        (root / "dataset.json").write_text(json.dumps(msd_json))
    if bad is not None:
        bad(images / "tiny_003.nii.gz", labels / "tiny_003.nii.gz")
    return images, labels


def one_line_error(excinfo: pytest.ExceptionInfo[MedTuneError], path: Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    return msg


# ------------------------------------------------------------------------------------------------ import


def test_import_msd_round_trip(tmp_path: Path) -> None:
    msd = {"name": "Tiny", "labels": MSD_LABELS, "modality": {"0": "MRI"}, "licence": "CC-BY-SA 4.0"}
    images, labels = msd_folder(tmp_path / "Task99_Tiny", n=5, msd_json=msd)
    out = tmp_path / "ds"

    summary = import_msd(images, labels, out)

    assert summary["n_cases"] == 5 and summary["channels"] == 1 and summary["copied"] == 10
    assert summary["labels"] == {0: "background", 1: "left", 2: "right"}
    assert summary["splits"] == {"training": {"n": 4, "class_counts": {}}, "validation": {"n": 1, "class_counts": {}}}
    meta = read_dataset_json(out)
    assert (meta["task"], meta["spatial_dims"], meta["channels"], meta["name"]) == ("segmentation", 3, 1, "Tiny")
    assert (meta["modality"], meta["license"], meta["synthetic"]) == ("MRI", "CC-BY-SA 4.0", False)
    assert meta["labels"] == {0: "background", 1: "left", 2: "right"}
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"case_{i:04d}.nii.gz" for i in range(1, 6)]
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"case_{i:04d}.nii.gz" for i in range(1, 6)]

    # opaque ids only: no original name anywhere in the shared JSON; the mapping stays in .medtune_local
    for name in ("dataset.json", "datalist.json"):
        assert "tiny_" not in (out / name).read_text()
    id_map = json.loads((out / ".medtune_local/id_map.json").read_text())
    assert "LOCAL ONLY" in id_map["note"]
    assert id_map["cases"]["case_0003"] == {"image": "tiny_003.nii.gz", "label": "tiny_003.nii.gz"}
    assert summary["id_map"] == str(out / ".medtune_local/id_map.json")
    assert (out / ".medtune_local/.gitignore").read_text().endswith("*\n")

    datalist = json.loads((out / "datalist.json").read_text())
    entries = datalist["training"] + datalist["validation"]
    assert {e["fold"] for e in datalist["validation"]} == {0} and all(e["fold"] > 0 for e in datalist["training"])
    for e in entries:
        case = e["image"].split("/")[1].split(".")[0]
        assert e["label"] == f"labels/{case}.nii.gz"
        src = id_map["cases"][case]["image"]
        for kind, folder in (("image", images), ("label", labels)):
            orig, copy = nib.load(str(folder / src)), nib.load(str(out / e[kind]))
            np.testing.assert_array_equal(np.asarray(copy.dataobj), np.asarray(orig.dataobj))
            np.testing.assert_allclose(copy.affine, orig.affine)
            np.testing.assert_allclose(copy.affine, AFFINE, atol=1e-5)
            assert copy.header.get_zooms() == pytest.approx(SPACING)
            assert_nifti_same_but_text(folder / src, out / e[kind])  # voxels + geometry bit for bit
    assert validate_dataset(out) == summary["splits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Task99_Tiny", "ds"]  # no temp folder left behind


def test_split_is_deterministic_and_seeded(tmp_path: Path) -> None:
    images, labels = msd_folder(tmp_path / "msd", n=10)
    lists = {}
    for out, seed in (("a", 0), ("b", 0), ("c", 7)):
        import_msd(images, labels, tmp_path / out, seed=seed, label_names={1: "one", 2: "two"})
        lists[out] = (tmp_path / out / "datalist.json").read_text()
    assert lists["a"] == lists["b"]
    assert lists["a"] != lists["c"]
    datalist = json.loads(lists["a"])
    assert (len(datalist["training"]), len(datalist["validation"])) == (8, 2)
    folds = [e["fold"] for e in datalist["training"] + datalist["validation"]]
    assert sorted(folds) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # five equal folds; fold 0 is the validation split
    assert read_dataset_json(tmp_path / "a")["labels"] == {0: "background", 1: "one", 2: "two"}


def test_labels_found_multichannel_and_link(tmp_path: Path) -> None:
    """No MSD dataset.json and no names: ``class N`` for the values found; 4D images give channels; hard links."""
    images, labels = msd_folder(tmp_path / "msd", n=3, channels=2)
    out = tmp_path / "ds"
    summary = import_msd(images, labels, out, name="two-channel", modality="MR", val_fraction=0.0, link=True)
    meta = read_dataset_json(out)
    assert meta["labels"] == {0: "background", 1: "class 1", 2: "class 2"}
    assert (meta["channels"], meta["modality"], meta["name"]) == (2, "MR", "two-channel")
    assert summary["linked"] + summary["copied"] == 6
    if summary["linked"]:
        assert (out / "images/case_0001.nii.gz").samefile(images / "tiny_001.nii.gz")
    assert set(json.loads((out / "datalist.json").read_text())) == {"training"}
    assert validate_dataset(out)["training"]["n"] == 3


def test_refuses_non_empty_out_and_unmatched_files(tmp_path: Path) -> None:
    images, labels = msd_folder(tmp_path / "msd", n=3)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MedTuneError) as excinfo:
        import_msd(images, labels, out)
    assert "not empty" in one_line_error(excinfo, out.absolute())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    (labels / "tiny_002.nii.gz").unlink()
    with pytest.raises(MedTuneError) as excinfo:
        import_msd(images, labels, tmp_path / "new")
    assert "no label file" in one_line_error(excinfo, images / "tiny_002.nii.gz")
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------- bad inputs


def _write_image(image: np.ndarray, affine: np.ndarray = AFFINE) -> Callable[[Path, Path], None]:
    def write(img: Path, _lab: Path) -> None:
        save(image, img, affine)

    return write


def _write_label(label: np.ndarray, affine: np.ndarray = AFFINE) -> Callable[[Path, Path], None]:
    def write(_img: Path, lab: Path) -> None:
        save(label, lab, affine)

    return write


_IMG, _LAB = good_case(3)
_NAN = _IMG.copy()
_NAN[3, 4, 5] = np.nan
_FIVE = _LAB.copy()
_FIVE[0, 0, 0] = 5
_HALF = _LAB.astype(np.float32)
_HALF[1, 1, 1] = 0.5

BAD_CASES = {
    "shape": (_write_label(_LAB[:, :, :15]), "label", "label shape (16, 16, 15) differs from image shape (16, 16, 16)"),
    "spacing": (_write_label(_LAB, make_affine((1.0, 1.0, 2.0))), "label", "label spacing (1, 1, 2) differs"),
    "affine": (_write_label(_LAB, make_affine(shift=(-10.0, 25.0, 5.0))), "label", "label affine"),
    "orientation": (_write_label(_LAB, make_affine() @ np.diag([-1.0, 1, 1, 1])), "label", "label orientation"),
    "undeclared": (_write_label(_FIVE), "label", "label values [5] not in declared labels [0, 1, 2]"),
    "4d": (_write_image(np.stack([_IMG, _IMG], -1)), "image", "is a 4D volume (shape (16, 16, 16, 2)) where a 3D"),
    "nan": (_write_image(_NAN), "image", "image holds 1 NaN or Inf voxel(s)"),
    "non_integer": (_write_label(_HALF), "label", "label map holds non-integer values (e.g. [0.5])"),
}


@pytest.mark.parametrize("kind", list(BAD_CASES))
def test_bad_case_stops_import(tmp_path: Path, kind: str) -> None:
    bad, which, words = BAD_CASES[kind]
    images, labels = msd_folder(tmp_path / "msd", n=5, msd_json={"labels": MSD_LABELS}, bad=bad)
    out = tmp_path / "out"
    with pytest.raises(MedTuneError) as excinfo:
        import_msd(images, labels, out)
    folder = images if which == "image" else labels
    msg = one_line_error(excinfo, folder / "tiny_003.nii.gz")
    assert words in msg
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["msd"]  # no temp folder either


def test_validate_dataset_catches_corruption_after_import(tmp_path: Path) -> None:
    images, labels = msd_folder(tmp_path / "msd", n=5, msd_json={"labels": MSD_LABELS})
    out = tmp_path / "ds"
    import_msd(images, labels, out)
    assert validate_dataset(out)["training"]["n"] == 4
    target = out / "labels/case_0002.nii.gz"
    save(_FIVE, target)
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(out)
    assert "label values [5] not in declared labels [0, 1, 2]" in one_line_error(excinfo, target)
    save(_LAB, target, make_affine(shift=(0.0, 0.0, 0.0)))  # right values, moved origin
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(out)
    assert "not aligned with its image" in one_line_error(excinfo, target)
    save(_LAB, target)
    image = out / "images/case_0004.nii.gz"
    save(_NAN, image)
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(out)
    assert "NaN" in one_line_error(excinfo, image)
    assert validate_dataset(out, check_images=False)["training"]["n"] == 4  # existence-only check passes


def test_check_pair_tolerates_float_noise(tmp_path: Path) -> None:
    """Spacing/affine differences far below 1e-3 of a voxel (float32 header round-off) are not mismatches."""
    image, label = good_case(0)
    noisy = AFFINE.copy()
    noisy[:3, :] += 2e-5
    img = save(image, tmp_path / "img.nii.gz")
    lab = save(label.astype(np.float32), tmp_path / "lab.nii.gz", noisy)  # integer-valued floats are fine
    assert check_pair(img, lab, {0, 1, 2}) == {0, 1, 2}
    assert check_pair(img, lab, None) == {0, 1, 2}


def test_2d_segmentation_validation(tmp_path: Path) -> None:
    root = create_dataset(
        tmp_path / "seg2d", name="s", task="segmentation", spatial_dims=2, labels={0: "bg", 1: "fg"}, modality="US"
    )
    rng = np.random.default_rng(0)
    add_case(root, rng.integers(0, 256, (12, 10), dtype=np.uint8), label=(rng.random((12, 10)) > 0.5).astype(np.uint8))
    assert validate_dataset(root)["training"]["n"] == 1
    label = Path(load_datalist(root)[0]["label"])
    save(np.full((12, 10), 0.25, np.float32), label, np.eye(4))
    with pytest.raises(MedTuneError) as excinfo:
        validate_dataset(root)
    assert "non-integer" in one_line_error(excinfo, label)


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (SHARED_HIPPOCAMPUS / "imagesTr").is_dir(),
    reason=f"real MSD Task04 Hippocampus copy not found at {SHARED_HIPPOCAMPUS} (imagesTr/labelsTr)",
)
@pytest.mark.slow  # 200 real cases imported twice; the same import path runs on synthetic cases in the fast set
def test_import_real_hippocampus(tmp_path: Path) -> None:
    has_json = (SHARED_HIPPOCAMPUS / "dataset.json").is_file()
    names = None if has_json else {1: "anterior", 2: "posterior"}
    out = tmp_path / "hippocampus"
    summary = import_msd(
        SHARED_HIPPOCAMPUS / "imagesTr", SHARED_HIPPOCAMPUS / "labelsTr", out, label_names=names, link=True
    )
    assert summary["n_cases"] == 200 and summary["channels"] == 1
    meta = read_dataset_json(out)
    assert len(meta["labels"]) == 3 and meta["spatial_dims"] == 3 and meta["task"] == "segmentation"
    assert [n.lower() for n in meta["labels"].values()] == ["background", "anterior", "posterior"]
    assert {k: v["n"] for k, v in summary["splits"].items()} == {"training": 160, "validation": 40}
    first = json.loads((out / "datalist.json").read_text())
    again = tmp_path / "again"
    import_msd(SHARED_HIPPOCAMPUS / "imagesTr", SHARED_HIPPOCAMPUS / "labelsTr", again, label_names=names, link=True)
    assert json.loads((again / "datalist.json").read_text()) == first  # fixed split
    assert validate_dataset(out) == summary["splits"]  # every pair passes the geometry checks


# ------------------------------------------------------------------------ NIfTI header text (privacy, issue 12)

IDENTIFIERS = (b"DOE^JOHN", b"MRN12345", b"john_doe", b"1961-04-02", b"DOE_JOHN")


def _identifying_nifti(src: Path, dst: Path, seed: int) -> Path:
    """A copy of the NIfTI ``src`` whose header names a patient in every text field, in a comment extension and in
    the gzip member's file name (as `gzip` and some scanners' converters write it); voxels and geometry unchanged."""
    import gzip
    import io

    img = nib.load(str(src))
    header = img.header.copy()
    header["descrip"] = b"DOE^JOHN MRN12345 1961-04-02"
    header["aux_file"] = b"john_doe.txt"
    header["intent_name"] = b"MRN12345"
    header["db_name"] = b"DOE^JOHN"
    header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=DOE^JOHN PatientID=MRN12345"))
    out = nib.Nifti1Image(np.asarray(img.dataobj.get_unscaled()), img.affine, header=header)
    buf = io.BytesIO()
    with gzip.GzipFile(filename=f"DOE_JOHN_{seed}.nii", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(out.to_bytes())
    dst.write_bytes(buf.getvalue())
    return dst


def _assert_no_identifier(root: Path) -> None:
    import gzip

    for path in root.rglob("*"):
        if not path.is_file() or ".medtune_local" in path.parts:
            continue
        raw = path.read_bytes()
        for data in (raw, gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw):
            for ident in IDENTIFIERS:
                assert ident not in data, (path, ident)


def _real_or_synthetic_case(tmp_path: Path) -> tuple[Path, Path]:
    """A real MSD Hippocampus image/label pair (their headers hold text: descrip '5.0.10', aux_file 'none') when
    the shared data is here, else a synthetic pair written by nibabel."""
    real = sorted((SHARED_HIPPOCAMPUS / "imagesTr").glob("hippocampus_*.nii.gz"))
    if real:
        return real[0], SHARED_HIPPOCAMPUS / "labelsTr" / real[0].name
    image, label = good_case(7)
    return save(image, tmp_path / "img.nii.gz"), save(label, tmp_path / "lab.nii.gz")


def test_msd_import_removes_identifying_header_text_and_keeps_voxels_and_geometry(tmp_path: Path) -> None:
    image, label = _real_or_synthetic_case(tmp_path)
    images, labels = tmp_path / "msd" / "imagesTr", tmp_path / "msd" / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in (1, 2, 3):
        _identifying_nifti(image, images / f"case{i}.nii.gz", i)
        _identifying_nifti(label, labels / f"case{i}.nii.gz", i)
    out = tmp_path / "ds"
    summary = import_msd(images, labels, out, label_names={1: "anterior", 2: "posterior"}, link=True)
    assert summary["linked"] == 0 and summary["copied"] == 6  # files with identifiers are never linked
    removed = summary["header_text_removed"]
    for field in ("descrip", "aux_file", "intent_name", "db_name", "gzip file name", "1 header extension(s)"):
        assert removed[field] == 6, removed
    _assert_no_identifier(out)
    for i, case in enumerate(sorted((out / "images").iterdir()), 1):
        src = images / f"case{i}.nii.gz"
        assert_nifti_same_but_text(src, case)
        a, b = nib.load(str(src)), nib.load(str(case))
        assert np.array_equal(a.affine, b.affine) and a.header.get_qform(coded=True)[1] == b.header.get_qform(True)[1]
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert validate_dataset(out) == summary["splits"]


def test_msd_import_links_files_without_header_text(tmp_path: Path) -> None:
    images, labels = msd_folder(tmp_path / "msd", n=3)  # nibabel-written: no text, no extension, no gzip name
    summary = import_msd(images, labels, tmp_path / "ds", val_fraction=0.0, link=True)
    assert summary["header_text_removed"] == {}
    assert summary["linked"] + summary["copied"] == 6


def test_add_case_removes_identifying_nifti_header_text(tmp_path: Path) -> None:
    image, label = _real_or_synthetic_case(tmp_path)
    root = create_dataset(tmp_path / "ds", name="d", task="segmentation", spatial_dims=3, modality="MR",
                          labels={0: "background", 1: "a", 2: "b"})  # fmt: skip
    src = _identifying_nifti(image, tmp_path / "DOE_JOHN.nii.gz", 1)
    lab = _identifying_nifti(label, tmp_path / "DOE_JOHN_label.nii.gz", 2)
    case = add_case(root, src, label=lab)
    _assert_no_identifier(root)
    entry = load_datalist(root, "training")[0]
    assert_nifti_same_but_text(src, root / entry["image"])
    assert_nifti_same_but_text(lab, root / entry["label"])
    assert case
