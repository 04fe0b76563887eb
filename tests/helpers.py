"""Helpers shared by several test files (not a test module: pytest does not collect it; tests import it)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# the public data sets beside the checkout (../shared/data), or where $MEDTUNE_SHARED_DATA points; tests skip without
SHARED_DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
CONFIGS = REPO / "monai_bundle" / "configs"
SLICER_MODULE = REPO / "slicer_extension" / "MedTune"  # MedTuneLib, the Slicer module's Qt-free logic

# a tiny 2D classification run: overrides for ``finetune(..., overrides=...)``
TINY_OVERRIDES = {
    "arch": "tiny_cnn",
    "pretrained": "none",
    "epochs": 2,
    "batch_size": 8,
    "num_workers": 0,
    "image_size": [32, 32],
}

def write_volume_classification(ds: Path, n: int = 16, n_val: int = 4) -> Path:
    """A tiny 3D classification dataset: noisy 16x16x12 NIfTI volumes (2 mm slices) with a bright cube, small
    (label 0) or large (label 1) in turn. The last ``n_val`` cases are the validation split; ``n_val=0``: training
    cases only, as a dataset labelled in Slicer holds them."""
    import nibabel as nib

    from medtune.data import create_dataset, write_datalist

    create_dataset(ds, name="vols", task="classification", spatial_dims=3, labels={0: "small", 1: "large"},
                   modality="synthetic", synthetic=True)  # fmt: skip
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n):
        vol = rng.normal(0, 1, (16, 16, 12)).astype(np.float32)
        r = 3 if i % 2 else 1
        vol[8 - r : 8 + r, 8 - r : 8 + r, 6 - r : 6 + r] += 4
        nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), ds / "images" / f"case_{i:04d}.nii.gz")
        entries.append({"image": f"images/case_{i:04d}.nii.gz", "label": i % 2})
    split = {"training": entries[: n - n_val], "validation": entries[n - n_val :]} if n_val else {"training": entries}
    write_datalist(ds, split)
    return ds


def member_mean_probabilities(member_onnx: list[str | Path], x: np.ndarray) -> np.ndarray:
    """Mean softmax probability of separately exported member ONNX files on a batch (the oracle of a fold
    ensemble's export)."""
    import onnxruntime as ort

    from medtune.runtime.model import softmax

    probs = []
    for path in member_onnx:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs.append(softmax(sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float64), axis=1))
    return np.mean(probs, axis=0)


# --- a synthetic DICOM MR series ------------------------------------------------------------------------
# sagittal: rows run along +y (posterior), columns along -z (inferior), normal = -x
SYN_IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
SYN_PS = [0.8, 0.6]  # (row spacing, column spacing)
SYN_ROWS, SYN_COLS, SYN_SLICES = 6, 5, 4


def syn_slice(k: int, series_uid: str, iop: list[float] = SYN_IOP):
    """Slice ``k`` of the synthetic series (pixel value ``1000 k + 10 row + col``, slope 2, intercept -5)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = "MR", "SYN-001", "Synthetic^Patient"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3.4", series_uid, "1.2.3.5"
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = iop
    ds.ImagePositionPatient = [10.0 - 2.5 * k, -20.0, 30.0]  # steps along the normal (-x)
    ds.PixelSpacing = SYN_PS
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = SYN_ROWS, SYN_COLS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -5
    r, c = np.mgrid[:SYN_ROWS, :SYN_COLS]
    ds.PixelData = (1000 * k + 10 * r + c).astype(np.uint16).tobytes()
    return ds


def save_dicom(ds, path: Path) -> None:
    """Save as a conformant DICOM file with pydicom 3.x (``enforce_file_format``) or 2.4 (Slicer 5.10)."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


def write_syn_series(folder: Path, n: int = SYN_SLICES, series_uid: str | None = None) -> str:
    """Write ``n`` slices of the synthetic series into ``folder`` in shuffled file order; return its UID."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    order = list(range(n))
    random.Random(0).shuffle(order)  # file names say nothing about slice order
    for name_idx, k in enumerate(order):
        save_dicom(syn_slice(k, series_uid), folder / f"img{name_idx:03d}_{series_uid[-4:]}.dcm")
    return series_uid


def assert_nifti_same_but_text(original: Path, copy: Path) -> None:
    """``copy`` holds ``original``'s voxel bytes and every header field bit for bit, except the free-text fields
    (blanked), the extensions (dropped) and ``vox_offset`` (moved to the header's end): what
    :func:`medtune.nifti.deidentified_nifti` promises."""
    import gzip
    import io

    import nibabel as nib

    from medtune.nifti import TEXT_FIELDS

    def parts(path: Path) -> tuple[object, bytes]:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        klass = nib.Nifti2Header if int.from_bytes(raw[:4], "little") == 540 else nib.Nifti1Header
        header = klass.from_fileobj(io.BytesIO(raw), check=False)
        return header, raw[int(header["vox_offset"]) :]

    (h0, data0), (h1, data1) = parts(original), parts(copy)
    assert data1 == data0, "voxel bytes differ"
    assert len(h1.extensions) == 0 and int(h1["vox_offset"]) in (352, 544)
    for key in h0.keys():
        if key in TEXT_FIELDS:
            assert h1[key].item() == b"", key
        elif key != "vox_offset":
            assert h1[key].tobytes() == h0[key].tobytes(), key
