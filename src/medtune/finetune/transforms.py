"""MONAI transforms specific to MedTune: loading through the runtime's readers.

The training pipeline reads images with the same torch-free readers the deployed runtime uses
(:mod:`medtune.runtime.readers`), so PNG/DICOM/NIfTI orientation and intensity handling are identical in
training and in deployment. (MONAI's ``LoadImage`` transposes PNGs to (W, H), which the runtime would then
have to mimic.)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

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


class Intensityd(MapTransform):
    """Intensity preset for scans: ``ct`` (window to [0, 1], clipped), ``mr`` (z-score over non-zero voxels,
    per channel), ``minmax`` (per-image min-max to [0, 1]) or ``none``; then ``(x - mean) / std`` when ``norm``
    (the pretrained source's statistics, :func:`medtune.finetune.bundle_glue.volume_norm`) is not the identity.
    Built from MONAI transforms (the normalization is one subtraction and division)."""

    def __init__(
        self,
        keys: KeysCollection,
        preset: str = "mr",
        window: Sequence[float] = (-175.0, 250.0),
        allow_missing_keys: bool = False,
        norm: Mapping[str, float] | None = None,
    ):
        from monai.transforms import NormalizeIntensity, ScaleIntensity, ScaleIntensityRange

        mean, std = (float(norm["mean"]), float(norm["std"])) if norm else (0.0, 1.0)
        # (x - mean) / std on the tensor (MetaTensor arithmetic keeps the metadata), as the runtime's normalize op
        self.norm: Callable[[Any], Any] | None = None if (mean, std) == (0.0, 1.0) else lambda x: (x - mean) / std

        super().__init__(keys, allow_missing_keys)
        self.op: Callable[[Any], Any] | None
        if preset == "ct":
            self.op = ScaleIntensityRange(
                a_min=float(window[0]), a_max=float(window[1]), b_min=0.0, b_max=1.0, clip=True
            )
        elif preset == "mr":
            self.op = NormalizeIntensity(nonzero=True, channel_wise=True)
        elif preset == "minmax":
            self.op = ScaleIntensity(minv=0.0, maxv=1.0)
        elif preset == "none":
            self.op = None
        else:
            raise ValueError(f"unknown intensity preset {preset!r}; use ct, mr, minmax or none")
        self.preset = preset

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.op is not None:
                d[key] = self.op(d[key])
            if self.norm is not None:
                d[key] = self.norm(d[key])
        return d


class OptionalSpacingd(MapTransform):
    """MONAI ``Spacingd`` when ``pixdim`` is given (resample to that voxel size), identity otherwise."""

    def __init__(
        self, keys: KeysCollection, pixdim: Sequence[float] | None = None, modes: Sequence[str] = ("bilinear",)
    ):
        from monai.transforms import Spacingd

        super().__init__(keys)
        self.op: Callable[[Any], Any] | None = (
            Spacingd(keys=keys, pixdim=pixdim, mode=list(modes)) if pixdim else None
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        return self.op(data) if self.op is not None else dict(data)


def volume_preprocessing_spec(
    intensity: str,
    window: Sequence[float],
    spacing: Sequence[float] | None,
    patch_size: Sequence[int],
    overlap: float,
    norm: Mapping[str, float] | None = None,
) -> dict:
    """The 3D preprocessing and sliding-window settings, as recorded in the model sidecar (``norm``: as
    :class:`Intensityd`'s, a ``normalize`` op after the intensity preset unless it is the identity)."""
    ops: list[dict] = [{"op": "orientation", "axcodes": "RAS"}]
    if spacing:
        ops.append({"op": "spacing", "pixdim": [float(s) for s in spacing], "mode": "bilinear"})
    if intensity == "ct":
        ops.append(
            {"op": "ct_window", "a_min": float(window[0]), "a_max": float(window[1]), "b_min": 0.0, "b_max": 1.0}
        )
    elif intensity == "mr":
        ops.append({"op": "zscore", "nonzero": True, "channel_wise": True})
    elif intensity == "minmax":
        ops.append({"op": "scale_intensity", "minv": 0.0, "maxv": 1.0})
    if norm and (float(norm["mean"]), float(norm["std"])) != (0.0, 1.0):
        ops.append({"op": "normalize", "mean": [float(norm["mean"])], "std": [float(norm["std"])]})
    return {
        "ops": ops,
        "sliding_window": {"roi_size": [int(p) for p in patch_size], "overlap": float(overlap), "mode": "gaussian"},
    }
