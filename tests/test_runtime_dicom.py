"""DICOM series reader (geometry, decoders, broken files) and DICOM SEG writer."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import SHARED_DATA, SYN_COLS, SYN_ROWS, SYN_SLICES, save_dicom, syn_slice, write_syn_series
from pydicom.uid import generate_uid

from medtune.errors import MedTuneError
from medtune.runtime.dicom import read_dicom_series, write_dicom_seg


def _seg_writer_available() -> bool:
    try:
        import highdicom
    except ImportError:
        return False
    return tuple(int(p) for p in highdicom.__version__.split(".")[:2]) >= (0, 23)


needs_seg_writer = pytest.mark.skipif(
    not _seg_writer_available(), reason="highdicom>=0.23 (needs pydicom>=3) not installed: DICOM SEG output untested"
)

REAL_MR = SHARED_DATA / "dicom" / "tcia_brain_tumor_progression_mr"
T1POST = "Study3/11-T1post-18670"
HCROP = "Study1/13_HCropVolume"

def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)  # offline: pydicom's own files + pydicom-data
    if path is None:
        pytest.skip(f"{name} not available offline (pip install pydicom-data)")
    return Path(path)


def _real(sub: str) -> Path:
    folder = REAL_MR / sub
    if not folder.is_dir():
        pytest.skip(f"real MR DICOM series not present at {folder} (shared data is optional)")
    return folder


# --- geometry -------------------------------------------------------------------------------------------


def test_synthetic_series_geometry_and_values(tmp_path, caplog):
    import nibabel as nib

    folder = tmp_path / "syn"
    write_syn_series(folder)
    (folder / "notes.txt").write_text("not DICOM")
    with caplog.at_level("DEBUG"):
        s = read_dicom_series(folder)
    assert "skipped 1" in caplog.text and "notes.txt" not in caplog.text and "SYN-001" not in caplog.text
    assert s.shape == (SYN_COLS, SYN_ROWS, SYN_SLICES)
    assert s.spacing == pytest.approx((0.6, 0.8, 2.5))
    # hand-derived: i -> +y*0.6 (LPS) = -y RAS; j -> -z*0.8; k -> -x*2.5 LPS = +x RAS; origin LPS (10,-20,30)
    expected = np.array([[0, 0, 2.5, -10], [-0.6, 0, 0, 20], [0, -0.8, 0, 30], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(s.affine, expected, atol=1e-6)
    assert nib.aff2axcodes(s.affine) == ("P", "I", "R")
    i, j, k = np.meshgrid(range(SYN_COLS), range(SYN_ROWS), range(SYN_SLICES), indexing="ij")
    np.testing.assert_array_equal(s.array, 2.0 * (1000 * k + 10 * j + i) - 5)  # rescale applied, frames transposed
    assert [f.name for f in s.skipped] == ["notes.txt"]
    assert [int(d.InstanceNumber) for d in s.datasets] == [1, 2, 3, 4]
    # nibabel keeps the geometry
    nib.save(nib.Nifti1Image(s.array, s.affine), tmp_path / "vol.nii.gz")
    back = nib.load(tmp_path / "vol.nii.gz")
    np.testing.assert_allclose(back.affine, s.affine, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_real_series_geometry_matches_each_file():
    from nibabel.nicom import dicomwrappers

    folder = _real(T1POST)
    s = read_dicom_series(folder)
    first = pydicom.dcmread(s.files[0], stop_before_pixels=True)
    assert s.shape == (int(first.Columns), int(first.Rows), len(list(folder.glob("*.dcm"))))
    assert s.spacing[:2] == pytest.approx((float(first.PixelSpacing[1]), float(first.PixelSpacing[0])))
    assert 1.0 < s.spacing[2] < 10.0 and s.array.dtype == np.float32 and s.array.max() > 0
    for k, path in enumerate(s.files):  # voxel (0, 0, k) sits at each file's ImagePositionPatient (LPS -> RAS)
        ipp = np.array([float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient])
        np.testing.assert_allclose(s.affine @ [0, 0, k, 1], [-ipp[0], -ipp[1], ipp[2], 1], atol=1e-3)
    # nibabel's single-slice wrapper indexes (row, col): same vectors, first two columns swapped
    w = dicomwrappers.wrapper_from_file(str(s.files[0]))
    np.testing.assert_allclose(s.affine_lps[:3, [1, 0, 3]], w.affine[:3, [0, 1, 3]], atol=1e-4)
    np.testing.assert_array_equal(s.array[:, :, 0], np.asarray(w.get_data(), dtype=np.float32).T)


@needs_seg_writer
def test_real_series_agrees_with_highdicom_volume():
    import highdicom as hd

    s = read_dicom_series(_real(T1POST))
    vol = hd.get_volume_from_series([pydicom.dcmread(f) for f in s.files])
    # highdicom: (slice, row, col) LPS; compare voxel positions of a few corners
    nz = s.shape[2]
    kk = [0, nz - 1] if np.allclose(vol.affine @ [0, 0, 0, 1], s.affine_lps @ [0, 0, 0, 1], atol=1e-3) else [nz - 1, 0]
    for i, j, k in [(0, 0, 0), (s.shape[0] - 1, 0, 0), (0, s.shape[1] - 1, nz - 1), (3, 7, 5)]:
        hk = k if kk[0] == 0 else nz - 1 - k
        np.testing.assert_allclose(s.affine_lps @ [i, j, k, 1], vol.affine @ [hk, j, i, 1], atol=1e-3)
        assert s.array[i, j, k] == pytest.approx(float(vol.array[hk, j, i]))


def test_all_real_series_load():
    root = _real("")
    folders = sorted({p.parent for p in root.glob("*/*/*.dcm")})
    assert len(folders) >= 2
    for folder in folders:
        s = read_dicom_series(folder)
        assert s.shape[2] == len(s.files) == len(list(folder.glob("*.dcm")))
        assert np.isclose(abs(np.linalg.det(s.affine[:3, :3])), np.prod(s.spacing), rtol=1e-3)


# --- decoders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_pairs_decode_like_uncompressed(tmp_path, compressed):
    ref, enc = tmp_path / "ref", tmp_path / "enc"
    ref.mkdir(), enc.mkdir()
    shutil.copy(_testdata("MR_small.dcm"), ref / "a.dcm")
    shutil.copy(_testdata(compressed), enc / "a.dcm")
    assert pydicom.dcmread(enc / "a.dcm").file_meta.TransferSyntaxUID.is_compressed
    a, b = read_dicom_series(ref), read_dicom_series(enc)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def test_jpeg_lossless_decodes_to_reference_values(tmp_path):
    """JPEG Lossless (process 14 SV1) needs pylibjpeg-libjpeg; values from pydicom's own pixel test suite."""
    cases = {
        "JPEG-LL.dcm": [
            (400, slice(124, 132), (60, 58, 61, 68, 59, 65, 64, 67)),
            (600, slice(124, 132), (3, 1, 2, 0, 2, 1, 2, 0)),
        ],
        "JPGLosslessP14SV1_1s_1f_8b.dcm": [
            (300, slice(512, 520), (26, 26, 25, 22, 19, 16, 14, 15)),
            (600, slice(512, 520), (45, 43, 41, 38, 33, 30, 26, 21)),
        ],
    }
    for name, checks in cases.items():
        ds = pydicom.dcmread(_testdata(name))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
        ds.PixelSpacing = ds.get("PixelSpacing") or [1, 1]
        folder = tmp_path / name
        folder.mkdir()
        ds.save_as(folder / "x.dcm")  # pixel data stays JPEG Lossless encapsulated
        s = read_dicom_series(folder)
        for row, cols, values in checks:
            assert tuple(s.array[cols, row, 0].astype(int)) == values


