"""The table importer: images (+ masks) named by a CSV/TSV, opaque ids, patient-grouped splits, one-line row errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medtune.cli import main
from medtune.data import load_datalist, read_dataset_json, validate_dataset
from medtune.data.table_import import import_table
from medtune.errors import MedTuneError

LIDC = Path("/work/shared/data/lidc_nodules")
PATIENT = "PAT-SECRET-{:03d}"


def _nifti(path: Path, arr: np.ndarray, descrip: bytes = b"") -> None:
    img = nib.Nifti1Image(arr, np.diag([0.7, 0.7, 2.5, 1.0]))
    img.header["descrip"] = descrip
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


@pytest.fixture()
def spreadsheet(tmp_path: Path) -> tuple[Path, Path, Path]:
    """12 patients x 2 nodules; file names, header text and the patient column carry 'identifiers'."""
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    lines = ["file\tpatient_id\tmalignant\tscore"]
    for p in range(12):
        for n in range(2):
            name = f"{PATIENT.format(p)}_R_{n}.nii.gz"
            arr = rng.integers(-1000, 400, size=(8, 9, 4)).astype(np.int16)
            _nifti(images / name, arr, descrip=PATIENT.format(p).encode())
            _nifti(masks / name, (arr > 0).astype(np.uint8))
            lines.append(f"{name}\t{PATIENT.format(p)}\t{(p + n) % 2}\t{1 + (p % 5)}")
    table = tmp_path / "labels.tsv"
    table.write_text("\n".join(lines) + "\n")
    return images, masks, table


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    out = []
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            out.append((f, gzip.decompress(data) if f.name.endswith(".gz") else data))
    return out


def test_import_groups_patients_and_writes_no_identifier(spreadsheet, tmp_path: Path):
    images, masks, table = spreadsheet
    out = tmp_path / "ds"
    summary = import_table(
        images,
        table,
        out,
        file_column="file",
        label_column="malignant",
        group_column="patient_id",
        masks=masks,
        class_names=["benign", "malignant"],
        val_fraction=0.25,
    )
    assert summary["n_cases"] == 24 and summary["n_groups"] == 12 and summary["id_map"] is None
    info = read_dataset_json(out)
    assert (
        info["task"] == "classification"
        and info["spatial_dims"] == 3
        and info["labels"] == {0: "benign", 1: "malignant"}
    )
    train, val = load_datalist(out, "training"), load_datalist(out, "validation")
    assert len(train) + len(val) == 24 and len(val) == 6  # 3 of 12 patients (4 folds)
    assert not {e["group"] for e in train} & {e["group"] for e in val}  # no patient on both sides
    assert all(e["group"].startswith("g") and Path(out / e["mask"]).is_file() for e in train + val)
    assert {e["label"] for e in val} == {0, 1}
    for path, data in _all_bytes(out):  # nothing from file names, patient column or headers
        assert b"PAT-SECRET" not in data and b"SECRET" not in data, path
    # voxels, geometry and labels unchanged (the mapping is checked through the local id map of a second import)
    out2 = tmp_path / "ds2"
    summary2 = import_table(
        images,
        table,
        out2,
        file_column="file",
        label_column="malignant",
        group_column="patient_id",
        keep_id_map=True,
    )
    id_map = json.loads(Path(summary2["id_map"]).read_text())
    for entry in load_datalist(out2, "training")[:5]:
        case = Path(entry["image"]).name.split(".")[0]
        src = nib.load(str(images / id_map["cases"][case]["file"]))
        dst = nib.load(entry["image"])
        np.testing.assert_array_equal(np.asarray(src.dataobj), np.asarray(dst.dataobj))
        np.testing.assert_allclose(src.affine, dst.affine)
        assert dst.get_data_dtype() == np.int16 and dst.header["descrip"] == b""
    validate_dataset(out2)  # images readable, labels declared


def test_integer_scores_and_string_labels_map_to_classes(spreadsheet, tmp_path: Path):
    images, _, table = spreadsheet
    s = import_table(images, table, tmp_path / "a", file_column="file", label_column="score", group_column="patient_id")
    assert s["labels"] == {0: "1", 1: "2", 2: "3", 3: "4", 4: "5"}


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda rows: rows.__setitem__(3, rows[3].replace("_R_0.nii.gz", "_R_9.nii.gz", 1)),
            r"row 4: file .* not found",
        ),
        (lambda rows: rows.__setitem__(5, rows[2]), r"row 6: file .* already listed on row 3"),
        (lambda rows: rows.__setitem__(2, "\t".join(rows[2].split("\t")[:2] + ["", "1"])), r"row 3: empty label"),
        (lambda rows: rows.__setitem__(2, rows[2] + "\textra"), r"row 3: 5 cells, the header has 4"),
        (lambda rows: rows.__setitem__(2, "../x.nii.gz\tp\t1\t1"), r"row 3: file .* outside the images folder"),
    ],
)
def test_bad_rows_give_one_line_naming_the_row(spreadsheet, tmp_path: Path, edit, match):
    images, _, table = spreadsheet
    rows = table.read_text().splitlines()
    edit(rows)
    table.write_text("\n".join(rows) + "\n")
    with pytest.raises(MedTuneError, match=match) as err:
        import_table(images, table, tmp_path / "o", file_column="file", label_column="malignant")
    assert "\n" not in str(err.value) and str(table) in str(err.value)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_unknown_label_and_missing_column(spreadsheet, tmp_path: Path):
    images, _, table = spreadsheet
    with pytest.raises(MedTuneError, match=r"row 2: label '\d' is not one of the classes"):
        import_table(images, table, tmp_path / "o", file_column="file", label_column="malignant", classes=["x", "y"])
    with pytest.raises(MedTuneError, match="no column 'patient'"):
        import_table(
            images, table, tmp_path / "o", file_column="file", label_column="malignant", group_column="patient"
        )


def test_missing_mask_names_the_row(spreadsheet, tmp_path: Path):
    images, masks, table = spreadsheet
    victim = sorted(masks.iterdir())[0]
    victim.unlink()
    with pytest.raises(MedTuneError, match=r"row \d+: no mask of the same name"):
        import_table(images, table, tmp_path / "o", file_column="file", label_column="malignant", masks=masks)


def test_cli_table_import_and_bad_row_exit_code(spreadsheet, tmp_path: Path, capsys):
    images, masks, table = spreadsheet
    argv = [
        "dataset",
        "import",
        "--from",
        "table",
        "--images",
        str(images),
        "--table",
        str(table),
        "--file-column",
        "file",
        "--label-column",
        "malignant",
        "--group-column",
        "patient_id",
        "--out",
    ]
    assert main([*argv, str(tmp_path / "ok")]) == 0
    assert json.loads(capsys.readouterr().out)["n_groups"] == 12
    table.write_text(table.read_text() + "missing.nii.gz\tp\t1\t1\n")
    assert main([*argv, str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 26: file 'missing.nii.gz' not found" in err


@pytest.mark.slow  # the real LIDC table: 17 s at load 6
@pytest.mark.skipif(not (LIDC / "labels.csv").is_file(), reason="real LIDC crops not present (../shared/data)")
def test_real_lidc_import_is_patient_grouped_and_carries_no_lidc_id(tmp_path: Path):
    out = tmp_path / "lidc"
    s = import_table(
        LIDC / "images",
        LIDC / "labels.csv",
        out,
        file_column="file",
        label_column="malignant",
        group_column="patient_id",
        masks=LIDC / "masks",
        class_names=["benign", "malignant"],
    )
    assert s["n_cases"] == 677 and s["n_groups"] == 378
    train, val = load_datalist(out, "training"), load_datalist(out, "validation")
    assert not {e["group"] for e in train} & {e["group"] for e in val}
    assert 0.15 < len(val) / 677 < 0.25 and sum(e["label"] for e in train + val) == 233
    for path, data in _all_bytes(out):
        assert b"LIDC-IDRI" not in data, path
