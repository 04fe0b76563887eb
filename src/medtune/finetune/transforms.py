"""MONAI transforms specific to MedTune: loading through the runtime's readers.

The training pipeline reads images with the same torch-free readers the deployed runtime uses
(:mod:`medtune.runtime.readers`), so PNG/DICOM/NIfTI orientation and intensity handling are identical in
training and in deployment. (MONAI's ``LoadImage`` transposes PNGs to (W, H), which the runtime would then
have to mimic.)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medtune.runtime.preprocess import to_channels
from medtune.runtime.readers import read_image


class LoadImageForModeld(MapTransform):
    """Read ``keys`` paths into channel-first float32 arrays with ``channels`` channels."""

    def __init__(
        self, keys: KeysCollection, spatial_dims: int = 2, channels: int = 1, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            img = read_image(str(path), spatial_dims=self.spatial_dims)
            d[key] = np.ascontiguousarray(to_channels(img.array, self.channels))
            d[f"{key}_path"] = str(path)
        return d


def as_list(value: Sequence[int] | int, n: int) -> list[int]:
    """Broadcast an int to an n-list."""
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