def test_jpeg_ls_reencoded_real_series_is_identical(tmp_path):
    from pydicom.uid import JPEGLSLossless

    if int(pydicom.__version__.split(".")[0]) < 3:
        pytest.skip("pydicom < 3 has no JPEG-LS encoder (decoding is tested with pydicom's JPEG-LS files)")

    src = _real(HCROP)
    enc = tmp_path / "jls"
    enc.mkdir()
    for f in src.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.compress(JPEGLSLossless)
        ds.save_as(enc / f.name)
    a, b = read_dicom_series(src), read_dicom_series(enc)
    assert pydicom.dcmread(b.files[0]).file_meta.TransferSyntaxUID == JPEGLSLossless
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


# --- broken input ---------------------------------------------------------------------------------------


def _assert_one_line_naming(exc: pytest.ExceptionInfo, name: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and name in msg, msg


@pytest.mark.parametrize("cut", [0.5, 0.9, None])
def test_truncated_dicom_is_a_one_line_error(tmp_path, cut):
    folder = tmp_path / "series"
    if cut is None:  # pydicom's own deliberately truncated MR file (a series of its own)
        folder.mkdir()
        victim = folder / "mr.dcm"
        shutil.copy(_testdata("MR_truncated.dcm"), victim)
    else:
        write_syn_series(folder)
        victim = sorted(folder.glob("*.dcm"))[1]
        raw = victim.read_bytes()
        victim.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(MedTuneError) as exc:
        read_dicom_series(folder)
    _assert_one_line_naming(exc, victim.name)


def test_header_truncated_dicom_is_an_error(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    raw = _testdata("MR_small.dcm").read_bytes()
    for n in (140, 600):
        (folder / "cut.dcm").write_bytes(raw[:n])
        with pytest.raises(MedTuneError) as exc:
            read_dicom_series(folder)
        _assert_one_line_naming(exc, "cut.dcm")


def test_several_series_need_a_uid(tmp_path):
    uid_a = write_syn_series(tmp_path, series_uid=generate_uid())
    uid_b = write_syn_series(tmp_path, n=2, series_uid=generate_uid())
    with pytest.raises(MedTuneError) as exc:
        read_dicom_series(tmp_path)
    text = str(exc.value)  # counts only: UIDs identify a patient's study and never appear in messages
    assert "2 DICOM series" in text and "own folder" in text and "\n" not in text
    assert uid_a not in text and uid_b not in text and "series_instance_uid" not in text
    assert read_dicom_series(tmp_path, series_instance_uid=uid_b).shape == (SYN_COLS, SYN_ROWS, 2)


def test_inconsistent_series_names_the_odd_file(tmp_path):
    uid = write_syn_series(tmp_path / "a")
    odd = tmp_path / "a" / "odd.dcm"
    save_dicom(syn_slice(SYN_SLICES, uid, iop=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]), odd)
    with pytest.raises(MedTuneError) as exc:
        read_dicom_series(tmp_path / "a")
    _assert_one_line_naming(exc, "odd.dcm")
    # a missing slice breaks the regular grid
    uid = write_syn_series(tmp_path / "b", n=1)
    for k in (1, 3):
        save_dicom(syn_slice(k, uid), tmp_path / "b" / f"s{k}.dcm")
    with pytest.raises(MedTuneError, match="uneven slice spacing"):
        read_dicom_series(tmp_path / "b")


# --- DICOM SEG ------------------------------------------------------------------------------------------


@pytest.mark.skipif(_seg_writer_available(), reason="a DICOM SEG writer is installed")
def test_dicom_seg_without_highdicom_023_is_one_line(tmp_path):
    """Slicer 5.10 (pydicom 2.4): reading works; DICOM SEG output says in one line what it needs."""
    folder = tmp_path / "syn"
    write_syn_series(folder)
    s = read_dicom_series(folder)
    label = np.zeros(s.shape, np.uint8)
    label[0, 0, 0] = 1
    with pytest.raises(MedTuneError, match=r"needs highdicom>=0\.23") as err:
        write_dicom_seg(label, s, {1: "a"}, tmp_path / "x.dcm")
    assert "\n" not in str(err.value) and not (tmp_path / "x.dcm").exists()


@needs_seg_writer
def test_dicom_seg_roundtrip_on_real_series(tmp_path):
    import highdicom as hd
    from pydicom.uid import SegmentationStorage

    s = read_dicom_series(_real(T1POST))
    label = np.zeros(s.shape, np.uint8)
    label[100:140, 120:170, 5:9] = 1
    label[150:180, 60:90, 12:14] = 3  # class 2 absent -> no segment for it
    out = write_dicom_seg(
        label, s, {1: "tumor core", 2: "edema", 3: "enhancing"}, tmp_path / "out" / "seg.dcm", algorithm_version="1.2.3"
    )
    assert out == tmp_path / "out" / "seg.dcm" and [p.name for p in out.parent.iterdir()] == ["seg.dcm"]

    raw = pydicom.dcmread(out)
    assert raw.SOPClassUID == SegmentationStorage and raw.Modality == "SEG"
    assert raw.StudyInstanceUID == s.datasets[0].StudyInstanceUID  # required by the standard
    seg = hd.seg.Segmentation.from_dataset(raw)
    assert seg.number_of_segments == 2
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["tumor core", "enhancing"]
    alg = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "MedTune" and alg.AlgorithmVersion == "1.2.3"
    assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == s.series_instance_uid
    assert raw.SeriesInstanceUID != s.series_instance_uid
    uids = [str(d.SOPInstanceUID) for d in s.datasets]
    got = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True, relabel=False)
    expected = np.transpose(np.where(label == 3, 2, label), (2, 1, 0))  # segment numbers, (Z, rows, cols)
    np.testing.assert_array_equal(got, expected)


