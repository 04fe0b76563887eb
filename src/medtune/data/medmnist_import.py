"""Import a MedMNIST dataset (``.npz``, read with the ``medmnist`` package's own classes) as a dataset folder.

Cases are numbered ``case_0001, ...`` in npz order: train, then val, then test. 2D images become PNG (grey or
RGB as stored), 3D volumes NIfTI (raw uint8 voxels, identity affine).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from medtune.data.contract import create_dataset, save_nifti, save_png, staged_folder, validate_dataset, write_datalist
from medtune.errors import MedTuneError, one_line

SPLIT_NAMES = {"train": "training", "val": "validation", "test": "testing"}

#: the clinically "positive" class where a binary MedMNIST set has one (sensitivity is reported for it)
POSITIVE_LABEL = {"breastmnist": 0, "pneumoniamnist": 1}

MODALITIES = {
    "pathmnist": "histopathology",
    "chestmnist": "XR",
    "dermamnist": "dermoscopy",
    "octmnist": "OCT",
    "pneumoniamnist": "XR",
    "retinamnist": "fundus photography",
    "breastmnist": "US",
    "bloodmnist": "microscopy",
    "tissuemnist": "microscopy",
    "organamnist": "CT",
    "organcmnist": "CT",
    "organsmnist": "CT",
    "organmnist3d": "CT",
    "nodulemnist3d": "CT",
    "adrenalmnist3d": "CT",
    "fracturemnist3d": "CT",
    "vesselmnist3d": "MRA",
    "synapsemnist3d": "electron microscopy",
}

CITATION = (
    "Please cite: Jiancheng Yang, Rui Shi, Donglai Wei, Zequan Liu, Lin Zhao, Bilian Ke, Hanspeter Pfister, "
    "Bingbing Ni. MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image "
    "classification. Scientific Data, 2023; and Jiancheng Yang, Rui Shi, Bingbing Ni. MedMNIST Classification "
    "Decathlon: A Lightweight AutoML Benchmark for Medical Image Analysis. IEEE ISBI, 2021; and the source "
    "dataset named above."
)


def import_medmnist(
    name: str,
    root: str | Path | None,
    out: str | Path,
    size: int | None = None,
    download: bool = False,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> dict[str, Any]:
    """Write MedMNIST ``name`` (e.g. ``"breastmnist"``) from ``root`` as a dataset folder at ``out``.

    ``root`` holds ``<name>[_<size>].npz`` (``None``: medmnist's default ``~/.medmnist``). Splits absent from
    the npz are skipped with a note on stderr. ``out`` is built in a temp folder and renamed at the end; an
    existing non-empty ``out`` is refused. Returns ``{"out", "name", "splits": {split: {"n", "class_counts"}},
    "skipped": [...]}``.
    """
    import medmnist  # lazy: imports torch

    flag = name.lower().removeprefix("medmnist:")
    if flag not in medmnist.INFO:
        raise MedTuneError(f"unknown MedMNIST dataset {name!r} (known: {', '.join(medmnist.INFO)})")
    info = medmnist.INFO[flag]
    _check_task(flag, info["task"])
    cls = getattr(medmnist, info["python_class"])
    size_flag = _size_flag(flag, cls, size)
    bad = [s for s in splits if s not in SPLIT_NAMES]
    if bad:
        raise MedTuneError(f"unknown MedMNIST split(s) {bad} (expected train, val, test)")
    root = Path(root) if root is not None else Path(medmnist.info.DEFAULT_ROOT)
    npz = root / f"{flag}{size_flag}.npz"
    out = Path(out)
    with staged_folder(out) as tmp:  # refuses a non-empty ``out`` before any work
        _fetch(cls, info, npz, size, download)
        spatial_dims = 3 if flag.endswith("3d") else 2
        create_dataset(
            tmp,
            name=f"{info['python_class']}{size_flag}",
            task="classification",
            spatial_dims=spatial_dims,
            labels={int(k): v for k, v in info["label"].items()},
            modality=MODALITIES.get(flag, "unknown"),
            channels=int(info["n_channels"]),
            description=_description(info),
            source=f"medmnist:{flag}",
            synthetic=False,
            license=info.get("license", "CC BY 4.0"),
            positive_label=POSITIVE_LABEL.get(flag),
        )
        datalist, skipped = _write_cases(tmp, cls, npz, size, splits, spatial_dims)
        if not datalist.get("training"):
            raise MedTuneError("has no 'train' split to import", npz)
        write_datalist(tmp, datalist)
        summary = validate_dataset(tmp, splits=tuple(datalist), check_images=False)
    return {"out": str(out.absolute()), "name": flag, "splits": summary, "skipped": skipped}


def _check_task(flag: str, task: str) -> None:
    if task.startswith("multi-label"):
        raise MedTuneError(f"medmnist:{flag} is a {task} task; only single-label classification is supported now")
    if task not in ("binary-class", "multi-class", "ordinal-regression"):
        raise MedTuneError(f"medmnist:{flag} has unsupported task {task!r}")
    # ordinal-regression (RetinaMNIST grades 0-4) maps trivially onto multi-class: one integer class per case


def _size_flag(flag: str, cls: Any, size: int | None) -> str:
    """medmnist's file-name suffix: ``""`` for 28 px, ``"_64"`` etc. otherwise."""
    if size is None or size == 28:
        return ""
    if size not in cls.available_sizes:
        raise MedTuneError(f"medmnist:{flag} has no size {size} (available: {cls.available_sizes})")
    return f"_{size}"


def _fetch(cls: Any, info: dict[str, Any], npz: Path, size: int | None, download: bool) -> None:
    """Make sure ``npz`` exists, downloading it (medmnist's own downloader) when asked."""
    if npz.is_file():
        return
    url = info.get(f"url{npz.stem.removeprefix(cls.flag)}", info.get("url", ""))
    if not download:
        raise MedTuneError(
            f"MedMNIST file not found (looked in {npz.parent}); put {npz.name} there (from {url}) "
            "or pass download=True (needs internet)",
            npz,
        )
    npz.parent.mkdir(parents=True, exist_ok=True)
    try:
        cls(split="train", root=str(npz.parent), size=size, download=True)
    except Exception as exc:  # noqa: BLE001 - medmnist raises a multi-line RuntimeError
        raise MedTuneError(
            f"download failed ({type(exc).__name__}); fetch {url} by hand into {npz.parent}", npz
        ) from exc


def _load_split(cls: type, npz: Path, size: int | None, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Images and labels of one split via the medmnist class; ``None`` when the npz has no such split."""
    try:
        ds = cls(split=split, root=str(npz.parent), size=size, download=False)
    except KeyError:  # numpy's NpzFile: '<split>_images is not a file in the archive'
        return None
    except Exception as exc:  # noqa: BLE001 - corrupt npz, bad zip, ...
        msg = one_line(exc)
        raise MedTuneError(f"cannot read MedMNIST file ({msg[:160]})", npz) from exc
    # ds.imgs / ds.labels are medmnist's arrays; len(ds) is avoided because it asserts the official counts
    return np.asarray(ds.imgs), np.asarray(ds.labels)


def _write_cases(
    tmp: Path, cls: type, npz: Path, size: int | None, splits: tuple[str, ...], spatial_dims: int
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    datalist: dict[str, list[dict[str, Any]]] = {}
    skipped: list[str] = []
    case = 0
    for split in ("train", "val", "test"):
        if split not in splits:
            continue
        loaded = _load_split(cls, npz, size, split)
        if loaded is None:
            print(f"note: {npz.name} has no '{split}' split; skipped", file=sys.stderr)
            skipped.append(split)
            continue
        imgs, labels = loaded
        if labels.ndim != 2 or labels.shape[1] != 1 or len(labels) != len(imgs):
            raise MedTuneError(f"{split}_labels has shape {labels.shape}, expected ({len(imgs)}, 1)", npz)
        entries = datalist[SPLIT_NAMES[split]] = []
        for img, label in zip(imgs, labels, strict=True):
            case += 1
            entries.append({"image": _write_image(tmp, case, img, spatial_dims), "label": int(label[0])})
    return datalist, skipped


def _write_image(tmp: Path, case: int, img: np.ndarray, spatial_dims: int) -> str:
    if spatial_dims == 2:
        rel = f"images/case_{case:04d}.png"
        save_png(img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0), tmp / rel)
    else:
        rel = f"images/case_{case:04d}.nii.gz"
        save_nifti(np.asarray(img), tmp / rel)
    return rel


def _description(info: dict[str, Any]) -> str:
    return f"Imported from MedMNIST ({info['python_class']}). {info['description']} {CITATION}"
