"""Transforms that exported bundles' configs call (``medtune export --format bundle``).

Written by hand because MONAI's ``SaveImaged`` needs image metadata (affine, spatial shape) that MedTune's 2D
loader (``LoadImageForModeld``, which reads PNG/DICOM/NIfTI the way the torch-free runtime does) does not attach;
3D bundles use MONAI's ``Invertd`` + ``SaveImaged``.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medtune.atomic import write_with


def _save_png(mask: np.ndarray, tmp: Path) -> None:
    from PIL import Image

    Image.fromarray(mask).save(tmp, "PNG")


class SaveLabelMap2Dd(MapTransform):
    """Write each item's label map ``keys`` (``(1, H, W)`` class indices, the network's input size) as
    ``output_dir/<image name>_seg.png`` (pixel value = class index), named after ``path_key``; written atomically."""

    def __init__(self, keys: KeysCollection, output_dir: str, path_key: str = "image_path") -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.path_key = path_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:

        d = dict(data)
        name = Path(str(d[self.path_key])).name
        for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        for key in self.key_iterator(d):
            arr = np.asarray(d[key].detach().cpu() if hasattr(d[key], "detach") else d[key])
            mask = np.squeeze(arr, 0).astype(np.uint8)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_with(self.output_dir / f"{name}_seg.png", functools.partial(_save_png, mask))
        return d