@needs_seg_writer
def test_dicom_seg_rejects_bad_label_maps(tmp_path):
    folder = tmp_path / "syn"
    write_syn_series(folder)
    s = read_dicom_series(folder)
    with pytest.raises(MedTuneError, match="does not match"):
        write_dicom_seg(np.zeros((2, 2, 2), np.uint8), s, {1: "a"}, tmp_path / "x.dcm")
    with pytest.raises(MedTuneError, match="empty"):
        write_dicom_seg(np.zeros(s.shape, np.uint8), s, {1: "a"}, tmp_path / "x.dcm")
    label = np.zeros(s.shape, np.uint8)
    with pytest.raises(MedTuneError, match="negative"):
        write_dicom_seg(np.full(s.shape, -1, np.int16), s, {1: "a"}, tmp_path / "x.dcm")
    label[1, 1, 1] = 4
    with pytest.raises(MedTuneError, match="class_names"):
        write_dicom_seg(label, s, {1: "a"}, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    label[0, 0, 0] = 1
    out = write_dicom_seg(label, s, {1: "a", 4: "b"}, tmp_path / "x.dcm")
    assert pydicom.dcmread(out).PatientID == "SYN-001"


def test_dicom_module_is_torch_free(tmp_path):
    code = (
        "import sys\n"
        "import medtune.runtime.dicom\n"
        "try:\n    import highdicom  # noqa: F401\nexcept ImportError:\n    pass\n"
        "bad = [m for m in ('torch', 'monai') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)
